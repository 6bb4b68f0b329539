"""FID: Inception statistics, the Fréchet distance, sharded feature extraction, reference statistics of a
dataset (cached by content, `scgcm.eval.statcache`) and of a file, and samples read from disk.

Image arrays follow `scgcm.data.images.as_nhwc_uint8` (uint8 NHWC or NCHW, 1 or 3 channels, any size:
Inception resizes to 299×299; samples in [-1, 1] go through `scgcm.data.images.to_uint8` first). Fewer
than 2 images are refused; fewer than 2,048 give a biased FID, with a warning. See fid.md for the
standard. `python -m scgcm.fid` is the CLI.
"""

import functools
import hashlib
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import scipy.linalg
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, UInt8
from tqdm.auto import tqdm

from scgcm.data import sources as data
from scgcm.data.images import FID_CHANNELS, ImageArrayError, as_nhwc_uint8, read_image_file, read_npz, rgb
from scgcm.errors import UserError
from scgcm.eval import inception, statcache
from scgcm.eval.precision_recall import K, precision_recall, subsample
from scgcm.eval.statcache import StatisticsError, Stats

# The feature dimension: with fewer images Σ is singular and FID is biased upward (papers use 50,000).
MIN_SAMPLES = 2048


def compute_statistics(features: np.ndarray) -> Stats:
    """Mean and covariance (float64, `np.cov(rowvar=False)`) of [N, d] features, N ≥ 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"statistics need at least 2 feature vectors [N, d], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def check_sample_count(n: int, name: str, *, warn: bool = True) -> int:
    """Refuse fewer than 2 images (no covariance) with a UserError naming `name`; warn below MIN_SAMPLES."""
    if n < 2:
        raise UserError(f"{name}: FID needs at least 2 images, got {n}")
    if warn and n < MIN_SAMPLES:
        warnings.warn(few_samples_message(n), stacklevel=2)
    return n


def few_samples_message(n: int, dim: int = MIN_SAMPLES) -> str:
    """The warning for a distance of `n` images on `dim`-dimensional features (Inception's 2,048 by default)."""
    if dim != MIN_SAMPLES:  # another feature network: nothing published to compare with
        return f"Fréchet distance of {n} images (fewer than {dim:,}, the feature dimension) is biased upward"
    return (f"FID of {n} images (fewer than {MIN_SAMPLES:,}, the feature dimension) is biased upward "
            "and not comparable with published numbers (50,000 images)")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}), with ε·I added to both Σ if the root is not finite.

    Non-finite statistics raise ValueError: `sqrtm` is never called on them (it can hang on NaN)."""
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("the statistics hold NaN or infinite values (non-finite features?): FID is undefined")
    product = sigma1 @ sigma2
    if not np.isfinite(product).all():
        raise ValueError("Σ₁Σ₂ overflows: FID is undefined")
    with warnings.catch_warnings():  # "Matrix is singular": expected below MIN_SAMPLES, which warns already
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(product)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("sqrtm(Σ₁Σ₂) is not finite, even with ε·I added: FID is undefined")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(Σ₁Σ₂) has a large imaginary part: {np.abs(covmean.imag).max()}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def default_batch_size(backend: str | None = None) -> int:
    """Images per Inception step: 256 on accelerators; 32 on a CPU, where each image in flight
    holds about 32 MB of activations (measured: 1.8 GB peak at 32, 2.9 GB at 64; 256 took 9.4 GB)."""
    return 32 if (backend or jax.default_backend()) == "cpu" else 256


def network_id(net: eqx.Module) -> str:
    """What cached statistics record as the network: the verified weights' hash for the standard
    InceptionV3 (`inception.PARAMS_SHA256`), else a sha256 of the module's arrays (stand-ins)."""
    if isinstance(net, inception.InceptionV3):
        return inception.PARAMS_SHA256
    h = hashlib.sha256(type(net).__qualname__.encode())
    for leaf in jax.tree_util.tree_leaves(eqx.filter(net, eqx.is_array)):
        a = np.asarray(leaf)
        h.update(f"{a.dtype.str}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return "sha256:" + h.hexdigest()


def _extract(net: eqx.Module, images: UInt8[Array, "b h w 3"]) -> Float[Array, "b d"]:
    return net(inception.preprocess(images))  # the 299×299 resize happens here, one batch at a time


@functools.cache
def _jitted_extract(sharding: NamedSharding):
    """One jitted `_extract` per output sharding, shared by every extractor (compiled once per network and batch shape)."""
    return jax.jit(_extract, out_shardings=sharding)


class FeatureExtractor:
    """uint8 NHWC images (any size) → [N, 2048] features, in batches sharded over `devices`.

    The batch is split along a 1-D mesh axis "data"; the network is replicated. Each batch is
    padded (by repeating the last image) to a fixed size, a multiple of the device count.
    `batch_size` None: `default_batch_size()` of the backend. `weights_id` names the network in
    cache keys (default: `network_id(net)`)."""

    def __init__(self, net: eqx.Module, *, batch_size: int | None = None,
                 devices: Sequence[jax.Device] | None = None, progress: bool = False, weights_id: str | None = None):
        devices = list(devices) if devices is not None else jax.local_devices()
        batch_size = default_batch_size(devices[0].platform) if batch_size is None else batch_size
        if batch_size < 1:
            raise UserError(f"--batch-size must be positive (got {batch_size})")
        self.weights_id = weights_id or network_id(net)
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.net = jax.device_put(net, NamedSharding(self.mesh, PartitionSpec()))
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.progress = progress
        self._fn = _jitted_extract(self.batch_sharding)

    feature_dim: int = MIN_SAMPLES
    """Length of a feature vector (Inception's pool3: 2,048); fewer images give a biased distance."""

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
"""Real features kept with reference statistics (a fixed random subset beyond this), for
precision/recall: all of CIFAR-10's 50,000 training images, 400 MB as float32."""


def load_statistics(path: str | Path) -> Stats:
    """(μ, Σ) of a statistics file, verified (`statcache.read_statistics`); StatisticsError if unusable."""
    mu, sigma, _ = statcache.read_statistics(path)
    return mu, sigma


Extractor = FeatureExtractor | Callable[[], FeatureExtractor]


def resolve(extractor: Extractor) -> FeatureExtractor:
    """An extractor, or a function that builds one (called here: only when features are needed)."""
    return extractor() if callable(extractor) else extractor


def cache_slug(source: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(source or "default"))[-48:]


def reference_from_images(images: np.ndarray, extractor: Extractor) -> tuple[Stats, np.ndarray]:
    """(μ, Σ) of uint8 NHWC RGB images and up to REAL_FEATURES_MAX of their features (for precision/recall)."""
    features = resolve(extractor).features(images)
    return compute_statistics(features), subsample(features, REAL_FEATURES_MAX)


def reference(source: str | None, extractor: Extractor, cache_dir: str | Path | None = None,
              split: str = "train", *, flag: str = "--config.data.source",
              need_features: bool = False) -> tuple[Stats, np.ndarray | None]:
    """Statistics of a whole dataset split (`scgcm.data.load_images` at its own size, grey as RGB)
    and, when `need_features`, up to REAL_FEATURES_MAX of its real features (else None), cached in
    `cache_dir` (default: the weights' cache folder) by `statcache.cached_reference`, keyed by the
    data's content. `extractor` may be a function that builds one: it is called only on a cache
    miss, after the data has been read. `flag` names the option in data errors."""
    key = {"kind": "fid-ref", "data": data.source_fingerprint(source, split=split, flag=flag), "split": split,
           "size": "native", "channels": "rgb", "network": getattr(extractor, "weights_id", inception.PARAMS_SHA256),
           "preprocessing": inception.PREPROCESS_VERSION}

    def compute() -> tuple[Stats, np.ndarray]:
        images = data.load_images(source, split=split, image_size=None, channels=FID_CHANNELS, flag=flag)
        return reference_from_images(rgb(images), extractor)

    cache_dir = Path(cache_dir) if cache_dir is not None else inception.cache_dir()
    return statcache.cached_reference(cache_dir, f"fid-ref-{cache_slug(source)}-{split}", key, compute,
                                      need_features=need_features)


def reference_statistics(source: str | None, extractor: Extractor, cache_dir: str | Path | None = None,
                         split: str = "train", *, flag: str = "--config.data.source") -> Stats:
    """(μ, Σ) of `reference`."""
    return reference(source, extractor, cache_dir, split, flag=flag)[0]


STANDARD_NUM = 50_000
"""Samples of a FID comparable with published numbers; fewer give a value biased upward."""


def fid_label(num: int, network: str = "inception") -> str:
    """'FID' for the standard 50,000 samples (or more), else 'FID (1,000 samples)': FID is biased upward at small N.
    With the digits classifier (`network` 'digits'): 'digits FD (500 samples)', a distance of its own."""
    if network == "digits":
        return f"digits FD ({num:,} samples)"
    return "FID" if num >= STANDARD_NUM else f"FID ({num:,} samples)"


Scores = dict[str, float]
"""{"fid": …, "precision": …, "recall": …}; the last two only against real features."""


def feature_scores(features: np.ndarray, ref_stats: Stats, ref_features: np.ndarray | None = None) -> Scores:
    """FID of generated features against (μ, Σ), and improved precision/recall (k = K) against the
    real features when given and both sets hold more than K. ValueError if the FID is undefined."""
    out = {"fid": frechet_distance(*compute_statistics(features), *ref_stats)}
    if ref_features is not None and min(len(features), len(ref_features)) > K:
        out["precision"], out["recall"] = precision_recall(ref_features, features)
    return out


def fid_from_images(images_u8: np.ndarray, ref_stats: Stats, extractor: FeatureExtractor) -> float:
    """FID of uint8 NHWC images against reference (μ, Σ)."""
    return feature_scores(extractor.features(images_u8), ref_stats)["fid"]


def load_samples(path: str | Path) -> np.ndarray:
    """uint8 NHWC RGB images from an `.npz` (key "images", else the first array; the rule of
    `scgcm.images.as_nhwc_uint8`, any size, grey repeated) or a folder of PNGs of one size.
    Problems are one-line UserErrors naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        if not files:
            raise UserError(f"{path}: no .png files in the folder")
        arrays = [read_image_file(files[0], "RGB")]  # damaged, not an image, a huge declared size: one line
        for f in files[1:]:
            try:
                arrays.append(read_image_file(f, "RGB", arrays[0].shape[1::-1]))
            except ImageArrayError as e:
                raise UserError(str(e).replace(", expected", f", unlike {files[0].name}")) from None
        images = np.stack(arrays)
    else:
        images = read_npz(path)
    return rgb(as_nhwc_uint8(images, image_size=None, channels=FID_CHANNELS, name=str(path)))


def read_reference(path: Path, flag: str = "--ref", *, need_features: bool = False) -> tuple[Stats, np.ndarray | None]:
    """Statistics from a file the user named and, when `need_features`, its real features (None if
    it holds none: `ref --out` writes them), verified; else a one-line UserError naming `flag` and the file."""
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        return load_statistics(path), statcache.read_features(path) if need_features else None
    except StatisticsError as e:
        raise UserError(f"{flag} {e}") from None
