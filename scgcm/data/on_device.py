"""The training set kept on the devices: each call's batches are drawn inside the jitted step.

When the uint8 images fit in a per-device budget (CIFAR-10's 50,000 × 32 × 32 × 3 are 147 MiB), every
device holds them all and the host sends nothing per call: each device computes its rows' image indices
and flips from the step counter with `scgcm.order` (the host loader's own pure function of seed, step and
example index), gathers, mirrors and converts them to [-1, 1] (`draw_batch`), the conversion through a
table of the host loader's 256 values, so the images are bit-identical to `data.BatchLoader`'s.
Otherwise (or with the fault injection of tests) the host loader is used.
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt8

from scgcm.data import order
from scgcm.data.images import to_model_range

# The 256 float32 values of `data.to_model_range` (x / 127.5 − 1, rounded as numpy does), looked up on the
# device: XLA would turn the division into a multiplication by 1/127.5, one ulp away for some x.
LEVELS = to_model_range(np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1))[:, 0, 0, 0]


def fits(images: np.ndarray, budget_mb: float, batch_size: int = 1) -> bool:
    """Whether the uint8 images take at most `budget_mb` MiB (each device holds a full copy), and the
    device's int32 arithmetic can number the examples (N·B < 2^31, `order.examples`)."""
    small = len(images) * batch_size < order.MAX_ROWS_TIMES_IMAGES
    return budget_mb > 0 and images.nbytes <= budget_mb * 2**20 and small


def gather_batch(
    images: UInt8[Array, "n h w c"], indices: Int[Array, "*batch"], flips: Bool[Array, "*batch"]
) -> Float[Array, "*batch c h w"]:
    """images[indices], mirrored left-right where `flips`, as float32 channel-first in [-1, 1]:
    `data.BatchLoader`'s batch, computed on the device."""
    x = images[indices]
    x = jnp.where(flips[..., None, None, None], x[..., ::-1, :], x)
    return jnp.moveaxis(jnp.asarray(LEVELS)[x], -1, -3)


def draw_batch(
    images: UInt8[Array, "n h w c"], first_step: Int[Array, ""], rows: Int[Array, " b"], *, steps: int, seed: int,
    batch_size: int, flip: bool = True,
) -> Float[Array, "steps b c h w"]:
    """Rows `rows` of global batches first_step, …, first_step + steps − 1, drawn on the device: the images
    and flips of `order.examples` (what `data.BatchLoader` loads on the host), gathered by `gather_batch`;
    without `flip`, none is mirrored."""
    step = first_step + jnp.arange(steps, dtype=jnp.int32)[:, None]
    indices, flips = order.examples(seed, step, rows[None, :], batch_size=batch_size, num_images=images.shape[0], xp=jnp)
    return gather_batch(images, indices.astype(jnp.int32), flips & flip)
