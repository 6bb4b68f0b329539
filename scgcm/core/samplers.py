"""Samplers (method.md §7), one function each, for a model in inference mode (EMA weights).

Noise comes from the caller's key, one key per image, so image i depends only on its own key:
the same seed gives the same images whatever the batch size or device count.
Outputs are not clipped; `scgcm.data.images.to_uint8` does that when images leave the model.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from scgcm.core.ict import heun_sigmas
from scgcm.nn.model import SCGCM


def _latent(key: PRNGKeyArray, shape: tuple[int, ...], index: int) -> Float[Array, "c h w"]:
    return jr.normal(jr.fold_in(key, index), shape)


def multistep(
    model: SCGCM, key: PRNGKeyArray, sigmas: tuple[float | Float[Array, ""], ...], shape: tuple[int, int, int],
    sigma_min: float,
) -> Float[Array, "c h w"]:
    """Consistency sampling through σ_0 > σ_1 > …: x = f(σ_0·z, σ_0); x ← f(x + sqrt(σ_j² − σ_min²)·z_j, σ_j).

    `sigmas=(80,)` is one-step sampling, `(80, 0.661)` the reference's two-step sampling. A σ after the
    first may be an array (traced: one compiled sampler for every value).
    """
    x = model.consistency(sigmas[0] * _latent(key, shape, 0), jnp.asarray(sigmas[0]))[0]
    for j, sigma in enumerate(sigmas[1:], start=1):
        x = x + jnp.sqrt(sigma**2 - sigma_min**2) * _latent(key, shape, j)
        x = model.consistency(x, jnp.asarray(sigma))[0]
    return x


def heun(
    model: SCGCM,
    key: PRNGKeyArray,
    num_steps: int,
    shape: tuple[int, int, int],
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
) -> Float[Array, "c h w"]:
    """EDM's deterministic Heun sampler with the score head's denoiser (2·num_steps − 1 evaluations)."""
    t = heun_sigmas(num_steps, sigma_min, sigma_max, rho)

    def slope(x, t_cur):
        return (x - model.score_denoise(x, t_cur)) / t_cur

    def heun_step(x, ts):
        t_cur, t_next = ts
        d = slope(x, t_cur)
        d_next = slope(x + (t_next - t_cur) * d, t_next)
        return x + 0.5 * (t_next - t_cur) * (d + d_next), None

    x = t[0] * _latent(key, shape, 0)
    x, _ = jax.lax.scan(heun_step, x, (t[:-2], t[1:-1]))
    return x + (t[-1] - t[-2]) * slope(x, t[-2])  # the last step, to σ = 0, is Euler only
