"""Runs that differ only in seed, and statistics over their seeds (pure functions of configs and numbers;
`scgcm.run.report` applies them to run directories).

A group is the runs whose configurations are equal once `seed` and `workdir` are removed (nested fields
compared as flattened dotted keys); a run without a configuration is a group of its own. A group's label
is the fields that differ between the groups ("variant=score, recipe=ict"), or, for a single group, the
first run's folder name without its seed suffix. Over the seeds of a group: mean ± sample standard deviation
(ddof 1); between two groups: the difference of a statistic with a bootstrap percentile interval (seeds
resampled with replacement within each group, independently; a fixed generator seed, so a report is
reproducible).
"""

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

SEED_KEYS = ("seed", "workdir")
"""Configuration fields that tell the seeds of one experiment apart without changing the experiment."""

NAMING_KEYS = ("preset", "variant", "recipe")
"""Fields that name a group alone when they tell all the groups apart (the recipe's changes then go unsaid)."""

RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
LEVEL = 0.95

_MISSING = object()

Values = Sequence[float] | Sequence[int] | np.ndarray
"""One number per seed."""


@dataclass(frozen=True)
class Group:
    label: str
    members: tuple[int, ...]  # indices into the list of runs, in its order
    config: dict | None  # flattened, without SEED_KEYS; None for a run without a configuration


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"model": {"torso": {"nf": 8}}} → {"model.torso.nf": 8}; lists become tuples (comparable, hashable)."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def experiment(config: dict) -> dict[str, object] | None:
    """The flattened configuration without the fields that only tell seeds apart; None without one."""
    return {k: v for k, v in flatten(config).items() if k not in SEED_KEYS} if config else None


def strip_seed_suffix(name: str) -> str:
    """"score-s3", "score_seed3", "score-3" → "score" (a name that is only a number is kept)."""
    return re.sub(r"[-_](?:seed|s)?\d+$", "", name) or name


def _show(value: object) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def differing_keys(configs: Sequence[dict]) -> list[str]:
    """The keys, in order of first appearance, whose value (or presence) is not the same in all `configs`."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if any(c.get(k, _MISSING) != configs[0].get(k, _MISSING) for c in configs[1:])]


def group_labels(configs: Sequence[dict | None], first_names: Sequence[str]) -> list[str]:
    """"key=value, …" of the fields that differ between the groups' configurations (only NAMING_KEYS when those
    alone tell the groups apart); a group without a configuration, or all of them when that names nothing, by
    its first run's folder name less the seed."""
    known = [c for c in configs if c is not None]
    keys = differing_keys(known) if len(known) > 1 else []
    named = [k for k in NAMING_KEYS if k in keys]  # "recipe=ict" says what its four changed fields would
    if named and len({tuple(c.get(k, _MISSING) for k in named) for c in known}) == len(known):
        keys = named
    labels = []
    for config, name in zip(configs, first_names):
        parts = [f"{k}={_show(config.get(k, '(unset)'))}" for k in keys] if config is not None else []
        labels.append(", ".join(parts) or strip_seed_suffix(name))
    return labels


def group_runs(configs: Sequence[dict], names: Sequence[str]) -> list[Group]:
    """Groups of the runs (their `config.json` "config" dicts and folder names), in order of first appearance."""
    experiments = [experiment(c) for c in configs]
    members: list[list[int]] = []
    for i, exp in enumerate(experiments):
        same = next((m for m in members if exp is not None and experiments[m[0]] == exp), None)
        if same is None:
            members.append([i])
        else:
            same.append(i)
    group_configs = [experiments[m[0]] for m in members]
    labels = group_labels(group_configs, [names[m[0]] for m in members])
    return [Group(label, tuple(m), c) for label, m, c in zip(labels, members, group_configs)]


def variant_pairs(groups: Sequence[Group]) -> list[tuple[Group, Group]]:
    """(score, vanilla) for every two groups whose configurations differ only in `variant`."""
    pairs = []
    for score in groups:
        for vanilla in groups:
            if score.config is None or vanilla.config is None:
                continue
            if (score.config.get("variant"), vanilla.config.get("variant")) == ("score", "vanilla") \
                    and differing_keys([score.config, vanilla.config]) == ["variant"]:
                pairs.append((score, vanilla))
    return pairs


def pair_context(score: Group, vanilla: Group) -> str:
    """What the two labels share besides the variant ("recipe=ict"), "" when nothing."""
    return re.sub(r"(^|, )variant=score(?=, |$)", "", score.label).removeprefix(", ")


# ------------------------------------------------------------------------------- aligning the seeds


def values_at_common_step(per_run: Sequence[dict[int, float]]) -> tuple[int, np.ndarray] | None:
    """(the largest step every run has a value at, the runs' values there); None when no step is common."""
    common = set.intersection(*(set(points) for points in per_run)) if per_run else set()
    if not common:
        return None
    step = max(common)
    return step, np.asarray([points[step] for points in per_run], float)


def common_curve(per_run: Sequence[dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps every run has a value at, sorted; values [run, step]); empty arrays when none is common."""
    common = sorted(set.intersection(*(set(points) for points in per_run))) if per_run else []
    values = np.asarray([[points[s] for s in common] for points in per_run], float).reshape(len(per_run), len(common))
    return np.asarray(common, float), values


# ------------------------------------------------------------------------------- statistics over seeds


def mean_std(values: Values) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof 1); the deviation is nan for a single value."""
    x = np.asarray(values, float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


def seed_mean(x: np.ndarray) -> np.ndarray | float:
    """The mean over the last axis (the seeds)."""
    return x.mean(axis=-1)


def seed_std(x: np.ndarray) -> np.ndarray | float:
    """The sample standard deviation (ddof 1) over the last axis (the seeds)."""
    return x.std(axis=-1, ddof=1)


@dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic of `a` minus that of `b`, on the seeds themselves
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap_difference(a: Values, b: Values, statistic: Callable[[np.ndarray], np.ndarray | float] = seed_mean,
                         *, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> Interval:
    """statistic(a) − statistic(b) with its bootstrap percentile interval: each group's seeds resampled with
    replacement, independently, `resamples` times, from numpy's Generator seeded with `seed`. `statistic`
    reduces the last axis. nan throughout when a group has too few seeds for it (the std needs two)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    need = 2 if statistic is seed_std else 1
    if len(a) < need or len(b) < need:
        return Interval(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, len(a), (resamples, len(a)))]
    rb = b[rng.integers(0, len(b), (resamples, len(b)))]
    low, high = np.percentile(statistic(ra) - statistic(rb), [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(statistic(a) - statistic(b)), float(low), float(high))
