"""Run-directory integrity and clean exits (issue 14, items 6-8): checksummed checkpoints, damaged ones
moved aside, a refused start when none is readable, one trainer per run directory, the configuration
history, counters and metrics that survive a resume, signals during the final sampling, and one-line
errors (full disk, damaged archive, offline hub, bad sampler input).

Most checks share two in-process runs of the micro model (its train step is the one test_evaluate's
run compiles) and copies of the session's `smoke_run`; one subprocess for the signal."""

import dataclasses
import errno
import gzip
import io
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli import checkpoint_arrays, train_cmd, train_env
from tiny import MICRO_MODEL, tiny_config

from scgcm.errors import run_cli


def _micro(workdir: Path, **overrides):
    """4 updates of the micro model, checkpoints at 2 and 4, skipping non-finite updates."""
    base = tiny_config()
    cfg = tiny_config(workdir=str(workdir), model=MICRO_MODEL, total_steps=4, saving_step=2, log_every=2,
                      skip_nonfinite=True, data=dataclasses.replace(base.data, synthetic_size=64),
                      sample=dataclasses.replace(base.sample, sampling_step=100, final_sampling=False))
    return dataclasses.replace(cfg, **overrides)


def _train_cli(cfg, capsys) -> tuple[int, list[str]]:
    """train(cfg) under the CLI's error rule: (exit code, the `error:` lines on stderr)."""
    from scgcm.run.loop import train

    code = run_cli(lambda argv: train(cfg), [])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _data_files(step_dir: Path) -> list[Path]:
    return sorted((p for p in (step_dir / "default").rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)


def _garble(step_dir: Path) -> None:
    """64 random bytes into the middle of the largest data file, its size unchanged (orbax reads it happily)."""
    path = _data_files(step_dir)[-1]
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(64))


def _truncate(step_dir: Path) -> None:
    """Every data file cut to half its length (orbax fails reading them)."""
    for path in _data_files(step_dir):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints" / "latest").iterdir() if p.name.isdigit())


def _log_lines(workdir: Path, level: str) -> list[str]:
    return [line for line in (workdir / "log.txt").read_text().splitlines() if f" {level} " in line]


def _strict_json(line: str) -> dict:
    def reject(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=reject)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """Updates 1-4 of the micro model with a NaN planted in update 2 (skipped): checkpoints at 2 and 4."""
    from scgcm.run.loop import train

    workdir = tmp_path_factory.mktemp("runs") / "micro"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCGCM_FAULT_NAN_STEP", "1")
        assert train(_micro(workdir)) == 0
    return workdir


@pytest.fixture(scope="module")
def resumed(micro_run, tmp_path_factory):
    """A copy of micro_run whose step-4 checkpoint got 64 random bytes and whose metrics.jsonl ends in a
    torn line, run again: it must resume from step 2 and redo updates 3-4."""
    from scgcm.run.loop import train

    workdir = tmp_path_factory.mktemp("runs") / "resumed"
    shutil.copytree(micro_run, workdir)
    _garble(workdir / "checkpoints" / "latest" / "4")
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss_ct": 0.2')  # a power loss mid-write
    assert train(_micro(workdir)) == 0
    return workdir


