"""Runs that differ only in seed (`scgcm.run.groups`, the group section of `scgcm.report`): grouping and
labels, the statistics against hand-computed values, and the report of fake run directories (metrics.jsonl
and config.json written here: no JAX, no training)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scgcm import report as report_cli
from scgcm.errors import run_cli
from scgcm.run.groups import (
    Interval,
    bootstrap_difference,
    common_curve,
    flatten,
    group_runs,
    mean_std,
    pair_context,
    seed_mean,
    seed_std,
    strip_seed_suffix,
    values_at_common_step,
    variant_pairs,
)

BASE = {"variant": "score", "preset": "digits", "recipe": "reference", "workdir": "runs/x", "seed": 1,
        "batch_size": 32, "optim": {"torso_lr": 4e-4}, "fid": {"num": 500, "modes": ["onestep", "twostep"]}}


def config(**changes) -> dict:
    c = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        if key == "torso_lr":
            c["optim"]["torso_lr"] = value
        else:
            c[key] = value
    return c


# ------------------------------------------------------------------------------- grouping and labels


def test_flatten_and_seed_suffixes():
    assert flatten({"a": 1, "m": {"t": {"nf": 8, "ch": [1, 2]}}}) == {"a": 1, "m.t.nf": 8, "m.t.ch": (1, 2)}
    for name in ("score-s3", "score_seed3", "score-3", "score_s12", "score"):
        assert strip_seed_suffix(name) == "score", name
    assert strip_seed_suffix("run12") == "run12" and strip_seed_suffix("7") == "7"


def test_runs_that_differ_only_in_seed_and_workdir_form_a_group_labelled_by_what_differs():
    configs = ([config(seed=s, workdir=f"runs/score-s{s}") for s in (1, 2, 3, 4)]
               + [config(variant="vanilla", seed=s, workdir=f"runs/vanilla-s{s}") for s in (1, 2, 3, 4)]
               + [config(variant="vanilla", recipe="ict", seed=s) for s in (1, 2)])
    names = [f"r{i}" for i in range(len(configs))]
    groups = group_runs(configs, names)
    assert [g.members for g in groups] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert [g.label for g in groups] == ["variant=score, recipe=reference", "variant=vanilla, recipe=reference",
                                         "variant=vanilla, recipe=ict"]
    assert [(s.members, v.members) for s, v in variant_pairs(groups)] == [((0, 1, 2, 3), (4, 5, 6, 7))]
    assert pair_context(*variant_pairs(groups)[0]) == "recipe=reference"


def test_runs_that_differ_in_more_than_seed_are_not_grouped_and_a_single_group_is_named_by_its_folders():
    groups = group_runs([config(seed=1), config(seed=2, torso_lr=1e-3), config(seed=3)], ["a-s1", "b-s2", "a-s3"])
    assert [(g.members, g.label) for g in groups] == [((0, 2), "optim.torso_lr=0.0004"), ((1,), "optim.torso_lr=0.001")]
    assert variant_pairs(groups) == []  # they differ in the learning rate, not the variant
    assert [g.label for g in group_runs([config(seed=1), config(seed=2)], ["score-s1", "score-s2"])] == ["score"]
    # a list-valued field is compared and shown whole; runs without config.json are never grouped
    groups = group_runs([config(fid={"modes": ["onestep"]}), config(seed=5, fid={"modes": ["twostep"]}), {}, {}],
                        ["a", "b", "plain-s1", "plain-s2"])
    assert [(g.members, g.label) for g in groups] == [((0,), "fid.modes=['onestep']"), ((1,), "fid.modes=['twostep']"),
                                                      ((2,), "plain"), ((3,), "plain")]


def test_values_at_the_largest_common_step_and_the_common_curve():
    runs = [{0: 1.0, 100: 2.0, 200: 3.0}, {0: 5.0, 100: 6.0}]
    step, values = values_at_common_step(runs)
    assert step == 100 and values.tolist() == [2.0, 6.0]
    assert values_at_common_step([{0: 1.0}, {5: 1.0}]) is None
    steps, values = common_curve(runs)
    assert steps.tolist() == [0, 100] and values.tolist() == [[1, 2], [5, 6]]
    assert common_curve([{0: 1.0}, {5: 1.0}])[1].shape == (2, 0)


# ------------------------------------------------------------------------------- statistics


def test_mean_and_sample_std():
    assert mean_std([1, 2, 3]) == (2.0, 1.0)
    mean, std = mean_std([5.0])
    assert mean == 5.0 and math.isnan(std)


def test_bootstrap_of_constant_groups_is_the_exact_difference_with_zero_width():
    assert bootstrap_difference([3.0] * 4, [1.0] * 3) == Interval(2.0, 2.0, 2.0)
    assert bootstrap_difference([3.0] * 4, [1.0] * 3, seed_std) == Interval(0.0, 0.0, 0.0)
    assert not Interval(0.0, 0.0, 0.0).excludes_zero and Interval(2.0, 2.0, 2.0).excludes_zero


def test_bootstrap_intervals_against_hand_computed_resampling_distributions():
    # a: mean of two draws from {0, 1} is 0, ½, 1 with probability ¼, ½, ¼; b constant 0: the 2.5 and 97.5
    # percentiles are the extremes
    assert bootstrap_difference([0.0, 1.0], [0.0]) == Interval(0.5, 0.0, 1.0)
    # both resampled, independently: −1 has probability 1/16 > 2.5% (resampling the same indices in both
    # groups would give 0 every time)
    assert bootstrap_difference([0.0, 1.0], [0.0, 1.0]) == Interval(0.0, -1.0, 1.0)


def test_bootstrap_separated_and_identical_groups_and_its_determinism():
    rng = np.random.default_rng(1)
    a, b = rng.normal(10, 1, 6), rng.normal(0, 1, 5)
    separated = bootstrap_difference(a, b)
    assert separated.excludes_zero and separated.low < separated.estimate < separated.high
    assert separated.estimate == pytest.approx(a.mean() - b.mean())
    same = bootstrap_difference(a, a)
    assert same.estimate == 0 and same.low < 0 < same.high and not same.excludes_zero
    assert bootstrap_difference(a, b) == separated  # the generator is seeded: the same interval every time
    assert bootstrap_difference(a, b, seed=1) != separated
    spread = bootstrap_difference(a, b, seed_std)
    assert spread.estimate == pytest.approx(a.std(ddof=1) - b.std(ddof=1)) and spread.low <= spread.estimate <= spread.high
    assert all(math.isnan(v) for v in vars(bootstrap_difference([1.0], [2.0, 3.0], seed_std)).values())
    assert seed_mean(np.array([[1.0, 3.0]])).tolist() == [2.0] and seed_std(np.array([1.0, 2.0, 3.0])) == 1.0


# ------------------------------------------------------------------------------- the report of fake runs

STEPS = range(20, 301, 20)  # 15 logged intervals: the spike window (10) judges the last 5
EVALS = (0, 150, 300)


def final_fid(variant: str, recipe: str, seed: int) -> float:
    return {"score": 10.0 + seed, "vanilla": 20.0 + 2 * seed}[variant] + (5.0 if recipe == "ict" else 0.0)


def write_run(root: Path, variant: str, seed: int, recipe: str = "reference", last: int = 300) -> Path:
    """A run directory as scgcm.train leaves it, as far as the report reads it. Hand-computable numbers:
    the last loss_ct is seed/10; the FIDs fall to `final_fid` at step 300 (and are 30 at step 150); a score
    run of seed 1 or 2 has one gradient-norm spike (at step 260)."""
    run = root / f"{variant}{'-ict' if recipe == 'ict' else ''}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": config(variant=variant, recipe=recipe, seed=seed,
                                                                  workdir=str(run))}))
    records = []
    for step in sorted(set(STEPS) | set(EVALS)):
        if step > last:
            break
        r = {"step": step}
        if step in STEPS:
            spike = variant == "score" and seed <= 2 and step == 260
            r |= {"kimg": step * 32 / 1000, "loss_ct": seed / 10 if step == last else 1.0 + seed - step / 300,
                  "grad_norm": 1.0, "grad_norm_max": 5.0 if spike else 1.5}
        if step in EVALS:
            fid = {0: 90.0, 150: 30.0, 300: final_fid(variant, recipe, seed)}[step]
            r |= {"fid_onestep": fid, "fid_twostep": fid - 1, "classes_onestep": 9.0 + (seed % 2),
                  "confident_onestep": 0.5 + seed / 100, "memorised_onestep": 0.0, "num_fid_samples": 500}
        records.append(r)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.fixture
def study(tmp_path) -> list[str]:
    """4 seeds of score and vanilla, and 2 of vanilla with the iCT recipe, one of them stopped at step 160."""
    root = tmp_path / "runs"
    runs = [write_run(root, v, s) for v in ("score", "vanilla") for s in (1, 2, 3, 4)]
    runs += [write_run(root, "vanilla", 1, "ict"), write_run(root, "vanilla", 2, "ict", last=160)]
    return [str(r) for r in runs]


def rows(md: str, first: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in md.splitlines() if line.startswith(f"| {first} |")]


SCORE, VANILLA, ICT = "variant=score, recipe=reference", "variant=vanilla, recipe=reference", "variant=vanilla, recipe=ict"


def test_report_of_seed_groups_through_the_cli(study, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_cli(report_cli.main, [*study, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote {out / 'report.md'}; runs that differ only in seed: "
                                               f"{SCORE} ×4; {VANILLA} ×4; {ICT} ×2")
    md = (out / "report.md").read_text()
    assert "## Groups (runs that differ only in seed)" in md and md.index("## Groups") < md.index("## Curves")
    assert [r[:2] for r in rows(md, SCORE)][0] == [SCORE, "4"]
    score = {r[2]: r[3:] for r in rows(md, SCORE) if len(r) == 6}
    vanilla = {r[2]: r[3:] for r in rows(md, VANILLA) if len(r) == 6}
    ict = {r[2]: r[3:] for r in rows(md, ICT) if len(r) == 6}
    # FIDs 11, 12, 13, 14: mean 12.5, sample std √(5/3) = 1.29; vanilla 22 … 28: 25 ± 2.58
    assert score["fid onestep (500 samples)"] == ["300", "12.50 ± 1.29", "1: 11.00; 2: 12.00; 3: 13.00; 4: 14.00"]
    assert vanilla["fid onestep (500 samples)"][:2] == ["300", "25.00 ± 2.58"]
    assert score["fid twostep (500 samples)"][:2] == ["300", "11.50 ± 1.29"]
    assert score["loss_ct"][:2] == ["300", "0.2500 ± 0.1291"]
    assert score["grad-norm spikes"][:2] == ["300", "0.50 ± 0.58"] and vanilla["grad-norm spikes"][:2] == ["300", "0.00 ± 0.00"]
    assert score["classes onestep (500 samples)"][1] == "9.50 ± 0.58"
    assert score["confident onestep (500 samples)"][1] == "0.525 ± 0.013"
    # the iCT group: one run stopped at 160, so its evaluations are compared at 150 (30 for both) and its
    # loss at 160, the largest logged step common to the two
    assert ict["fid onestep (500 samples)"][:2] == ["150", "30.00 ± 0.00"] and ict["loss_ct"][0] == "160"
    [comparison] = [r for r in rows(md, "score − vanilla (recipe=reference)") if r[1] == "fid onestep (500 samples)"]
    # score − vanilla: 12.5 − 25 = −12.5; every resample is negative (score ≤ 14 < 22 ≤ vanilla); std 1.29 − 2.58
    assert comparison[2:4] == ["300", "-12.50"] and comparison[5] == "yes" and comparison[6] == "-1.29"
    low, high = (float(v) for v in comparison[4].strip("[]").split(", "))
    assert -17.0 <= low < -12.5 < high <= -8.0
    assert all("recipe=ict" not in line for line in md.splitlines() if line.startswith("| score − vanilla"))
    group_pngs = {p.stem for p in out.glob("group_*.png")}
    assert group_pngs == {"group_loss_ct", "group_grad_norm", "group_fid_onestep", "group_fid_twostep",
                          "group_classes_onestep", "group_confident_onestep", "group_memorised_onestep"}
    for stem in group_pngs:
        with Image.open(out / f"{stem}.png") as png:
            assert png.format == "PNG" and png.size[0] > 500
            png.verify()
        assert f"![{stem}]({stem}.png)" in md
    assert (out / "loss_ct.png").is_file() and (out / "fid_onestep.png").is_file()  # the per-run plots stay


def test_the_report_is_reproducible(study, tmp_path):
    for out in ("a", "b"):
        assert report_cli.main([*study, "--out", str(tmp_path / out)]) == 0
    assert (tmp_path / "a" / "report.md").read_text().replace(str(tmp_path / "a"), "") == \
        (tmp_path / "b" / "report.md").read_text().replace(str(tmp_path / "b"), "")


def test_no_group_section_without_groups_or_with_no_group_seeds(study, tmp_path, capsys):
    out = tmp_path / "plain"
    assert run_cli(report_cli.main, [*study, "--out", str(out), "--no-group-seeds"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'report.md'}"
    md = (out / "report.md").read_text()
    assert "## Groups" not in md and "score − vanilla" not in md and not list(out.glob("group_*"))
    assert "| score-s1 | score | digits | reference | 1 | 300 |" in md and (out / "fid_onestep.png").is_file()
    # one run per configuration: nothing to group, the report of before
    ungrouped = tmp_path / "ungrouped"
    assert run_cli(report_cli.main, [study[0], study[4], study[8], "--out", str(ungrouped)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {ungrouped / 'report.md'}"
    assert "## Groups" not in (ungrouped / "report.md").read_text() and not list(ungrouped.glob("group_*"))


def test_the_distance_is_named_by_the_network_that_measured_it(tmp_path):
    from scgcm.run.report import Run, distance_name, evaluated_title

    run = lambda cfg: Run("r", tmp_path, cfg, [])
    digits = {"data": {"source": "digits"}, "fid": {"network": "auto"}}
    assert distance_name([run(digits), run({"data": {"source": "digits"}, "fid": {"network": "digits"}})]) == "digits FD"
    assert distance_name([run(digits), run({"data": {"source": None}, "fid": {"network": "auto"}})]) == "FID"
    assert distance_name([run({"data": {"source": "digits"}, "fid": {"network": "inception"}})]) == "FID"
    assert distance_name([run({})]) == "FID"  # no config.json: the standard
    # the group plots' titles too (they said "FID" for digits runs until 2026-12-04)
    assert evaluated_title("fid", "FID", [run(digits)]) == "digits FD" and evaluated_title("fid", "FID", [run({})]) == "FID"
    assert evaluated_title("confident", "confident share", [run(digits)]) == "confident share"


def test_a_recipe_names_its_group_without_the_fields_it_changes():
    ict = config(variant="vanilla", recipe="ict", seed=1)
    ict["loss"] = {**ict.get("loss", {}), "huber_form": "per_image"}  # what --config.recipe ict changes with it
    configs = [config(seed=1), config(seed=2), ict, {**ict, "seed": 2}]
    assert [g.label for g in group_runs(configs, ["a", "b", "c", "d"])] == [
        "variant=score, recipe=reference", "variant=vanilla, recipe=ict"]
    lr = [config(seed=1), config(seed=2, torso_lr=1.0), config(seed=3, variant="vanilla")]  # the names do not separate
    assert [g.label for g in group_runs(lr, ["a", "b", "c"])] == [
        "variant=score, optim.torso_lr=0.0004", "variant=score, optim.torso_lr=1.0", "variant=vanilla, optim.torso_lr=0.0004"]
