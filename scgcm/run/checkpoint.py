"""Orbax checkpoints of the array half of a TrainState, with checksums.

`checkpoints/latest/<step>` keeps the last few states; `checkpoints/best_<mode>/<step>` keeps the one
with the lowest FID of each sampling mode. Orbax writes each checkpoint to a temporary folder and
renames it when complete, so a process killed mid-save never leaves a checkpoint that can be picked.

After each save, `<step>/scgcm_checksums.json` records a CRC-32 of every array (as saved) and the size
and CRC-32 of every data file. A restore checks the files first, so orbax never reads a damaged one,
then the arrays it read; any mismatch makes the checkpoint unreadable. Training then falls back to
the newest readable checkpoint (one warning line per unreadable one, naming it and the reason) and
moves the unreadable ones aside to `latest/corrupt-<step>/`, which orbax ignores. A checkpoint
without the file (written by an older version, or a kill between the save and the checksums) is
restored unverified.

`SCGCM_FAULT_KILL_AT=<folder>:<step>:<point>` (for tests) ends the process as kill -9 would
(`os._exit(137)`, nothing flushed or closed) when the save of `<folder>/<step>` (e.g. `phema:8`)
reaches `<point>`: `begin` (nothing written yet), `written` (orbax's folder renamed into place, no
checksums yet) or `done` (checksums written).

The state is stored as a flat {key path: array} dict (typed PRNG keys as their raw uint32 data)
and restored into the leaves of a skeleton made with `eqx.filter_eval_shape`. Run counters that are
not part of the state (`skipped_total`) are stored beside it as `@<name>` int64 scalars.
"""

import errno
import json
import logging
import os
import shutil
import zlib
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jaxtyping import PyTree

from scgcm.errors import UserError

log = logging.getLogger(__name__)

CHECKSUMS = "scgcm_checksums.json"
COUNTER = "@"  # prefix of the flat keys of run counters stored beside the state
FAULT_KILL_AT = "SCGCM_FAULT_KILL_AT"
FAULT_POINTS = ("begin", "written", "done")


def fault_point(folder: str, step: int, point: str) -> None:
    """The kill -9 of fault injection: `os._exit(137)` if $SCGCM_FAULT_KILL_AT names this point of a save."""
    if os.environ.get(FAULT_KILL_AT) == f"{folder}:{step}:{point}":
        os._exit(137)


class UnreadableCheckpoint(Exception):
    """A checkpoint that cannot be restored as saved; the message is the one-line reason."""


class NoReadableCheckpoint(UserError):
    """Checkpoints exist, but none can be restored."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (a full disk); the message is one line."""


def _is_key(x) -> bool:
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_array_like(x) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _flatten(tree: PyTree) -> dict[str, jax.Array | jax.ShapeDtypeStruct]:
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, _is_array_like))[0]
    raw = lambda x: jax.eval_shape(jax.random.key_data, x) if isinstance(x, jax.ShapeDtypeStruct) else jax.random.key_data(x)
    return {jax.tree_util.keystr(path): (raw(x) if _is_key(x) else x) for path, x in leaves}


def _unflatten(flat: dict, skeleton: PyTree) -> PyTree:
    arrays, static = eqx.partition(skeleton, _is_array_like)
    paths, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    leaves = []
    for path, like in paths:
        name = jax.tree_util.keystr(path)
        if name not in flat:
            raise KeyError(f"checkpoint has no array {name}")
        value = flat[name]
        if _is_key(like):
            value = jax.random.wrap_key_data(value)  # the default (threefry) implementation, as jr.key
        elif tuple(value.shape) != tuple(like.shape):
            raise ValueError(f"checkpoint array {name} has shape {value.shape}, expected {like.shape}")
        leaves.append(value)
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static)


def flat_state(tree: PyTree) -> dict[str, jax.Array | jax.ShapeDtypeStruct]:
    """The flat {key path: array} form a checkpoint stores (typed PRNG keys as their raw uint32 data)."""
    return _flatten(tree)


def state_from_flat(flat: dict, skeleton: PyTree) -> PyTree:
    """The inverse of `flat_state`: the arrays of `flat` in the leaves of `skeleton` (shapes checked)."""
    return _unflatten(flat, skeleton)


