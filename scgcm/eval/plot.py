"""Line plots to PNG (FID against step, against σ, against σ_rel): matplotlib's object API on the Agg
canvas (no pyplot, no global backend), the one plotting stack of scgcm (`scgcm.run.report` uses it too)."""

import math
from collections.abc import Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator


def figure(width_in: float | int, height_in: float | int, dpi: int = 100) -> Figure:
    """A matplotlib figure drawn on its own Agg canvas."""
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, out_png: str | Path, **kwargs) -> Path:
    """Write `fig` to `out_png` through a temporary file renamed when complete (a reader never sees half a PNG)."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    partial = out_png.with_name(out_png.name + ".partial.png")
    fig.savefig(partial, **kwargs)
    partial.replace(out_png)
    return out_png


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0e}"


def plot_lines(series: Mapping[str, list[tuple[int | float, int | float]]], out_png: str | Path, *, xlabel: str, ylabel: str,
               size: tuple[int, int] = (720, 440), integer_x: bool = False) -> bool:
    """y against x, one line per name (y log-scaled when it spans a decade), to a PNG of `size` pixels.
    The legend gives each line's last y (`integer_x`, steps) or its lowest y and where (a search).
    Returns False (and writes nothing) without finite points."""
    series = {k: sorted((float(x), float(y)) for x, y in v if math.isfinite(y)) for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    values = [y for points in series.values() for _, y in points]
    fig = figure(size[0] / 100, size[1] / 100)
    ax = fig.add_subplot()
    for mode, points in series.items():
        xs, ys = zip(*points)
        if integer_x:
            legend = f"{mode}: {ys[-1]:.2f}"
        else:
            x_best, y_best = min(points, key=lambda p: p[1])
            legend = f"{mode}: min {y_best:.2f} at {_label(x_best)}"
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=2, label=legend)
    log_scale = min(values) > 0 and max(values) / min(values) >= 10
    if log_scale:
        ax.set_yscale("log")
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v):,}"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (log scale)" if log_scale else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    save(fig, out_png)
    return True
