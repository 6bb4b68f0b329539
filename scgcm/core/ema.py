"""The running averages of the weights, updated after every optimizer step.

The EMA of the reference (`ema_update`: a constant decay, copied for the first updates) and the
power-function EMAs of post-hoc EMA (Karras et al. 2024, §3): exponent γ averages the weights of
updates τ = 1 … t with a profile ∝ τ^γ, whose width relative to t is σ_rel (`gamma_to_sigma_rel`).
The reconstruction of other σ_rel from their snapshots is `scgcm.core.phema`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

DEFAULT_SIGMA_RELS = (0.05, 0.10)


def ema_update(ema: PyTree, params: PyTree, step: Int[Array, ""], decay: float, copy_steps: int) -> PyTree:
    """θ_ema ← d·θ_ema + (1 − d)·θ, with d = 0 while step ≤ copy_steps (the reference's first-updates rule)."""
    d = jnp.where(step <= copy_steps, 0.0, decay)
    return jax.tree_util.tree_map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype), ema, params)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative std of the power profile ∝ τ^γ on [0, 1] (paper eq. 123)."""
    g = np.float64(gamma)
    return float(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ with `gamma_to_sigma_rel(γ) = sigma_rel`: the largest real root of
    γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0 (paper eq. 126, Algorithm 2)."""
    if not 0 < sigma_rel < gamma_to_sigma_rel(0.0):  # γ = 0 (uniform average) is the widest profile
        raise ValueError(f"sigma_rel must lie in (0, {gamma_to_sigma_rel(0.0):.4f}), got {sigma_rel}")
    t = np.float64(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_ema_beta(step: Int[Array, ""] | int, gamma: float) -> Float[Array, ""]:
    """Decay of the power-function EMA at update `step` (1 at the first): β = (1 − 1/step)^(γ+1)
    (paper eq. 127 with one update per step), so that the first update copies the weights."""
    t = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def power_ema_update(ema: PyTree, params: PyTree, step: Int[Array, ""], gamma: float) -> PyTree:
    """θ̂ ← β θ̂ + (1 − β) θ with β = power_ema_beta(step, γ)."""
    beta = power_ema_beta(step, gamma)
    return jax.tree_util.tree_map(lambda e, p: (beta * e + (1 - beta) * p).astype(e.dtype), ema, params)
