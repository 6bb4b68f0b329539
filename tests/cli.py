"""Running the training CLI in a subprocess with the tiny configuration: the micro model (one level of
8 × 8, no attention; tiny.MICRO_MODEL), 8 updates of batch 8, two per call."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# XLA's CPU backend without its expensive LLVM optimisations: ~30% less CPU for a cold compile of the
# micro model's programs, but slower code: a training subprocess whose programs are in the cache takes
# ~70% more CPU (17 s against 10.5 s here). So: for the test processes and the multi-process runs, which
# compile most of what they run, not for the CLI runs of `train_env`, most of which find their programs
# in the cache.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

TINY_ARGS = [
    "--config.preset", "smoke",
    "--config.model.image-size", "8",
    "--config.model.torso.ch-mult", "1",
    "--config.model.torso.attn-resolutions",
    "--config.model.head.channel-mult", "1",
    "--config.model.head.attn-levels",
    "--config.batch-size", "8",
    "--config.steps-per-call", "2",
    "--config.total-steps", "8",
    "--config.saving-step", "4",
    "--config.sample.sampling-step", "100",  # no grids (~4 s of each start): smoke_run alone writes them
    "--config.sample.final-num", "8",
    "--config.sample.grid-size", "4",
    "--config.data.synthetic-size", "64",
    "--config.log-every", "2",
]


def train_env() -> dict[str, str]:
    """One CPU device (no simulated ones), XLA's default CPU compile, the session's compilation cache."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return env


def train_cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "scgcm.train", *TINY_ARGS, "--config.workdir", str(workdir), *extra]


def run_train(workdir: Path, *extra: str, timeout: float = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(workdir, *extra), env={**train_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def checkpoint_arrays(workdir: Path, step: int, folder: str = "latest") -> dict[str, np.ndarray]:
    """The flat {path: array} dict of a checkpoint (`checkpoints/<folder>/<step>`), read back with orbax into
    host arrays, whatever layout wrote it (orbax refuses to restore arrays saved from another topology
    without a target)."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints" / folder,
                               item_handlers=ocp.StandardCheckpointHandler()) as manager:
        saved = manager.item_metadata(step)
        target = {k: np.zeros(m.shape, m.dtype) for k, m in getattr(saved, "tree", saved).items()}
        return {k: np.asarray(v) for k, v in manager.restore(step, args=ocp.args.StandardRestore(target)).items()}
