"""NCSN++ building blocks (method.md §4.1): reference initialisers, convolutions, FIR resampling,
the BigGAN residual block and the DDPM attention block.

Every module sees one example, channel-first (`c h w`). The FIR kernel is a numpy constant, so it
never becomes a leaf of a model.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


class Frozen(eqx.Module):
    """Marks a non-trainable array (the Fourier W); read it under `jax.lax.stop_gradient`."""

    value: Array


def variance_scaling_fan_avg_uniform(
    key: PRNGKeyArray, shape: tuple[int, ...], scale: float, fan_in: int, fan_out: int
) -> Float[Array, "..."]:
    """The reference `default_init(scale)`: U(±sqrt(3·scale / fan_avg)); a scale of 0 means 1e-10."""
    scale = 1e-10 if scale == 0 else scale
    limit = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2))
    # Drawn flat and reshaped: the same distribution, and XLA compiles a 1-D draw ~3x faster on CPU.
    return jr.uniform(key, (math.prod(shape),), minval=-limit, maxval=limit).reshape(shape)


def group_norm(channels: int) -> eqx.nn.GroupNorm:
    return eqx.nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


def conv2d(
    key: PRNGKeyArray, c_in: int, c_out: int, size: int, *, scale: float = 1.0, stride: int = 1, padding: int
) -> eqx.nn.Conv2d:
    """Conv with the reference init: fan_avg uniform kernel (fans include size²), zero bias."""
    # A shape-only skeleton skips Equinox's default init, which would be overwritten anyway.
    conv = eqx.filter_eval_shape(eqx.nn.Conv2d, c_in, c_out, size, stride=stride, padding=padding, key=key)
    weight = variance_scaling_fan_avg_uniform(key, conv.weight.shape, scale, size * size * c_in, size * size * c_out)
    return eqx.tree_at(lambda c: (c.weight, c.bias), conv, (weight, jnp.zeros(conv.bias.shape)))


def conv3x3(key: PRNGKeyArray, c_in: int, c_out: int, scale: float = 1.0) -> eqx.nn.Conv2d:
    return conv2d(key, c_in, c_out, 3, scale=scale, padding=1)


def conv1x1(key: PRNGKeyArray, c_in: int, c_out: int, scale: float = 1.0) -> eqx.nn.Conv2d:
    return conv2d(key, c_in, c_out, 1, scale=scale, padding=0)


def nin(key: PRNGKeyArray, c_in: int, c_out: int, scale: float = 0.1) -> eqx.nn.Conv2d:
    """The reference NIN (a per-pixel linear layer) is a 1×1 conv with init scale 0.1 by default."""
    return conv1x1(key, c_in, c_out, scale)


def dense(key: PRNGKeyArray, d_in: int, d_out: int, scale: float = 1.0) -> eqx.nn.Linear:
    linear = eqx.filter_eval_shape(eqx.nn.Linear, d_in, d_out, key=key)
    weight = variance_scaling_fan_avg_uniform(key, (d_out, d_in), scale, d_in, d_out)
    return eqx.tree_at(lambda m: (m.weight, m.bias), linear, (weight, jnp.zeros((d_out,))))


# StyleGAN2 FIR filter: outer([1,3,3,1], [1,3,3,1]) normalised to sum 1 (symmetric, so no flip needed).
FIR_KERNEL = np.outer([1.0, 3.0, 3.0, 1.0], [1.0, 3.0, 3.0, 1.0]).astype(np.float32) / 64.0


def _depthwise_fir(x: Float[Array, "c h w"], gain: float, *, stride: int, padding: int, dilation: int = 1) -> Array:
    c = x.shape[0]
    kernel = np.broadcast_to(gain * FIR_KERNEL, (c, 1, *FIR_KERNEL.shape))
    out = jax.lax.conv_general_dilated(
        x[None], jnp.asarray(kernel, x.dtype), (stride, stride), [(padding, padding)] * 2,
        lhs_dilation=(dilation, dilation), feature_group_count=c,
    )
    return out[0]


def fir_downsample(x: Float[Array, "c h w"]) -> Float[Array, "c h//2 w//2"]:
    """upfirdn(x, K, down=2, pad=(1, 1)): depthwise conv with K, stride 2, padding 1."""
    return _depthwise_fir(x, 1.0, stride=2, padding=1)


def fir_upsample(x: Float[Array, "c h w"]) -> Float[Array, "c 2*h 2*w"]:
    """upfirdn(x, 4K, up=2, pad=(2, 1)): zero insertion (input dilation 2), then 4K with padding 2."""
    return _depthwise_fir(x, 4.0, stride=1, padding=2, dilation=2)


class ConvDown(eqx.Module):
    """Pyramid conv-down (fused FIR + conv): pad 2, depthwise K, then a learned 3×3 conv, stride 2, VALID."""

    conv: eqx.nn.Conv2d

    def __init__(self, c_in: int, c_out: int, *, key: PRNGKeyArray):
        self.conv = conv2d(key, c_in, c_out, 3, stride=2, padding=0)

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "d h//2 w//2"]:
        return self.conv(_depthwise_fir(x, 1.0, stride=1, padding=2))


class ResnetBlockBigGAN(eqx.Module):
    """BigGAN++ residual block with FIR up/down, time-embedding bias, dropout and (x + h)/√2."""

    norm0: eqx.nn.GroupNorm
    conv0: eqx.nn.Conv2d
    temb_proj: eqx.nn.Linear
    norm1: eqx.nn.GroupNorm
    dropout: eqx.nn.Dropout
    conv1: eqx.nn.Conv2d
    skip: eqx.nn.Conv2d | None
    up: bool = eqx.field(static=True)
    down: bool = eqx.field(static=True)

    def __init__(
        self, c_in: int, c_out: int, temb_dim: int, *, dropout: float, up: bool = False, down: bool = False,
        key: PRNGKeyArray,
    ):
        k0, k1, k2, k3 = jr.split(key, 4)
        self.norm0 = group_norm(c_in)
        self.conv0 = conv3x3(k0, c_in, c_out)
        self.temb_proj = dense(k1, temb_dim, c_out)
        self.norm1 = group_norm(c_out)
        self.dropout = eqx.nn.Dropout(dropout)
        self.conv1 = conv3x3(k2, c_out, c_out, scale=0.0)
        self.skip = conv1x1(k3, c_in, c_out) if (c_in != c_out or up or down) else None
        self.up, self.down = up, down

    def __call__(
        self, x: Float[Array, "c h w"], temb: Float[Array, " e"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "d _ _"]:
        h = jax.nn.silu(self.norm0(x))
        if self.up:
            h, x = fir_upsample(h), fir_upsample(x)
        elif self.down:
            h, x = fir_downsample(h), fir_downsample(x)
        h = self.conv0(h) + self.temb_proj(jax.nn.silu(temb))[:, None, None]
        h = jax.nn.silu(self.norm1(h))
        h = self.conv1(self.dropout(h, key=key))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / math.sqrt(2.0)


class AttnBlock(eqx.Module):
    """Single-head self-attention over all h·w positions (DDPM "AttnBlockpp", skip-rescaled)."""

    norm: eqx.nn.GroupNorm
    q: eqx.nn.Conv2d
    k: eqx.nn.Conv2d
    v: eqx.nn.Conv2d
    proj: eqx.nn.Conv2d

    def __init__(self, channels: int, *, key: PRNGKeyArray):
        kq, kk, kv, kp = jr.split(key, 4)
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nin(k_, channels, channels) for k_ in (kq, kk, kv))
        self.proj = nin(kp, channels, channels, scale=0.0)

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        c, hgt, wid = x.shape
        g = self.norm(x)
        q, k, v = (layer(g).reshape(c, hgt * wid) for layer in (self.q, self.k, self.v))
        with jax.named_scope("attention"):  # a name for profiles (experiments/bench_train.py --profile)
            logits = (q.T @ k).astype(jnp.float32) / math.sqrt(c)  # (queries, keys); softmax in float32
            weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            a = (v @ weights.T).reshape(c, hgt, wid)
        return (x + self.proj(a)) / math.sqrt(2.0)
