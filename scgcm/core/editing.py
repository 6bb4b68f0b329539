"""Zero-shot editing (Song et al. 2023, Algorithm 4) and latent interpolation, one example at a time.

An edit is an orthogonal linear map A of the image and a binary mask `known` in A's space (1 where
the coefficient of the reference y is known, 0 where the model fills it in):

    project(x) = A⁻¹[known ⊙ A·y + (1 − known) ⊙ A·x]

`ConsistencyEditor` runs Algorithm 4: start from x = A⁻¹[known ⊙ A·y] + σ_0·z, then for each σ_j of a
decreasing list: x ← x + sqrt(σ_j² − σ_min²)·z_j (j > 0), x ← clip(f(x, σ_j)), x ← project(x). The output
therefore satisfies the constraint exactly (to float round-off), but may leave [-1, 1] (a projected
colour or block can overshoot), and the clip of the uint8 conversion would then break the constraint
in the written image (by up to 15 grey levels of luminance on real images): `fit_to_range` projects
onto the intersection of the constraint and the pixel range, and `scgcm.parallel.editing.edit_images`
ends with it. `HeunEditor` applies the same
projection after every step of EDM's Heun sampler through the score head, with the known part put
back at the current noise level, A·y + t·A·z (z the starting noise), and at t = 0 as A·y itself.

Tasks are choices of (A, known): inpainting (A = I, a pixel mask), colourisation (A mixes channels by
an orthogonal matrix whose first column is the luminance direction; known = that channel), super-
resolution (A is orthogonal on each factor×factor block with the block mean as first coefficient;
known = that coefficient), and SDEdit-style stroke editing and denoising (known = 0: only the start,
`given` + σ·z, carries the input). Batches over devices are
`scgcm.parallel.editing`; the CLI is `python -m scgcm.edit`.

Noise: the starting noise is normal(fold_in(key, 0)) and the re-noising at step j normal(fold_in(key, j)),
as in `samplers.multistep`; callers give image i the key fold_in(key(seed), i).
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from scgcm.core.ict import heun_sigmas, karras_sigmas
from scgcm.nn.model import SCGCM

LUMINANCE = (0.2989, 0.5870, 0.1140)  # ITU-R BT.601 weights, as the reference's colouriser


# ----------------------------------------------------------------------------- linear maps


def orthogonal_with_first_column(v: Sequence[float] | np.ndarray) -> np.ndarray:
    """An orthogonal n×n matrix (float64) whose first column is v/|v| (the reference's QR construction)."""
    v = np.asarray(v, np.float64)
    m = np.eye(len(v))
    m[:, 0] = v / np.linalg.norm(v)
    q = np.linalg.qr(m)[0]
    return -q if q[:, 0].sum() < 0 else q


def _to_blocks(x: Float[Array, "c h w"], p: int) -> Float[Array, "c hp wp pp"]:
    c, h, w = x.shape
    return x.reshape(c, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4).reshape(c, h // p, w // p, p * p)


def _from_blocks(b: Float[Array, "c hp wp pp"], p: int) -> Float[Array, "c h w"]:
    c, hp, wp, _ = b.shape
    return b.reshape(c, hp, wp, p, p).transpose(0, 1, 3, 2, 4).reshape(c, hp * p, wp * p)


class OrthogonalMap(eqx.Module):
    """A = (channel mixing by `channel`) ⊗ (the same orthogonal map `block` on every factor×factor block).

    Coefficients keep the image's layout: coefficient k of a block sits at its k-th pixel (row-major),
    so a mask in A's space is an array like the image. Both factors are orthogonal, so A⁻¹ = Aᵀ.
    """

    channel: Float[Array, "c c"]
    block: Float[Array, "pp pp"]
    factor: int = eqx.field(static=True)

    def forward(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        """A·x: coefficient d of a pixel is Σ_c x_c·channel[c, d]; of a block, Σ_k b_k·block[k, e]."""
        x = jnp.einsum("chw,cd->dhw", x, self.channel)
        if self.factor == 1:
            return x
        return _from_blocks(_to_blocks(x, self.factor) @ self.block, self.factor)

    def inverse(self, a: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        """A⁻¹·a = Aᵀ·a."""
        if self.factor > 1:
            a = _from_blocks(_to_blocks(a, self.factor) @ self.block.T, self.factor)
        return jnp.einsum("dhw,cd->chw", a, self.channel)


def identity_map(channels: int) -> OrthogonalMap:
    """A = I (inpainting, strokes, denoising)."""
    return OrthogonalMap(jnp.eye(channels), jnp.eye(1), 1)


def luminance_map() -> OrthogonalMap:
    """Colourisation: the first coefficient of each pixel is (w·rgb)/|w|, w the luminance weights."""
    return OrthogonalMap(jnp.asarray(orthogonal_with_first_column(LUMINANCE), jnp.float32), jnp.eye(1), 1)


def block_mean_map(channels: int, factor: int) -> OrthogonalMap:
    """Super-resolution: the first coefficient of each factor×factor block is factor·(block mean)."""
    block = orthogonal_with_first_column(np.ones(factor * factor))
    return OrthogonalMap(jnp.eye(channels), jnp.asarray(block, jnp.float32), factor)


def project(
    amap: OrthogonalMap, x: Float[Array, "c h w"], y: Float[Array, "c h w"], known: Float[Array, "c h w"]
) -> Float[Array, "c h w"]:
    """A⁻¹[known ⊙ A·y + (1 − known) ⊙ A·x]: x with the known coefficients of y put back."""
    return amap.inverse(known * amap.forward(y) + (1 - known) * amap.forward(x))


def fit_to_range(
    amap: OrthogonalMap, x: Float[Array, "c h w"], y: Float[Array, "c h w"], known: Float[Array, "c h w"],
    *, tol: float = 1e-5, max_iter: int = 5000,
) -> Float[Array, "c h w"]:
    """x moved into the intersection of the constraint set {project(·) = ·} (the known coefficients of y)
    and the pixel range [-1, 1], close to its nearest point: Dykstra's alternating projections (for an
    affine set only the box needs a correction term), until the box-feasible iterate breaks the
    constraint by at most `tol` (or `max_iter` rounds), then projected onto the constraint once more.

    The result keeps the constraint exactly (to float round-off) and lies in [-1, 1] to within `tol`, so
    the clip of the uint8 conversion moves it by at most `tol` and the written image keeps the known
    part to rounding. The intersection is not empty when y is in range (y itself is in it). An x in
    range that keeps the constraint is returned unchanged (to round-off)."""

    def violation(b):
        return jnp.max(jnp.abs(project(amap, b, y, known) - b))

    def cond(carry):
        i, _, _, err = carry
        return (i < max_iter) & (err > tol)

    def body(carry):
        i, b, q, _ = carry
        a = project(amap, b, y, known)
        b = jnp.clip(a + q, -1.0, 1.0)
        return i + 1, b, a + q - b, violation(b)

    start = (jnp.asarray(0), x, jnp.zeros_like(x), jnp.asarray(jnp.inf, x.dtype))
    return project(amap, jax.lax.while_loop(cond, body, start)[1], y, known)


def given_image(amap: OrthogonalMap, y: Float[Array, "c h w"], known: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
    """A⁻¹[known ⊙ A·y]: what the model is told about y (masked image, luminance, block means)."""
    return amap.inverse(known * amap.forward(y))


# ----------------------------------------------------------------------------- masks (1 = known)


def luminance_known(shape: tuple[int, int, int]) -> np.ndarray:
    """Colourisation: the first (luminance) coefficient of every pixel is known."""
    known = np.zeros(shape, np.float32)
    known[0] = 1
    return known


def block_mean_known(shape: tuple[int, int, int], factor: int) -> np.ndarray:
    """Super-resolution: coefficient 0 (at the top-left pixel of every block) is known."""
    known = np.zeros(shape, np.float32)
    known[:, ::factor, ::factor] = 1
    return known


def region_known(shape: tuple[int, int, int], region: str) -> np.ndarray:
    """Inpainting: everything is known except `region`: 'center' (the central half-size box), 'left',
    'right', 'top' or 'bottom' (that half)."""
    c, h, w = shape
    known = np.ones(shape, np.float32)
    hole = {
        "center": (slice(h // 4, h // 4 + h // 2), slice(w // 4, w // 4 + w // 2)),
        "left": (slice(None), slice(0, w // 2)),
        "right": (slice(None), slice(w // 2, None)),
        "top": (slice(0, h // 2), slice(None)),
        "bottom": (slice(h // 2, None), slice(None)),
    }[region]
    known[:, hole[0], hole[1]] = 0
    return known


def random_known(key: PRNGKeyArray, shape: tuple[int, int, int], rate: float) -> Float[Array, "c h w"]:
    """Inpainting: each pixel (all its channels) is missing with probability `rate`."""
    missing = jr.bernoulli(key, rate, shape[1:])
    return jnp.broadcast_to(1.0 - missing.astype(jnp.float32), shape)


def coarse_painting(images: np.ndarray, factor: int, levels: int = 4) -> np.ndarray:
    """Stroke inputs from real images: uint8 [..., h, w, c] → each factor×factor block filled with its mean
    colour, every channel rounded to one of `levels` evenly spaced values in 0..255."""
    *lead, h, w, c = images.shape
    blocks = images.reshape(*lead, h // factor, factor, w // factor, factor, c).astype(np.float64)
    means = blocks.mean(axis=(-4, -2), keepdims=True)
    step = 255.0 / (levels - 1)
    flat = np.round(means / step) * step
    return np.broadcast_to(flat, blocks.shape).reshape(images.shape).round().astype(np.uint8)


def gray(y: Float[Array, "*b 3 h w"]) -> Float[Array, "*b 3 h w"]:
    """The luminance Σ w_c·y_c in all three channels (for showing what colourisation is given)."""
    lum = jnp.einsum("...chw,c->...hw", y, jnp.asarray(LUMINANCE, y.dtype))
    return jnp.repeat(lum[..., None, :, :], 3, axis=-3)


# ----------------------------------------------------------------------------- samplers with projection


def _noise(key: PRNGKeyArray, j, shape) -> Float[Array, "c h w"]:
    return jr.normal(jr.fold_in(key, j), shape)


def default_sigmas(sigma_min: float, sigma_max: float, num: int = 18, rho: float = 7.0) -> tuple[float, ...]:
    """The first num − 1 levels of the num-level Karras grid, σ_max down (σ_min itself is left out: f is the
    identity there). num = 18 is the reference CIFAR-10 notebook's editing schedule (ts = 0..17, N = 18)."""
    grid = np.asarray(karras_sigmas(num, num, sigma_min, sigma_max, rho))[::-1]
    return tuple(float(s) for s in grid[:-1])


class ConsistencyEditor(eqx.Module):
    """Algorithm 4: after every consistency step the known coefficients of y are put back."""

    sigmas: Float[Array, " n"]
    sigma_min: float = eqx.field(static=True)
    clip: bool = eqx.field(static=True, default=True)

    @property
    def start(self) -> Float[Array, ""]:
        return self.sigmas[0]

    def __call__(
        self,
        model: SCGCM,
        key: PRNGKeyArray,
        x: Float[Array, "c h w"],
        y: Float[Array, "c h w"],
        known: Float[Array, "c h w"],
        amap: OrthogonalMap,
    ) -> Float[Array, "c h w"]:
        """x is the start at noise level sigmas[0]; returns the projected result."""
        renoise = jnp.sqrt(jnp.maximum(self.sigmas**2 - self.sigma_min**2, 0.0)).at[0].set(0.0)

        def step(x, inputs):
            j, sigma, scale = inputs
            x = x + scale * _noise(key, j, x.shape)
            x = model.consistency(x, sigma)[0]
            x = jnp.clip(x, -1.0, 1.0) if self.clip else x
            return project(amap, x, y, known), None

        steps = (jnp.arange(len(self.sigmas)), self.sigmas, renoise)
        return jax.lax.scan(step, x, steps)[0]


class HeunEditor(eqx.Module):
    """EDM's Heun sampler through the score head's denoiser, projected after every step: the known
    coefficients are set to those of y + t·z at the step's level t (z the starting noise), and of y at t = 0."""

    ts: Float[Array, " n"]  # decreasing levels, the last one 0

    @property
    def start(self) -> Float[Array, ""]:
        return self.ts[0]

    def __call__(
        self,
        model: SCGCM,
        key: PRNGKeyArray,
        x: Float[Array, "c h w"],
        y: Float[Array, "c h w"],
        known: Float[Array, "c h w"],
        amap: OrthogonalMap,
    ) -> Float[Array, "c h w"]:
        z = _noise(key, 0, x.shape)

        def slope(x, t):
            return (x - model.score_denoise(x, t)) / t

        def step(x, ts):
            t_cur, t_next = ts
            d = slope(x, t_cur)
            euler = x + (t_next - t_cur) * d
            last = t_next == 0  # the last step, to 0, is Euler only (its corrector is computed, then dropped)
            d_next = slope(euler, jnp.where(last, t_cur, t_next))
            x = jnp.where(last, euler, x + 0.5 * (t_next - t_cur) * (d + d_next))
            return project(amap, x, y + t_next * z, known), None

        return jax.lax.scan(step, x, (self.ts[:-1], self.ts[1:]))[0]


def heun_editor(num_steps: int, sigma_min: float, start: float, rho: float = 7.0) -> HeunEditor:
    """Heun levels from `start` (σ_max, or an SDEdit/denoising level) down to σ_min, then 0."""
    return HeunEditor(heun_sigmas(num_steps, sigma_min, start, rho))


Editor = ConsistencyEditor | HeunEditor


def edit(
    model: SCGCM,
    key: PRNGKeyArray,
    given: Float[Array, "c h w"],
    y: Float[Array, "c h w"],
    known: Float[Array, "c h w"],
    *,
    editor: Editor,
    amap: OrthogonalMap,
) -> tuple[Float[Array, "c h w"], Float[Array, "c h w"]]:
    """One example: start at x = given + σ_start·z, z = normal(fold_in(key, 0)), and run the editor.

    For the constrained tasks `given` is `given_image(amap, y, known)`; for strokes it is the painting
    and for denoising the clean image (known = 0 for both). Returns (start, result).
    """
    start = given + editor.start * _noise(key, 0, given.shape)
    return start, editor(model, key, start, y, known, amap)


# ----------------------------------------------------------------------------- interpolation


def slerp(z1: Float[Array, "*s"], z2: Float[Array, "*s"], t: Float[Array, ""] | float) -> Float[Array, "*s"]:
    """Spherical interpolation: sin((1−t)θ)/sin θ·z1 + sin(tθ)/sin θ·z2, θ the angle between z1 and z2
    (linear interpolation when they are parallel)."""
    a, b = z1.ravel(), z2.ravel()
    cos = jnp.clip(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)), -1.0, 1.0)
    theta = jnp.arccos(cos)
    s = jnp.sin(theta)
    parallel = s < 1e-6
    safe = jnp.where(parallel, 1.0, s)
    w1 = jnp.where(parallel, 1.0 - t, jnp.sin((1.0 - t) * theta) / safe)
    w2 = jnp.where(parallel, t, jnp.sin(t * theta) / safe)
    return w1 * z1 + w2 * z2


def interpolate(
    model: SCGCM,
    key_a: PRNGKeyArray,
    key_b: PRNGKeyArray,
    positions: Float[Array, " f"],
    *,
    editor: Editor,
    shape: tuple[int, int, int],
) -> Float[Array, "f c h w"]:
    """Frames decoded from slerp(z_a, z_b, t) for t in `positions`, z_a = normal(fold_in(key_a, 0)) and
    z_b = normal(fold_in(key_b, 0)): each frame starts at σ_start·slerp (σ_start = the editor's first level)
    and is decoded with no constraint, any re-noising drawn from key_a. With the one-level
    ConsistencyEditor((σ_max,)) the end frames are the one-step samples of key_a and key_b."""
    za, zb = _noise(key_a, 0, shape), _noise(key_b, 0, shape)
    zeros = jnp.zeros(shape)
    amap = identity_map(shape[0])

    def frame(t):
        return editor(model, key_a, editor.start * slerp(za, zb, t), zeros, zeros, amap)

    return jax.vmap(frame)(positions)
