"""Running the training CLI in a subprocess with the tiny configuration."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

TINY_ARGS = [
    "--config.preset", "smoke",
    "--config.model.image-size", "16",
    "--config.model.torso.attn-resolutions", "8",
    "--config.batch-size", "8",
    "--config.steps-per-call", "2",
    "--config.total-steps", "8",
    "--config.saving-step", "4",
    "--config.sample.sampling-step", "4",
    "--config.sample.final-num", "8",
    "--config.sample.grid-size", "4",
    "--config.data.synthetic-size", "64",
    "--config.log-every", "2",
]


def train_env() -> dict[str, str]:
    """One CPU device (no simulated ones) and the session's compilation cache."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def train_cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "scgcm.train", *TINY_ARGS, "--config.workdir", str(workdir), *extra]


def run_train(workdir: Path, *extra: str, timeout: float = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(workdir, *extra), env={**train_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def checkpoint_arrays(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """The flat {path: array} dict of a checkpoint, read back with orbax."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints" / "latest") as manager:
        flat = manager.restore(step, args=ocp.args.StandardRestore())
    return {k: np.asarray(v) for k, v in flat.items()}
