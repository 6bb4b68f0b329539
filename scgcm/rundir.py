"""A run directory explains itself.

    config.json      the resolved configuration, JAX version, devices, git commit (rewritten at each start)
    log.txt          everything printed
    metrics.jsonl    one JSON line per logging interval (losses, grad norm, update distance, N(k), FIDs)
    samples/         PNG grids during training, final samples (.npz)
    checkpoints/     latest/<step>, best_<mode>/<step>
    fid.png          FID against steps, per sampling mode
"""

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from PIL import Image


def compile_cache_dir(setting: str, env: Mapping[str, str] = os.environ) -> Path | None:
    """Where XLA's persistent compilation cache goes: 'off' → None; 'auto' → $JAX_COMPILATION_CACHE_DIR
    if set, else <scgcm cache folder>/xla ($SCGCM_CACHE, $XDG_CACHE_HOME/scgcm or ~/.cache/scgcm);
    anything else is a folder (~ expanded)."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(env["JAX_COMPILATION_CACHE_DIR"])
    if env.get("SCGCM_CACHE"):
        return Path(env["SCGCM_CACHE"]) / "xla"
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "scgcm" / "xla"


def use_compile_cache(setting: str) -> Path | None:
    """Point JAX's persistent compilation cache at `compile_cache_dir(setting)` (a process-wide JAX
    option, so only entry points call this). A resumed or repeated run then loads its compiled step
    instead of compiling it again."""
    path = compile_cache_dir(setting)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def git_commit() -> tuple[str | None, bool]:
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
        return (commit.stdout.strip() or None), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, False


def setup_logging(workdir: Path) -> logging.Logger:
    logger = logging.getLogger("scgcm")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(workdir / "log.txt")):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def write_config(workdir: Path, config) -> None:
    commit, dirty = git_commit()
    record = {
        "config": dataclasses.asdict(config),
        "git_commit": commit,
        "git_dirty": dirty,
        "jax_version": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
    }
    (workdir / "config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def save_grid(images: np.ndarray, path: Path, nrow: int | None = None) -> None:
    """uint8 [N, h, w, c] → one PNG grid with a 2-pixel border."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + 2) + 2, nrow * (w + 2) + 2, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


class MetricsLog:
    """metrics.jsonl, plus TensorBoard or W&B when asked for."""

    def __init__(self, workdir: Path, *, resume_step: int, tensorboard: bool = False, wandb: bool = False,
                 config=None):
        self.path = workdir / "metrics.jsonl"
        if jax.process_index() == 0:
            self._truncate_after(resume_step)
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise SystemExit("--config.tensorboard needs tensorboardX: pip install tensorboardX") from None
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise SystemExit("--config.wandb needs wandb: pip install wandb") from None
            self.wandb = wandb_lib.init(project="scgcm", dir=str(workdir), resume="allow",
                                        config=dataclasses.asdict(config) if config is not None else None)

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from, so the file matches the run."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def last(self, key: str, default=None):
        """The last value of `key` in the file (e.g. elapsed_s, to continue it after a resume)."""
        if not self.path.exists():
            return default
        values = [r[key] for r in map(json.loads, filter(str.strip, self.path.read_text().splitlines())) if key in r]
        return values[-1] if values else default

    def write(self, step: int, values: dict) -> None:
        if jax.process_index() != 0:  # one writer in a multi-host run
            return
        record = {"step": int(step), **{k: (float(v) if isinstance(v, (int, float, np.number)) else v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, float) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
