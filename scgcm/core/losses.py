"""The two training objectives (method.md §1), for one example; the step vmaps and averages them.

Consistency term (torso):  λ(σ)·d(f_θ(x, σ), sg f_θ(x', σ')),  x = y + σz, x' = y + σ'z,
    d elementwise (reference, quirk Q1): mean over pixels of sqrt(δ² + c²) − c, c = 0.003;
    d per image (iCT paper):             sqrt(‖δ‖² + c²) − c,                  c = 0.00054·sqrt(dim).
Score term (head):  w·(σ² + σ_d²)/(σσ_d)² · mean over pixels of (h_φ(x, σ) − y)², w = 0.3.

Both passes of the torso share the dropout key (identical masks, iCT); the target pass is the
online network under stop_gradient, not an EMA.
"""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from scgcm.nn.model import SCGCM
from scgcm.nn.precond import edm_weight

HuberForm = Literal["elementwise", "per_image"]
Variant = Literal["score", "vanilla"]


def default_huber_c(form: HuberForm, dim: int) -> float:
    """The constant each form was published with: 0.003 (reference) or 0.00054·sqrt(dim) (iCT)."""
    return 0.003 if form == "elementwise" else 0.00054 * math.sqrt(dim)


def pseudo_huber(delta: Float[Array, "c h w"], c: float, form: HuberForm) -> Float[Array, ""]:
    if form == "elementwise":
        return jnp.mean(jnp.sqrt(delta**2 + c**2) - c)
    return jnp.sqrt(jnp.sum(delta**2) + c**2) - c


class JointLoss(eqx.Module):
    """L_CT + L_DSM for one example; hyperparameters are fields, inputs are arguments."""

    variant: Variant = eqx.field(static=True, default="score")
    huber_form: HuberForm = eqx.field(static=True, default="elementwise")
    huber_c: float = eqx.field(static=True, default=0.003)
    dsm_weight: float = eqx.field(static=True, default=0.3)

    def __call__(
        self,
        model: SCGCM,
        y: Float[Array, "c h w"],
        noise: Float[Array, "c h w"],
        sigma: Float[Array, ""],
        sigma_prev: Float[Array, ""],
        weight: Float[Array, ""],
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, ""], Float[Array, ""]]:
        """(consistency loss, weighted DSM loss), both float32 scalars."""
        cm_key, head_key = jr.split(key)
        x, x_prev = y + sigma * noise, y + sigma_prev * noise
        denoised, t_emb, last_x_emb = model.consistency(x, sigma, key=cm_key)
        target, _, _ = model.consistency(x_prev, sigma_prev, key=cm_key)
        target = jax.lax.stop_gradient(target)
        delta = (denoised - target).astype(jnp.float32)
        loss_ct = weight * pseudo_huber(delta, self.huber_c, self.huber_form)

        if self.variant == "vanilla":
            t_emb, last_x_emb = jax.lax.stop_gradient((t_emb, last_x_emb))
        head_out = model.head_denoise(x, sigma, denoised, t_emb, last_x_emb, key=head_key)
        err = (head_out - y).astype(jnp.float32)
        loss_dsm = self.dsm_weight * edm_weight(sigma, model.sigma_data) * jnp.mean(err**2)
        return loss_ct, loss_dsm
