"""FID during training and from `scgcm.sample --fid` (issue 4): the evaluator, the best checkpoint per
mode, the plot, a short training run with FID on, and the sampler CLI. A cheap stand-in replaces
Inception (about 5 images/s on these CPUs); the network itself is tested in test_inception.py."""

import dataclasses
import json
import logging
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float
from PIL import Image
from tiny import MICRO_MODEL, tiny_config

from scgcm import fid as fid_cli
from scgcm.errors import UserError
from scgcm.eval import fid, inception
from scgcm.eval.scores import FIDEvaluator, data_statistics
from scgcm.parallel.generate import make_sampler
from scgcm.run.checkpoint import Checkpointer
from scgcm.run.config import FIDConfig, build_model, validate_config
from scgcm.run.metrics import plot_fid, read_fids

MODES = ("onestep", "twostep", "heun")
RUN_MODES = ("onestep", "twostep")
# Smaller than tests/tiny.py: one level, no attention, 8×8 images; compiling the train step dominates.
MICRO = MICRO_MODEL


class StandIn(eqx.Module):
    """Inception's contract ((b, 299, 299, 3) in [-1, 1] → (b, d)) at a fraction of the cost."""

    w: Float[Array, "3 6"]

    def __call__(self, x: Float[Array, "b 299 299 3"]) -> Float[Array, "b 6"]:
        return jnp.mean(jnp.tanh(4 * x[:, ::13, ::13] @ self.w), axis=(1, 2))


@pytest.fixture(scope="module")
def net():
    return StandIn(jax.random.normal(jax.random.key(1), (3, 6)))


