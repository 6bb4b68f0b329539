"""`python -m scgcm.report RUN [RUN ...] --out DIR`: compare training runs (`scgcm.run.report`).

Reads each run directory's `metrics.jsonl`, `config.json` and `samples/` (a run still going is read
as far as it has got; a torn last line is skipped) and writes to DIR:

    <quantity>.png    the runs overlaid against updates (left) and kimg (right): losses, torso
                      gradient norm (interval mean, and the largest single update as a thin line),
                      update distance, N(k), images/s, skipped updates; fid_<mode>.png per sampling
                      mode, one line per run and sample count (FID depends on the count)
    grids_<mode>.png  the sample grids of all runs side by side (columns) at matching steps (rows)
    report.md         a summary table per run, an FID table, the plots and grids

A gradient-norm spike is a logged interval whose largest per-update torso gradient norm exceeds
`--spike-factor` (default 3) times the median of the interval means of the `--spike-window`
(default 10) intervals before it; the first window of intervals is not judged.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from scgcm.errors import UserError, run_cli
from scgcm.run.report import report


@dataclass(frozen=True)
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """Run directories written by scgcm.train (finished or still going)."""
    out: str = "report"
    """Folder for the PNGs and report.md."""
    names: tuple[str, ...] | None = None
    """Names of the runs in plots and tables (default: the folder names)."""
    spike_factor: float = 3.0
    """A gradient-norm spike exceeds this many times the recent median."""
    spike_window: int = 10
    """Logged intervals the spike median is taken over."""


def main(argv: list[str]) -> int:
    args = tyro.cli(Args, args=argv, description=__doc__)
    if args.names is not None and len(args.names) != len(args.runs):
        raise UserError(f"--names gives {len(args.names)} names for {len(args.runs)} runs")
    if len({Path(r).name for r in args.runs}) < len(args.runs) and args.names is None:
        names = [str(Path(r)) for r in args.runs]  # distinct labels when folder names repeat
    else:
        names = list(args.names) if args.names else None
    if args.spike_factor <= 0 or args.spike_window < 1:
        raise UserError("--spike-factor must be positive and --spike-window at least 1")
    path = report(list(args.runs), args.out, names=names, spike_factor=args.spike_factor, spike_window=args.spike_window)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