def array_crc32(x) -> int:
    """CRC-32 of an array's C-order bytes."""
    return zlib.crc32(np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8))


def file_crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _data_files(step_dir: Path) -> dict[str, Path]:
    """The files orbax wrote for the state ({path relative to the step folder: path})."""
    return {p.relative_to(step_dir).as_posix(): p for p in sorted((step_dir / "default").rglob("*")) if p.is_file()}


def write_checksums(step_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    """<step_dir>/scgcm_checksums.json: CRC-32 of each array and size + CRC-32 of each data file (atomic)."""
    record = {
        "format": 1,
        "arrays": {k: array_crc32(v) for k, v in arrays.items()},
        "files": {name: [p.stat().st_size, file_crc32(p)] for name, p in _data_files(step_dir).items()},
    }
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, step_dir / CHECKSUMS)


def read_checksums(step_dir: Path) -> dict | None:
    """The checksum record of a checkpoint, or None if it has none; UnreadableCheckpoint if it is damaged."""
    path = step_dir / CHECKSUMS
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("arrays"), dict) or not isinstance(record.get("files"), dict):
            raise ValueError("missing 'arrays' or 'files'")
        return record
    except (OSError, ValueError) as e:
        raise UnreadableCheckpoint(f"{CHECKSUMS} is damaged ({type(e).__name__}: {str(e)[:100]})") from None


def verify_files(step_dir: Path, record: dict) -> None:
    """UnreadableCheckpoint unless every data file listed in `record` is there with its size and CRC."""
    files = _data_files(step_dir)
    for name, (size, crc) in record["files"].items():
        path = files.get(name)
        if path is None:
            raise UnreadableCheckpoint(f"data file {name} is missing")
        if path.stat().st_size != size:
            raise UnreadableCheckpoint(f"data file {name} has {path.stat().st_size} bytes, {size} were written")
        if file_crc32(path) != crc:
            raise UnreadableCheckpoint(f"data file {name} fails its checksum")


def verify_arrays(flat: dict[str, np.ndarray], record: dict) -> None:
    for name, crc in record["arrays"].items():
        if name not in flat:
            raise UnreadableCheckpoint(f"array {name} is missing")
        if array_crc32(flat[name]) != crc:
            raise UnreadableCheckpoint(f"array {name} fails its checksum")


def _is_no_space(exc: BaseException) -> bool:
    """Whether a (possibly wrapped) exception comes from a full disk."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "no space left on device" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _NoSpaceFilter(logging.Filter):
    """Drops the tracebacks orbax's writer threads log (through absl) for a full disk: the save reports it
    as one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ((exc is not None and _is_no_space(exc)) or "no space left on device" in record.getMessage().lower())


def _manager(directory: Path, max_to_keep: int | None, best: bool = False, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,  # what orbax sets (with a warning each) for a reader
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=False,
        best_fn=(lambda m: m["fid"]) if best else None,
        best_mode="min",
        keep_checkpoints_without_metrics=not best,
        cleanup_tmp_directories=not read_only,  # a reader beside training must not remove a save in progress
        create=not read_only,
        read_only=read_only,
    )
    # the handler named up front, so that item_metadata can read a checkpoint this manager did not write
    quiet, absl = _ReadOnlyNoteFilter(), logging.getLogger("absl")
    absl.addFilter(quiet)  # "Given directory is read only=…": a reader asked for exactly that
    try:
        return ocp.CheckpointManager(directory.absolute(), item_handlers=ocp.StandardCheckpointHandler(), options=options)
    finally:
        absl.removeFilter(quiet)


