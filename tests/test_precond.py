"""Preconditioning coefficients against their closed forms."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from scgcm.nn.precond import cm_coefficients, edm_weight


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.661, 5.0, 80.0])
def test_coefficients(sigma):
    c_skip, c_out, c_in, c_noise = cm_coefficients(jnp.asarray(sigma), 0.002, 0.5)
    np.testing.assert_allclose(c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_out, (sigma - 0.002) * 0.5 / math.sqrt(sigma**2 + 0.25), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(c_in, 1 / math.sqrt(sigma**2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_noise, math.log(sigma) / 4, rtol=1e-6)


def test_boundary_coefficients_are_exact():
    c_skip, c_out, _, _ = cm_coefficients(jnp.asarray(0.002, jnp.float32), 0.002, 0.5)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0


def test_noise_scale_q2():
    _, _, _, c_noise = cm_coefficients(jnp.asarray(2.0), 0.002, 0.5, noise_scale=1000.0)
    np.testing.assert_allclose(c_noise, 250 * math.log(2.0), rtol=1e-6)


def test_edm_weight_and_q5_floor():
    sigma = jnp.asarray(1.3)
    np.testing.assert_allclose(edm_weight(sigma, 0.5), (1.69 + 0.25) / (1.3 * 0.5) ** 2, rtol=1e-6)
    _, c_out, _, _ = cm_coefficients(sigma, 0.002, 0.5)  # quirk Q5: w·c_out² = ((σ − σ_min)/σ)²
    np.testing.assert_allclose(edm_weight(sigma, 0.5) * c_out**2, ((1.3 - 0.002) / 1.3) ** 2, rtol=1e-5)
