"""`python -m scgcm.sample --workdir DIR [--mode onestep|twostep|multistep|heun] [--num N] [--out FILE.npz]`

Loads a checkpoint of a run (the latest, the best by FID of a mode, or a given step), takes its EMA
weights (or the raw ones with --no-ema), and writes uint8 images [N, h, w, c] to an .npz, a PNG grid
and optionally a folder of PNGs. Image i depends only on (seed, i). With --fid it also prints their
FID (the computation of `scgcm.fid` and of training), against --fid-ref, --fid-source or the run's data.
"""

import dataclasses
import functools
import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax.random as jr
import numpy as np
import tyro
from PIL import Image

from scgcm import fid, inception
from scgcm.checkpoint import Checkpointer
from scgcm.config import TrainConfig, build_model
from scgcm.errors import UserError, run_cli
from scgcm.evaluate import data_statistics, rgb
from scgcm.generate import Mode, generate, make_sampler
from scgcm.rundir import save_grid, use_compile_cache
from scgcm.state import TrainState, init_state, make_optimizer


@dataclass(frozen=True)
class SampleArgs:
    workdir: str
    """Run directory written by scgcm.train."""
    checkpoint: str = "latest"
    """'latest', 'best' (lowest FID of --mode; 'best_onestep' etc. names a mode) or a step number."""
    ema: bool = True
    """Use the EMA weights (--no-ema for the raw ones)."""
    mode: Mode = "onestep"
    """Sampler: one consistency step, two steps, several steps through --sigmas, or EDM Heun through the score head."""
    two_step_sigma: float | None = None
    """Intermediate σ of two-step sampling (default: the run's, reference 0.661; iCT 0.821)."""
    sigmas: tuple[float, ...] = (80.0, 0.661)
    """Decreasing σ levels of multistep sampling."""
    heun_steps: int | None = None
    """Noise levels of the Heun sampler (default: the run's, 18)."""
    num: int = 64
    """Number of images."""
    batch_size: int = 256
    """Images per device batch (global)."""
    seed: int = 0
    """Seed: image i comes from fold_in(key(seed), i)."""
    out: str | None = None
    """.npz of uint8 images [N, h, w, c] (default: DIR/samples/<mode>_<step>_seed<seed>.npz)."""
    png_dir: str | None = None
    """Also write each image as a PNG into this folder."""
    grid: str | None = None
    """PNG grid of the first 64 images (default: next to --out)."""
    fid: bool = False
    """Also print the FID of the images (standard Inception features; comparable numbers need --num 50000)."""
    fid_ref: str | None = None
    """Reference statistics .npz for --fid (from `python -m scgcm.fid ref --out`)."""
    fid_source: str | None = None
    """Without --fid-ref: dataset whose train split gives the reference (default: the run's training data); cached."""
    compile_cache: str = "auto"
    """XLA's persistent compilation cache: 'auto' ($JAX_COMPILATION_CACHE_DIR, else ~/.cache/scgcm/xla), a folder, or 'off'."""


