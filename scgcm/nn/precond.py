"""Consistency-model preconditioning (method.md §3, §5.1), shared by the torso and the head.

    c_skip(σ)  = σ_d² / ((σ − σ_min)² + σ_d²)
    c_out(σ)   = (σ − σ_min)·σ_d / sqrt(σ² + σ_d²)
    c_in(σ)    = 1 / sqrt(σ² + σ_d²)
    c_noise(σ) = s · ln(σ) / 4

At σ = σ_min, c_skip = 1 and c_out = 0, so D(x, σ_min) = x exactly (the boundary condition).
The reference feeds c_noise with s = 1 to a Fourier layer of scale 0.02 (quirk Q2); the CM/iCT
code uses s = 1000. `noise_scale` selects it.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float


def cm_coefficients(
    sigma: Float[Array, ""], sigma_min: float, sigma_data: float, noise_scale: float = 1.0
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """(c_skip, c_out, c_in, c_noise) at noise level σ."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)
    c_noise = noise_scale * jnp.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def edm_weight(sigma: Float[Array, ""], sigma_data: float) -> Float[Array, ""]:
    """EDM's loss weight λ(σ) = (σ² + σ_d²) / (σ·σ_d)²."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
