"""The data order (`scgcm.order`): a keyed permutation per epoch, the same bits in numpy and in jax, and
the batches drawn on the device equal to the host loader's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scgcm.data import loader, on_device as device_data, order, sources

M32 = 0xFFFFFFFF


def fmix32(x: int) -> int:  # murmur3's finaliser on Python integers
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def reference_example(seed: int, epoch: int, position: int, n: int) -> tuple[int, bool]:
    """The module's definition, one example at a time in Python integers."""
    keys = [fmix32(fmix32(epoch ^ (seed & M32)) ^ (seed >> 32) ^ ((0x9E3779B9 * (r + 1)) & M32)) for r in range(7)]
    h = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << h) - 1
    x = position
    while True:
        left, right = x >> h, x & mask
        for k in keys[:6]:
            left, right = right, left ^ (fmix32(right ^ k) & mask)
        x = (left << h) | right
        if x < n:
            break
    return x, fmix32(position ^ keys[6]) >> 31 == 1


def test_mix_is_murmur3_fmix32():
    x = np.array([0, 1, 2, 0xDEADBEEF, M32], np.uint32)
    assert [int(v) for v in order._mix(x, np)] == [fmix32(int(v)) for v in x]


@pytest.mark.parametrize("n", [1, 2, 3, 10, 64, 65, 1017])
def test_each_epoch_is_a_permutation_matching_the_definition(n):
    for seed, epoch in ((0, 0), (5, 3), (2**40 + 7, 1)):
        position = np.arange(n)
        image = order.permute(seed, epoch, position, n)
        np.testing.assert_array_equal(np.sort(image), position)
        flips = order.flip(seed, epoch, position)
        expected = [reference_example(seed, epoch, p, n) for p in range(n)]
        assert [int(i) for i in image] == [i for i, _ in expected] and list(flips) == [f for _, f in expected]
    assert order.half_bits(1) == 1 and order.half_bits(64) == 3 and order.half_bits(65) == 4 and order.half_bits(50_000) == 8


def test_orders_look_random():
    """CIFAR-10-sized: epochs, seeds and positions uncorrelated; half the examples mirrored."""
    n = 50_000
    position = np.arange(n)
    e0, e1, other_seed = order.permute(1, 0, position, n), order.permute(1, 1, position, n), order.permute(2, 0, position, n)
    for a, b in ((e0, position), (e0, e1), (e0, other_seed)):
        assert abs(np.corrcoef(a.astype(float), b.astype(float))[0, 1]) < 0.02
        assert np.mean(a == b) < 1e-3
    flips = order.flip(1, 0, position)
    assert abs(flips.mean() - 0.5) < 0.01 and np.mean(flips == order.flip(1, 1, position)) < 0.52


def test_epoch_position_is_exact_without_forming_the_example_index():
    step = np.array([0, 1, 48, 49, 50, 123_456, 2_000_000])[:, None]
    row = np.arange(0, 1024, 97)[None, :]
    for n in (50_000, 1017, 7):
        g = step * 1024 + row
        epoch, position = order.epoch_position(step, row, 1024, n)
        np.testing.assert_array_equal(epoch, g // n)
        np.testing.assert_array_equal(position, g % n)


def test_numpy_and_jax_give_the_same_bits():
    """Across epoch boundaries and at steps whose example index g = s·B + j would overflow int32."""
    for n, b in ((20, 8), (50_000, 1024), (1017, 96)):
        step = np.array([0, 1, 2, 5, 123, 40_000, 2_500_000])[:, None]
        row = np.arange(b)[None, :]
        drawn = jax.jit(lambda s, r: order.examples(9, s, r, batch_size=b, num_images=n, xp=jnp))  # noqa: B023
        got = drawn(jnp.asarray(step, jnp.int32), jnp.asarray(row, jnp.int32))
        want = order.examples(9, step, row, batch_size=b, num_images=n)
        np.testing.assert_array_equal(np.asarray(got[0]), want[0])
        np.testing.assert_array_equal(np.asarray(got[1]), want[1])
    with pytest.raises(ValueError, match="too many"):
        order.examples(0, 0, 0, batch_size=2**16, num_images=2**15, xp=jnp)


def test_batches_drawn_on_the_device_equal_the_host_loaders():
    """device_data.draw_batch from the step counter is BatchLoader's batch, bit for bit, for each process's
    rows of a 2-process run, across an epoch boundary, with and without flips."""
    images = sources.synthetic_images(20, image_size=8, seed=3)
    for flip, process in ((True, 0), (True, 1), (False, 1)):  # without flips (the digits preset's) too
        draw = jax.jit(functools.partial(device_data.draw_batch, steps=3, seed=5, batch_size=8, flip=flip))
        host = loader.BatchLoader(images, batch_size=8, seed=5, start_step=1, steps_per_call=3,
                                process_index=process, process_count=2, flip=flip)
        try:
            for call in range(2):
                expected = next(host)
                got = draw(images, jnp.int32(1 + 3 * call), jnp.arange(4 * process, 4 * process + 4, dtype=jnp.int32))
                assert got.shape == expected.shape == (3, 4, 3, 8, 8)
                np.testing.assert_array_equal(np.asarray(got), expected)
        finally:
            host.close()
    assert device_data.fits(images, 1.0) and not device_data.fits(images, 0.0)
    assert not device_data.fits(np.zeros((1024, 1024, 1024), np.uint8)[:1], 1e-3)
    assert not device_data.fits(images, 1.0, batch_size=2**31 // 20 + 1)  # N·B would overflow int32 on the device
