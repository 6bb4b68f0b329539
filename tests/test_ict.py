"""iCT schedule against method.md §13 and closed forms."""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from scgcm.core.ict import ICTSchedule, heun_sigmas, karras_sigmas, lognormal_index_probs, num_scales

GRID_11 = [0.002, 0.01672, 0.08509, 0.31828, 0.96542, 2.51522, 5.83895, 12.38158, 24.40834, 45.31373, 80.0]
PROBS_11 = [0.0626, 0.1817, 0.2455, 0.2135, 0.1424, 0.0806, 0.0411, 0.0196, 0.0089, 0.0040]
WEIGHTS_11 = [67.93, 14.63, 4.288, 1.545, 0.645, 0.301, 0.153, 0.083, 0.048, 0.029]
HEUN_18 = [80, 57.586, 40.786, 28.375, 19.353, 12.910, 8.401, 5.315, 3.257, 1.923, 1.088,
           0.5853, 0.2964, 0.1395, 0.0599, 0.0229, 0.0075, 0.002, 0.0]


@pytest.mark.parametrize("k,n", [(0, 11), (49_999, 11), (50_000, 21), (100_000, 41), (350_000, 1281), (400_000, 1281)])
def test_curriculum(k, n):
    assert int(num_scales(k, 10, 1280, 400_000)) == n


def test_grid_at_11():
    np.testing.assert_allclose(karras_sigmas(11, 11, 0.002, 80.0, 7.0), GRID_11, rtol=6e-5)


def test_grid_padding_and_probabilities_at_11():
    schedule = ICTSchedule()
    sig = schedule.sigmas(0)
    assert sig.shape == (1281,)
    np.testing.assert_allclose(sig[:11], GRID_11, rtol=6e-5)
    assert np.all(np.asarray(sig[11:]) == np.float32(sig[10]))  # clipped to σ_max
    p = schedule.index_probs(0)
    assert p.shape == (1280,)
    np.testing.assert_allclose(p[:10], PROBS_11, atol=6e-5)
    assert float(jnp.sum(p[10:])) == 0.0
    np.testing.assert_allclose(float(p.sum()), 1.0, rtol=1e-6)


def test_probabilities_closed_form():
    # P(i) ∝ Φ(ln σ_{i+1}) − Φ(ln σ_i) for the normal CDF Φ with mean −1.1, std 2.
    grid = np.asarray(GRID_11, np.float64)
    cdf = np.array([0.5 * (1 + math.erf((math.log(s) + 1.1) / (2.0 * math.sqrt(2)))) for s in grid])
    expected = np.diff(cdf) / np.diff(cdf).sum()
    got = lognormal_index_probs(jnp.asarray(grid, jnp.float32), 11, -1.1, 2.0)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_weights_at_11():
    grid = np.asarray(karras_sigmas(11, 11, 0.002, 80.0, 7.0))
    np.testing.assert_allclose(1 / np.diff(grid), WEIGHTS_11, rtol=1e-2)  # the spec prints 2-4 significant digits


def test_final_grid_stats():
    schedule = ICTSchedule()
    sig, p = np.asarray(schedule.sigmas(400_000), np.float64), np.asarray(schedule.index_probs(400_000), np.float64)
    np.testing.assert_allclose(sig[1], 0.0020391, rtol=1e-4)
    assert 0.69 < p[sig[1:] < 1.0].sum() < 0.73
    assert 0.1 < sig[1:][np.argmax(p)] < 0.3


def test_sample_is_on_grid_and_follows_probabilities():
    schedule = ICTSchedule()
    keys = jr.split(jr.key(0), 20_000)
    sigma, sigma_prev, weight = jax.jit(jax.vmap(schedule.sample, in_axes=(0, None)))(keys, jnp.asarray(0))
    grid = np.asarray(karras_sigmas(11, 11, 0.002, 80.0, 7.0))
    idx = np.argmin(np.abs(grid[None, :] - np.asarray(sigma_prev)[:, None]), axis=1)
    np.testing.assert_allclose(sigma, grid[idx + 1], rtol=1e-5)
    np.testing.assert_allclose(weight, 1 / (grid[idx + 1] - grid[idx]), rtol=1e-4)
    freq = np.bincount(idx, minlength=10) / len(idx)
    np.testing.assert_allclose(freq, PROBS_11, atol=0.01)


def test_heun_schedule():
    np.testing.assert_allclose(heun_sigmas(18, 0.002, 80.0, 7.0), HEUN_18, rtol=5e-3, atol=1e-6)  # printed to 3-5 digits
