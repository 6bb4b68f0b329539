"""The training set kept on the devices: each call's batches are gathered inside the jitted step.

When the uint8 images fit in a per-device budget (CIFAR-10's 50,000 × 32 × 32 × 3 are 147 MiB), every
device holds them all, and the host sends only each call's image indices and flip flags, 5 bytes an
example instead of a 12 KiB float32 image: `data.batch_indices`, the host loader's own pure function of
(seed, step, example index), picks them, so the batches are exactly the host loader's. The gather, the
mirror and the conversion to [-1, 1] (`gather_batch`) run on the device, the conversion through a
table of the host loader's 256 values, so the images are bit-identical. Otherwise (or with the fault
injection of tests) the host loader (`data.BatchLoader`) is used.
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt8

from scgcm.data import DataError, batch_indices, to_model_range


# The 256 float32 values of `data.to_model_range` (x / 127.5 − 1, rounded as numpy does), looked up on the
# device: XLA would turn the division into a multiplication by 1/127.5, one ulp away for some x.
LEVELS = to_model_range(np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1))[:, 0, 0, 0]


def fits(images: np.ndarray, budget_mb: float) -> bool:
    """Whether the uint8 images take at most `budget_mb` MiB (each device holds a full copy)."""
    return budget_mb > 0 and images.nbytes <= budget_mb * 2**20


def gather_batch(
    images: UInt8[Array, "n h w c"], indices: Int[Array, "*batch"], flips: Bool[Array, "*batch"]
) -> Float[Array, "*batch c h w"]:
    """images[indices], mirrored left-right where `flips`, as float32 channel-first in [-1, 1]:
    `data.BatchLoader`'s batch, computed on the device."""
    x = images[indices]
    x = jnp.where(flips[..., None, None, None], x[..., ::-1, :], x)
    return jnp.moveaxis(jnp.asarray(LEVELS)[x], -1, -3)


class IndexLoader:
    """Endless iterator of (indices int32, flips bool), each [steps_per_call, batch_size/process_count]:
    item k covers global steps start_step + k·steps_per_call + s, this process's rows [p·b, (p+1)·b)
    of each global batch, exactly the examples `data.BatchLoader` would load."""

    def __init__(self, num_images: int, *, batch_size: int, seed: int, start_step: int = 0, steps_per_call: int = 1,
                 process_index: int = 0, process_count: int = 1):
        if batch_size < 1 or process_count < 1 or batch_size % process_count:
            raise DataError(f"batch_size {batch_size} must be a positive multiple of the process count {process_count}")
        self._num, self._batch_size, self._seed = num_images, batch_size, seed
        self._step, self._steps_per_call = start_step, steps_per_call
        local = batch_size // process_count
        self._rows = slice(process_index * local, (process_index + 1) * local)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        picks = [batch_indices(self._step + s, batch_size=self._batch_size, num_images=self._num, seed=self._seed)
                 for s in range(self._steps_per_call)]
        self._step += self._steps_per_call
        return (np.stack([i[self._rows] for i, _ in picks]).astype(np.int32),
                np.stack([f[self._rows] for _, f in picks]))

    def close(self) -> None:
        pass
