"""The iCT noise schedule: Karras grid, curriculum N(k), discrete lognormal over the grid.

Pure functions of the optimizer step (method.md §2). Every array has a static shape
under jit: the grid is built at its largest size, s1 + 1 points, and indices past
N(k) − 1 are clipped, so a traced N(k) never changes a shape.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray


def karras_sigmas(
    num: Int[Array, ""] | int,
    length: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
) -> Float[Array, " length"]:
    """σ_i = (σ_min^{1/ρ} + i/(N−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ for i < length, i clipped to N−1."""
    i = jnp.minimum(jnp.arange(length), num - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i / (num - 1) * (hi - lo)) ** rho


def num_scales(step: Int[Array, ""] | int, s0: int, s1: int, total_steps: int) -> Int[Array, ""]:
    """N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 with K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋."""
    k_prime = math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))
    doublings = jnp.minimum(jnp.asarray(step) // k_prime, 30)
    return jnp.minimum(s0 * 2**doublings, s1) + 1


def lognormal_index_probs(
    sigmas: Float[Array, " length"], num: Int[Array, ""] | int, p_mean: float, p_std: float
) -> Float[Array, " length-1"]:
    """P(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std)), zero for i ≥ N−1."""
    e = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = jnp.where(jnp.arange(sigmas.shape[0] - 1) < num - 1, e[1:] - e[:-1], 0.0)
    return mass / mass.sum()


class ICTSchedule(eqx.Module):
    """The iCT discretisation; hyperparameters only, every method is a pure function of the step."""

    sigma_min: float = eqx.field(static=True, default=0.002)
    sigma_max: float = eqx.field(static=True, default=80.0)
    rho: float = eqx.field(static=True, default=7.0)
    s0: int = eqx.field(static=True, default=10)
    s1: int = eqx.field(static=True, default=1280)
    total_steps: int = eqx.field(static=True, default=400_000)
    p_mean: float = eqx.field(static=True, default=-1.1)
    p_std: float = eqx.field(static=True, default=2.0)

    def num_scales(self, step: Int[Array, ""] | int) -> Int[Array, ""]:
        return num_scales(step, self.s0, self.s1, self.total_steps)

    def sigmas(self, step: Int[Array, ""] | int) -> Float[Array, " s1p1"]:
        """The grid of N(step) levels, padded to s1 + 1 entries by repeating σ_max."""
        return karras_sigmas(self.num_scales(step), self.s1 + 1, self.sigma_min, self.sigma_max, self.rho)

    def index_probs(self, step: Int[Array, ""] | int) -> Float[Array, " s1"]:
        return lognormal_index_probs(self.sigmas(step), self.num_scales(step), self.p_mean, self.p_std)

    def sample(
        self, key: PRNGKeyArray, step: Int[Array, ""] | int
    ) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
        """One draw for one example: (σ_{i+1}, σ_i, λ = 1/(σ_{i+1} − σ_i))."""
        sigmas = self.sigmas(step)
        i = jr.categorical(key, jnp.log(self.index_probs(step)))
        sigma, sigma_prev = sigmas[i + 1], sigmas[i]
        return sigma, sigma_prev, 1.0 / (sigma - sigma_prev)


def heun_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> Float[Array, " levels"]:
    """EDM's descending sampling levels t_0 = σ_max … t_{n−1} = σ_min, then t_n = 0."""
    t = karras_sigmas(num_steps, num_steps, sigma_min, sigma_max, rho)[::-1]
    return jnp.concatenate([t, jnp.zeros(1)])
