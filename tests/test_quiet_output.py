"""Quiet, honest output (issue 21): a dataset fall-back is one line of the run's log (stderr and log.txt)
in training and one `warning:` line in the other CLIs, never a Python UserWarning with its source line."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from scgcm.errors import UserError, run_cli
from scgcm.run.config import SMOKE

FALLBACK = "no train batches, using the test split (test_batch)"


@pytest.fixture
def test_split_only(tmp_path) -> Path:
    """A cifar-10-batches-py folder with only a test_batch (as the shared subset): asked for train, it falls back."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": rows, b"labels": [0, 1, 2, 3]}, protocol=2))
    return folder


def stop(*a, **k):
    raise UserError("stopped here by the test, after the data")


def assert_no_python_warning(err: str) -> None:
    assert "UserWarning" not in err and "warnings.warn" not in err and ".py:" not in err, err


def test_training_logs_a_dataset_fallback_as_one_line(test_split_only, tmp_path, monkeypatch, capsys):
    import scgcm.run.loop
    from scgcm.train import main

    monkeypatch.setattr(scgcm.run.loop, "build_state", stop)  # right after the data is read, before any compile
    workdir = tmp_path / "w"
    assert main(["--config.preset", "smoke", "--config.batch-size", "8", "--config.workdir", str(workdir),
                 "--config.data.source", str(test_split_only)]) == 2
    err = capsys.readouterr().err
    assert_no_python_warning(err)
    lines = [line for line in err.splitlines() if FALLBACK in line]
    assert len(lines) == 1 and " WARNING " in lines[0] and str(test_split_only) in lines[0], err
    assert len([line for line in (workdir / "log.txt").read_text().splitlines() if FALLBACK in line]) == 1


def test_edit_and_fid_print_a_dataset_fallback_as_one_warning_line(test_split_only, tmp_path, monkeypatch, capsys):
    import scgcm.edit
    import scgcm.eval.inception
    from scgcm.fid import main as fid_main
    from scgcm.run.rundir import write_config

    monkeypatch.setattr(scgcm.edit, "load_state", stop)
    monkeypatch.setattr(scgcm.eval.inception, "load_inception", stop)
    monkeypatch.setenv("SCGCM_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    write_config(run, SMOKE)
    for argv, main in [(["--workdir", str(run), "--task", "inpaint", "--input", str(test_split_only), "--split", "train",
                         "--num", "2"], scgcm.edit.main),
                       (["ref", "--source", str(test_split_only)], fid_main)]:
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err
        assert_no_python_warning(err)
        warnings = [line for line in err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and FALLBACK in warnings[0] and str(test_split_only) in warnings[0], err
        assert "stopped here by the test" in err
