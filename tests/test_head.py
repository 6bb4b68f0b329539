"""Score head (method.md §5): parameter counts, wiring, embedding, initialisation, gradient flow."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from scgcm.nn.head import Conv, Linear, ScoreHead, positional_embedding

TINY = dict(feature_channels=32, temb_dim=64, model_channels=16, channel_mult=(1, 2), num_blocks=1,
            attn_levels=(1,))


def _is_float_struct(x):
    return isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact)


def _count(module):
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(eqx.filter(module, _is_float_struct)))


@pytest.fixture(scope="module")
def full_shapes():
    return eqx.filter_eval_shape(lambda k: ScoreHead(key=k), jr.key(0))


@pytest.fixture(scope="module")
def tiny():
    return eqx.filter_jit(lambda k: ScoreHead(**TINY, key=k))(jr.key(0))


@pytest.fixture(scope="module")
def perturbed(tiny):
    """The tiny head with a unit-scale output conv, so F_h is O(1) and gradients are not 1e-5-scaled."""
    w = tiny.out_conv.weight
    return eqx.tree_at(lambda m: m.out_conv.weight, tiny, w * 1e5 + 0.05 * jr.normal(jr.key(9), w.shape))


@pytest.fixture(scope="module")
def inputs():
    k = jr.split(jr.key(1), 4)
    return (jr.normal(k[0], (3, 32, 32)), jr.normal(k[1], (3, 32, 32)), jnp.asarray(0.3),
            jr.normal(k[2], (64,)), jr.normal(k[3], (32, 32, 32)))


@pytest.fixture(scope="module")
def grads():
    """One compiled gradient of an MSE on F_h w.r.t. (model, (x_in, d_in, c_noise, t_emb, last_x_emb))."""
    target = jr.normal(jr.key(5), (3, 32, 32))

    @eqx.filter_jit
    @eqx.filter_grad
    def f(model_and_inputs):
        model, inputs = model_and_inputs
        return jnp.mean((model(*inputs, key=jr.key(6)) - target) ** 2)

    return lambda model, inputs: f((model, inputs))


def test_full_size_parameter_count(full_shapes):
    leaves = jax.tree_util.tree_leaves(eqx.filter(full_shapes, _is_float_struct))
    assert len(leaves) == 210
    assert _count(full_shapes) == 26_243_715
    h = full_shapes
    assert _count((h.ln_x, h.ln_t)) == 1_536
    assert _count(h.conv_in) == 603_904
    assert (_count(h.map0), _count(h.map1), _count(h.map_proj)) == (66_048, 262_656, 524_800)
    assert _count(h.enc_conv) == 295_040


def test_tiny_output_shape_and_zero_init(tiny, inputs):
    out = eqx.filter_jit(tiny)(*inputs)
    assert out.shape == (3, 32, 32)
    assert out.dtype == jnp.float32
    assert 0 < float(jnp.max(jnp.abs(out))) < 1e-3  # output conv is xavier × 1e-5


def test_positional_embedding_hand_computed():
    c = 0.37
    got = np.asarray(positional_embedding(jnp.asarray(c), 8))
    freqs = np.array([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])  # endpoint: last frequency is 1/10000
    want = np.concatenate([np.sin(c * freqs), np.cos(c * freqs)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[0] == pytest.approx(math.sin(c)) and got[4] == pytest.approx(math.cos(c))


def test_every_input_matters(perturbed, inputs, grads):
    _, input_grads = grads(perturbed, inputs)
    for name, g in zip(["x_in", "d_in", "c_noise", "t_emb", "last_x_emb"], input_grads):
        assert float(jnp.max(jnp.abs(g))) > 0, name


@pytest.mark.parametrize("live, dead", [(0, (1, 4)), (1, (0, 4)), (4, (0, 1))])
def test_concatenation_order(perturbed, inputs, grads, live, dead):
    """u = SiLU(concat[x_in, d_in, GN(LN(last_x_emb))]): keep one slice of conv_in's input channels at a time."""
    keep = {0: slice(0, 3), 1: slice(3, 6), 4: slice(6, None)}[live]
    w = perturbed.conv_in.weight
    masked = eqx.tree_at(lambda m: m.conv_in.weight, perturbed, jnp.zeros_like(w).at[:, keep].set(w[:, keep]))
    _, input_grads = grads(masked, inputs)
    assert float(jnp.max(jnp.abs(input_grads[live]))) > 0
    for i in dead:
        assert float(jnp.max(jnp.abs(input_grads[i]))) == 0


def test_xavier_variance():
    lin = Linear(1024, 512, key=jr.key(2))
    np.testing.assert_allclose(jnp.var(lin.weight), 6 / (1024 + 512) / 3, rtol=0.02)
    conv = Conv(128, 256, 3, key=jr.key(3))
    bound = math.sqrt(6 / (9 * 128 + 9 * 256))
    np.testing.assert_allclose(jnp.var(conv.weight), bound**2 / 3, rtol=0.02)
    assert float(jnp.max(jnp.abs(conv.weight))) <= bound
    zero = Conv(128, 256, 3, scale=1e-5, key=jr.key(3))
    np.testing.assert_allclose(zero.weight, conv.weight * 1e-5, rtol=1e-6, atol=1e-6 * 1e-5 * bound)  # round-off
    assert not jnp.any(lin.bias) and not jnp.any(conv.bias)


def test_tiny_init_values(tiny):
    attn = tiny.enc[-1].attn  # level-1 encoder block has attention
    bound = math.sqrt(6 / (16 * 2 + 3 * 16 * 2))
    assert float(jnp.max(jnp.abs(attn.qkv.weight))) <= math.sqrt(0.2) * bound
    assert float(jnp.max(jnp.abs(attn.proj.weight))) <= 1e-5
    assert float(jnp.max(jnp.abs(tiny.out_conv.weight))) <= 1e-5
    norms = [tiny.ln_x, tiny.ln_t, tiny.gn_x, tiny.out_norm]
    assert all(bool(jnp.all(n.weight == 1)) and not jnp.any(n.bias) for n in norms)
    biases = [tiny.conv_in.bias, tiny.map0.bias, tiny.map_proj.bias, tiny.enc[0].affine.bias, attn.qkv.bias]
    assert not any(bool(jnp.any(b)) for b in biases)


def test_gradient_reaches_every_array(perturbed, inputs, grads):
    model_grads, _ = grads(perturbed, inputs)
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(model_grads, eqx.is_inexact_array))
    assert len(leaves) == len(jax.tree_util.tree_leaves(eqx.filter(perturbed, eqx.is_inexact_array)))
    dead = [jax.tree_util.keystr(p) for p, g in leaves if not jnp.any(g != 0)]
    assert not dead
