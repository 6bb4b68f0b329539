"""The one name-and-shape table between the original code's checkpoint (github:boingkiri/stabilizing_consistency,
Flax) and scgcm's model: which original array is which scgcm array, and how its layout differs.

The original saves one orbax item per network: `diffusion` (the torso, `CMPrecond` → `NCSNpp_0`, score_sde's
NCSN++) and `head` (`ScoreDistillPrecond`: its two LayerNorms and `head`, the EDM-style `UNetppHead`). Flax
names a submodule of a compact module by its class and a per-class counter in the order the forward pass
creates it (`ResnetBlockBigGANpp_7`, `AttnBlockpp_2/NIN_1`), and a submodule of a `setup` module by its
attribute (`head/enc_16x16_block0/conv0`; `enc`/`dec` are dicts of blocks keyed by resolution, which the
original counts from a fixed 32: `img_res = 32`, "TMP: for CIFAR10"). The table is made by walking scgcm's
model in the original's creation order, so it holds for any architecture the two codes share.

Layouts (original → scgcm; both store float32):

    same    vectors (biases, norm scales, the Fourier W): equal
    dense   flax Dense `kernel` / the head's Linear `weight`, (in, out) → eqx (out, in): a transpose
    conv    flax Conv `kernel` / the head's conv `weight` / score_sde's Conv2d `weight`, HWIO → OIHW
    nin     score_sde's NIN `W` (a per-pixel linear map, (in, out)) → scgcm's 1×1 conv, (out, in, 1, 1)
    bias    a torso conv's or NIN's bias, (out,) → eqx Conv2d's (out, 1, 1)

The head's qkv channels need no permutation: both codes read the 3·C outputs as (C, 3).
"""

import collections
from dataclasses import dataclass
from typing import Literal

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree, Shaped

from scgcm.nn.model import SCGCM

Layout = Literal["same", "dense", "conv", "nin", "bias"]
Item = Literal["diffusion", "head"]
ITEMS: tuple[Item, ...] = ("diffusion", "head")
NAME_RESOLUTION = 32
"""The original names its head's blocks from this resolution whatever the image size (`img_res = 32`)."""


@dataclass(frozen=True)
class Row:
    item: Item
    """The orbax item (network) of the original checkpoint."""
    original: str
    """The array's '/'-joined name inside the item's `params` (and `params_ema`, and each optimizer moment)."""
    path: str
    """The array's key path in scgcm's `SCGCM` (`jax.tree_util.keystr`), e.g. `.torso.conv_in.weight`."""
    layout: Layout


def to_scgcm(layout: Layout, x: Shaped[np.ndarray, "..."]) -> Shaped[np.ndarray, "..."]:
    """An original array in scgcm's layout."""
    if layout == "dense":
        return x.T
    if layout == "conv":
        return x.transpose(3, 2, 0, 1)
    if layout == "nin":
        return x.T[:, :, None, None]
    if layout == "bias":
        return x[:, None, None]
    return x


def to_original(layout: Layout, x: Shaped[np.ndarray, "..."]) -> Shaped[np.ndarray, "..."]:
    """The inverse of `to_scgcm`: an scgcm array in the original's layout."""
    if layout == "dense":
        return x.T
    if layout == "conv":
        return x.transpose(2, 3, 1, 0)
    if layout == "nin":
        return x[:, :, 0, 0].T
    if layout == "bias":
        return x[:, 0, 0]
    return x


