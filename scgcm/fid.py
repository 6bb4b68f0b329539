"""FID: Inception statistics, the Fréchet distance, sharded feature extraction and the CLI.

    python -m scgcm.fid ref [--source S] [--split train] [--out stats.npz]
    python -m scgcm.fid calc SAMPLES [--ref stats.npz | --source S]

SAMPLES is an `.npz` (key "images", else its first array) or a folder of PNGs, uint8 NHWC at any
size (samples in [-1, 1] go through `scgcm.inception.to_uint8` first). Reference statistics of a
dataset are cached next to the weights, keyed by source and split. See fid.md for the standard.
"""

import hashlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import scipy.linalg
import tyro
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, UInt8

from scgcm import inception
from scgcm.precision_recall import K, precision_recall, subsample

Stats = tuple[np.ndarray, np.ndarray]


def compute_statistics(features: np.ndarray) -> Stats:
    """Mean and covariance (float64, `np.cov(rowvar=False)`) of [N, d] features."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}), with ε·I added to both Σ if the root is not finite."""
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(Σ₁Σ₂) has a large imaginary part: {np.abs(covmean.imag).max()}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _extract(net: eqx.Module, images: UInt8[Array, "b h w 3"]) -> Float[Array, "b d"]:
    return net(inception.preprocess(images))