@pytest.fixture(scope="module")
def extractor(net):
    return fid.FeatureExtractor(net, batch_size=16)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Reference statistics of the stand-in go here, never into the real cache next to the weights."""
    path = tmp_path_factory.mktemp("fid-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCGCM_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def fid_run(tmp_path_factory, extractor, cache):
    """4 updates of the micro model with FID (16 samples; two modes: the evaluator test compiles Heun) at steps 2 and 4."""
    from scgcm.run.loop import train

    base = tiny_config()
    cfg = tiny_config(
        workdir=str(tmp_path_factory.mktemp("runs") / "fid"), model=MICRO, total_steps=4, saving_step=2, log_every=2,
        data=dataclasses.replace(base.data, synthetic_size=64),
        sample=dataclasses.replace(base.sample, sampling_step=100, heun_steps=3, final_num=16, batch_size=16),
        fid=FIDConfig(enabled=True, num=16, batch_size=16, modes=RUN_MODES),
    )
    assert validate_config(cfg, num_devices=len(jax.devices())) == []
    assert train(cfg, extractor=extractor) == 0
    return cfg


def test_evaluator_one_finite_fid_per_mode_and_deterministic(extractor, tmp_path):
    model = build_model(MICRO, key=jax.random.key(0))
    ref = data_statistics("synthetic", extractor, image_size=8, synthetic_size=32, seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("fid-ref-synthetic-*.npz"))) == 1
    cached = data_statistics("synthetic", extractor, image_size=8, synthetic_size=32, seed=0, cache_dir=tmp_path)
    np.testing.assert_array_equal(ref[1], cached[1])
    samplers = {m: make_sampler(m, shape=(3, 8, 8), heun_steps=2) for m in MODES}
    evaluator = FIDEvaluator(ref, extractor, samplers, num=12, batch_size=8, seed=42)
    first, second = evaluator(model), evaluator(model)
    assert list(first) == list(MODES)
    assert all(np.isfinite(v) and v > 0 for v in first.values()), first
    assert first == second  # the same latents every time, as the reference's fixed PRNGKey(42)
    images = evaluator.images(model, "onestep")
    assert images.shape == (12, 8, 8, 3) and images.dtype == np.uint8
    assert first["onestep"] == fid.fid_from_images(images, ref, extractor)  # one implementation
    with pytest.raises(ValueError, match="at least 2"):
        FIDEvaluator(ref, extractor, samplers, num=1, batch_size=8)


def test_best_checkpoint_keeps_the_lowest_fid(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", best_modes=("onestep", "heun"))
    lowest = {}
    for step, one, heun in [(1, 5.0, 9.0), (2, 3.0, 9.5), (3, 4.0, 8.0), (4, 2.0, 8.5), (5, 6.0, 7.0)]:
        state = {"w": jnp.full(3, float(step))}
        for mode, value in (("onestep", one), ("heun", heun)):
            ckpt.save_best(mode, step, state, value)
            lowest[mode] = min(lowest.get(mode, (value, step)), (value, step))
            assert ckpt.steps(mode) == [lowest[mode][1]]
    ckpt.close()
    reopened = Checkpointer(tmp_path / "checkpoints", best_modes=("onestep", "heun"))
    restored, step = reopened.restore({"w": jnp.zeros(3)}, which="onestep")
    assert step == 4 and np.all(np.asarray(restored["w"]) == 4.0)
    assert reopened.restore({"w": jnp.zeros(3)}, which="heun")[1] == 5
    reopened.close()


def test_plot_fid(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert not plot_fid(metrics, tmp_path / "fid.png")  # no file yet
    lines = [{"step": 2, "loss_ct": 0.5}]
    for step, one, two in [(100, 300.0, 250.0), (200, 80.0, 60.0), (300, 20.0, float("nan"))]:
        lines += [{"step": step, "loss_ct": 0.1}, {"step": step, "fid_onestep": one, "fid_twostep": two}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_fids(metrics) == {"onestep": [(100, 300.0), (200, 80.0), (300, 20.0)], "twostep": [(100, 250.0), (200, 60.0)]}
    assert plot_fid(metrics, tmp_path / "fid.png")
    image = np.asarray(Image.open(tmp_path / "fid.png").convert("RGB"))
    assert image.shape == (440, 720, 3)
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert {(31, 119, 180), (255, 127, 14)} <= colours  # a line per mode
    metrics.write_text(json.dumps({"step": 5, "fid_heun": 7.0}) + "\n")  # a single point, flat range
    assert plot_fid(metrics, tmp_path / "fid.png")


def test_config_validation():
    cfg = tiny_config(fid=FIDConfig(enabled=True, num=1, batch_size=0, modes=("onestep", "onestep"), ref="/nonexistent.npz"))
    errors = "\n".join(validate_config(cfg, num_devices=1))
    for field in ("fid.num", "fid.batch-size", "fid.modes", "fid.ref"):
        assert f"--config.{field}" in errors
    assert not tiny_config().fid.enabled  # the smoke preset keeps FID off
    assert FIDConfig().enabled and FIDConfig().num == 50_000 and FIDConfig().modes == MODES


def test_training_logs_fid_and_keeps_best_checkpoints(fid_run, cache):
    workdir = Path(fid_run.workdir)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in records if any(k.startswith("fid_") for k in r)]
    assert [r["step"] for r in fids] == [2, 4]
    for r in fids:
        expected = {f"{name}_{m}" for m in RUN_MODES for name in ("fid", "precision", "recall")} | {"num_fid_samples"}
        assert expected == set(r) - {"step"} and all(np.isfinite(r[f"fid_{m}"]) for m in RUN_MODES)
        assert r["num_fid_samples"] == 16 and all(0 <= r[f"{n}_{m}"] <= 1 for m in RUN_MODES for n in ("precision", "recall"))
    assert set(read_fids(workdir / "metrics.jsonl")) == set(RUN_MODES)  # num_fid_samples is not a mode
    checkpoints = workdir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best_onestep", "best_twostep", "latest"]
    for mode in RUN_MODES:
        kept = [int(p.name) for p in (checkpoints / f"best_{mode}").iterdir() if p.name.isdigit()]
        by_step = {r["step"]: r[f"fid_{mode}"] for r in fids}
        assert len(kept) == 1 and by_step[kept[0]] == min(by_step.values())  # the lowest FID (ties: either)
    assert (workdir / "fid.png").is_file()
    log = (workdir / "log.txt").read_text()
    assert "FID (16 samples) at step 4: onestep" in log and "final FID (16 samples) (onestep, seed" in log
    assert "precision" in log
    assert len(list(cache.glob("fid-ref-synthetic-*.npz"))) == 1  # the run's data, cached


def test_sample_fid_matches_training(fid_run, net, cache, tmp_path, monkeypatch, capsys):
    """`scgcm.sample --fid` on the same checkpoint, seed and count prints training's FID; so does
    `scgcm.fid calc` on the written images against the same statistics."""
    from scgcm import sample

    monkeypatch.setattr(inception, "load_inception", lambda: net)
    workdir = fid_run.workdir
    records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    trained = next(r["fid_onestep"] for r in records if r["step"] == 4 and "fid_onestep" in r)
    out = tmp_path / "s.npz"
    args = ["--workdir", workdir, "--num", "16", "--batch-size", "16", "--seed", "42", "--out", str(out), "--fid"]
    assert sample.main(args) == 0
    printed = capsys.readouterr().out
    value = float(re.search(r"^FID \(16 samples\): (\S+) \(images 0–15, onestep, step 4", printed, re.M).group(1))
    assert value == pytest.approx(trained, rel=1e-4, abs=1e-4)
    precision = float(re.search(r"precision (\S+),", printed).group(1))
    logged = next(r["precision_onestep"] for r in records if "precision_onestep" in r and r["step"] == 4)
    assert precision == pytest.approx(logged)
    saved = json.loads(out.with_suffix(".fid.json").read_text())
    assert saved["label"] == "FID (16 samples)" and saved["fid"]["min"] == pytest.approx(value, abs=1e-4)
    printed = value

    ref = next(cache.glob("fid-ref-synthetic-*.npz"))  # the run's reference, computed by training
    assert sample.main([*args, "--fid-ref", str(ref)]) == 0
    assert f"FID (16 samples): {printed:.4f} (images 0–15" in capsys.readouterr().out
    fid_cli.main(fid_cli.cli(["calc", str(out), "--ref", str(ref), "--batch-size", "8"]))
    assert float(capsys.readouterr().out.split()[-1]) == pytest.approx(printed, rel=1e-4, abs=1e-4)
    with pytest.raises(UserError, match="--fid-ref .*missing.npz: no such file"):
        sample.main([*args, "--fid-ref", str(tmp_path / "missing.npz")])


# ------------------------------------------------------------------- the run report (issue 10)


def _records(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_report_on_two_runs(smoke_run, fid_run, tmp_path):
    """`scgcm.report` on the session's smoke run (no FID) and the FID run: every plot, the grids side by
    side, and report.md with the numbers of the metrics files."""
    from scgcm import report

    out = tmp_path / "report"
    runs = [str(smoke_run), fid_run.workdir]
    assert report.main([*runs, "--out", str(out), "--names", "plain", "withfid"]) == 0
    curves = {"loss_ct", "loss_dsm", "grad_norm", "update_distance", "num_scales", "images_per_sec", "skipped_total"}
    assert {p.stem for p in out.glob("*.png")} >= curves | {f"fid_{m}" for m in RUN_MODES}
    for name in curves:
        assert Image.open(out / f"{name}.png").size[0] > 500
    md = (out / "report.md").read_text()
    summary = md.split("## FID")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in summary.splitlines()
            if line.startswith("| plain") or line.startswith("| withfid")}
    plain, withfid = _records(smoke_run), _records(fid_run.workdir)
    assert rows["plain"][5] == f"{plain[-1]['step']:,}" and rows["withfid"][5] == f"{max(r['step'] for r in withfid):,}"
    assert rows["plain"][6] == f"{plain[-1]['kimg']:,.1f}"
    assert rows["plain"][8] == f"{plain[-1]['loss_ct']:,.4f}"
    fid_lines = [line for line in md.splitlines() if line.startswith("| withfid | onestep")]
    onestep = [(r["step"], r["fid_onestep"]) for r in withfid if "fid_onestep" in r]
    best = min(onestep, key=lambda sv: sv[1])
    assert len(fid_lines) == 1 and f"{best[1]:,.2f} ({best[0]:,})" in fid_lines[0]
    assert f"{onestep[-1][1]:,.2f} ({onestep[-1][0]:,})" in fid_lines[0] and "| 16 |" in fid_lines[0]
    assert "plain" not in "".join(line for line in md.splitlines() if "| onestep |" in line)  # no FID, no row


def test_report_single_run_without_fid_and_bad_input(smoke_run, tmp_path, capsys):
    from scgcm import report
    from scgcm.errors import run_cli

    assert report.main([str(smoke_run), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "No FID has been computed" in md and (tmp_path / "r" / "grids_onestep.png").is_file()
    import shutil

    going = tmp_path / "going"  # a run still being written: its last line is incomplete
    shutil.copytree(smoke_run, going, ignore=shutil.ignore_patterns("checkpoints"))
    with open(going / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "loss_c')
    assert report.main([str(going), "--out", str(tmp_path / "r2")]) == 0
    assert f"| {_records(smoke_run)[-1]['step']:,} |" in (tmp_path / "r2" / "report.md").read_text()
    (tmp_path / "empty").mkdir()
    assert run_cli(report.main, [str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no metrics.jsonl" in err


def test_spike_count():
    from scgcm.run.report import count_spikes

    means = np.ones(30)
    peaks = np.ones(30) * 1.5
    peaks[[5, 12, 20]] = [10.0, 2.9, 3.5]  # index 5 lies in the first window (not judged); 2.9 < 3 × median 1
    assert count_spikes(means, peaks, factor=3.0, window=10) == 1
    assert count_spikes(means, peaks, factor=2.0, window=10) == 2


def test_fid_of_the_untrained_model_and_a_larger_final_evaluation(fid_run, tmp_path, extractor, cache):
    """`fid.at_start` scores step 0; `fid.final_num`/`final_modes` change the last evaluation, which then
    keeps no best checkpoint (its count differs from the others'). Same programs as fid_run: compiled once."""
    from scgcm.run.loop import train

    cfg = dataclasses.replace(fid_run, workdir=str(tmp_path / "run"), fid=dataclasses.replace(
        fid_run.fid, at_start=True, final_num=32, final_modes=("onestep",)))
    assert train(cfg, extractor=extractor) == 0
    fids = [r for r in _records(cfg.workdir) if "num_fid_samples" in r]
    keys = lambda *modes: sorted([f"{n}_{m}" for m in modes for n in ("fid", "precision", "recall")]
                                 + ["num_fid_samples", "step"])
    assert [(r["step"], r["num_fid_samples"], sorted(r)) for r in fids] == [
        (0, 16, keys("onestep", "twostep")),
        (2, 16, keys("onestep", "twostep")),
        (4, 32, keys("onestep")),
    ]
    for mode in RUN_MODES:
        assert [p.name for p in (Path(cfg.workdir) / "checkpoints" / f"best_{mode}").iterdir() if p.name.isdigit()] == ["2"]


METRICS_LINES = [
    '{"step": 2, "loss_ct": 0.5, "kimg": 0.016, "grad_norm": 1.0}',
    '{"step": "x"}',  # line 2: the wrong type of step
    '{"step": 4, "loss_ct": "a"}',  # line 3: the wrong type of value
    '{"step": 4, "loss_ct": 0.4, "kimg": 0.032, "grad_norm": 0.9, "fid_onestep": 50.0, "num_fid_samples": 8}',
    '{"step": 6, "lo',  # line 5: torn by a crash (a newline follows)
    '{"step": 6, "loss_ct": 0.3, "kimg": 0.048, "grad_norm": 0.8, "fid_onestep": null, "num_fid_samples": 8}',
]


def test_a_metrics_line_of_the_wrong_types_is_skipped_with_one_warning_by_every_reader(tmp_path, capsys, caplog):
    """report, the sweep's list of evaluated steps, fid.png and a resumed training's MetricsLog read
    metrics.jsonl through one reader: a bad line is skipped with one warning naming its line number."""
    from scgcm import report
    from scgcm.errors import run_cli
    from scgcm.run.metrics import evaluated_steps
    from scgcm.run.rundir import MetricsLog

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in METRICS_LINES))
    assert run_cli(report.main, [str(run), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert [n for n in range(1, 7) if f"line {n} skipped" in err] == [2, 3, 5], err
    assert all(err.count(f"line {n} skipped") == 1 for n in (2, 3, 5)) and "Traceback" not in err, err
    assert "| 6 |" in (tmp_path / "report" / "report.md").read_text()

    with pytest.warns(UserWarning, match="line 2 skipped, its step is \"x\""):
        assert evaluated_steps(run / "metrics.jsonl", ("onestep",)) == {4, 6}
    with pytest.warns(UserWarning, match="line 3 skipped, its 'loss_ct' is \"a\""):
        assert plot_fid(run / "metrics.jsonl", run / "fid.png") and (run / "fid.png").is_file()

    with caplog.at_level(logging.WARNING, logger="scgcm"):
        MetricsLog(run, resume_step=4).close()  # the resume keeps the records up to its step, and only records
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert [n for n in range(1, 7) if f"dropping line {n}," in caplog.text] == [2, 3, 5], caplog.text


def test_report_out_inside_a_run_directory_is_refused(smoke_run, tmp_path, capsys):
    from scgcm import report
    from scgcm.errors import run_cli

    for out in (smoke_run / "report", smoke_run, smoke_run / "samples" / "r"):
        assert run_cli(report.main, [str(smoke_run), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: --out {out}: inside the run directory"), err
    assert not (smoke_run / "report").exists() and not (smoke_run / "report.md").exists()
    assert not (smoke_run / "samples" / "r").exists()
