"""How papers report FID: repeated seed ranges with the minimum and mean ± std, and the search of
the two-step sampler's intermediate σ. Pure functions; the CLIs (`scgcm.sample`) do the sampling.

EDM reports the minimum FID over three disjoint ranges of 50,000 seeds (0–49,999, 50,000–99,999,
100,000–149,999); the consistency-model papers tune the intermediate σ of two-step sampling by a
one-dimensional search on FID (openai/consistency_models' ternary search). Here image i of a range
comes from `fold_in(key(seed), start + i)`, so a range is reproducible from (seed, start, num) alone.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np

from scgcm.errors import UserError

GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618…: each probe keeps this fraction of the bracket


def seed_ranges(num: int, repeats: int, starts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """[(first, last)] image indices of each repeat (inclusive): `starts` if given, else r·num for r < repeats.
    Raises UserError when ranges overlap or the counts are wrong."""
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1 (got {repeats})")
    if starts:
        if len(starts) != repeats:
            raise UserError(f"--seed-starts gives {len(starts)} starts for --repeats {repeats}")
        if min(starts) < 0:
            raise UserError(f"--seed-starts must not be negative (got {list(starts)})")
    ranges = [(s, s + num - 1) for s in (starts or [r * num for r in range(repeats)])]
    ordered = sorted(ranges)
    for (_, last), (first, _) in zip(ordered, ordered[1:]):
        if first <= last:
            raise UserError(f"--seed-starts {list(starts or [])}: ranges of --num {num} images overlap")
    return ranges


def summarize(values: Sequence[float]) -> dict[str, float]:
    """min, mean and std (population, ddof=0; 0 for one value) of repeated measurements."""
    v = np.asarray(values, np.float64)
    return {"min": float(v.min()), "mean": float(v.mean()), "std": float(v.std())}


def golden_section_search(f: Callable[[float], float], lo: float, hi: float, *, probes: int = 10,
                          log_scale: bool = True) -> tuple[float, float, list[tuple[float, float]]]:
    """Minimise a unimodal f on [lo, hi] with `probes` evaluations (≥ 2) of golden-section search,
    in log x when `log_scale` (σ spans decades). Returns (best x, f(best x), every probe (x, f(x)) in order).

    Each step keeps the part of the bracket holding the smaller of two interior probes and reuses
    the other probe, so the bracket shrinks by 0.618 per evaluation after the first two."""
    if not 0 < lo < hi if log_scale else not lo < hi:
        raise ValueError(f"need {'0 < ' if log_scale else ''}lo < hi, got lo={lo}, hi={hi}")
    if probes < 2:
        raise ValueError(f"golden-section search needs at least 2 probes, got {probes}")
    to_x = math.exp if log_scale else float
    a, b = (math.log(lo), math.log(hi)) if log_scale else (lo, hi)
    history: list[tuple[float, float]] = []

    def probe(u: float) -> float:
        x = to_x(u)
        y = float(f(x))
        history.append((x, y))
        return y if math.isfinite(y) else math.inf  # a failed probe never wins

    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = probe(c), probe(d)
    for _ in range(probes - 2):
        if fc <= fd:  # the minimum lies in [a, d]
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = probe(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = probe(d)
    best = min(history, key=lambda p: p[1] if math.isfinite(p[1]) else math.inf)
    return best[0], best[1], history
