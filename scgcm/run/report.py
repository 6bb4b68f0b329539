"""Comparing training runs (the library of `python -m scgcm.report`, whose docstring describes the output):
each run directory's metrics.jsonl, config.json and sample grids become overlaid plots, grids side by side
and report.md. A gradient-norm spike is an interval whose largest per-update torso gradient norm exceeds
`factor` times the median of the interval means of the `window` intervals before it. Runs that differ only
in seed (`scgcm.run.groups`) also get mean-over-seeds plots and a statistics section."""

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from matplotlib import rcParams
from PIL import Image, ImageDraw, ImageFont

from scgcm.errors import UserError
from scgcm.eval.digits import resolve_network
from scgcm.eval.plot import figure, save
from scgcm.run.groups import (
    BOOTSTRAP_SEED,
    LEVEL,
    RESAMPLES,
    Group,
    Interval,
    bootstrap_difference,
    common_curve,
    group_runs,
    mean_std,
    pair_context,
    seed_mean,
    seed_std,
    values_at_common_step,
    variant_pairs,
)
from scgcm.run.metrics import read_records

# (metric key, title, log scale)
CURVES = (
    ("loss_ct", "consistency loss", True),
    ("loss_dsm", "DSM loss (score head)", True),
    ("grad_norm", "torso gradient norm", True),
    ("update_distance", "torso update distance", True),
    ("num_scales", "N(k), discretisation steps", False),
    ("images_per_sec", "training images/s", False),
    ("skipped_total", "skipped updates (total)", False),
)