def test_metrics_are_strict_json_with_null_for_a_skipped_update(micro_run):
    records = [_strict_json(line) for line in (micro_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["loss_ct"] is None and np.isfinite(records[1]["loss_ct"])  # update 2 was NaN
    assert [r["skipped_total"] for r in records] == [1, 1]


def test_garbled_checkpoint_fails_its_checksum_and_is_moved_aside(resumed, micro_run):
    warnings = _log_lines(resumed, "WARNING")
    bad = [line for line in warnings if "checkpoints/latest/4" in line]
    assert len(bad) == 1 and "fails its checksum" in bad[0] and "moved aside to corrupt-4" in bad[0], warnings
    assert "resumed from" in (resumed / "log.txt").read_text().split(bad[0])[1]  # then resumed from step 2
    assert (resumed / "checkpoints" / "latest" / "corrupt-4" / "default").is_dir()
    assert _steps(resumed) == [2, 4]
    again, reference = checkpoint_arrays(resumed, 4), checkpoint_arrays(micro_run, 4)
    assert [k for k in reference if not np.array_equal(again[k], reference[k])] == []  # updates 3-4 redone exactly


def test_skipped_total_survives_a_resume(resumed):
    records = [_strict_json(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_total"]) for r in records] == [(2, 1), (4, 1)]  # not (4, 0) after the resume


def test_torn_metrics_line_is_dropped_with_a_warning(resumed):
    assert any("dropping line 3" in line and "torn" in line for line in _log_lines(resumed, "WARNING"))


def test_every_start_is_kept_in_the_config_history(resumed, micro_run):
    history = [json.loads(line) for line in (resumed / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(h["config"]["seed"] == 42 for h in history)
    assert json.loads((resumed / "config.json").read_text())["started"] == history[-1]["started"]


def test_all_checkpoints_unreadable_refuses_to_start(micro_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(micro_run, workdir)
    for step in (2, 4):
        _truncate(workdir / "checkpoints" / "latest" / str(step))
    code, errors = _train_cli(_micro(workdir), capsys)
    assert code == 2 and len(errors) == 1, errors
    assert f"every checkpoint in {workdir / 'checkpoints' / 'latest'} is unreadable" in errors[0]
    assert "--config.restart-from-scratch" in errors[0]
    assert _steps(workdir) == [2, 4]  # nothing moved: it may be a mount or permission problem
    assert "--config.restart-from-scratch" in _log_lines(workdir, "ERROR")[-1]  # fatal errors go to log.txt too


def test_second_trainer_on_a_locked_run_dir_is_refused(micro_run, tmp_path, capsys):
    from scgcm.run.rundir import RunLock

    workdir = tmp_path / "run"
    shutil.copytree(micro_run, workdir)
    config = (workdir / "config.json").read_text()
    holder = RunLock(workdir)  # another open file description: the same as another process
    try:
        code, errors = _train_cli(_micro(workdir), capsys)
    finally:
        holder.release()
    assert code == 2 and len(errors) == 1, errors
    assert "is in use by another trainer" in errors[0] and f"pid {os.getpid()}" in errors[0]
    assert (workdir / "config.json").read_text() == config


def test_changed_seed_on_resume_is_refused(micro_run, tmp_path, capsys):
    from scgcm.run.rundir import config_changes

    workdir = tmp_path / "run"
    shutil.copytree(micro_run, workdir)
    code, errors = _train_cli(_micro(workdir, seed=7, log_every=4), capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "seed 42 → 7" in errors[0] and "--config.allow-config-change" in errors[0]
    assert "log_every" not in errors[0]  # not part of the run's arithmetic
    assert len((workdir / "config_history.jsonl").read_text().splitlines()) == 1  # nothing written
    before, after = dataclasses.asdict(_micro(workdir)), dataclasses.asdict(_micro(workdir, batch_size=16, keep_checkpoints=1))
    assert config_changes(before, after) == ["batch_size 8 → 16"]
    with_phema = dataclasses.asdict(_micro(workdir, phema=True))  # another state layout: its checkpoints would not load
    assert config_changes(before, with_phema) == ["phema False → True"]


def test_unwritable_checkpoints_folder_is_found_at_start(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a folder")
    code, errors = _train_cli(_micro(workdir), capsys)
    assert code == 2 and len(errors) == 1 and f"cannot write checkpoints in {workdir / 'checkpoints'}" in errors[0]


def test_sigterm_during_final_sampling_exits_143_with_a_message(smoke_run, tmp_path):
    """A finished run started again only redoes its final sampling; a long one is stopped by SIGTERM."""
    workdir = tmp_path / "run"
    shutil.copytree(smoke_run, workdir)
    log = workdir / "log.txt"
    before = log.read_text().count("final sampling:")
    proc = subprocess.Popen(train_cmd(workdir, "--config.sample.final-num", "500000"), env=train_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while log.read_text().count("final sampling:") == before:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    message = [line for line in err.splitlines() if line.startswith("SIGTERM during the final sampling")]
    assert message and "checkpoint of step 8 is saved" in message[0], err[-3000:]
    assert f"python -m scgcm.sample --workdir {workdir} --checkpoint 8" in message[0]
    assert "Traceback" not in err
    assert "SIGTERM during the final sampling" in log.read_text()
    assert np.load(workdir / "samples" / "final_onestep.npz")["images"].shape[0] == 8  # the old file, whole
    assert not list((workdir / "samples").glob("*.tmp"))


# ----------------------------------------------------------------------------- scgcm.sample


def test_sample_after_a_fall_back_prints_one_warning_and_no_traceback(smoke_run, tmp_path, capfd, caplog):
    from scgcm.sample import main

    workdir = tmp_path / "run"
    shutil.copytree(smoke_run, workdir)
    _truncate(workdir / "checkpoints" / "latest" / "8")
    with caplog.at_level(logging.WARNING):
        assert run_cli(main, ["--workdir", str(workdir), "--out", str(tmp_path / "s.npz"), "--num", "6",
                              "--batch-size", "8"]) == 0
    time.sleep(0.5)  # tensorstore's late callbacks, if any, would print by now
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Event loop" not in err, err[-3000:]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # stderr outside pytest
    assert len(warnings) == 1 and "latest/8" in warnings[0] and "data file" in warnings[0], warnings
    assert "step 4" in out and (workdir / "checkpoints" / "latest" / "8").is_dir()  # sampling moves nothing


@pytest.mark.parametrize("args,needle", [
    (["--num", "0"], "--num must be at least 1 (got 0)"),
    (["--batch-size", "-4"], "--batch-size must be at least 1 (got -4)"),
    (["--checkpoint", "999999"], "--checkpoint 999999: no such step in"),
    (["--workdir", "/nonexistent/run"], "--workdir /nonexistent/run: no such directory"),
])
def test_sample_bad_input_is_one_line(smoke_run, args, needle, tmp_path, capsys):
    from scgcm.sample import main

    out = tmp_path / "x.npz"
    assert run_cli(main, ["--workdir", str(smoke_run), "--out", str(out), *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and needle in errors[0], errors
    assert not out.exists()
    if "999999" in needle:
        assert "(available: 4, 8)" in errors[0]


# ----------------------------------------------------------------------------- checkpoints and data


def _toy_state(value: float):
    return {"w": jnp.full((3, 4), value), "step": jnp.asarray(int(value)), "key": jr.key(int(value))}


def test_full_disk_during_a_checkpoint_write_is_one_line(tmp_path, monkeypatch):
    from scgcm.run.checkpoint import Checkpointer, CheckpointWriteError

    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, _toy_state(1.0))

    def full(self, step, *args, **kwargs):
        (Path(self.directory) / f"{step}.orbax-checkpoint-tmp").mkdir()  # what a failed write leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(CheckpointWriteError) as info:
        ckpt.save(2, _toy_state(2.0))
    expected = f"no space left in {tmp_path / 'latest'} while writing checkpoint 2; the checkpoint of step 1 is intact"
    assert str(info.value) == expected
    monkeypatch.undo()
    assert not list((tmp_path / "latest").glob("*tmp*"))  # its space given back
    assert Checkpointer(tmp_path).restore(_toy_state(0.0))[1] == 1


def test_checkpoint_without_its_data_folder_is_moved_aside_and_saving_goes_on(tmp_path, caplog):
    from scgcm.run.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, _toy_state(1.0))
    ckpt.save(2, _toy_state(2.0))
    ckpt.close()
    shutil.rmtree(tmp_path / "latest" / "2" / "default")
    ckpt = Checkpointer(tmp_path, keep=3)
    with caplog.at_level(logging.WARNING):
        state, step = ckpt.restore(_toy_state(0.0), move_aside=True)
    assert step == 1 and float(state["w"][0, 0]) == 1.0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"checkpoint {tmp_path / 'latest' / '2'} is unreadable (it has no 2/default folder); moved aside to corrupt-2"]
    assert ckpt.steps() == [1] and (tmp_path / "latest" / "corrupt-2").is_dir()
    ckpt.save(2, _toy_state(2.0))  # the next save works
    assert Checkpointer(tmp_path).restore(_toy_state(0.0))[1] == 2


def _cifar_tar_gz(path: Path) -> None:
    batch = pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 10})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(batch)
        tar.addfile(info, io.BytesIO(batch))
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_archive_is_one_line(tmp_path, damage):
    from scgcm.data.sources import DataError, load_images

    path = tmp_path / "cifar-10-python.tar.gz"
    _cifar_tar_gz(path)
    assert load_images(path).shape == (10, 32, 32, 3)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else gzip.compress(b"\x07" * 5000))
    with pytest.raises(DataError) as info:
        load_images(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "damaged or truncated archive" in message


def test_offline_hub_is_one_quick_line(monkeypatch):
    from scgcm.data import sources as data

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    tried = []

    def no_network(address, timeout=None):
        tried.append((address, timeout))
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    class NoDatasets:  # what the hub download would reach: it must not be
        def load_dataset(*args, **kwargs):
            raise AssertionError("load_dataset called while offline")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setitem(sys.modules, "datasets", NoDatasets())
    with pytest.raises(data.DataError) as info:
        data.load_images(None)
    assert tried == [(("huggingface.co", 443), 3.0)]
    assert str(info.value).startswith("cannot reach the Hugging Face hub for CIFAR-10 (OSError: [Errno")
    assert "HF_HUB_OFFLINE=1" in str(info.value) and "\n" not in str(info.value)


def test_an_error_after_opening_the_checkpoints_is_one_line_every_time(smoke_run, tmp_path):
    """A writer's orbax manager removes leftover temporary folders (of saves a kill cut short) in a thread,
    which its close did not wait for: an error right after could end in that thread's traceback ("cannot
    schedule new futures after interpreter shutdown"). 300 such folders make it slow enough to lose that
    race every time; `scgcm.sample` (a best checkpoint the run has not) and `scgcm.phema` (a step with no
    snapshot) must print their one line, each of five times."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("samples"))
    config = json.loads((run / "config.json").read_text())
    config["config"].update(phema=True)
    (run / "config.json").write_text(json.dumps(config))
    calls = [("sample", "--workdir", str(run), "--checkpoint", "best_twostep", "--num", "2"),
             ("phema", str(run), "--sigma-rel", "0.08", "--step", "6")]
    for i in range(5):
        for n in range(300):
            (run / "checkpoints" / "latest" / f"9.orbax-checkpoint-tmp-{n}" / "default").mkdir(parents=True, exist_ok=True)
        name, *argv = calls[i % 2]
        result = subprocess.run([sys.executable, "-m", f"scgcm.{name}", *argv], env=train_env(), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (i, result.stderr[-3000:])
        assert result.stderr.startswith("error: "), result.stderr
