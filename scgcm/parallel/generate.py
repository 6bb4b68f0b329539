"""Batched, device-sharded generation of uint8 images with any sampler.

Image i of a seed always comes from `fold_in(key(seed), i)`, so the images do not depend on the
batch size or on the number of devices.

A sampler is a `jax.tree_util.Partial`, a pytree: its float and int options are compared by value
(the jitted batch is compiled once per mode, options and shapes in a process, however many times
the sampler is rebuilt), and an option given as a JAX array is traced (a search over the two-step
σ compiles once).
"""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.tree_util import Partial
from tqdm.auto import tqdm

from scgcm.core import samplers
from scgcm.data.images import to_uint8_nhwc
from scgcm.nn.model import SCGCM
from scgcm.parallel.mesh import split_rows

Mode = Literal["onestep", "twostep", "multistep", "heun"]
MODES: tuple[str, ...] = ("onestep", "twostep", "multistep", "heun")


def make_sampler(
    mode: Mode,
    *,
    shape: tuple[int, int, int],
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    two_step_sigma: float | jax.Array = 0.661,
    sigmas: tuple[float, ...] = (80.0, 0.661),
    heun_steps: int = 18,
) -> Callable[[SCGCM, jax.Array], jax.Array]:
    """A per-image function (model, key) -> image in [-1, 1] (channel-first) for one sampling mode."""
    match mode:
        case "onestep":
            return Partial(samplers.multistep, sigmas=(sigma_max,), shape=shape, sigma_min=sigma_min)
        case "twostep":
            return Partial(samplers.multistep, sigmas=(sigma_max, two_step_sigma), shape=shape, sigma_min=sigma_min)
        case "multistep":
            if list(sigmas) != sorted(sigmas, reverse=True) or sigmas[-1] <= sigma_min:
                raise ValueError(f"multistep sigmas must decrease and stay above sigma_min={sigma_min}: {sigmas}")
            return Partial(samplers.multistep, sigmas=tuple(sigmas), shape=shape, sigma_min=sigma_min)
        case "heun":
            return Partial(samplers.heun, num_steps=heun_steps, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max)
    raise ValueError(f"unknown sampling mode {mode!r}; choose one of {MODES}")


@eqx.filter_jit
def _sample_batch(model: SCGCM, keys: jax.Array, sampler) -> jax.Array:
    return to_uint8_nhwc(jax.vmap(sampler, in_axes=(None, 0))(model, keys))


def generate(
    model: SCGCM,
    sampler: Callable,
    *,
    seed: int,
    num: int,
    batch_size: int,
    mesh: Mesh | None = None,
    progress: bool = False,
    start: int = 0,
) -> np.ndarray:
    """`num` uint8 images [num, h, w, c] from the model in inference mode, `batch_size` at a time:
    images start … start + num − 1 of the seed (image i from `fold_in(key(seed), i)`)."""
    model = eqx.nn.inference_mode(model)
    mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ("data",))
    ndev = mesh.devices.size
    batch_size = max(ndev, -(-batch_size // ndev) * ndev)
    base = jr.key(seed)
    out = []
    for first in tqdm(range(0, num, batch_size), disable=not progress, desc="sampling", leave=False):
        idx = np.arange(start + first, start + first + batch_size)
        keys = split_rows(jax.vmap(lambda i: jr.fold_in(base, i))(idx), mesh)  # every process draws all keys
        images = _sample_batch(model, keys, sampler)
        images = multihost_utils.process_allgather(images, tiled=True) if jax.process_count() > 1 else np.asarray(images)
        out.append(images[: num - first])
    return np.concatenate(out) if out else np.zeros((0,), np.uint8)
