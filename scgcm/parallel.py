"""Data parallelism: a 1-D device mesh "data", the train step under shard_map, batch placement.

The same code runs on 1 CPU, 8 GPUs or a TPU pod slice over several hosts: state replicated (P()),
batch split over "data", gradients and metrics averaged with pmean inside `train_step`.
Each host passes only its rows of the global batch; `global_batch` assembles the global array.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scgcm.device_data import draw_batch
from scgcm.state import TrainState
from scgcm.step import train_steps

AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh "data" over `devices` (default: every device of every process), ordered process by
    process, so that process p's devices hold rows [p·b, (p+1)·b) of a global batch: the rows its loader
    reads (`data.BatchLoader`) and the global example indices the step folds into its keys."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.asarray(sorted(devices, key=lambda d: d.process_index)), (AXIS,))  # stable: order kept within a process


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _global_array(x, sharding: NamedSharding) -> jax.Array:
    """A global array with `sharding` from the full value `x`, which every process holds (typed PRNG keys
    go through their raw data). `jax.device_put` only reaches this process's devices."""
    if _is_key(x):
        return jax.random.wrap_key_data(_global_array(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh):
    """Place every array of `tree` on all devices of the mesh; in a multi-process run every process
    passes the same values (its own copy: built from the seed, or restored from the checkpoint)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda x: _global_array(x, sharding) if eqx.is_array(x) else x, tree)


def split_rows(x, mesh: Mesh) -> jax.Array:
    """The full array `x` (every process holds it) split over "data" along axis 0."""
    return _global_array(x, NamedSharding(mesh, P(AXIS)))


def global_batch(local: np.ndarray, mesh: Mesh, batch_axis: int = 1) -> jax.Array:
    """This host's rows of a batch → the global array, split over "data" along `batch_axis`."""
    spec = P(*([None] * batch_axis), AXIS)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)


def make_train_fn(mesh: Mesh, state_like: TrainState, *, dataset: jax.Array | None = None, seed: int = 0,
                  batch_size: int = 0, steps_per_call: int = 1, **step_kwargs):
    """A jitted `(state, batch) -> (state, metrics)` running `train_steps` under shard_map; `batch` is the
    global float32 images [n, B, c, h, w]. With `dataset` (uint8 [N, h, w, c] replicated on the mesh,
    `device_data`) `batch` is None: each device draws its rows of the next `steps_per_call` global batches
    of `batch_size` from `seed` and the state's step counter, as the host loader would.

    The state's buffers are donated: the caller must use the returned state.
    """
    static = eqx.filter(state_like, eqx.is_array, inverse=True)

    def per_device(arrays, images):
        state = eqx.combine(arrays, static)
        offset = jax.lax.axis_index(AXIS) * images.shape[1]
        state, metrics = train_steps(state, images, offset, axis_name=AXIS, **step_kwargs)
        return eqx.filter(state, eqx.is_array), metrics

    if dataset is None:
        sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(None, AXIS)), out_specs=(P(), P()))

        @eqx.filter_jit(donate="all")
        def run(state: TrainState, images: jax.Array):
            arrays, _ = eqx.partition(state, eqx.is_array)
            arrays, metrics = sharded(arrays, images)
            return eqx.combine(arrays, static), metrics

        return run

    if batch_size < 1 or batch_size % mesh.size:
        raise ValueError(f"batch size {batch_size} is not a positive multiple of the {mesh.size} devices")
    local = batch_size // mesh.size

    def drawn(arrays, images):
        rows = jax.lax.axis_index(AXIS) * local + jnp.arange(local, dtype=jnp.int32)
        batch = draw_batch(images, arrays.step, rows, steps=steps_per_call, seed=seed, batch_size=batch_size)
        return per_device(arrays, batch)

    sharded = jax.shard_map(drawn, mesh=mesh, in_specs=(P(), P()), out_specs=(P(), P()))

    @eqx.filter_jit(donate="all-except-first")  # the dataset is an argument (not a constant) and is kept
    def run_drawn(images: jax.Array, state: TrainState):
        arrays, _ = eqx.partition(state, eqx.is_array)
        arrays, metrics = sharded(arrays, images)
        return eqx.combine(arrays, static), metrics

    def run_on_device(state: TrainState, batch: None = None):
        assert batch is None, "the batches are drawn on the devices"
        return run_drawn(dataset, state)

    return run_on_device
