"""FID, precision and recall of a model's samples, per sampling mode, for training, `scgcm.sample --fid`,
the checkpoint sweep and post-hoc EMA.

The distance is `scgcm.eval.fid`'s, the images `scgcm.parallel.generate`'s, so the numbers of training,
of `python -m scgcm.sample --fid` and of `python -m scgcm.fid calc` agree for the same images. Every
evaluation draws the same latents (image i from `fold_in(key(seed), i)`), as the reference does with
PRNGKey(42) (method.md §8), so successive FIDs differ only through the model.
"""

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from scgcm.data import sources as data
from scgcm.data.images import rgb
from scgcm.eval import fid, inception, statcache
from scgcm.eval.fid import Scores, feature_scores
from scgcm.nn.model import SCGCM
from scgcm.parallel.generate import generate

log = logging.getLogger("scgcm")


class FIDEvaluator:
    """`evaluator(model) -> {mode: FID}` (and `evaluate(model) -> {mode: Scores}` with precision and
    recall when `ref_features` are given): `num` images per sampler, `batch_size` at a time over the
    mesh, their Inception features through `extractor`, against `ref_stats` (μ, Σ).

    A mode whose distance cannot be computed (e.g. non-finite features) gets NaN and a warning."""

    def __init__(self, ref_stats: fid.Stats, extractor: fid.FeatureExtractor,
                 samplers: Mapping[str, Callable[[SCGCM, jax.Array], jax.Array]], *, num: int, batch_size: int,
                 seed: int = 42, mesh: Mesh | None = None, progress: bool = False,
                 ref_features: np.ndarray | None = None):
        if num < 2:
            raise ValueError(f"FID needs at least 2 samples per mode, got num={num}")
        dim = getattr(extractor, "feature_dim", fid.MIN_SAMPLES)
        if num < dim:
            log.warning("%s", fid.few_samples_message(num, dim))
        self.ref_stats, self.extractor, self.samplers = ref_stats, extractor, dict(samplers)
        self.num, self.batch_size, self.seed, self.mesh, self.progress = num, batch_size, seed, mesh, progress
        self.ref_features = ref_features

    def images(self, model: SCGCM, mode: str) -> np.ndarray:
        return generate(model, self.samplers[mode], seed=self.seed, num=self.num, batch_size=self.batch_size,
                        mesh=self.mesh, progress=self.progress)

    def __call__(self, model: SCGCM) -> dict[str, float]:
        return {mode: s["fid"] for mode, s in self.evaluate(model).items()}

    def evaluate(self, model: SCGCM) -> dict[str, Scores]:
        return {mode: self.scores(self.images(model, mode), mode) for mode in self.samplers}

    def scores(self, images: np.ndarray, mode: str = "samples") -> Scores:
        return image_scores(images, self.ref_stats, self.extractor, self.ref_features, mode)

    def score(self, images: np.ndarray, mode: str = "samples") -> float:
        return self.scores(images, mode)["fid"]


def image_scores(images: np.ndarray, ref_stats: fid.Stats, extractor: fid.FeatureExtractor,
                 ref_features: np.ndarray | None = None, name: str = "samples") -> Scores:
    """`fid.feature_scores` of uint8 NHWC images (1 or 3 channels); an undefined FID is NaN, with a warning."""
    try:
        scores = feature_scores(extractor.features(rgb(images)), ref_stats, ref_features)
    except ValueError as e:
        log.warning("FID of %s is undefined (%s)", name, e)
        scores = {"fid": float("nan")}
    if hasattr(extractor, "image_scores"):  # a network with scores of its own (the digits classifier)
        scores.update(extractor.image_scores(images))
    return scores


def flat_scores(results: Mapping[str, Scores]) -> dict[str, float]:
    """{mode: Scores} → metrics.jsonl's {"fid_<mode>": …, "precision_<mode>": …, "recall_<mode>": …}."""
    return {f"{name}_{mode}": value for mode, s in results.items() for name, value in s.items()}


def describe_scores(results: Mapping[str, Scores]) -> str:
    """'onestep 12.345 (precision 0.612, recall 0.401), heun …' for logs and prints."""
    def one(s: Scores) -> str:
        pr = f" (precision {s['precision']:.3f}, recall {s['recall']:.3f})" if "precision" in s else ""
        return f"{s['fid']:.3f}{pr}"

    return ", ".join(f"{mode} {one(s)}" for mode, s in results.items())


def data_statistics(source: str | None, extractor: fid.Extractor, **kwargs) -> fid.Stats:
    """(μ, Σ) of `data_reference`."""
    return data_reference(source, extractor, **kwargs)[0]


def data_reference(source: str | None, extractor: fid.Extractor, *, split: str = "train",
                   image_size: int = 32, channels: int = 3, synthetic_size: int = 2048, seed: int = 42,
                   cache_dir: str | Path | None = None,
                   need_features: bool = False) -> tuple[fid.Stats, np.ndarray | None]:
    """Reference (μ, Σ) of a run's training data and, when `need_features`, up to
    `fid.REAL_FEATURES_MAX` of its features for precision/recall (else None), cached in `cache_dir`
    (default: next to the weights) by `statcache.cached_reference`, keyed by the data's content,
    split, size, channels, network and preprocessing. `extractor` may be a function that builds
    one (called only on a miss).

    A dataset at 32×32×3 goes through `fid.reference`, sharing its cache with
    `python -m scgcm.fid ref --source S` (its images are 32×32×3, or training would have refused
    them); 'synthetic' is keyed by its parameters (count, size, channels, seed)."""
    if source != "synthetic" and (image_size, channels) == (32, 3):
        return fid.reference(source, extractor, cache_dir, split, need_features=need_features)
    if source == "synthetic":
        fingerprint = f"synthetic:{synthetic_size}:{seed}"
        load = lambda: data.synthetic_images(synthetic_size, image_size=image_size, channels=channels, seed=seed)
    else:
        fingerprint = data.source_fingerprint(source, split=split)
        load = lambda: data.load_images(source, split=split, image_size=image_size, channels=channels)
    key = {"kind": "fid-ref", "data": fingerprint, "split": split, "size": image_size, "channels": channels,
           "network": getattr(extractor, "weights_id", inception.PARAMS_SHA256),
           "preprocessing": inception.PREPROCESS_VERSION}
    cache_dir = Path(cache_dir) if cache_dir is not None else inception.cache_dir()
    return statcache.cached_reference(
        cache_dir, f"fid-ref-{fid.cache_slug(source)}-{split}-{image_size}x{channels}", key,
        lambda: fid.reference_from_images(rgb(load()), extractor), need_features=need_features)