class _ReadOnlyNoteFilter(logging.Filter):
    """Drops orbax's warning that a read-only manager's directory is read only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, best_modes: tuple[str, ...] = (), read_only: bool = False):
        """`read_only`: only restore (e.g. `python -m scgcm.evaluate` beside a training process)."""
        self.directory = Path(directory)
        self.read_only = read_only
        self.latest = _manager(self.directory / "latest", keep, read_only=read_only)
        self.best: dict[str, ocp.CheckpointManager] = {}
        try:
            for mode in best_modes:
                self.best[mode] = _manager(self.directory / f"best_{mode}", 1, best=True)
        except BaseException:
            self.close()
            raise
        self.counters: dict[str, int] = {}
        """The run counters stored with the checkpoint last restored (e.g. skipped_total); {} if none."""

    def _save(self, manager: ocp.CheckpointManager, step: int, state: PyTree, counters: dict[str, int] | None,
              metrics: dict | None = None) -> None:
        flat = _flatten(state)
        flat.update({COUNTER + k: np.asarray(v, np.int64) for k, v in (counters or {}).items()})
        quiet, absl = _NoSpaceFilter(), logging.getLogger("absl")
        absl.addFilter(quiet)
        folder_name = Path(manager.directory).name
        try:
            fault_point(folder_name, step, "begin")
            manager.save(step, args=ocp.args.StandardSave(flat), metrics=metrics, force=True)
            manager.wait_until_finished()
            fault_point(folder_name, step, "written")
            step_dir = self.step_dir(step, manager)
            if jax.process_index() == 0 and step_dir.is_dir():  # a best manager may not keep a worse step
                try:
                    write_checksums(step_dir, {k: np.asarray(v) for k, v in flat.items()})
                except FileNotFoundError:
                    if step_dir.is_dir():  # not a step the manager just dropped
                        raise
            fault_point(folder_name, step, "done")
        except Exception as e:
            if not _is_no_space(e):
                raise
            folder = Path(manager.directory)
            for tmp in folder.glob(f"{step}.orbax-checkpoint-tmp*"):  # give the space back
                shutil.rmtree(tmp, ignore_errors=True)
            (folder / str(step) / f".{CHECKSUMS}.tmp").unlink(missing_ok=True)
            manager.reload()
            kept = [s for s in manager.all_steps() if s != step]
            intact = f"the checkpoint of step {max(kept)} is intact" if kept else "there is no earlier checkpoint"
            raise CheckpointWriteError(f"no space left in {folder} while writing checkpoint {step}; {intact}") from None
        finally:
            absl.removeFilter(quiet)

    def save(self, step: int, state: PyTree, counters: dict[str, int] | None = None) -> None:
        """The latest checkpoint of `step` (nothing if it exists), with run `counters` beside the state."""
        if step in self.latest.all_steps():
            return
        self._save(self.latest, step, state, counters)

    def _manager_for(self, which: str) -> ocp.CheckpointManager:
        """'latest', 'phema' (the power-EMA snapshots, all kept), 'phema_<σ_rel>' (reconstructed EMAs)
        or a sampling mode's best manager, created once (a spare manager's tmp-dir cleanup would race
        with a save)."""
        if which == "latest":
            return self.latest
        if which not in self.best:
            if which == "phema" or which.startswith("phema_"):
                self.best[which] = _manager(self.directory / which, None, read_only=self.read_only)
            else:
                self.best[which] = _manager(self.directory / f"best_{which}", 1, best=True, read_only=self.read_only)
        return self.best[which]

    def save_named(self, which: str, step: int, tree: PyTree) -> None:
        """Save into 'phema' (snapshots) or 'phema_<σ_rel>', with checksums; an existing step is replaced."""
        manager = self._manager_for(which)
        if step in manager.all_steps():
            manager.delete(step)
        self._save(manager, step, tree, None)

    def restore_phema(self, skeleton: PyTree, step: int, flag: str = "snapshot") -> PyTree:
        """The power-EMA snapshot of `step` (saved with `save_named("phema", step, state.phema)`); a missing
        or unreadable one is a UserError naming `flag`."""
        return self.restore(skeleton, step=step, which="phema", flag=flag)[0]

    def save_best(self, mode: str, step: int, state: PyTree, fid: float) -> None:
        self._save(self._manager_for(mode), step, state, None, metrics={"fid": float(fid)})

    def steps(self, which: str = "latest") -> list[int]:
        return sorted(self._manager_for(which).all_steps())

    def step_dir(self, step: int, manager: ocp.CheckpointManager | str = "latest") -> Path:
        manager = self._manager_for(manager) if isinstance(manager, str) else manager
        return Path(manager.directory) / str(step)

    def _read(self, manager: ocp.CheckpointManager, step: int, skeleton: PyTree) -> tuple[PyTree, dict[str, int]]:
        """Restore one checkpoint, checking it before and after orbax reads it; UnreadableCheckpoint if it can't."""
        step_dir = self.step_dir(step, manager)
        if not (step_dir / "default").is_dir():
            raise UnreadableCheckpoint(f"it has no {step_dir.name}/default folder")
        try:
            record = read_checksums(step_dir)
            if record is not None:
                verify_files(step_dir, record)  # before orbax: it must not read a damaged file
            target = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), _flatten(skeleton))
            if record is not None:  # the saved keys are in the record; reading orbax's metadata costs seconds
                saved = record["arrays"]
            else:
                saved = manager.item_metadata(step)
                saved = getattr(saved, "tree", saved) or {}
            target.update({k: np.zeros((), np.int64) for k in saved if k.startswith(COUNTER)})
            flat = manager.restore(step, args=ocp.args.StandardRestore(target))
            if record is not None:
                verify_arrays(flat, record)
            return _unflatten(flat, skeleton), {k[1:]: int(v) for k, v in flat.items() if k.startswith(COUNTER)}
        except UnreadableCheckpoint:
            raise
        except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many types; all mean unreadable)
            raise UnreadableCheckpoint(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}") from None

    def restore(self, skeleton: PyTree, step: int | None = None, which: str = "latest", *,
                move_aside: bool = False, flag: str = "--checkpoint") -> tuple[PyTree, int] | None:
        """Restore `step` (or the newest readable one) into the skeleton; None if there is none.

        A given `step` that is missing or unreadable is a UserError naming `flag` (listing the steps there are).
        Otherwise each unreadable checkpoint gets one warning line and the one before is tried; with
        `move_aside` the unreadable ones newer than the one restored go to `<which>/corrupt-<step>`.
        If checkpoints exist but none is readable: NoReadableCheckpoint (nothing is moved)."""
        manager = self._manager_for(which)
        available = sorted(manager.all_steps(), reverse=True)
        if step is not None and step not in available:
            raise UserError(f"{flag} {step}: no such step in {manager.directory} "
                            f"(available: {', '.join(map(str, sorted(available))) or 'none'})")
        unreadable: list[tuple[int, str]] = []
        for s in [step] if step is not None else available:
            try:
                state, self.counters = self._read(manager, s, skeleton)
            except UnreadableCheckpoint as e:
                if step is not None:
                    raise UserError(f"{flag} {step}: {self.step_dir(s, manager)} is unreadable ({e})") from None
                unreadable.append((s, str(e)))
                if not move_aside:
                    log.warning("checkpoint %s is unreadable (%s); trying an earlier one", self.step_dir(s, manager), e)
                continue
            for bad, why in unreadable if move_aside else ():
                moved = self.move_aside(bad, which)
                log.warning("checkpoint %s is unreadable (%s); moved aside to %s", self.step_dir(bad, manager), why, moved.name)
            return state, s
        if unreadable:
            reasons = "; ".join(f"step {s}: {why}" for s, why in unreadable[:3])
            raise NoReadableCheckpoint(f"every checkpoint in {manager.directory} is unreadable ({reasons})")
        return None

    def move_aside(self, step: int, which: str = "latest") -> Path:
        """Rename checkpoint `step` to `<which>/corrupt-<step>` (a name orbax ignores; process 0 renames
        in a multi-host run); returns the new path."""
        manager = self._manager_for(which)
        source = self.step_dir(step, manager)
        target = source.with_name(f"corrupt-{step}")
        n = 1
        while target.exists():
            n += 1
            target = source.with_name(f"corrupt-{step}-{n}")
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:  # the others look at the folder only once it is renamed

            multihost_utils.sync_global_devices(f"scgcm-move-aside-{which}-{step}")
        manager.reload()
        return target

    def close(self) -> None:
        """Close every manager, after its start-up clean-up of temporary folders has ended: orbax runs that
        in a thread and its `close` does not wait for it, so an exit right after (an error message) could
        end in its traceback ("cannot schedule new futures after interpreter shutdown"). Safe to call twice."""
        for m in (self.latest, *self.best.values()):
            _await_cleanup(m)
            m.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _await_cleanup(manager: ocp.CheckpointManager) -> None:
    """Wait for the manager's start-up clean-up of temporary folders (orbax's own save waits for it; close does not)."""
    wait = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait is not None:
        wait()