def _from_dict(cls, values: dict):
    """Rebuild a (nested) config dataclass from its asdict() form; lists become tuples."""
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v, t = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(t):
            v = _from_dict(t, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def load_run_config(workdir: Path) -> TrainConfig:
    path = workdir / "config.json"
    if not path.exists():
        raise UserError(f"--workdir {workdir}: no config.json; it must be a run directory written by scgcm.train")
    try:
        return _from_dict(TrainConfig, json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--workdir {workdir}: {path.name} is unreadable ({type(e).__name__}: {str(e)[:100]})") from None


def load_state(workdir: Path, cfg: TrainConfig, checkpoint: str = "latest", mode: str = "onestep") -> tuple[TrainState, int]:
    optim = make_optimizer(cfg.optim.torso_lr, cfg.optim.head_lr)
    skeleton = eqx.filter_eval_shape(lambda k: init_state(build_model(cfg.model, key=k), optim, k), jr.key(0))
    if not (checkpoint.isdigit() or checkpoint == "latest" or checkpoint.startswith("best")):
        raise UserError(f"--checkpoint must be 'latest', 'best', 'best_<mode>' or a step, not {checkpoint!r}")
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        if checkpoint.isdigit():
            restored = ckpt.restore(skeleton, step=int(checkpoint))
        elif checkpoint.startswith("best"):
            which = checkpoint.split("_", 1)[1] if "_" in checkpoint else mode
            restored = ckpt.restore(skeleton, which=which)
        else:
            restored = ckpt.restore(skeleton)
    finally:
        ckpt.close()
    if restored is None:
        raise UserError(f"--checkpoint {checkpoint}: no such checkpoint in {workdir / 'checkpoints'}")
    return restored


def reference(args: SampleArgs, cfg: TrainConfig, extractor: fid.Extractor) -> tuple[fid.Stats, str]:
    """Reference statistics for --fid and their description: --fid-ref, else --fid-source, else the run's data.
    `extractor` may be a function that builds one: it is called only if statistics must be computed."""
    if args.fid_ref and args.fid_source:
        raise UserError("--fid-ref and --fid-source exclude each other: the reference is either a file or a dataset")
    if args.fid_ref:
        return fid.read_reference(Path(args.fid_ref), "--fid-ref"), args.fid_ref
    if args.fid_source:
        return fid.reference_statistics(args.fid_source, extractor, flag="--fid-source"), f"{args.fid_source} (train)"
    d, m = cfg.data, cfg.model
    stats = data_statistics(d.source, extractor, split=d.split, image_size=m.image_size, channels=m.channels,
                            synthetic_size=d.synthetic_size, seed=cfg.seed)
    return stats, f"the run's data {d.source or 'cifar10'} ({d.split})"


def check_args(args: SampleArgs) -> None:
    """Each bad input is a one-line UserError naming its flag, raised before anything is loaded."""
    for flag, value in (("--num", args.num), ("--batch-size", args.batch_size), ("--heun-steps", args.heun_steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if args.fid:
        fid.check_sample_count(args.num, "--num")
    if not Path(args.workdir).is_dir():
        raise UserError(f"--workdir {args.workdir}: no such directory")


def main(argv: list[str] | None = None) -> int:
    """The CLI; bad input raises UserError (run through scgcm.errors.run_cli: one line, exit code 2)."""
    args = tyro.cli(SampleArgs, args=sys.argv[1:] if argv is None else argv, description=__doc__)
    check_args(args)
    workdir = Path(args.workdir)
    cfg = load_run_config(workdir)
    use_compile_cache(args.compile_cache)
    state, step = load_state(workdir, cfg, args.checkpoint, args.mode)  # a missing step stops us before any network
    if args.fid:  # the reference before sampling, so that a missing file or dataset stops us first
        extractor = functools.cache(lambda: fid.FeatureExtractor(  # built only when features are needed
            inception.load_inception(), batch_size=min(args.batch_size, fid.default_batch_size()), progress=True))
        ref_stats, ref_name = reference(args, cfg, extractor)
    model = state.ema if args.ema else state.model
    m = cfg.model
    sampler = make_sampler(
        args.mode, shape=(m.channels, m.image_size, m.image_size), sigma_min=m.sigma_min, sigma_max=m.sigma_max,
        two_step_sigma=args.two_step_sigma or cfg.sample.two_step_sigma, sigmas=args.sigmas,
        heun_steps=args.heun_steps or cfg.sample.heun_steps,
    )
    images = generate(model, sampler, seed=args.seed, num=args.num, batch_size=args.batch_size, progress=True)

    out = Path(args.out) if args.out else workdir / "samples" / f"{args.mode}_{step:07d}_seed{args.seed}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images)
    grid = Path(args.grid) if args.grid else out.with_suffix(".png")
    save_grid(images[:64], grid)
    if args.png_dir:
        folder = Path(args.png_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    print(f"{len(images)} images ({args.mode}, step {step}, {'EMA' if args.ema else 'raw'} weights) -> {out}, grid {grid}")
    if args.fid:
        print(f"FID {fid.fid_from_images(rgb(images), ref_stats, extractor()):.4f} "
              f"({len(images)} images, {args.mode}, step {step}, against {ref_name})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