class FeatureExtractor:
    """uint8 NHWC images (any size) → [N, 2048] features, in batches sharded over `devices`.

    The batch is split along a 1-D mesh axis "data"; the network is replicated. Each batch is
    padded (by repeating the last image) to a fixed size, a multiple of the device count."""

    def __init__(self, net: eqx.Module, *, batch_size: int = 256,
                 devices: Sequence[jax.Device] | None = None, progress: bool = False):
        devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.net = jax.device_put(net, NamedSharding(self.mesh, PartitionSpec()))
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.progress = progress
        self._fn = jax.jit(_extract, out_shardings=self.batch_sharding)

    def features(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 NHWC images with 3 channels, got {images.dtype} {images.shape}")
        n, n_dev = len(images), self.mesh.size
        if n == 0:
            raise ValueError("no images")
        batch = min(self.batch_size, -(-n // n_dev) * n_dev)
        starts = range(0, n, batch)
        if self.progress:
            from tqdm import tqdm  # only for the progress bar

            starts = tqdm(starts, desc="inception", unit="batch")
        out, pending = [], []
        for start in starts:
            chunk = images[start:start + batch]
            if len(chunk) < batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
            pending.append((self._fn(self.net, jax.device_put(chunk, self.batch_sharding)), min(batch, n - start)))
            if len(pending) > 1:  # keep one batch in flight while copying the previous one back
                feats, k = pending.pop(0)
                out.append(np.asarray(feats)[:k])
        out += [np.asarray(feats)[:k] for feats, k in pending]
        return np.concatenate(out).astype(np.float32)


REAL_FEATURES_MAX = 50_000
"""Real features kept in a reference cache (a fixed random subset beyond this), for precision/recall:
all of CIFAR-10's 50,000 training images, 400 MB as float32."""


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, features: np.ndarray | None = None,
                    **meta: str | int) -> None:
    """μ, Σ (and optionally the features themselves, for precision/recall) to an .npz, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    extra = {} if features is None else {"features": np.asarray(features, np.float32)}
    with open(partial, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, **extra, **{k: np.asarray(v) for k, v in meta.items()})
    partial.replace(path)


def load_statistics(path: str | Path) -> Stats:
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(f"{path} holds no FID statistics (keys mu, sigma)")
        return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)


def load_features(path: str | Path) -> np.ndarray | None:
    """The real features stored with statistics (for precision/recall), or None if the file has none."""
    with np.load(path, allow_pickle=False) as z:
        return z["features"] if "features" in z.files else None


def cached_reference(path: Path, images: Callable[[], np.ndarray], extractor: FeatureExtractor, *,
                     need_features: bool = False, **meta: str | int) -> tuple[Stats, np.ndarray | None]:
    """(μ, Σ) and up to REAL_FEATURES_MAX features of `images()`, from the .npz at `path` if it holds
    them (features only when needed: an older cache without them is recomputed then), else computed and saved."""
    if path.is_file():
        features = load_features(path)
        if features is not None or not need_features:
            return load_statistics(path), features
    data = images()
    features = extractor.features(data)
    mu, sigma = compute_statistics(features)
    kept = subsample(features, REAL_FEATURES_MAX)
    save_statistics(path, mu, sigma, features=kept, num_images=len(data), **meta)
    return (mu, sigma), kept


def reference_statistics(source: str | None, extractor: FeatureExtractor, cache_dir: str | Path | None = None,
                         split: str = "train") -> Stats:
    """Statistics of a whole dataset split (`scgcm.data.load_images`), cached as `.npz` in
    `cache_dir` (default: the weights' cache folder) under a name made from source and split."""
    return reference(source, extractor, cache_dir, split)[0]


def reference(source: str | None, extractor: FeatureExtractor, cache_dir: str | Path | None = None,
              split: str = "train", *, need_features: bool = False) -> tuple[Stats, np.ndarray | None]:
    """`reference_statistics` and the cached real features (None unless cached or `need_features`)."""
    from scgcm.data import load_images  # the data stack is only needed when the cache misses

    cache_dir = Path(cache_dir) if cache_dir is not None else inception.cache_dir()
    key = f"{source!r}|{split}|{inception.PT_SHA256}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source or "default")[-48:]
    path = cache_dir / f"fid-ref-{slug}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    return cached_reference(path, lambda: load_images(source, split=split), extractor, need_features=need_features,
                            source=str(source), split=split)


STANDARD_NUM = 50_000
"""Samples of a FID comparable with published numbers; fewer give a value biased upward."""


def fid_label(num: int) -> str:
    """'FID' for the standard 50,000 samples (or more), else 'FID (1,000 samples)': FID is biased upward at small N."""
    return "FID" if num >= STANDARD_NUM else f"FID ({num:,} samples)"


def fid_from_images(images_u8: np.ndarray, ref_stats: Stats, extractor: FeatureExtractor) -> float:
    """FID of uint8 NHWC images against reference (μ, Σ)."""
    return frechet_distance(*compute_statistics(extractor.features(images_u8)), *ref_stats)


def load_samples(path: str | Path) -> np.ndarray:
    """uint8 NHWC images from an `.npz` (key "images", else the first array) or a folder of PNGs."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image  # only for folders of PNGs

        files = sorted(path.glob("*.png"))
        if not files:
            raise FileNotFoundError(f"no .png files in {path}")
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    else:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"] if "images" in z.files else z[z.files[0]]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: expected uint8 NHWC images with 3 channels, got {images.dtype} {images.shape}")
    return images


# ------------------------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class Ref:
    """Compute (or read from the cache) the reference statistics of a dataset split."""

    source: str | None = None
    """Dataset source for `scgcm.data.load_images`; None is its default dataset, CIFAR-10."""
    split: str = "train"
    """Dataset split."""
    out: Path | None = None
    """Also write the statistics to this .npz."""
    batch_size: int = 256
    """Images per step, over all local devices."""


@dataclass(frozen=True)
class Calc:
    """FID of generated samples against reference statistics."""

    samples: tyro.conf.Positional[Path]
    """An .npz (key "images" or its first array) or a folder of PNGs, uint8 NHWC."""
    ref: Path | None = None
    """Reference statistics .npz (from `ref --out`); if absent, computed from --source/--split."""
    source: str | None = None
    """Dataset source for the reference statistics when --ref is not given."""
    split: str = "train"
    """Dataset split for the reference statistics when --ref is not given."""
    batch_size: int = 256
    """Images per step, over all local devices."""


def cli(args: Sequence[str] | None = None) -> Ref | Calc:
    """Parse `ref …` or `calc …` from `args` (default: the command line)."""
    return tyro.extras.subcommand_cli_from_dict({"ref": Ref, "calc": Calc}, prog="python -m scgcm.fid",
                                                description=__doc__.splitlines()[0], args=args)


def main(command: Ref | Calc) -> None:
    def extractor() -> FeatureExtractor:
        return FeatureExtractor(inception.load_inception(), batch_size=command.batch_size, progress=True)

    match command:
        case Ref(source=source, split=split, out=out):
            (mu, sigma), features = reference(source, extractor(), split=split, need_features=out is not None)
            if out is not None:
                save_statistics(out, mu, sigma, features=features, source=str(source), split=split)
                print(f"wrote {out}", file=sys.stderr)
        case Calc(samples=samples, ref=ref, source=source, split=split):
            images = load_samples(samples)  # read the inputs before loading the network
            ref_stats = load_statistics(ref) if ref is not None else None
            ref_features = load_features(ref) if ref is not None else None
            net = extractor()
            if ref_stats is None:
                ref_stats, ref_features = reference(source, net, split=split, need_features=True)
            features = net.features(images)
            print(f"{len(images)} samples from {samples}", file=sys.stderr)
            if ref_features is not None and len(images) > K and len(ref_features) > K:
                precision, recall = precision_recall(ref_features, features)
                print(f"precision {precision:.4f}, recall {recall:.4f} (k={K}, {len(ref_features)} real features)",
                      file=sys.stderr)
            print(f"{fid_label(len(images))}:", file=sys.stderr)
            print(f"{frechet_distance(*compute_statistics(features), *ref_stats):.4f}")


if __name__ == "__main__":
    main(cli())
