"""FID, precision and recall of every saved checkpoint of a run (the checkpoint sweep, `scgcm.run.sweep`):

    python -m scgcm.evaluate RUN [--modes onestep twostep] [--num N]

computes FID, precision and recall of every saved checkpoint of RUN (checkpoints/latest/<step>) that
metrics.jsonl holds no FID of yet, appends them there and redraws fid.png. It only reads the
checkpoints, so it can run beside training on another device (e.g. `CUDA_VISIBLE_DEVICES=1`); keep
it running, or raise --config.keep-checkpoints, since training keeps only the last few.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from scgcm.errors import UserError, run_cli
from scgcm.eval import fid
from scgcm.run.rundir import SweepLock, use_compile_cache
from scgcm.run.sweep import sweep


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


def main(argv: list[str] | None = None, extractor: fid.FeatureExtractor | None = None) -> int:
    args = tyro.cli(SweepArgs, args=sys.argv[1:] if argv is None else argv, description=__doc__.split("\n\n")[0])
    workdir = Path(args.workdir)
    if not (workdir / "config.json").is_file():
        raise UserError(f"{workdir}: not a run directory (no config.json)")
    lock = SweepLock(workdir)  # a second sweep of this run stops here, in one line; training holds another lock
    try:
        use_compile_cache(args.compile_cache)
        sweep(workdir, modes=args.modes, num=args.num, batch_size=args.batch_size, seed=args.seed,
              fid_ref=args.fid_ref, extractor=extractor)
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
