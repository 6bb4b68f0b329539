"""`python -m scgcm.report RUN [RUN ...] --out DIR`: compare training runs (`scgcm.run.report`).

Reads each run directory's `metrics.jsonl`, `config.json` and `samples/` (a run still going is read
as far as it has got; a torn last line is skipped) and writes to DIR:

    <quantity>.png    the runs overlaid against updates (left) and kimg (right): losses, torso
                      gradient norm (interval mean, and the largest single update as a thin line),
                      update distance, N(k), images/s, skipped updates; fid_<mode>.png per sampling
                      mode, one line per run and sample count (FID depends on the count)
    grids_<mode>.png  the sample grids of all runs side by side (columns) at matching steps (rows)
    report.md         a summary table per run, an FID table, the plots and grids

Runs whose configurations are equal but for `seed` and `workdir` form a group, labelled by the fields
that differ between groups ("variant=score, recipe=ict"). When some group has two runs or more, DIR
also holds (unless `--no-group-seeds`):

    group_<key>.png   per group the mean over seeds (line) and the min–max over seeds (band) against
                      updates, on the steps all its runs share: each quantity above, and
                      group_<fid|classes|confident|memorised>_<mode>.png, a line per sample count
    report.md         + "Groups (runs that differ only in seed)": per group and metric (loss_ct,
                      grad-norm spikes, grad_norm std; the last fid/classes/confident/memorised at
                      the largest step every run of the group reached) mean ± sample std over seeds;
                      for two groups that differ only in variant, score − vanilla of the means and
                      of the stds with bootstrap 95% intervals (10,000 resamples of the seeds within
                      each group, generator seed 0), and whether the interval of the means excludes 0

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
    group_seeds: bool = True
    """Group the runs that differ only in seed (and workdir): mean-over-seeds plots and statistics."""


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
    path, groups = report(list(args.runs), args.out, names=names, spike_factor=args.spike_factor,
                          spike_window=args.spike_window, group_seeds=args.group_seeds)
    seeds = lambda g: f"{g.label} ×{len(g.members)}"
    print(f"wrote {path}" + (f"; runs that differ only in seed: {'; '.join(map(seeds, groups))}" if groups else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