@dataclass
class Run:
    name: str
    path: Path
    config: dict
    lines: list[dict]
    grids: dict[str, dict[int, Path]] = field(default_factory=dict)  # mode -> step -> PNG

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, kimg, values) of the lines that hold a finite `key`."""
        rows = [(r["step"], r.get("kimg", r["step"] * self.batch / 1000), r[key]) for r in self.lines
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return tuple(np.asarray(c, float) for c in zip(*rows)) if rows else (np.zeros(0),) * 3

    @property
    def batch(self) -> int:
        return int(self.config.get("batch_size", 1))

    def evaluated(self, name: str) -> dict[tuple[str, int | None], list[tuple[int, float]]]:
        """{(mode, sample count): [(step, value), ...]} of the `<name>_<mode>` entries (fid, classes, …), in file order."""
        default_num = self.config.get("fid", {}).get("num")
        out: dict[tuple[str, int | None], list[tuple[int, float]]] = {}
        for r in self.lines:
            for k, v in r.items():
                if k.startswith(f"{name}_") and isinstance(v, (int, float)):
                    num = r.get("num_fid_samples", default_num)
                    out.setdefault((k[len(name) + 1:], None if num is None else int(num)), []).append((int(r["step"]), float(v)))
        return out

    def fids(self) -> dict[tuple[str, int | None], list[tuple[int, float]]]:
        """{(mode, sample count): [(step, FID), ...]} in file order."""
        return self.evaluated("fid")


def load_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    lines = read_records(metrics)  # a line being written, torn or of the wrong types is skipped (with a warning)
    if not lines:
        raise UserError(f"{path}: no metrics.jsonl with any logged interval "
                        "(not a scgcm.train run directory, or nothing logged yet)")
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()).get("config", {}) if config_file.is_file() else {}
    grids: dict[str, dict[int, Path]] = {}
    for png in sorted((path / "samples").glob("*_*.png")):
        m = re.fullmatch(r"([a-z]+)_(\d+)", png.stem)
        if m:
            grids.setdefault(m.group(1), {})[int(m.group(2))] = png
    return Run(name or path.name, path, config, lines, grids)


def count_spikes(grad_norm: np.ndarray, grad_norm_max: np.ndarray, factor: float = 3.0, window: int = 10) -> int:
    """Intervals whose largest update norm exceeds `factor` × the median interval mean of the `window` before."""
    return sum(int(grad_norm_max[i] > factor * np.median(grad_norm[i - window:i]))
               for i in range(window, len(grad_norm)))


def spikes(run: Run, factor: float, window: int) -> int:
    rows = [r for r in run.lines if isinstance(r.get("grad_norm"), (int, float))]
    means = np.asarray([r["grad_norm"] for r in rows], float)
    peaks = np.asarray([r.get("grad_norm_max", r["grad_norm"]) for r in rows], float)
    return count_spikes(means, peaks, factor, window)


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def summary_rows(runs: list[Run], factor: float, window: int) -> list[dict]:
    rows = []
    for run in runs:
        last = run.lines[-1]
        train_lines = [r for r in run.lines if "loss_ct" in r]
        elapsed = [r["elapsed_s"] for r in run.lines if isinstance(r.get("elapsed_s"), (int, float))]
        rows.append({
            "run": run.name, "variant": run.config.get("variant", "?"), "preset": run.config.get("preset", "?"),
            "recipe": run.config.get("recipe", "reference"), "seed": run.config.get("seed", "?"),
            "updates": max(r["step"] for r in run.lines),
            "kimg": max((r["kimg"] for r in train_lines if "kimg" in r), default=last["step"] * run.batch / 1000),
            "wall": elapsed[-1] if elapsed else None,
            "loss_ct": train_lines[-1]["loss_ct"] if train_lines else None,
            "spikes": spikes(run, factor, window),
            "skipped": max((r.get("skipped_total", 0) or 0 for r in run.lines), default=0),
        })
    return rows


def fid_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for run in runs:
        for (mode, num), points in sorted(run.fids().items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            finite = [(s, v) for s, v in points if math.isfinite(v)]
            best = min(finite, key=lambda sv: sv[1]) if finite else (None, math.nan)
            rows.append({"run": run.name, "mode": mode, "samples": num, "evaluations": len(points),
                         "first": points[0], "last": points[-1], "best": best})
    return rows


def _label(run: Run, num: int | None = None) -> str:
    return run.name + (f" ({num:,} samples)" if num else "")


def distance_name(runs: list[Run]) -> str:
    """'digits FD' when every run is scored by the digits classifier (`--config.fid.network`), else 'FID'."""
    network = lambda run: resolve_network(run.config.get("fid", {}).get("network", "auto"),
                                          run.config.get("data", {}).get("source"))
    return "digits FD" if runs and all(network(run) == "digits" for run in runs) else "FID"


def evaluated_title(name: str, title: str, runs: list[Run]) -> str:
    """An evaluation's name on the group plots: the distance named by the network that measured it."""
    return distance_name(runs) if name == "fid" else title


def plot_curves(runs: list[Run], out: Path) -> list[Path]:
    written = []
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    for key, title, log in CURVES:
        if not any(len(run.series(key)[0]) for run in runs):
            continue
        fig = figure(11, 3.8)
        axes = fig.subplots(1, 2, sharey=True)
        for i, run in enumerate(runs):
            steps, kimg, values = run.series(key)
            colour = colours[i % len(colours)]
            for ax, x in zip(axes, (steps, kimg)):
                ax.plot(x, values, color=colour, label=run.name, lw=1.4)
                if key == "grad_norm":
                    s2, k2, peaks = run.series("grad_norm_max")
                    ax.plot(s2 if ax is axes[0] else k2, peaks, color=colour, lw=0.6, alpha=0.5)
        for ax, xlabel in zip(axes, ("updates", "kimg")):
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if log and all(np.all(run.series(key)[2] > 0) for run in runs):
                ax.set_yscale("log")
        axes[0].set_ylabel(title + (" (thin: largest update)" if key == "grad_norm" else ""))
        axes[0].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        written.append(out / f"{key}.png")
        fig.savefig(written[-1], dpi=90)

    modes = sorted({mode for run in runs for mode, _ in run.fids()})
    for mode in modes:
        fig = figure(11, 3.8)
        axes = fig.subplots(1, 2, sharey=True)
        for i, run in enumerate(runs):
            for j, ((m, num), points) in enumerate(sorted(run.fids().items(), key=lambda kv: kv[0][1] or 0)):
                if m != mode:
                    continue
                steps = np.asarray([s for s, _ in points], float)
                values = np.asarray([v for _, v in points], float)
                for ax, x in zip(axes, (steps, steps * run.batch / 1000)):
                    ax.plot(x, values, color=colours[i % len(colours)], marker="os^v"[j % 4],
                            ls="-" if j == 0 else ":", label=_label(run, num))
        for ax, xlabel in zip(axes, ("updates", "kimg")):
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"{distance_name(runs)}, {mode}")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"FID ({mode}); fewer than 50,000 samples biases FID upward" if distance_name(runs) == "FID"
                     else f"{distance_name(runs)} ({mode}): Fréchet distance on the digits classifier's features")
        fig.tight_layout()
        written.append(out / f"fid_{mode}.png")
        fig.savefig(written[-1], dpi=90)
    return written


