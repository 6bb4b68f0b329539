"""FID of a model's samples, per sampling mode, for training and `scgcm.sample --fid`; `fid.png`.

The distance is `scgcm.fid`'s (`fid_from_images`), the images `scgcm.generate`'s, so the numbers of
training, of `python -m scgcm.sample --fid` and of `python -m scgcm.fid calc` agree for the same images.
Every evaluation draws the same latents (image i from `fold_in(key(seed), i)`), as the reference
does with PRNGKey(42) (method.md §8), so successive FIDs differ only through the model.
"""

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh
from PIL import Image, ImageDraw, ImageFont

from scgcm import fid, inception, statcache
from scgcm.generate import generate
from scgcm.images import rgb  # noqa: F401 (re-exported: callers import it from here)
from scgcm.model import SCGCM

log = logging.getLogger("scgcm")


class FIDEvaluator:
    """`evaluator(model) -> {mode: FID}`: `num` images per sampler, `batch_size` at a time over the
    mesh, their Inception features through `extractor`, against `ref_stats` (μ, Σ).

    A mode whose distance cannot be computed (e.g. non-finite features) gets NaN and a warning."""

    def __init__(self, ref_stats: fid.Stats, extractor: fid.FeatureExtractor,
                 samplers: Mapping[str, Callable[[SCGCM, jax.Array], jax.Array]], *, num: int, batch_size: int,
                 seed: int = 42, mesh: Mesh | None = None, progress: bool = False):
        if num < 2:
            raise ValueError(f"FID needs at least 2 samples per mode, got num={num}")
        if num < fid.MIN_SAMPLES:
            log.warning("%s", fid.few_samples_message(num))
        self.ref_stats, self.extractor, self.samplers = ref_stats, extractor, dict(samplers)
        self.num, self.batch_size, self.seed, self.mesh, self.progress = num, batch_size, seed, mesh, progress

    def images(self, model: SCGCM, mode: str) -> np.ndarray:
        return generate(model, self.samplers[mode], seed=self.seed, num=self.num, batch_size=self.batch_size,
                        mesh=self.mesh, progress=self.progress)

    def __call__(self, model: SCGCM) -> dict[str, float]:
        return {mode: self.score(self.images(model, mode), mode) for mode in self.samplers}

    def score(self, images: np.ndarray, mode: str = "samples") -> float:
        try:
            return fid.fid_from_images(rgb(images), self.ref_stats, self.extractor)
        except ValueError as e:
            log.warning("FID of %s is undefined (%s)", mode, e)
            return float("nan")


def data_statistics(source: str | None, extractor: fid.Extractor, *, split: str = "train",
                    image_size: int = 32, channels: int = 3, synthetic_size: int = 2048, seed: int = 42,
                    cache_dir: str | Path | None = None) -> fid.Stats:
    """Reference (μ, Σ) of a run's training data, cached in `cache_dir` (default: next to the weights)
    by `statcache.cached_statistics`, keyed by the data's content, split, size, channels, network
    and preprocessing. `extractor` may be a function that builds one (called only on a miss).

    A dataset at 32×32×3 goes through `fid.reference_statistics`, sharing its cache with
    `python -m scgcm.fid ref --source S` (its images are 32×32×3, or training would have refused
    them); 'synthetic' is keyed by its parameters (count, size, channels, seed)."""
    if source != "synthetic" and (image_size, channels) == (32, 3):
        return fid.reference_statistics(source, extractor, cache_dir, split)
    from scgcm import data  # the data stack is only needed here

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
    return statcache.cached_statistics(
        cache_dir, f"fid-ref-{fid.cache_slug(source)}-{split}-{image_size}x{channels}", key,
        lambda: fid.compute_statistics(fid.resolve(extractor).features(rgb(load()))))


# ------------------------------------------------------------------------------------------ plot

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def read_fids(metrics_jsonl: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{mode: [(step, FID), …]} from the `fid_<mode>` entries of metrics.jsonl (finite values only)."""
    series: dict[str, list[tuple[int, float]]] = {}
    path = Path(metrics_jsonl)
    if not path.exists():
        return series
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for k, v in record.items():
            if k.startswith("fid_") and isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(k[4:], []).append((int(record["step"]), float(v)))
    return series


def _ticks(lo: float, hi: float, log_scale: bool) -> list[float]:
    if log_scale:
        ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
        return [t for t in ticks if lo <= t <= hi] or [lo, hi]
    step = 10.0 ** math.floor(math.log10((hi - lo) / 4)) if hi > lo else 1.0
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= 6)
    return [t * step for t in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0e}"


def plot_fid(metrics_jsonl: str | Path, out_png: str | Path, size: tuple[int, int] = (720, 440)) -> bool:
    """FID against training step, one line per mode (log-scaled when it spans a decade); PIL only.
    Returns False (and writes nothing) when metrics.jsonl holds no FID yet."""
    series = read_fids(metrics_jsonl)
    if not series:
        return False
    width, height = size
    left, right, top, bottom = 70, 20, 30, 45
    steps = [s for points in series.values() for s, _ in points]
    values = [v for points in series.values() for _, v in points]
    x0, x1 = float(min(steps)), float(max(steps))
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = min(values), max(values)
    log_scale = y0 > 0 and y1 / y0 >= 10
    if log_scale:
        f = math.log10
        lo, hi = f(y0) - 0.05, f(y1) + 0.05
    else:
        f = float
        pad = (y1 - y0) * 0.05 or max(abs(y0) * 0.05, 1.0)
        lo, hi = y0 - pad, y1 + pad
    px = lambda s: left + (s - x0) / (x1 - x0) * (width - left - right)
    py = lambda v: top + (hi - f(v)) / (hi - lo) * (height - top - bottom)

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for t in _ticks(10**lo if log_scale else lo, 10**hi if log_scale else hi, log_scale):
        y = py(t)
        draw.line([left, y, width - right, y], fill=(225, 225, 225))
        draw.text((left - 6, y), _label(t), fill="black", font=font, anchor="rm")
    for t in _ticks(x0, x1, False):
        x = px(t)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x, height - bottom + 6), f"{int(t):,}", fill="black", font=font, anchor="ma")
    draw.text((width / 2, height - 14), "step", fill="black", font=font, anchor="mm")
    draw.text((left, top / 2), "FID" + (" (log scale)" if log_scale else ""), fill="black", font=font, anchor="lm")
    for i, (mode, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [(px(s), py(v)) for s, v in sorted(points)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        last = sorted(points)[-1][1]
        draw.text((width - right - 8, top + 10 + 14 * i), f"{mode}: {last:.2f}", fill=colour, font=font, anchor="rm")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    partial = out_png.with_name(out_png.name + ".partial.png")
    image.save(partial)
    partial.replace(out_png)
    return True
