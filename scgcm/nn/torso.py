"""NCSN++ torso of the consistency model (method.md §4), one example at a time.

score_sde's NCSN++ as configured for iCT: BigGAN residual blocks with FIR resampling, a "residual"
input pyramid, attention at the listed resolutions, Gaussian-Fourier noise embedding. Besides the raw
output F it returns the time embedding t_emb and the last feature map, which feed the score head.
"""

import itertools
import math
from collections.abc import Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from scgcm.nn.layers import AttnBlock, ConvDown, Frozen, ResnetBlockBigGAN, conv3x3, dense, group_norm


class DownLevel(eqx.Module):
    blocks: tuple[ResnetBlockBigGAN, ...]
    attns: tuple[AttnBlock, ...]  # one after each block at attention resolutions, else empty
    down: ResnetBlockBigGAN | None  # FIR-down block; None at the last level
    pyramid: ConvDown | None  # input-pyramid conv-down; None at the last level


class UpLevel(eqx.Module):
    blocks: tuple[ResnetBlockBigGAN, ...]  # num_res_blocks + 1, each on concat[h, skip]
    attn: AttnBlock | None  # after the blocks, at attention resolutions
    up: ResnetBlockBigGAN | None  # FIR-up block; None at level 0


def _key_stream(key: PRNGKeyArray | None) -> Iterator[PRNGKeyArray | None]:
    """fold_in(key, 0), fold_in(key, 1), ...: the n-th layer to ask always gets the same key."""
    return (None if key is None else jr.fold_in(key, i) for i in itertools.count())


def _plain(block: eqx.Module, *args, **kwargs):
    return block(*args, **kwargs)


@eqx.filter_checkpoint
def _checkpointed(block: eqx.Module, *args, **kwargs):
    """`block(*args)` whose activations are recomputed in the backward pass instead of stored."""
    return block(*args, **kwargs)


class NCSNpp(eqx.Module):
    """NCSN++ on one `c h w` image. `image_size` only places attention: a block is followed by one
    wherever its resolution (image_size / 2^level) is in `attn_resolutions`, as the reference decides
    from the feature map's height. Dropout `p` applies inside every residual block."""

    fourier_w: Frozen
    temb_dense0: eqx.nn.Linear
    temb_dense1: eqx.nn.Linear
    conv_in: eqx.nn.Conv2d
    down: tuple[DownLevel, ...]
    mid_block0: ResnetBlockBigGAN
    mid_attn: AttnBlock
    mid_block1: ResnetBlockBigGAN
    up: tuple[UpLevel, ...]  # from the lowest resolution up
    norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d
    remat: bool = eqx.field(static=True)  # recompute each block's activations in the backward pass

    def __init__(
        self, *, in_channels: int = 3, nf: int = 128, ch_mult: tuple[int, ...] = (2, 2, 2),
        num_res_blocks: int = 4, attn_resolutions: tuple[int, ...] = (16,), image_size: int = 32,
        dropout: float = 0.3, fourier_scale: float = 0.02, remat: bool = False, key: PRNGKeyArray,
    ):
        keys = _key_stream(key)
        self.remat = remat
        temb_dim = 4 * nf

        def block(c_in: int, c_out: int, **kwargs) -> ResnetBlockBigGAN:
            return ResnetBlockBigGAN(c_in, c_out, temb_dim, dropout=dropout, key=next(keys), **kwargs)

        self.fourier_w = Frozen(fourier_scale * jr.normal(next(keys), (nf,)))
        self.temb_dense0 = dense(next(keys), 2 * nf, temb_dim)
        self.temb_dense1 = dense(next(keys), temb_dim, temb_dim)
        self.conv_in = conv3x3(next(keys), in_channels, nf)

        ch, pyramid_ch, res, skip_chs = nf, in_channels, image_size, [nf]
        down = []
        for level, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(block(ch, nf * mult))
                ch = nf * mult
                if res in attn_resolutions:
                    attns.append(AttnBlock(ch, key=next(keys)))
                skip_chs.append(ch)
            down_block = pyramid = None
            if level != len(ch_mult) - 1:
                down_block = block(ch, ch, down=True)
                pyramid = ConvDown(pyramid_ch, ch, key=next(keys))
                pyramid_ch, res = ch, res // 2
                skip_chs.append(ch)
            down.append(DownLevel(tuple(blocks), tuple(attns), down_block, pyramid))
        self.down = tuple(down)

        self.mid_block0 = block(ch, ch)
        self.mid_attn = AttnBlock(ch, key=next(keys))
        self.mid_block1 = block(ch, ch)

        up = []
        for level, mult in reversed(list(enumerate(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skip_chs.pop(), nf * mult))
                ch = nf * mult
            attn = AttnBlock(ch, key=next(keys)) if res in attn_resolutions else None
            up_block = None
            if level != 0:
                up_block = block(ch, ch, up=True)
                res *= 2
            up.append(UpLevel(tuple(blocks), attn, up_block))
        self.up = tuple(up)

        self.norm_out = group_norm(ch)
        self.conv_out = conv3x3(next(keys), ch, in_channels, scale=0.0)

    @property
    def feature_channels(self) -> int:
        return self.conv_out.in_channels

    @property
    def temb_dim(self) -> int:
        return self.temb_dense1.out_features

    def __call__(
        self, x: Float[Array, "c h w"], c_noise: Float[Array, ""], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "c h w"], Float[Array, " e"], Float[Array, "f h w"]]:
        """x is already c_in-scaled; c_noise = ln(σ)/4 goes straight into the Fourier layer.

        Returns (F, t_emb, last_x_emb): the raw output, the time embedding (4·nf) and the feature map
        before the output conv. `key` drives dropout (each res block gets fold_in(key, its index));
        it may be None under `eqx.nn.inference_mode`. The network computes in its weights' dtype
        (bfloat16 after a cast), the Fourier angles in float32.
        """
        dropout_keys = _key_stream(key)
        dtype = self.conv_in.weight.dtype
        call = _checkpointed if self.remat else _plain

        w = jax.lax.stop_gradient(self.fourier_w.value).astype(jnp.float32)
        angles = 2 * math.pi * w * c_noise.astype(jnp.float32)
        temb = self.temb_dense0(jnp.concatenate([jnp.sin(angles), jnp.cos(angles)]).astype(dtype))
        temb = self.temb_dense1(jax.nn.silu(temb))

        x = x.astype(dtype)
        hs = [self.conv_in(x)]
        pyramid = x
        for level in self.down:
            for i, block in enumerate(level.blocks):
                h = call(block, hs[-1], temb, key=next(dropout_keys))
                if level.attns:
                    h = call(level.attns[i], h)
                hs.append(h)
            if level.down is not None and level.pyramid is not None:
                h = call(level.down, hs[-1], temb, key=next(dropout_keys))
                pyramid = (level.pyramid(pyramid) + h) / math.sqrt(2.0)
                hs.append(pyramid)

        h = call(self.mid_block0, hs[-1], temb, key=next(dropout_keys))
        h = call(self.mid_attn, h)
        h = call(self.mid_block1, h, temb, key=next(dropout_keys))

        for level in self.up:
            for block in level.blocks:
                h = call(block, jnp.concatenate([h, hs.pop()]), temb, key=next(dropout_keys))
            if level.attn is not None:
                h = call(level.attn, h)
            if level.up is not None:
                h = call(level.up, h, temb, key=next(dropout_keys))

        last_x_emb = jax.nn.silu(self.norm_out(h))
        return self.conv_out(last_x_emb), temb, last_x_emb