def matching_steps(runs: list[Run], mode: str, rows: int) -> list[int]:
    """Up to `rows` steps, evenly spread, at which every run has a grid of `mode` (else each run's latest)."""
    common = sorted(set.intersection(*(set(run.grids.get(mode, {})) for run in runs)))
    if not common:
        return []
    picks = np.unique(np.round(np.linspace(0, len(common) - 1, min(rows, len(common)))).astype(int))
    return [common[i] for i in picks]


def side_by_side(runs: list[Run], mode: str, out: Path, rows: int = 3, cell: int = 192) -> Path | None:
    """One PNG: a column per run, a row per matching step, each cell the run's grid at that step."""
    steps = matching_steps(runs, mode, rows)
    if not steps:
        return None
    font = ImageFont.load_default()
    pad, head, side = 6, 18, 90
    sheet = Image.new("RGB", (side + len(runs) * (cell + pad) + pad, head + len(steps) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, run in enumerate(runs):
        draw.text((side + pad + c * (cell + pad) + cell // 2, head // 2), run.name, fill="black", font=font, anchor="mm")
    for r, step in enumerate(steps):
        y = head + pad + r * (cell + pad)
        draw.text((side - 6, y + cell // 2), f"{step:,} updates", fill="black", font=font, anchor="rm")
        for c, run in enumerate(runs):
            grid = Image.open(run.grids[mode][step]).convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(grid, (side + pad + c * (cell + pad), y))
    path = out / f"grids_{mode}.png"
    sheet.save(path)
    return path


def _num(v, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:,.{digits}f}"


# ------------------------------------------------------------------------------- runs that differ only in seed

# (metrics.jsonl name before _<mode>, title, decimals): the evaluations reported per group of seeds
EVALUATED = (
    ("fid", "FID", 2),
    ("classes", "classes", 2),
    ("confident", "confident share", 3),
    ("memorised", "memorised share", 3),
)


@dataclass(frozen=True)
class SeedMetric:
    name: str
    step: int  # the largest step common to the runs, where `values` are taken (or up to which they count)
    values: np.ndarray  # one per run, in the runs' order
    decimals: int


def _points(pairs: Iterable[tuple[int | float, float]]) -> dict[int, float]:
    """{step: value} of the finite values (a step evaluated twice: the later value)."""
    return {int(s): float(v) for s, v in pairs if math.isfinite(v)}


def _series_points(run: Run, key: str) -> dict[int, float]:
    steps, _, values = run.series(key)
    return _points(zip(steps, values))


def seed_groups(runs: list[Run]) -> list[Group]:
    """The groups of runs that differ only in seed; [] unless some group has two runs or more."""
    groups = group_runs([run.config for run in runs], [run.path.name for run in runs])
    return groups if any(len(g.members) > 1 for g in groups) else []


def training_metrics(runs: list[Run], factor: float, window: int) -> list[SeedMetric]:
    """loss_ct at the largest logged step common to `runs`; spikes and the grad_norm std up to it."""
    found = values_at_common_step([_series_points(run, "loss_ct") for run in runs])
    if found is None:
        return []
    step, loss = found
    upto = [replace(run, lines=[r for r in run.lines if r["step"] <= step]) for run in runs]
    norms = [run.series("grad_norm")[2] for run in upto]
    return [SeedMetric("loss_ct", step, loss, 4),
            SeedMetric("grad-norm spikes", step, np.asarray([spikes(run, factor, window) for run in upto], float), 2),
            SeedMetric("grad_norm std over the run", step, np.asarray([n.std() if len(n) else math.nan for n in norms]), 3)]


def evaluated_metrics(runs: list[Run]) -> list[SeedMetric]:
    """Each evaluation every run has (name, mode, sample count) at the largest step at which all have it."""
    metrics = []
    for name, _, decimals in EVALUATED:
        keys = set.intersection(*(set(run.evaluated(name)) for run in runs))
        for mode, num in sorted(keys, key=lambda k: (k[0], k[1] or 0)):
            found = values_at_common_step([_points(run.evaluated(name)[mode, num]) for run in runs])
            if found is not None:
                metrics.append(SeedMetric(f"{name} {mode}" + (f" ({num:,} samples)" if num else ""), *found, decimals))
    return metrics


def seed_metrics(runs: list[Run], factor: float, window: int) -> list[SeedMetric]:
    return training_metrics(runs, factor, window) + evaluated_metrics(runs)


def _band_plot(curves: list[tuple[str, int, int, np.ndarray, np.ndarray]], ylabel: str, log: bool, path: Path,
               marker: str = "") -> list[Path]:
    """Per (label, colour, style, steps, values [seed, step]): the mean over seeds and a min–max band."""
    curves = [c for c in curves if len(c[3])]
    if not curves:
        return []
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    fig = figure(8, 4.2)
    ax = fig.subplots()
    for label, colour, style, steps, values in curves:
        colour = colours[colour % len(colours)]
        ax.plot(steps, values.mean(0), color=colour, ls=("-", ":", "--", "-.")[style % 4], marker=marker, lw=1.4,
                label=label)
        ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.2, lw=0)
    if log and all(np.all(c[4] > 0) for c in curves):
        ax.set_yscale("log")
    ax.set_xlabel("updates")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{ylabel}: mean over seeds (line), min–max over seeds (band)", fontsize=10)
    fig.tight_layout()
    return [save(fig, path, dpi=90)]


def _seeds(group: Group) -> str:
    return f"{group.label} ({len(group.members)} seed{'s' if len(group.members) > 1 else ''})"


def plot_groups(runs: list[Run], groups: list[Group], out: Path) -> list[Path]:
    """group_<quantity>.png and group_<name>_<mode>.png: per group the mean over seeds on their common steps."""
    written = []
    members = [[runs[i] for i in g.members] for g in groups]
    for key, title, log in CURVES:
        curves = [(_seeds(g), i, 0, *common_curve([_series_points(run, key) for run in m]))
                  for i, (g, m) in enumerate(zip(groups, members))]
        written += _band_plot(curves, title, log, out / f"group_{key}.png")
    for name, title, _ in EVALUATED:
        for mode in sorted({mode for run in runs for mode, _ in run.evaluated(name)}):
            curves = []
            for i, (g, m) in enumerate(zip(groups, members)):
                nums = set.intersection(*({n for md, n in run.evaluated(name) if md == mode} for run in m))
                for j, num in enumerate(sorted(nums, key=lambda n: n or 0)):
                    count = f", {num:,} samples" if num else ""
                    points = [_points(run.evaluated(name)[mode, num]) for run in m]
                    curves.append((_seeds(g) + count, i, j, *common_curve(points)))
            written += _band_plot(curves, f"{evaluated_title(name, title, runs)}, {mode}", False,
                                  out / f"group_{name}_{mode}.png", marker="o")
    return written


def _mean_std(values: np.ndarray, decimals: int) -> str:
    mean, std = mean_std(values)
    return f"{_num(mean, decimals)} ± {_num(std, decimals)}"


def _interval(iv: Interval, decimals: int) -> tuple[str, str]:
    return _num(iv.estimate, decimals), f"[{_num(iv.low, decimals)}, {_num(iv.high, decimals)}]"


def group_table(runs: list[Run], groups: list[Group], factor: float, window: int) -> list[str]:
    lines = ["| group | seeds | runs |", "|---|---|---|"]
    lines += [f"| {g.label} | {len(g.members)} | {', '.join(runs[i].name for i in g.members)} |" for g in groups]
    lines += ["", "| group | seeds | metric | at step | mean ± std | per seed (seed: value) |", "|---|---|---|---|---|---|"]
    for g in groups:
        members = [runs[i] for i in g.members]
        for m in seed_metrics(members, factor, window):
            per_seed = "; ".join(f"{run.config.get('seed', '?')}: {_num(v, m.decimals)}" for run, v in zip(members, m.values))
            lines.append(f"| {g.label} | {len(members)} | {m.name} | {m.step:,} | {_mean_std(m.values, m.decimals)} "
                         f"| {per_seed} |")
    return lines


def comparison_table(runs: list[Run], pairs: list[tuple[Group, Group]], factor: float, window: int) -> list[str]:
    """score − vanilla per metric, at the steps common to both groups: the difference of the means and of
    the seed-to-seed standard deviations, each with its bootstrap interval."""
    lines = ["| comparison | metric | at step | score − vanilla, mean | 95% interval | excludes 0 "
             "| score − vanilla, std | 95% interval |", "|---|---|---|---|---|---|---|---|"]
    for score, vanilla in pairs:
        context = pair_context(score, vanilla)
        members = [runs[i] for i in score.members + vanilla.members]
        for m in seed_metrics(members, factor, window):
            a, b = m.values[:len(score.members)], m.values[len(score.members):]
            mean, std = bootstrap_difference(a, b, seed_mean), bootstrap_difference(a, b, seed_std)
            excludes = "n/a" if math.isnan(mean.low) else ("yes" if mean.excludes_zero else "no")
            lines.append(f"| score − vanilla{f' ({context})' if context else ''} | {m.name} | {m.step:,} | "
                         f"{' | '.join(_interval(mean, m.decimals))} | {excludes} | {' | '.join(_interval(std, m.decimals))} |")
    return lines


def group_section(runs: list[Run], groups: list[Group], plots: list[Path], factor: float, window: int) -> list[str]:
    lines = ["## Groups (runs that differ only in seed)", "",
             "Runs whose configurations are equal but for `seed` and `workdir` form a group, labelled by the fields "
             "that differ between groups. mean ± std: over the group's seeds, sample standard deviation (ddof 1; "
             "n/a for one seed). Evaluations are taken at the largest step at which every run of the group has one, "
             "loss_ct at the largest logged step all share; spikes and the grad_norm std count up to that step.", ""]
    lines += group_table(runs, groups, factor, window) + [""]
    if pairs := variant_pairs(groups):
        lines += ["### score − vanilla", "",
                  "For groups that differ only in `variant`, at the steps common to both: the difference of the means "
                  f"and of the seed-to-seed standard deviations, with a bootstrap {LEVEL:.0%} percentile interval "
                  f"({RESAMPLES:,} resamples of the seeds with replacement, within each group independently; numpy "
                  f"Generator seed {BOOTSTRAP_SEED}). With few seeds the interval is coarse.", ""]
        lines += comparison_table(runs, pairs, factor, window) + [""]
    return lines + [f"![{p.stem}]({p.name})" for p in plots] + [""]


def write_markdown(runs: list[Run], out: Path, plots: list[Path], grids: list[Path], factor: float, window: int,
                   groups: Sequence[Group] = (), group_plots: Sequence[Path] = ()) -> Path:
    lines = ["# Run comparison", "", "Runs: " + ", ".join(f"`{run.path}`" for run in runs), ""]
    lines += ["| run | variant | preset | recipe | seed | updates | kimg | wall time | last loss_ct | grad-norm spikes "
              "| skipped |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary_rows(runs, factor, window):
        lines.append(f"| {r['run']} | {r['variant']} | {r['preset']} | {r['recipe']} | {r['seed']} | {r['updates']:,} | "
                     f"{r['kimg']:,.1f} | {_fmt_time(r['wall'])} | {_num(r['loss_ct'], 4)} | {r['spikes']} | {r['skipped']} |")
    lines += ["", f"Spike: a logged interval whose largest per-update torso gradient norm exceeds {factor:g}× the median "
              f"of the interval means of the {window} intervals before it.", ""]
    fids = fid_rows(runs)
    if fids:
        lines += ["## FID", "", "Each FID is labelled with its sample count; below 50,000 samples FID is biased upward, "
                  "so compare numbers of the same count only.", "",
                  "| run | mode | samples | evaluations | first (step) | last (step) | best (step) |",
                  "|---|---|---|---|---|---|---|"]
        for r in fids:
            cell = lambda sv: f"{_num(sv[1])} ({sv[0]:,})" if sv[0] is not None else "n/a"
            lines.append(f"| {r['run']} | {r['mode']} | {r['samples'] or '?'} | {r['evaluations']} | "
                         f"{cell(r['first'])} | {cell(r['last'])} | {cell(r['best'])} |")
        lines.append("")
    else:
        lines += ["No FID has been computed in these runs.", ""]
    if groups:
        lines += group_section(runs, list(groups), list(group_plots), factor, window)
    lines += ["## Curves", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if grids:
        lines += ["## Samples at matching steps", ""] + [f"![{p.stem}]({p.name})" for p in grids] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def is_run_directory(folder: Path) -> bool:
    """A folder scgcm.train writes: metrics.jsonl, or config.json beside checkpoints/ or trainer.lock."""
    return (folder / "metrics.jsonl").is_file() or (
        (folder / "config.json").is_file() and ((folder / "checkpoints").is_dir() or (folder / "trainer.lock").exists()))


def check_out(out: Path, runs: list[str | Path] = ()) -> None:
    """A UserError if `out` is, or lies inside, a run directory (one of `runs` or any other): the report's
    files would mix with the run's."""
    where = Path(out).resolve()
    listed = {Path(r).resolve() for r in runs}
    for folder in (where, *where.parents):
        if folder in listed or is_run_directory(folder):
            raise UserError(f"--out {out}: inside the run directory {folder}; write the report elsewhere "
                            "(e.g. --out report beside the runs)")


def report(paths: list[str | Path], out: str | Path, *, names: list[str] | None = None,
           spike_factor: float = 3.0, spike_window: int = 10, group_seeds: bool = True) -> tuple[Path, list[Group]]:
    """Write the plots, grids and report.md for `paths` into `out` (not inside a run directory), with a
    section on the runs that differ only in seed when `group_seeds` and some group has two runs or more.
    Returns report.md's path and the groups reported ([] when none)."""
    check_out(Path(out), paths)
    runs = [load_run(p, n) for p, n in zip(paths, names or [None] * len(paths))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(runs, out)
    modes = sorted({mode for run in runs for mode in run.grids})
    grids = [g for g in (side_by_side(runs, mode, out) for mode in modes) if g is not None]
    groups = seed_groups(runs) if group_seeds else []
    group_plots = plot_groups(runs, groups, out) if groups else []
    return write_markdown(runs, out, plots, grids, spike_factor, spike_window, groups, group_plots), groups
