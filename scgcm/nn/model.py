"""SCGCM = consistency torso f_θ + score head h_φ, each behind its preconditioning.

One example at a time (`c h w`, σ a scalar); callers vmap. The trainable/frozen split lives here:
the torso's Fourier weights are wrapped in `Frozen` and never reach the optimizer or the EMA.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from scgcm.nn.head import ScoreHead
from scgcm.nn.layers import Frozen
from scgcm.nn.precond import cm_coefficients
from scgcm.nn.torso import NCSNpp


class SCGCM(eqx.Module):
    torso: NCSNpp
    head: ScoreHead
    sigma_min: float = eqx.field(static=True, default=0.002)
    sigma_data: float = eqx.field(static=True, default=0.5)
    noise_scale: float = eqx.field(static=True, default=1.0)

    def coefficients(self, sigma: Float[Array, ""]):
        return cm_coefficients(sigma, self.sigma_min, self.sigma_data, self.noise_scale)

    def consistency(
        self, x: Float[Array, "c h w"], sigma: Float[Array, ""], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "c h w"], Float[Array, " e"], Float[Array, "f h w"]]:
        """f_θ(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise), with the torso's (t_emb, last_x_emb)."""
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        out, t_emb, last_x_emb = self.torso(c_in * x, c_noise, key=key)
        return c_skip * x + c_out * out.astype(x.dtype), t_emb, last_x_emb

    def head_denoise(
        self,
        x: Float[Array, "c h w"],
        sigma: Float[Array, ""],
        denoised: Float[Array, "c h w"],
        t_emb: Float[Array, " e"],
        last_x_emb: Float[Array, "f h w"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "c h w"]:
        """h_φ(x, σ; D, t_emb, last_x_emb) with the same CM-style coefficients (σ_min offset, quirk Q5).

        `denoised` is the torso's D; it always enters under stop_gradient. Whether t_emb and
        last_x_emb carry gradient back to the torso is the caller's choice (score vs vanilla).
        """
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        d_in = c_in * jax.lax.stop_gradient(denoised)
        out = self.head(c_in * x, d_in, c_noise, t_emb, last_x_emb, key=key)
        return c_skip * x + c_out * out.astype(x.dtype)

    def score_denoise(self, x: Float[Array, "c h w"], sigma: Float[Array, ""]) -> Float[Array, "c h w"]:
        """The head's denoiser D_h(x, σ) for sampling: the torso runs at the same (x, σ) to feed it."""
        denoised, t_emb, last_x_emb = self.consistency(x, sigma)
        return self.head_denoise(x, sigma, denoised, t_emb, last_x_emb)


def _is_frozen(x) -> bool:
    return isinstance(x, Frozen)


def trainable_spec(model: PyTree) -> PyTree:
    """Filter spec: True for trainable float arrays, False for `Frozen` leaves and non-arrays."""
    return jax.tree_util.tree_map(
        lambda x: False if _is_frozen(x) else eqx.is_inexact_array(x), model, is_leaf=_is_frozen
    )


def split_trainable(model: PyTree) -> tuple[PyTree, PyTree]:
    """(trainable, rest) with `eqx.combine(trainable, rest) == model`."""
    return eqx.partition(model, trainable_spec(model), is_leaf=_is_frozen)


def count_params(module: PyTree) -> tuple[int, int]:
    """(number of parameters, number of arrays), every inexact array counted (the reference's count)."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(module, eqx.is_inexact_array))
    return sum(int(jnp.size(x)) for x in leaves), len(leaves)
