"""The FID protocol's pure parts: seed ranges of --repeats, the summary, golden-section search."""

import math

import numpy as np
import pytest

from scgcm.errors import UserError
from scgcm.eval.fid import fid_label
from scgcm.eval.protocol import GOLDEN, golden_section_search, seed_ranges, summarize


def test_default_seed_ranges_are_edms_and_disjoint():
    assert seed_ranges(50_000, 3) == [(0, 49_999), (50_000, 99_999), (100_000, 149_999)]
    ranges = seed_ranges(1000, 4)
    assert ranges == seed_ranges(1000, 4)  # reproducible
    indices = [set(range(a, b + 1)) for a, b in ranges]
    assert all(len(s) == 1000 for s in indices) and len(set().union(*indices)) == 4000  # disjoint
    assert seed_ranges(10, 2, [100, 0]) == [(100, 109), (0, 9)]
    with pytest.raises(UserError, match="--seed-starts.*overlap"):
        seed_ranges(10, 2, [0, 5])
    with pytest.raises(UserError, match="--seed-starts gives 1 starts for --repeats 2"):
        seed_ranges(10, 2, [0])
    with pytest.raises(UserError, match="--repeats"):
        seed_ranges(10, 0)


def test_summary_and_labels():
    assert summarize([3.0, 1.0, 2.0]) == {"min": 1.0, "mean": 2.0, "std": pytest.approx(math.sqrt(2 / 3))}
    assert summarize([4.5]) == {"min": 4.5, "mean": 4.5, "std": 0.0}
    assert fid_label(50_000) == "FID" and fid_label(1000) == "FID (1,000 samples)"


@pytest.mark.parametrize("log_scale, x_min", [(True, 0.821), (False, 2.5)])
def test_golden_section_finds_the_minimum_of_a_unimodal_function(log_scale, x_min):
    calls = []

    def f(x):  # a stand-in for FID(σ): unimodal, minimum 1.5 at x_min
        calls.append(x)
        return 1.5 + (math.log(x / x_min) if log_scale else x - x_min) ** 2

    lo, hi = (0.05, 20.0) if log_scale else (-3.0, 7.0)
    best, value, history = golden_section_search(f, lo, hi, probes=30, log_scale=log_scale)
    assert len(calls) == len(history) == 30 and [x for x, _ in history] == calls  # every probe, once
    assert best == pytest.approx(x_min, rel=1e-5) and value == pytest.approx(1.5, abs=1e-9)
    assert all(lo <= x <= hi for x in calls)


def test_golden_section_bracket_shrinks_by_the_golden_ratio():
    # on an increasing function the probes walk towards lo: the n-th lies at GOLDEN^n (GOLDEN² + GOLDEN = 1)
    _, _, history = golden_section_search(lambda x: x, 0.0, 1.0, probes=12, log_scale=False)
    assert history[-1][0] == pytest.approx(GOLDEN ** 12, rel=1e-9)
    with pytest.raises(ValueError):
        golden_section_search(lambda x: x, 0.0, 1.0, probes=5)  # log scale needs lo > 0
    inf_at_left = golden_section_search(lambda x: np.nan if x < 0.5 else x, 0.0, 1.0, probes=8, log_scale=False)
    assert inf_at_left[0] >= 0.5 and math.isfinite(inf_at_left[1])
