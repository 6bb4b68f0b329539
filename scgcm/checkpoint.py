"""Orbax checkpoints of the array half of a TrainState.

`checkpoints/latest/<step>` keeps the last few states; `checkpoints/best_<mode>/<step>` keeps the one
with the lowest FID of each sampling mode. Orbax writes each checkpoint to a temporary folder and
renames it when complete, so a process killed mid-save never leaves a checkpoint that can be picked;
a latest checkpoint that cannot be read falls back to the one before, with a warning.

The state is stored as a flat {key path: array} dict (typed PRNG keys as their raw uint32 data)
and restored into the leaves of a skeleton made with `eqx.filter_eval_shape`.
"""

import logging
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree

log = logging.getLogger(__name__)


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


def _manager(directory: Path, max_to_keep: int | None, best: bool = False, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=False,
        best_fn=(lambda m: m["fid"]) if best else None,
        best_mode="min",
        keep_checkpoints_without_metrics=not best,
        cleanup_tmp_directories=not read_only,  # a reader beside training must not remove a save in progress
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, best_modes: tuple[str, ...] = (), read_only: bool = False):
        """`read_only`: only restore (e.g. `python -m scgcm.evaluate` beside a training process)."""
        self.directory = Path(directory)
        self.read_only = read_only
        self.latest = _manager(self.directory / "latest", keep, read_only=read_only)
        self.best = {mode: _manager(self.directory / f"best_{mode}", 1, best=True) for mode in best_modes}

    def save(self, step: int, state: PyTree) -> None:
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=ocp.args.StandardSave(_flatten(state)), force=True)
        self.latest.wait_until_finished()

    def _manager_for(self, which: str) -> ocp.CheckpointManager:
        """'latest', 'phema' (the power-EMA snapshots, all kept), 'phema_<σ_rel>' (reconstructed EMAs)
        or a sampling mode's best manager, created once (a spare manager's tmp-dir cleanup would race
        with a save)."""
        if which == "latest":
            return self.latest
        if which not in self.best:
            if which == "phema" or which.startswith("phema_"):
                self.best[which] = _manager(self.directory / which, None)
            else:
                self.best[which] = _manager(self.directory / f"best_{which}", 1, best=True)
        return self.best[which]

    def save_named(self, which: str, step: int, tree: PyTree) -> None:
        """Save into 'phema' (snapshots) or 'phema_<σ_rel>'; an existing step is replaced."""
        manager = self._manager_for(which)
        if step in manager.all_steps():
            manager.delete(step)
        manager.save(step, args=ocp.args.StandardSave(_flatten(tree)), force=True)
        manager.wait_until_finished()

    def restore_phema(self, skeleton: PyTree, step: int) -> PyTree:
        """The power-EMA snapshot of `step` (saved with `save_named("phema", step, state.phema)`)."""
        restored = self.restore(skeleton, step=step, which="phema")
        if restored is None:
            raise FileNotFoundError(f"no power-EMA snapshot at step {step} in {self.directory / 'phema'}")
        return restored[0]

    def save_best(self, mode: str, step: int, state: PyTree, fid: float) -> None:
        manager = self._manager_for(mode)
        manager.save(step, args=ocp.args.StandardSave(_flatten(state)), metrics={"fid": float(fid)}, force=True)
        manager.wait_until_finished()

    def steps(self, which: str = "latest") -> list[int]:
        return sorted(self._manager_for(which).all_steps())

    def restore(self, skeleton: PyTree, step: int | None = None, which: str = "latest") -> tuple[PyTree, int] | None:
        """Restore `step` (or the newest readable one) into the skeleton; None if there is none."""
        manager = self._manager_for(which)
        candidates = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
        target = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), _flatten(skeleton))
        for s in candidates:
            try:
                flat = manager.restore(s, args=ocp.args.StandardRestore(target))
                return _unflatten(flat, skeleton), s
            except Exception as e:  # unreadable: fall back to the one before
                if step is not None:
                    raise
                log.warning("checkpoint %s at step %d is unreadable (%s: %s); trying an earlier one",
                            manager.directory, s, type(e).__name__, str(e).splitlines()[0][:200])
        return None

    def close(self) -> None:
        self.latest.close()
        for m in self.best.values():
            m.close()