def original_shape(layout: Layout, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the original stores an array of scgcm shape `shape` in."""
    return to_original(layout, np.empty(shape, np.bool_)).shape


def model_paths(model: PyTree) -> dict[str, jax.ShapeDtypeStruct]:
    """{key path: shape and dtype} of every array of a model (or of its `eqx.filter_eval_shape` skeleton)."""
    arrays = eqx.filter(model, lambda x: eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct))
    return {jax.tree_util.keystr(p): jax.ShapeDtypeStruct(x.shape, x.dtype)
            for p, x in jax.tree_util.tree_flatten_with_path(arrays)[0]}


class _Rows:
    """Collects the rows of one item; `name(kind)` is flax's per-class counter of a compact module."""

    def __init__(self, item: Item, prefix: str):
        self.item, self.prefix, self.rows = item, prefix, []
        self.counts: collections.Counter = collections.Counter()

    def name(self, kind: str) -> str:
        n = self.counts[kind]
        self.counts[kind] += 1
        return f"{kind}_{n}"

    def add(self, original: str, path: str, layout: Layout) -> None:
        self.rows.append(Row(self.item, self.prefix + original, path, layout))

    def norm(self, original: str, path: str) -> None:  # flax GroupNorm/LayerNorm (scale, bias) → eqx (weight, bias)
        self.add(f"{original}/scale", f"{path}.weight", "same")
        self.add(f"{original}/bias", f"{path}.bias", "same")

    def affine(self, original: str, path: str, layout: Layout, weight: str = "kernel", bias: str = "bias",
               bias_layout: Layout = "same") -> None:
        self.add(f"{original}/{weight}", f"{path}.weight", layout)
        self.add(f"{original}/{bias}", f"{path}.bias", bias_layout)


def _torso_rows(torso) -> list[Row]:
    """score_sde's NCSN++ (model/ct/ncsnpp.py, layerspp.py) as the original's config builds it: BigGAN blocks,
    DDPM attention, a residual input pyramid (`Downsample_k/Conv2d_0`), no output pyramid."""
    r = _Rows("diffusion", "NCSNpp_0/")
    conv = lambda original, path, weight="kernel": r.affine(original, path, "conv", weight=weight, bias_layout="bias")

    def biggan(path: str, block) -> None:  # ResnetBlockBigGANpp: GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Conv_1[, Conv_2]
        b = r.name("ResnetBlockBigGANpp")
        r.norm(f"{b}/GroupNorm_0", f"{path}.norm0")
        conv(f"{b}/Conv_0", f"{path}.conv0")
        r.affine(f"{b}/Dense_0", f"{path}.temb_proj", "dense")
        r.norm(f"{b}/GroupNorm_1", f"{path}.norm1")
        conv(f"{b}/Conv_1", f"{path}.conv1")
        if block.skip is not None:
            conv(f"{b}/Conv_2", f"{path}.skip")

    def attn(path: str) -> None:  # AttnBlockpp: GroupNorm_0, NIN_0..3 = q, k, v, output projection
        a = r.name("AttnBlockpp")
        r.norm(f"{a}/GroupNorm_0", f"{path}.norm")
        for i, part in enumerate(("q", "k", "v", "proj")):
            r.affine(f"{a}/NIN_{i}", f"{path}.{part}", "nin", weight="W", bias="b", bias_layout="bias")

    r.add("GaussianFourierProjection_0/W", ".torso.fourier_w.value", "same")
    r.affine("Dense_0", ".torso.temb_dense0", "dense")
    r.affine("Dense_1", ".torso.temb_dense1", "dense")
    conv("Conv_0", ".torso.conv_in")
    for i, level in enumerate(torso.down):
        for j, block in enumerate(level.blocks):
            biggan(f".torso.down[{i}].blocks[{j}]", block)
            if level.attns:
                attn(f".torso.down[{i}].attns[{j}]")
        if level.down is not None:
            biggan(f".torso.down[{i}].down", level.down)
            conv(f"{r.name('Downsample')}/Conv2d_0", f".torso.down[{i}].pyramid.conv", weight="weight")
    biggan(".torso.mid_block0", torso.mid_block0)
    attn(".torso.mid_attn")
    biggan(".torso.mid_block1", torso.mid_block1)
    for i, level in enumerate(torso.up):
        for j, block in enumerate(level.blocks):
            biggan(f".torso.up[{i}].blocks[{j}]", block)
        if level.attn is not None:
            attn(f".torso.up[{i}].attn")
        if level.up is not None:
            biggan(f".torso.up[{i}].up", level.up)
    r.norm("GroupNorm_0", ".torso.norm_out")
    conv("Conv_1", ".torso.conv_out")
    return r.rows


def _head_rows(head) -> list[Row]:
    """`ScoreDistillPrecond` with model_type 'unetpp' (model/unetpp.py): LayerNorms of last_x_emb and t_emb, then
    `UNetppHead` (normalize1, conv1, then UNetpp's mapping layers, encoder and decoder dicts)."""
    r = _Rows("head", "")
    r.norm("layer_norm_for_last_x_emb", ".head.ln_x")
    r.norm("layer_norm_for_t_emb", ".head.ln_t")
    r.norm("head/normalize1", ".head.gn_x")
    r.affine("head/conv1", ".head.conv_in", "conv", weight="weight")
    for original, ours in (("map_layer0", "map0"), ("map_layer1", "map1"), ("map_noise_proj", "map_proj")):
        r.affine(f"head/{original}", f".head.{ours}", "dense", weight="weight")

    def block(original: str, path: str, blk) -> None:  # UNetBlock: norm0, conv0, affine, norm1, conv1[, skip][, atten]
        r.norm(f"head/{original}/norm0", f"{path}.norm0")
        r.affine(f"head/{original}/conv0", f"{path}.conv0", "conv", weight="weight")
        r.affine(f"head/{original}/affine", f"{path}.affine", "dense", weight="weight")
        r.norm(f"head/{original}/norm1", f"{path}.norm1")
        r.affine(f"head/{original}/conv1", f"{path}.conv1", "conv", weight="weight")
        if blk.skip is not None:
            r.affine(f"head/{original}/skip", f"{path}.skip", "conv", weight="weight")
        if blk.attn is not None:
            r.norm(f"head/{original}/atten/norm2", f"{path}.attn.norm")
            r.affine(f"head/{original}/atten/qkv", f"{path}.attn.qkv", "conv", weight="weight")
            r.affine(f"head/{original}/atten/proj", f"{path}.attn.proj", "conv", weight="weight")

    res = lambda level: f"{NAME_RESOLUTION >> level}x{NAME_RESOLUTION >> level}"
    r.affine(f"head/enc_{res(0)}_conv", ".head.enc_conv", "conv", weight="weight")
    level = idx = 0
    for i, blk in enumerate(head.enc):  # per level: [down], block0, block1, …
        if blk.conv0.resample == "down":
            level, idx, name = level + 1, 0, f"enc_{res(level + 1)}_down"
        else:
            name, idx = f"enc_{res(level)}_block{idx}", idx + 1
        block(name, f".head.enc[{i}]", blk)
    idx = 0
    for i, blk in enumerate(head.dec):  # lowest level: in0, in1, blocks; each level above: up, blocks
        if i < 2:
            name = f"dec_{res(level)}_in{i}"
        elif blk.conv0.resample == "up":
            level, idx, name = level - 1, 0, f"dec_{res(level - 1)}_up"
        else:
            name, idx = f"dec_{res(level)}_block{idx}", idx + 1
        block(name, f".head.dec[{i}]", blk)
    r.norm(f"head/dec_{res(0)}_aux_norm", ".head.out_norm")
    r.affine(f"head/dec_{res(0)}_aux_conv", ".head.out_conv", "conv", weight="weight")
    return r.rows


def original_table(model: SCGCM) -> tuple[Row, ...]:
    """Every array of `model` (or of its shape skeleton) with the original's item, name and layout of it.

    Asserted here: each array of the model appears exactly once, and no original name twice, so a
    checkpoint with exactly the table's names and shapes fills the model with every array used once."""
    rows = (*_torso_rows(model.torso), *_head_rows(model.head))
    ours = model_paths(model)
    paths = collections.Counter(r.path for r in rows)
    names = collections.Counter((r.item, r.original) for r in rows)
    assert set(paths) == set(ours) and max(paths.values()) == 1, (
        f"table and model differ: {sorted(set(paths) ^ set(ours))[:3]} {[p for p, n in paths.items() if n > 1][:3]}")
    assert max(names.values()) == 1, [n for n, c in names.items() if c > 1][:3]
    return rows


def expected_params(model: SCGCM) -> dict[Item, dict[str, tuple[int, ...]]]:
    """{item: {original name: shape}}: the `params` each item of a matching original checkpoint holds."""
    shapes = model_paths(model)
    out: dict[Item, dict[str, tuple[int, ...]]] = {item: {} for item in ITEMS}
    for row in original_table(model):
        out[row.item][row.original] = original_shape(row.layout, tuple(shapes[row.path].shape))
    return out
