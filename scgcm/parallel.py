"""Data parallelism: a 1-D device mesh "data", the train step under shard_map, batch placement.

The same code runs on 1 CPU, 8 GPUs or a TPU pod slice over several hosts: state replicated (P()),
batch split over "data", gradients and metrics averaged with pmean inside `train_step`.
Each host passes only its rows of the global batch; `global_batch` assembles the global array.
"""

import os

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scgcm.state import TrainState
from scgcm.step import train_steps

AXIS = "data"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-host run: explicit flags, or the environment variables jax.distributed reads
    (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, Cloud TPU, SLURM, Open MPI)."""
    if coordinator or num_processes or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator, num_processes, process_id)


def make_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def replicate(tree, mesh: Mesh):
    """Place every array of `tree` on all devices of the mesh."""
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree)


def global_batch(local: np.ndarray, mesh: Mesh, batch_axis: int = 1) -> jax.Array:
    """This host's rows of a batch → the global array, split over "data" along `batch_axis`."""
    spec = P(*([None] * batch_axis), AXIS)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)


def make_train_fn(mesh: Mesh, state_like: TrainState, **step_kwargs):
    """A jitted `(state, images [n, B, c, h, w]) -> (state, metrics)` running `train_steps` under shard_map.

    The state's buffers are donated: the caller must use the returned state.
    """
    static = eqx.filter(state_like, eqx.is_array, inverse=True)

    def per_device(arrays, images):
        state = eqx.combine(arrays, static)
        offset = jax.lax.axis_index(AXIS) * images.shape[1]
        state, metrics = train_steps(state, images, offset, axis_name=AXIS, **step_kwargs)
        return eqx.filter(state, eqx.is_array), metrics

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(None, AXIS)), out_specs=(P(), P()))

    @eqx.filter_jit(donate="all")
    def run(state: TrainState, images: jax.Array):
        arrays, _ = eqx.partition(state, eqx.is_array)
        arrays, metrics = sharded(arrays, images)
        return eqx.combine(arrays, static), metrics

    return run
