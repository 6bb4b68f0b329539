"""FID of a model's samples, per sampling mode, for training and `scgcm.sample --fid`; `fid.png`;
and the checkpoint sweep:

    python -m scgcm.evaluate RUN [--modes onestep twostep] [--num N]

computes FID, precision and recall of every saved checkpoint of RUN (checkpoints/latest/<step>) that
metrics.jsonl holds no FID of yet, appends them there and redraws fid.png. It only reads the
checkpoints, so it can run beside training on another device (e.g. `CUDA_VISIBLE_DEVICES=1`); keep
it running, or raise --config.keep-checkpoints, since training keeps only the last few.

The distance is `scgcm.fid`'s (`fid_from_images`), the images `scgcm.generate`'s, so the numbers of
training, of `python -m scgcm.sample --fid` and of `python -m scgcm.fid calc` agree for the same images.
Every evaluation draws the same latents (image i from `fold_in(key(seed), i)`), as the reference
does with PRNGKey(42) (method.md §8), so successive FIDs differ only through the model.
"""

import functools
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import tyro
from jax.sharding import Mesh
from PIL import Image, ImageDraw, ImageFont

from scgcm import fid, inception, statcache
from scgcm.errors import UserError
from scgcm.fid import Scores, feature_scores
from scgcm.generate import generate
from scgcm.images import rgb
from scgcm.model import SCGCM

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
        if num < fid.MIN_SAMPLES:
            log.warning("%s", fid.few_samples_message(num))
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
        return feature_scores(extractor.features(rgb(images)), ref_stats, ref_features)
    except ValueError as e:
        log.warning("FID of %s is undefined (%s)", name, e)
        return {"fid": float("nan")}


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
    return statcache.cached_reference(
        cache_dir, f"fid-ref-{fid.cache_slug(source)}-{split}-{image_size}x{channels}", key,
        lambda: fid.reference_from_images(rgb(load()), extractor), need_features=need_features)


