"""The data order: which image, mirrored or not, is example g of a run.

Example g of a run (global step s, row j: g = s·B + j) is position p = g mod N of epoch e = g // N.
Epoch e's order is a keyed pseudo-random permutation π_e of [0, N): a six-round balanced Feistel network
on 2h bits (the fewest with 4^h ≥ N), restricted to [0, N) by cycle-walking (apply it again while the
value is ≥ N; a permutation of [0, 4^h) so restricted is a permutation of [0, N), Black & Rogaway 2002).
The round keys and the flip bit come from murmur3's 32-bit finaliser of (seed, epoch, round).

It is a pure function of (seed, epoch, position) in uint32 arithmetic only (wrapping products, xor,
shifts), so numpy (the host loader, `data.BatchLoader`) and jax.numpy (inside the jitted step, when the
images are kept on the devices) compute it bit for bit alike, one example at a time, with no epoch-wide
state. `xp` is the array module: `numpy` or `jax.numpy`.
"""

import jax
import numpy as np

ROUNDS = 6
FLIP_ROUND = ROUNDS  # the flip bit's key is round 6's
MAX_ROWS_TIMES_IMAGES = 2**31  # device path: N·B must fit int32 (its epoch/position split stays exact)


def _mix(x, xp):
    """murmur3's fmix32: a bijection of uint32 with full avalanche."""
    with np.errstate(over="ignore"):  # numpy scalars warn on the wrapping products (arrays and jax do not)
        x = x ^ (x >> 16)
        x = x * xp.uint32(0x85EBCA6B)
        x = x ^ (x >> 13)
        x = x * xp.uint32(0xC2B2AE35)
        return x ^ (x >> 16)


def _seed_words(seed: int) -> tuple[int, int]:
    if seed < 0 or seed >= 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed & 0xFFFFFFFF, seed >> 32


def _round_key(seed: int, epoch, r: int, xp):
    lo, hi = _seed_words(seed)
    k = _mix(xp.asarray(epoch).astype(xp.uint32) ^ xp.uint32(lo), xp)
    return _mix(k ^ xp.uint32(hi) ^ xp.uint32((0x9E3779B9 * (r + 1)) & 0xFFFFFFFF), xp)


def half_bits(num_images: int) -> int:
    """h: the Feistel network permutes [0, 4^h), the smallest such range that holds [0, num_images)."""
    return max(1, ((num_images - 1).bit_length() + 1) // 2)


def _feistel(x, keys, h: int, xp):
    mask = xp.uint32((1 << h) - 1)
    left, right = x >> xp.uint32(h), x & mask
    for k in keys:
        left, right = right, left ^ (_mix(right ^ k, xp) & mask)
    return (left << xp.uint32(h)) | right


def permute(seed: int, epoch, position, num_images: int, xp=np):
    """π_epoch(position): the image at `position` of epoch `epoch` (broadcast together), uint32."""
    h = half_bits(num_images)
    keys = [_round_key(seed, epoch, r, xp) for r in range(ROUNDS)]
    x = _feistel(xp.asarray(position).astype(xp.uint32), keys, h, xp)
    n = xp.uint32(num_images)
    if xp is np:
        while (outside := x >= n).any():
            x = np.where(outside, _feistel(x, keys, h, np), x)
        return x
    return jax.lax.while_loop(lambda y: (y >= n).any(), lambda y: xp.where(y >= n, _feistel(y, keys, h, xp), y), x)


def flip(seed: int, epoch, position, xp=np):
    """Whether the example at `position` of epoch `epoch` is mirrored left-right (bool, half of them)."""
    k = _round_key(seed, epoch, FLIP_ROUND, xp)
    return (_mix(xp.asarray(position).astype(xp.uint32) ^ k, xp) >> xp.uint32(31)) == 1


def epoch_position(step, row, batch_size: int, num_images: int, xp=np):
    """(epoch, position) of example g = step·B + row (0 ≤ row < B), broadcast together, without forming g:
    exact in int32 while N·B < 2^31 and the epoch fits (jax's default integers)."""
    a, b = step // num_images, step % num_images  # step·B = (a·B + c)·N + d, with b·B = c·N + d
    c, d = (b * batch_size) // num_images, (b * batch_size) % num_images
    return a * batch_size + c + (d + row) // num_images, (d + row) % num_images


def examples(seed: int, step, row, *, batch_size: int, num_images: int, xp=np):
    """(image index uint32, flip bool) of row `row` of global batch `step` (broadcast together)."""
    if xp is not np and num_images * batch_size >= MAX_ROWS_TIMES_IMAGES:
        raise ValueError(f"{num_images} images × batch {batch_size} is too many for int32 example indices")
    epoch, position = epoch_position(step, row, batch_size, num_images, xp)
    return permute(seed, epoch, position, num_images, xp), flip(seed, epoch, position, xp)
