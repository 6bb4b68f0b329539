"""A run directory explains itself.

    config.json      the resolved configuration, JAX version, devices, git commit of the latest start
    config_history.jsonl   the same record for every start, one JSON line each, never rewritten
    trainer.lock     held (flock) by the trainer using the directory; names its host and pid
    log.txt          everything printed, fatal errors included
    metrics.jsonl    one JSON line per logging interval (losses, grad norm, update distance, N(k), FIDs)
    samples/         PNG grids during training, final samples (.npz)
    checkpoints/     latest/<step>, best_<mode>/<step>
    fid.png          FID against steps, per sampling mode
"""

import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from scgcm.errors import UserError
from scgcm.run.metrics import parse_record, read_records

log = logging.getLogger(__name__)


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


class _LogFile(logging.FileHandler):
    """log.txt; a failed write (a full disk) is one note on stderr, once, instead of a traceback per record."""

    _failed = False

    def handleError(self, record):
        if not self._failed:
            self._failed = True
            sys.stderr.write(f"warning: could not write {self.baseFilename}: {sys.exc_info()[1]}\n")


def setup_logging(workdir: Path, process_index: int = 0) -> logging.Logger:
    """The "scgcm" logger: stderr and log.txt. In a multi-process run only process 0 writes log.txt; the
    others print on their own stderr only, each line marked with the process index."""
    logger = logging.getLogger("scgcm")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    mark = f"[process {process_index}] " if process_index else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {mark}%(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in (logging.StreamHandler(sys.stderr), *([_LogFile(workdir / "log.txt")] if not process_index else [])):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def close_logging(logger: logging.Logger) -> None:
    """Undo setup_logging: close log.txt and let records propagate again (a later run, or a test, in the
    same process must not write into this run's log)."""
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = True


def log_to_file(workdir: Path, message: str, level: str = "ERROR") -> None:
    """Append one line to log.txt directly (for fatal errors, which the CLI prints on stderr itself);
    process 0's job in a multi-process run."""
    if jax.process_index() != 0:
        return
    try:
        with (Path(workdir) / "log.txt").open("a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} {message}\n")
    except OSError:
        pass


class RunLock:
    """An exclusive lock on a run directory: flock on <workdir>/trainer.lock, whose text names the holder
    (host, pid, start time). The kernel drops the lock when its process dies, so a lock left by a killed
    trainer is free; its text is then reported as stale and replaced. A held lock is a one-line UserError."""

    NAME = "trainer.lock"

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / self.NAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(self.in_use(workdir, holder or "unknown holder")) from None
            log.warning("could not lock %s (%s); continuing without a lock", self.path, e)  # e.g. no locks on NFS
            return
        self.stale = self._holder()  # text left by a trainer that died holding the lock, or ""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    @staticmethod
    def in_use(workdir: Path, holder: str) -> str:
        return (f"--config.workdir {workdir} is in use by another trainer ({holder}); "
                "wait for it to end or stop it, or use another --config.workdir")

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        """Empty the file (a clean end leaves no stale text) and unlock; safe to call twice."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class SweepLock(RunLock):
    """The lock of `python -m scgcm.evaluate RUN` (<workdir>/sweep.lock): one checkpoint sweep per run
    directory, so that two never evaluate the same checkpoints and append them twice. It is not the
    trainer's lock: a sweep runs beside training."""

    NAME = "sweep.lock"

    @staticmethod
    def in_use(workdir: Path, holder: str) -> str:
        return (f"{workdir}: another checkpoint sweep is running on this run directory ({holder}); "
                "wait for it to end or stop it")


# Fields whose change alters the run's arithmetic (or, for phema, the layout of the state its checkpoints
# hold): resuming with any of them changed is refused unless --config.allow-config-change. Other fields
# (logging, saving, FID, sampling, workdir) may change freely.
MATH_FIELDS = ("variant", "seed", "total_steps", "batch_size", "compute_dtype", "model.", "ict.", "loss.", "optim.", "data.",
               "phema", "phema_sigma_rels")


def _dotted(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(previous: dict, current: dict) -> list[str]:
    """'field old → new' for each run-math field (MATH_FIELDS) that differs between two config dicts."""
    old, new = _dotted(json.loads(json.dumps(previous, default=str))), _dotted(json.loads(json.dumps(current, default=str)))
    math_field = lambda k: any(k == f or (f.endswith(".") and k.startswith(f)) for f in MATH_FIELDS)
    return [f"{k} {old[k]} → {new[k]}" for k in sorted(old.keys() & new.keys()) if math_field(k) and old[k] != new[k]]


def previous_config(workdir: Path) -> dict | None:
    """The configuration of the latest start (config.json), or None if there is none."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); move it aside to resume without the check") from None


def write_config(workdir: Path, config) -> None:
    """config.json (this start) and one more line of config_history.jsonl (every start, oldest first)."""
    commit, dirty = git_commit()
    record = {
        "config": dataclasses.asdict(config),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": commit,
        "git_dirty": dirty,
        "jax_version": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
    }
    latest, history = workdir / "config.json", workdir / "config_history.jsonl"
    if latest.exists() and not history.exists():  # a run from before the history: keep its last start
        try:
            history.write_text(json.dumps(json.loads(latest.read_text()), default=str) + "\n")
        except (OSError, ValueError):
            pass
    with history.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    tmp = workdir / ".config.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, latest)


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


def _finite_or_none(v):
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
        return v
    return float(v) if math.isfinite(float(v)) else None


def dumps_finite(obj, **kwargs) -> str:
    """json.dumps with every non-finite number (at any depth) written as null, so the JSON is valid."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


def append_record(path: Path, step: int, values: dict) -> dict:
    """Append {"step": step, **values} to a .jsonl file as one line (non-finite numbers as null); returns it."""
    record = {"step": int(step), **_finite_or_none(values)}
    with Path(path).open("a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
    return record


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
        """Drop lines logged after the checkpoint we resume from, so the file matches the run; a line that
        is not JSON (torn by a power loss) is dropped with a warning."""
        if not self.path.exists():
            return
        keep = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            record, why = parse_record(line)  # the rule of every reader (run.metrics.read_records)
            if record is None:
                log.warning("%s: dropping line %d, %s: %.60s", self.path, number, why, line)
                continue
            if record["step"] <= step:
                keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))

    def last(self, key: str, default=None):
        """The last value of `key` in the file (e.g. elapsed_s, to continue it after a resume)."""
        values = [r[key] for r in read_records(self.path, warn=False) if r.get(key) is not None]
        return values[-1] if values else default

    def write(self, step: int, values: dict) -> None:
        """Append one record; non-finite numbers are written as null (valid JSON)."""
        if jax.process_index() != 0:  # one writer in a multi-host run
            return
        record = append_record(self.path, step, values)
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