# ------------------------------------------------------------------------------------------ plot

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def read_fids(metrics_jsonl: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{mode: [(step, FID), …]} from the `fid_<mode>` entries of metrics.jsonl (finite values only)."""
    return {mode: [(s, v["fid"]) for s, v in points] for mode, points in read_evaluations(metrics_jsonl).items()}


NUM_KEY = "num_fid_samples"
"""metrics.jsonl key of the number of samples behind the FIDs of a record (not a mode)."""


def _records(metrics_jsonl: str | Path) -> list[dict]:
    """The complete records of metrics.jsonl (a line being written by training, or torn, is skipped)."""
    path = Path(metrics_jsonl)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _modes(record: dict) -> list[str]:
    return [k[4:] for k in record if k.startswith("fid_") and k != NUM_KEY]


def read_evaluations(metrics_jsonl: str | Path) -> dict[str, list[tuple[int, dict[str, float]]]]:
    """{mode: [(step, {"fid": …, "precision": …, "recall": …, "num": …}), …]} of the evaluations in
    metrics.jsonl (records with a finite `fid_<mode>`; `num` from `num_fid_samples` when logged)."""
    series: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for record in _records(metrics_jsonl):
        for mode in _modes(record):
            v = record[f"fid_{mode}"]
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                continue
            entry = {"fid": float(v), **{name: float(record[f"{name}_{mode}"]) for name in ("precision", "recall")
                                         if isinstance(record.get(f"{name}_{mode}"), (int, float))}}
            if isinstance(record.get(NUM_KEY), (int, float)):  # written as a float
                entry["num"] = int(record[NUM_KEY])
            series.setdefault(mode, []).append((record["step"], entry))
    return series


def evaluated_steps(metrics_jsonl: str | Path, modes: tuple[str, ...]) -> set[int]:
    """Steps with a logged FID (an undefined one, null, included) for every one of `modes`."""
    per_mode = [{r["step"] for r in _records(metrics_jsonl) if f"fid_{mode}" in r} for mode in modes]
    return set.intersection(*per_mode) if per_mode else set()


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
    The axis names the sample count when under 50,000. Returns False (and writes nothing) when
    metrics.jsonl holds no FID yet."""
    evaluations = read_evaluations(metrics_jsonl)
    if not evaluations:
        return False
    nums = sorted({v["num"] for points in evaluations.values() for _, v in points if "num" in v})
    ylabel = " / ".join(fid.fid_label(n) for n in nums) if nums else "FID"
    series = {mode: [(s, v["fid"]) for s, v in points] for mode, points in evaluations.items()}
    return plot_lines(series, out_png, xlabel="step", ylabel=ylabel, size=size, integer_x=True)


def plot_lines(series: Mapping[str, list[tuple[int | float, int | float]]], out_png: str | Path, *, xlabel: str, ylabel: str,
               size: tuple[int, int] = (720, 440), integer_x: bool = False) -> bool:
    """y against x, one line per name (y log-scaled when it spans a decade), to a PNG; PIL only.
    The legend gives each line's last y (`integer_x`, steps) or its lowest y and where (a search).
    Returns False (and writes nothing) without finite points."""
    series = {k: [(float(x), float(y)) for x, y in v if math.isfinite(y)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
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
        draw.text((x, height - bottom + 6), f"{int(t):,}" if integer_x else _label(t), fill="black", font=font, anchor="ma")
    draw.text((width / 2, height - 14), xlabel, fill="black", font=font, anchor="mm")
    draw.text((left, top / 2), ylabel + (" (log scale)" if log_scale else ""), fill="black", font=font, anchor="lm")
    for i, (mode, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [(px(s), py(v)) for s, v in sorted(points)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if integer_x:
            legend = f"{mode}: {sorted(points)[-1][1]:.2f}"
        else:
            x_best, y_best = min(points, key=lambda p: p[1])
            legend = f"{mode}: min {y_best:.2f} at {_label(x_best)}"
        draw.text((width - right - 8, top + 10 + 14 * i), legend, fill=colour, font=font, anchor="rm")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    partial = out_png.with_name(out_png.name + ".partial.png")
    image.save(partial)
    partial.replace(out_png)
    return True


# ----------------------------------------------------------------------------------- sweep CLI


@dataclass(frozen=True)
class SweepArgs:
    workdir: tyro.conf.Positional[str]
    """Run directory written by scgcm.train."""
    modes: tuple[str, ...] | None = None
    """Sampling modes (default: the run's --config.fid.modes)."""
    num: int | None = None
    """Samples per mode and checkpoint (default: the run's --config.fid.num)."""
    batch_size: int | None = None
    """Sampling and Inception batch (default: the run's --config.fid.batch-size)."""
    seed: int | None = None
    """Seed of the latents, the same for every checkpoint (default: the run's --config.fid.seed)."""
    fid_ref: str | None = None
    """Reference statistics .npz (default: the run's --config.fid.ref, else its data, cached)."""
    compile_cache: str = "auto"
    """XLA's persistent compilation cache: 'auto', a folder, or 'off'."""


def check_modes(modes: tuple[str, ...]) -> None:
    """UserError unless `modes` are distinct sampling modes that need no options (not multistep)."""
    from scgcm.generate import MODES

    if unknown := [m for m in modes if m not in MODES or m == "multistep"]:
        raise UserError(f"--modes {' '.join(unknown)}: choose from onestep, twostep, heun")
    if not modes or len(set(modes)) != len(modes):
        raise UserError(f"--modes must name distinct modes, at least one (got {' '.join(modes)})")


def saved_steps(checkpoints: Path) -> list[int]:
    """Steps of the complete checkpoints in checkpoints/latest (orbax's temporary folders are not digits)."""
    folder = checkpoints / "latest"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def pending_steps(workdir: Path, modes: tuple[str, ...]) -> list[int]:
    """Saved checkpoints whose FID of some mode is not yet in metrics.jsonl."""
    done = evaluated_steps(workdir / "metrics.jsonl", modes)
    return [s for s in saved_steps(workdir / "checkpoints") if s not in done]


def sweep(workdir: Path, args: SweepArgs, extractor: fid.Extractor | None = None) -> list[int]:
    """Evaluate every pending checkpoint (oldest first), appending to metrics.jsonl; returns their steps.
    A checkpoint that training removed meanwhile, or that cannot be read, is skipped with a message."""
    from scgcm.checkpoint import Checkpointer
    from scgcm.rundir import append_record
    from scgcm.sample import fid_extractor, load_run_config, run_evaluator, state_skeleton

    cfg = load_run_config(workdir)
    modes = args.modes or cfg.fid.modes
    num, batch_size = args.num or cfg.fid.num, args.batch_size or cfg.fid.batch_size
    seed = cfg.fid.seed if args.seed is None else args.seed
    check_modes(modes)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    fid.check_sample_count(num, "--num", warn=False)  # FIDEvaluator warns below MIN_SAMPLES
    pending = pending_steps(workdir, modes)
    if not pending:
        print(f"{workdir}: every saved checkpoint has a FID of {', '.join(modes)}")
        return []
    extractor = extractor or functools.cache(lambda: fid_extractor(batch_size))
    evaluator, ref_name = run_evaluator(cfg, extractor, modes=modes, num=num, batch_size=batch_size, seed=seed,
                                        fid_ref=args.fid_ref or cfg.fid.ref)
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    skeleton = state_skeleton(cfg)
    label = fid.fid_label(num)
    done = []
    try:
        for step in pending:
            try:
                state, _ = ckpt.restore(skeleton, step=step)
            except UserError as e:  # removed by training since we listed it (it keeps the last few), or damaged
                print(f"step {step}: skipped ({e})", flush=True)
                continue
            results = evaluator.evaluate(state.ema)
            append_record(workdir / "metrics.jsonl", step, {**flat_scores(results), NUM_KEY: num})
            plot_fid(workdir / "metrics.jsonl", workdir / "fid.png")
            print(f"step {step}: {label} {describe_scores(results)} (against {ref_name})", flush=True)
            done.append(step)
    finally:
        ckpt.close()
    return done


def main(argv: list[str] | None = None, extractor: fid.FeatureExtractor | None = None) -> int:
    args = tyro.cli(SweepArgs, args=sys.argv[1:] if argv is None else argv, description=__doc__.split("\n\n")[0])
    workdir = Path(args.workdir)
    if not (workdir / "config.json").is_file():
        raise UserError(f"{workdir}: not a run directory (no config.json)")
    from scgcm.rundir import use_compile_cache

    use_compile_cache(args.compile_cache)
    sweep(workdir, args, extractor)
    return 0


if __name__ == "__main__":
    from scgcm.errors import run_cli

    sys.exit(run_cli(main))
