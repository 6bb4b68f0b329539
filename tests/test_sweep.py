"""The FID protocol through the CLIs, on a copy of the session's smoke run with a cheap Inception
stand-in: `scgcm.sample --fid --repeats`, `--search-two-step-sigma`, and the checkpoint sweep
`python -m scgcm.evaluate RUN`."""

import json
import logging
import os
import re
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float

from scgcm import evaluate, sample
from scgcm.eval import fid, inception
from scgcm.run import metrics as run_metrics, sweep


class StandIn(eqx.Module):
    """Inception's contract ((b, 299, 299, 3) in [-1, 1] → (b, 6)) at a fraction of the cost, as in test_evaluate.py."""

    w: jax.Array = eqx.field(default_factory=lambda: jax.random.normal(jax.random.key(1), (3, 6)))

    def __call__(self, x: Float[Array, "b 299 299 3"]) -> Float[Array, "b 6"]:
        return jnp.mean(jnp.tanh(4 * x[:, ::13, ::13] @ self.w), axis=(1, 2))


@pytest.fixture
def run(smoke_run, tmp_path, monkeypatch):
    """A private copy of the smoke run (checkpoints at 4 and 8, no FID logged), the stand-in network
    and a private reference cache."""
    workdir = tmp_path / "smoke"
    shutil.copytree(smoke_run, workdir)
    monkeypatch.setenv("SCGCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "load_inception", StandIn)
    return workdir


def test_repeats_use_disjoint_reproducible_ranges_and_label_the_count(run, tmp_path, capsys):
    out = tmp_path / "s.npz"
    args = ["--workdir", str(run), "--num", "6", "--batch-size", "8", "--fid", "--out", str(out)]
    assert sample.main([*args, "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"^FID \(6 samples\): \S+ \(images 0–5, ", printed, re.M)) == 1
    assert len(re.findall(r"^FID \(6 samples\): \S+ \(images 6–11, ", printed, re.M)) == 1
    assert re.search(r"^FID \(6 samples\) over 2 ranges: min \S+, mean \S+ ± \S+$", printed, re.M)
    record = json.loads(out.with_suffix(".fid.json").read_text())
    fids = [r["fid"] for r in record["repeats"]]
    assert [(r["first"], r["last"]) for r in record["repeats"]] == [(0, 5), (6, 11)]
    assert record["fid"]["min"] == min(fids) and record["fid"]["mean"] == pytest.approx(np.mean(fids))
    assert record["label"] == "FID (6 samples)" and {"precision", "recall"} <= set(record)
    images = np.load(out)["images"]
    assert images.shape[0] == 12 and not np.array_equal(images[:6], images[6:])

    assert sample.main([*args, "--seed-starts", "6", "--out", str(tmp_path / "second.npz")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "second.npz")["images"], images[6:])  # reproducible
    second = json.loads((tmp_path / "second.fid.json").read_text())
    assert second["repeats"][0]["fid"] == pytest.approx(fids[1], rel=1e-6)
    with pytest.raises(Exception, match="overlap"):
        sample.main([*args, "--repeats", "2", "--seed-starts", "0", "3"])


def test_search_two_step_sigma_writes_probes_and_plot(run, capsys):
    assert sample.main(["--workdir", str(run), "--num", "4", "--batch-size", "8", "--search-two-step-sigma",
                        "--search-probes", "2", "--search-range", "0.2", "2.0"]) == 0
    record = json.loads((run / "samples" / "two_step_sigma_0000008.json").read_text())
    assert len(record["probes"]) == 2 and all(0.2 <= p["sigma"] <= 2.0 for p in record["probes"])
    assert record["best_fid"] == min(p["fid"] for p in record["probes"])
    assert (run / "samples" / "two_step_sigma_0000008.png").is_file()
    assert "best two-step σ" in capsys.readouterr().out


def test_sweep_evaluates_exactly_the_checkpoints_without_fid_and_is_idempotent(run, capsys):
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as f:  # step 4 already has its FID
        f.write(json.dumps({"step": 4, "fid_onestep": 123.0}) + "\n")
    assert sweep.pending_steps(run, ("onestep",)) == [8]
    assert sweep.pending_steps(run, ("onestep", "twostep")) == [4, 8]
    extractor = fid.FeatureExtractor(StandIn(), batch_size=8)
    before = metrics.read_text()
    assert evaluate.main([str(run), "--modes", "onestep", "--num", "6", "--batch-size", "8"], extractor=extractor) == 0
    added = [json.loads(line) for line in metrics.read_text()[len(before):].splitlines()]
    assert [r["step"] for r in added] == [8]
    assert set(added[0]) == {"step", "fid_onestep", "precision_onestep", "recall_onestep", "num_fid_samples"}
    assert (run / "fid.png").is_file() and "step 8: FID (6 samples) onestep" in capsys.readouterr().out
    after = metrics.read_text()
    assert evaluate.main([str(run), "--modes", "onestep", "--num", "6", "--batch-size", "8"], extractor=extractor) == 0
    assert metrics.read_text() == after and "every saved checkpoint has a FID" in capsys.readouterr().out
    assert run_metrics.read_fids(metrics)["onestep"] == [(4, 123.0), (8, added[0]["fid_onestep"])]


def test_evaluated_steps_count_undefined_fids_and_skip_torn_lines(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 2, "loss_ct": 1.0}\n{"step": 4, "fid_onestep": null, "num_fid_samples": 6.0}\n'
                       '{"step": 6, "fid_onestep": 3.5, "fid_twostep": 2.5}\nnot json\n{"step": 8, "fid_on')
    assert run_metrics.evaluated_steps(metrics, ("onestep",)) == {4, 6}  # an undefined FID was computed: not redone
    assert run_metrics.evaluated_steps(metrics, ("onestep", "twostep")) == {6}
    assert run_metrics.read_fids(metrics) == {"onestep": [(6, 3.5)], "twostep": [(6, 2.5)]}  # finite values only


def test_second_sweep_is_refused_in_one_line_and_a_sweep_beside_training_works(run, capsys, caplog):
    """Two sweeps of one run directory would evaluate the same checkpoints and append them twice: the
    second says in one line who holds the sweep lock (exit code 2) and writes nothing. The trainer's lock
    is another one: with a trainer holding it, the sweep evaluates and appends."""
    from scgcm.errors import run_cli
    from scgcm.run.rundir import RunLock, SweepLock

    extractor = fid.FeatureExtractor(StandIn(), batch_size=8)
    argv = [str(run), "--modes", "onestep", "--num", "6", "--batch-size", "8"]
    before = (run / "metrics.jsonl").read_text()
    first = SweepLock(run)
    try:
        assert run_cli(lambda a: evaluate.main(a, extractor=extractor), argv) == 2
    finally:
        first.release()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "another checkpoint sweep" in err, err
    assert f"pid {os.getpid()}" in err
    assert (run / "metrics.jsonl").read_text() == before

    trainer = RunLock(run)
    try:
        with caplog.at_level(logging.WARNING):
            assert run_cli(lambda a: evaluate.main(a, extractor=extractor), argv) == 0
    finally:
        trainer.release()
    assert sweep.pending_steps(run, ("onestep",)) == []
    # no orbax notes on the read-only checkpoint reader (three "CheckpointManagerOptions.read_only=True …" a call)
    notes = [r.getMessage() for r in caplog.records if "read_only" in r.getMessage() or "read only" in r.getMessage()]
    assert not notes, notes
    assert "read_only" not in capsys.readouterr().err
    assert (run / "sweep.lock").read_text() == ""  # released at the end
