"""Score head h_φ: input wiring plus an EDM DDPM++ ("SongUNet") UNet, method.md §5.

One example at a time, channel-first (c, h, w). The caller (precond.py) supplies c_in·x, c_in·sg(D),
c_noise = ln(σ)/4, the torso's t_emb and last_x_emb, and forms c_skip·x + c_out·F_h itself.

Initialisation follows EDM: xavier-uniform weights U(±sqrt(6/(fan_in+fan_out))) with conv fans kh·kw·C,
×1e-5 for the "zero" convs, ×sqrt(0.2) for qkv, zero biases. GroupNorm groups min(32, C//4), ε 1e-6.
Resampling uses EDM's [1, 1] filter: nearest-neighbour up, 2×2 average down.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

EPS = 1e-6


def _xavier(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int, fan_out: int, scale: float):
    bound = scale * math.sqrt(6.0 / (fan_in + fan_out))
    return jr.uniform(key, shape, minval=-bound, maxval=bound)


def group_norm(channels: int) -> eqx.nn.GroupNorm:
    return eqx.nn.GroupNorm(min(32, channels // 4), channels, eps=EPS)


def positional_embedding(c_noise: Float[Array, ""], num_channels: int) -> Float[Array, " n"]:
    """EDM positional embedding, "endpoint" frequencies (1/10000)^(j/(half-1)), ordered [sin, cos]."""
    half = num_channels // 2
    freqs = (1.0 / 10000.0) ** (jnp.arange(half, dtype=jnp.float32) / (half - 1))
    arg = c_noise * freqs
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])


def _resample(x: Float[Array, "c h w"], mode: str | None) -> Float[Array, "c hh ww"]:
    c, h, w = x.shape
    if mode == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if mode == "down":
        return x.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    return x


class Linear(eqx.Module):
    weight: Float[Array, "o i"]
    bias: Float[Array, " o"]

    def __init__(self, in_features: int, out_features: int, *, scale: float = 1.0, key: PRNGKeyArray):
        self.weight = _xavier(key, (out_features, in_features), in_features, out_features, scale)
        self.bias = jnp.zeros(out_features)

    def __call__(self, x: Float[Array, " i"]) -> Float[Array, " o"]:
        return self.weight @ x + self.bias


class Conv(eqx.Module):
    """k×k conv, stride 1, 'same' padding, preceded by an optional [1, 1]-filter resample."""

    weight: Float[Array, "o i k k"]
    bias: Float[Array, " o"]
    resample: str | None = eqx.field(static=True)

    def __init__(self, cin: int, cout: int, kernel: int, *, scale: float = 1.0,
                 resample: str | None = None, key: PRNGKeyArray):
        kk = kernel * kernel
        self.weight = _xavier(key, (cout, cin, kernel, kernel), kk * cin, kk * cout, scale)
        self.bias = jnp.zeros(cout)
        self.resample = resample

    def __call__(self, x: Float[Array, "i h w"]) -> Float[Array, "o hh ww"]:
        x = _resample(x, self.resample)
        pad = self.weight.shape[-1] // 2
        y = jax.lax.conv_general_dilated(x[None], self.weight, (1, 1), [(pad, pad), (pad, pad)])[0]
        return y + self.bias[:, None, None]


class Attention(eqx.Module):
    """Single-head self-attention over all h·w positions (EDM layout: qkv channels as (c, 3))."""

    norm: eqx.nn.GroupNorm
    qkv: Conv
    proj: Conv

    def __init__(self, channels: int, *, key: PRNGKeyArray):
        kq, kp = jr.split(key)
        self.norm = group_norm(channels)
        self.qkv = Conv(channels, 3 * channels, 1, scale=math.sqrt(0.2), key=kq)
        self.proj = Conv(channels, channels, 1, scale=1e-5, key=kp)

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(c, 3, h * w)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        with jax.named_scope("attention"):  # a name for profiles (experiments/bench_train.py --profile)
            logits = jnp.einsum("cq,ck->qk", q, k / math.sqrt(c)).astype(jnp.float32)  # softmax in float32
            weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            a = jnp.einsum("qk,ck->cq", weights, v).reshape(c, h, w)
        return self.proj(a)


class UNetBlock(eqx.Module):
    """EDM UNetBlock, additive embedding (adaptive_scale=False), skip_scale sqrt(0.5), resample_proj."""

    norm0: eqx.nn.GroupNorm
    conv0: Conv
    affine: Linear
    norm1: eqx.nn.GroupNorm
    dropout: eqx.nn.Dropout
    conv1: Conv
    skip: Conv | None
    attn: Attention | None
    in_channels: int = eqx.field(static=True)

    def __init__(self, cin: int, cout: int, emb_channels: int, *, resample: str | None = None,
                 attention: bool = False, dropout: float = 0.0, key: PRNGKeyArray):
        k0, ka, k1, ks, kt = jr.split(key, 5)
        self.in_channels = cin
        self.norm0 = group_norm(cin)
        self.conv0 = Conv(cin, cout, 3, resample=resample, key=k0)
        self.affine = Linear(emb_channels, cout, key=ka)
        self.norm1 = group_norm(cout)
        self.dropout = eqx.nn.Dropout(dropout)
        self.conv1 = Conv(cout, cout, 3, scale=1e-5, key=k1)
        needs_skip = cin != cout or resample is not None
        self.skip = Conv(cin, cout, 1, resample=resample, key=ks) if needs_skip else None
        self.attn = Attention(cout, key=kt) if attention else None

    def __call__(self, x: Float[Array, "ci h w"], emb: Float[Array, " e"], *,
                 key: PRNGKeyArray | None = None) -> Float[Array, "co hh ww"]:
        h = self.conv0(jax.nn.silu(self.norm0(x)))
        h = jax.nn.silu(self.norm1(h + self.affine(emb)[:, None, None]))
        h = self.conv1(self.dropout(h, key=key))
        skip = self.skip(x) if self.skip is not None else x
        x = (h + skip) * math.sqrt(0.5)
        if self.attn is not None:
            x = (x + self.attn(x)) * math.sqrt(0.5)
        return x


class ScoreHead(eqx.Module):
    ln_x: eqx.nn.LayerNorm
    ln_t: eqx.nn.LayerNorm
    gn_x: eqx.nn.GroupNorm
    conv_in: Conv
    map0: Linear
    map1: Linear
    map_proj: Linear
    enc_conv: Conv
    enc: list[UNetBlock]
    dec: list[UNetBlock]
    out_norm: eqx.nn.GroupNorm
    out_conv: Conv
    noise_channels: int = eqx.field(static=True)

    def __init__(self, *, image_channels: int = 3, feature_channels: int = 256, temb_dim: int = 512,
                 model_channels: int = 128, channel_mult: tuple[int, ...] = (2, 2, 2), num_blocks: int = 1,
                 attn_levels: tuple[int, ...] = (1,), dropout: float = 0.0, key: PRNGKeyArray):
        keys = iter(jr.split(key, 6 + len(channel_mult) * (2 * num_blocks + 3)))  # 6 layers + every block
        emb = 4 * model_channels
        self.noise_channels = model_channels
        # Input wiring (§5.1).
        self.ln_x = eqx.nn.LayerNorm(feature_channels, eps=EPS)
        self.ln_t = eqx.nn.LayerNorm(temb_dim, eps=EPS)
        self.gn_x = group_norm(feature_channels)
        c0 = model_channels * channel_mult[0]
        self.conv_in = Conv(2 * image_channels + feature_channels, c0, 3, key=next(keys))
        self.map0 = Linear(model_channels, emb, key=next(keys))
        self.map1 = Linear(emb, emb, key=next(keys))
        self.map_proj = Linear(emb + temb_dim, emb, key=next(keys))
        # Encoder (§5.2): first conv, then per level [down], num_blocks blocks; every output is a skip.
        block = dict(emb_channels=emb, dropout=dropout)
        self.enc_conv = Conv(c0, model_channels, 3, key=next(keys))
        cout, skips, enc = model_channels, [model_channels], []
        for level, mult in enumerate(channel_mult):
            if level > 0:
                enc.append(UNetBlock(cout, cout, resample="down", key=next(keys), **block))
                skips.append(cout)
            for _ in range(num_blocks):
                cin, cout = cout, model_channels * mult
                enc.append(UNetBlock(cin, cout, attention=level in attn_levels, key=next(keys), **block))
                skips.append(cout)
        # Decoder: two middle blocks at the lowest level, [up], num_blocks + 1 blocks eating the skips.
        dec = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            if level == len(channel_mult) - 1:
                dec.append(UNetBlock(cout, cout, attention=True, key=next(keys), **block))
                dec.append(UNetBlock(cout, cout, key=next(keys), **block))
            else:
                dec.append(UNetBlock(cout, cout, resample="up", key=next(keys), **block))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and level in attn_levels
                dec.append(UNetBlock(cin, cout, attention=attn, key=next(keys), **block))
        self.enc, self.dec = enc, dec
        self.out_norm = group_norm(cout)
        self.out_conv = Conv(cout, image_channels, 3, scale=1e-5, key=next(keys))

    def __call__(self, x_in: Float[Array, "c h w"], d_in: Float[Array, "c h w"], c_noise: Float[Array, ""],
                 t_emb: Float[Array, " e"], last_x_emb: Float[Array, "f h w"], *, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "c h w"]:
        """x_in = c_in·x, d_in = c_in·D (both already scaled by the caller, D already stop-gradiented by the caller),
        c_noise = ln(σ)/4. Returns the raw head output F_h; the caller forms c_skip·x + c_out·F_h.
        The network computes in its weights' dtype (bfloat16 after a cast): inputs are cast to it."""
        dtype = self.conv_in.weight.dtype
        x_in, d_in, t_emb, last_x_emb = (a.astype(dtype) for a in (x_in, d_in, t_emb, last_x_emb))
        per_pixel_ln = jax.vmap(jax.vmap(self.ln_x, in_axes=1, out_axes=1), in_axes=2, out_axes=2)
        feats = self.gn_x(per_pixel_ln(last_x_emb))
        x = self.conv_in(jax.nn.silu(jnp.concatenate([x_in, d_in, feats], axis=0)))

        e = positional_embedding(c_noise, self.noise_channels).astype(dtype)
        e = jax.nn.silu(self.map1(jax.nn.silu(self.map0(e))))
        emb = self.map_proj(jnp.concatenate([e, self.ln_t(t_emb)]))

        # Dropout keys depend only on the block's position, never on the mode.
        block_keys = [None if key is None else jr.fold_in(key, i) for i in range(len(self.enc) + len(self.dec))]
        x = self.enc_conv(x)
        skips = [x]
        for blk, k in zip(self.enc, block_keys):
            x = blk(x, emb, key=k)
            skips.append(x)
        for blk, k in zip(self.dec, block_keys[len(self.enc):]):
            if x.shape[0] != blk.in_channels:
                x = jnp.concatenate([x, skips.pop()], axis=0)
            x = blk(x, emb, key=k)
        return self.out_conv(jax.nn.silu(self.out_norm(x)))
