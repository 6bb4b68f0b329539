"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", §3 and Appendix C): the math of the reconstruction, numpy only.

A power-function EMA of exponent γ (`scgcm.core.ema`) averages the weights of updates τ = 1 … t with a
profile ∝ τ^γ. With `--config.phema` training keeps two of them beside the usual EMA and saves a snapshot
of both at every checkpoint. Any other σ_rel is then a linear combination of the snapshots: the one whose
profile is closest in L2 to the wanted profile, from the closed-form inner products of power profiles
(a least-squares solve). `scgcm.run.posthoc` applies it to a run's snapshots; `python -m scgcm.phema`
is the CLI.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, PyTree

ArrayOrScalar = Float[np.ndarray, "..."] | float | int


def power_ema_weights(t: int, gamma: float | int) -> Float[np.ndarray, " t"]:
    """Weights of θ_1 … θ_t in the power EMA after update t: (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1)
    (the product of the β's above; they sum to 1)."""
    tau = np.arange(1, t + 1, dtype=np.float64)
    return (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / np.float64(t) ** (gamma + 1)


def profile_inner_product(t_a: ArrayOrScalar, gamma_a: ArrayOrScalar, t_b: ArrayOrScalar,
                          gamma_b: ArrayOrScalar) -> Float[np.ndarray, "..."] | np.float64:
    """∫ p_a p_b dτ of the continuous power profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]:
    (γa+1)(γb+1) / ((γa+γb+1) t_max) · (t_min/t_max)^γ, γ that of the longer profile (paper eq. 151)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    t_max, ratio = np.maximum(t_a, t_b), np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
    gamma_long = np.where(t_a < t_b, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_max) * ratio**gamma_long


def solve_coefficients(snapshot_t: Float[np.ndarray, " n"], snapshot_gamma: Float[np.ndarray, " n"],
                       target_t: float | int, target_gamma: float) -> Float[np.ndarray, " n"]:
    """x minimising ‖p_target − Σᵢ xᵢ pᵢ‖² over the snapshot profiles (normal equations A x = b with
    A_ij = ⟨pᵢ, pⱼ⟩, b_i = ⟨pᵢ, p_target⟩), rescaled to sum to 1 as in the reference (Algorithm 3)."""
    t, g = np.asarray(snapshot_t, np.float64), np.asarray(snapshot_gamma, np.float64)
    a = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner_product(t, g, np.float64(target_t), np.float64(target_gamma))
    x = np.linalg.solve(a, b)
    return x / x.sum()


def accumulate(total: PyTree | None, trees: Sequence[PyTree], coefficients: Float[np.ndarray, " n"] | Sequence[float]) -> PyTree:
    """total + Σᵢ cᵢ treeᵢ over the inexact arrays, as float64 host arrays (None: start from zero)."""
    arrays = [jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), eqx.filter(t, eqx.is_inexact_array))
              for t in trees]
    part = jax.tree_util.tree_map(lambda *xs: sum(np.float64(c) * x for c, x in zip(coefficients, xs)), *arrays)
    return part if total is None else jax.tree_util.tree_map(np.add, total, part)


def finish(total: PyTree, like: PyTree) -> PyTree:
    """An `accumulate` total cast back to the dtypes of `like`, with its other leaves."""
    arrays = eqx.filter(like, eqx.is_inexact_array)
    return eqx.combine(jax.tree_util.tree_map(lambda s, x: jnp.asarray(s, x.dtype), total, arrays), like)


def combine(trees: Sequence[PyTree], coefficients: Float[np.ndarray, " n"] | Sequence[float]) -> PyTree:
    """Σᵢ cᵢ treeᵢ of the inexact arrays (summed in float64); other leaves from trees[0]."""
    return finish(accumulate(None, trees, coefficients), trees[0])
