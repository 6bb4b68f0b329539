"""The train step under shard_map: state replicated (P()), batch split over "data", gradients and
metrics averaged with pmean inside `train_step`; with the data on the devices, each device draws its
own rows of every batch inside the jitted call.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from scgcm.core.state import TrainState
from scgcm.core.step import train_steps
from scgcm.data.on_device import draw_batch
from scgcm.parallel.mesh import AXIS


def make_train_fn(mesh: Mesh, state_like: TrainState, *, dataset: jax.Array | None = None, seed: int = 0,
                  batch_size: int = 0, steps_per_call: int = 1, flip: bool = True, **step_kwargs):
    """A jitted `(state, batch) -> (state, metrics)` running `train_steps` under shard_map; `batch` is the
    global float32 images [n, B, c, h, w]. With `dataset` (uint8 [N, h, w, c] replicated on the mesh,
    `device_data`) `batch` is None: each device draws its rows of the next `steps_per_call` global batches
    of `batch_size` from `seed` and the state's step counter (mirrored where `order` says, with `flip`), as the
    host loader would.

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
        batch = draw_batch(images, arrays.step, rows, steps=steps_per_call, seed=seed, batch_size=batch_size,
                           flip=flip)
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
