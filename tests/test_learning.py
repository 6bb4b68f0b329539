"""The model learns: a short run of the digits preset turns the untrained model's one-class blobs into
digits of many classes, measured by the digits classifier as training measures it (metrics.jsonl), and
its written sample grid is no longer a uniform blob.

Thresholds from measurement (experiments/RESULTS.md, "Learning test", 2026-12-04, the preset without flips and
with RAdam 3e-3): 200 updates of the preset take the one-step distance of 250 samples from 97.8 (untrained,
1 class) to 19.8 (7 classes); with the consistency term's gradient stopped (`jax.lax.stop_gradient` on the CT
loss, the head still trained) it stays at 97.8 with 1 class, and this test fails. The thresholds sit between,
with margin on both sides. About 3 CPU-minutes, most of it the 200 updates.
"""

import subprocess
import sys

import numpy as np
from PIL import Image

from scgcm.run.metrics import read_records
from tests.cli import train_env

LEARNING_STEPS = 200
MAX_FINAL_FD = 40.0
"""The one-step distance must fall below this (measured: 19.8; broken objective: 97.8)."""
MIN_IMPROVEMENT = 2.0
"""…and below the untrained model's divided by this."""
MIN_CLASSES = 4
"""Classes among the confidently classified one-step samples (measured: 7; untrained and broken: 1)."""


def test_a_short_digits_run_learns_digits(tmp_path):
    workdir = tmp_path / "digits"
    cmd = [sys.executable, "-m", "scgcm.train", "--config.preset", "digits", "--config.workdir", str(workdir),
           "--config.total-steps", str(LEARNING_STEPS), "--config.saving-step", str(LEARNING_STEPS),
           "--config.sample.sampling-step", str(LEARNING_STEPS), "--config.sample.no-final-sampling",
           "--config.fid.modes", "onestep", "--config.fid.num", "250", "--config.fid.batch-size", "250"]
    run = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not mirrored" in (workdir / "log.txt").read_text()  # the digits are trained as they are, never flipped
    scores = {r["step"]: r for r in read_records(workdir / "metrics.jsonl") if "fid_onestep" in r}
    assert set(scores) == {0, LEARNING_STEPS}, scores.keys()
    start, end = scores[0], scores[LEARNING_STEPS]
    assert start["classes_onestep"] <= 2  # the untrained model: blobs of one class
    assert end["fid_onestep"] < MAX_FINAL_FD and end["fid_onestep"] < start["fid_onestep"] / MIN_IMPROVEMENT, (start, end)
    assert end["classes_onestep"] >= MIN_CLASSES, end
    assert end["memorised_onestep"] < 0.5  # new digits, not copies of training digits
    grid = np.asarray(Image.open(workdir / "samples" / f"onestep_{LEARNING_STEPS:07d}.png"))
    assert grid.dtype == np.uint8 and grid.ndim == 2  # grey digits are written as a grey PNG
    cells = [grid[2 + 10 * r: 10 + 10 * r, 2 + 10 * c: 10 + 10 * c] for r in range(10) for c in range(10)]
    assert np.std([cell.astype(float) for cell in cells], axis=0).mean() > 20  # the samples differ from each other
