"""Data parallelism: a 1-D device mesh "data" and the placement of arrays on it.

The same code runs on 1 CPU, 8 GPUs or a TPU pod slice over several hosts: state replicated (P()),
batches split over "data" (`scgcm.parallel.train_fn` runs the train step under shard_map on this mesh).
Each host passes only its rows of the global batch; `global_batch` assembles the global array.
"""

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
