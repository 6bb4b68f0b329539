"""NCSN++ torso and its layers (method.md §4, §13): counts, init, FIR resampling, dropout, gradients."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from scgcm.nn.layers import (
    FIR_KERNEL,
    ConvDown,
    Frozen,
    conv3x3,
    dense,
    fir_downsample,
    fir_upsample,
    group_norm,
    variance_scaling_fan_avg_uniform,
)
from scgcm.nn.torso import NCSNpp

TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), image_size=32)


def upfirdn_np(x, k, up, down, pad0, pad1):
    """StyleGAN2 upfirdn on one (h, w) plane: insert zeros, pad (pad0 before, pad1 after), convolve, subsample."""
    h, w = x.shape
    z = np.zeros((h * up, w * up))
    z[::up, ::up] = x
    z = np.pad(z, ((pad0, pad1), (pad0, pad1)))
    y = np.einsum("ijab,ab->ij", sliding_window_view(z, k.shape), k[::-1, ::-1])
    return y[::down, ::down]


@pytest.fixture(scope="module")
def tiny():
    return NCSNpp(**TINY, key=jr.key(0))


@pytest.fixture(scope="module")
def perturbed(tiny):
    """Tiny model with every weight jittered, so the 1e-10-scaled convs no longer hide dropout."""
    rng = np.random.default_rng(1)  # numpy noise: nothing to compile per shape

    def jitter(a):
        if not eqx.is_inexact_array(a):
            return a
        return jnp.asarray(np.asarray(a) + 0.05 * rng.standard_normal(a.shape, dtype=np.float32))

    return jax.tree.map(jitter, tiny)


@pytest.fixture(scope="module")
def batch():
    x = jr.normal(jr.key(2), (2, 3, 32, 32))
    c_noise = jnp.log(jnp.array([0.3, 20.0])) / 4
    return x, c_noise


@pytest.fixture(scope="module")
def train_call():
    """One compiled train-mode batch call: the outputs and the gradient of sum(last_x_emb)."""

    @eqx.filter_jit
    def call(model, x, c_noise, key):
        def feature_sum(m):
            keys = jr.split(key, x.shape[0])
            outs = jax.vmap(lambda x_, c_, k_: m(x_, c_, key=k_))(x, c_noise, keys)
            return outs[2].sum(), outs

        (_, outs), grads = eqx.filter_value_and_grad(feature_sum, has_aux=True)(model)
        return outs, grads

    return call


def test_full_size_parameter_count():
    model = eqx.filter_eval_shape(NCSNpp, key=jr.key(0))
    arrays = [a for a in jax.tree.leaves(model) if isinstance(a, jax.ShapeDtypeStruct)]
    assert all(jnp.issubdtype(a.dtype, jnp.inexact) for a in arrays)  # no constants stored as arrays
    assert len(arrays) == 445
    assert sum(a.size for a in arrays) == 56_395_651
    assert isinstance(model.fourier_w, Frozen) and model.fourier_w.value.shape == (128,)
    assert (model.feature_channels, model.temb_dim) == (256, 512)


def test_tiny_shapes_and_zero_output(tiny, train_call, batch):
    (out, temb, feat), _ = train_call(tiny, *batch, jr.key(3))
    assert out.shape == (2, 3, 32, 32) and temb.shape == (2, 64) and feat.shape == (2, 16, 32, 32)
    assert tiny.feature_channels == 16 and tiny.temb_dim == 64
    assert jnp.all(jnp.isfinite(feat)) and float(jnp.abs(out).max()) < 1e-4  # output conv scale 1e-10


def test_dropout_masks_depend_only_on_key(tiny, perturbed, train_call, batch):
    for model in (tiny, perturbed):
        a, _ = train_call(model, *batch, jr.key(4))
        b, _ = train_call(model, *batch, jr.key(4))
        assert all(jnp.array_equal(u, v) for u, v in zip(a, b))
    other, _ = train_call(perturbed, *batch, jr.key(5))
    assert float(jnp.abs(a[0] - other[0]).max()) > 1e-3
    assert jnp.array_equal(a[1], other[1])  # the time embedding has no dropout


def test_inference_mode_without_key(perturbed, train_call, batch):
    x, c_noise = batch
    evaluate = eqx.filter_jit(lambda m, x_, c_: m(x_, c_))
    model = eqx.nn.inference_mode(perturbed)
    first, second = evaluate(model, x[0], c_noise[0]), evaluate(model, x[0], c_noise[0])
    assert all(jnp.array_equal(u, v) for u, v in zip(first, second))
    train, _ = train_call(perturbed, *batch, jr.key(4))
    assert float(jnp.abs(first[0] - train[0][0]).max()) > 1e-3
    with pytest.raises(RuntimeError):  # train-mode dropout needs a key (fails while tracing)
        eqx.filter_eval_shape(perturbed, x[0], c_noise[0])


def test_feature_gradient_reaches_every_array_but_output_conv_and_fourier(tiny, train_call, batch):
    _, grads = train_call(tiny, *batch, jr.key(6))
    flat = jax.tree_util.tree_flatten_with_path(eqx.filter(grads, eqx.is_inexact_array))[0]
    zero = {jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g))}
    assert zero == {".fourier_w.value", ".conv_out.weight", ".conv_out.bias"}
    assert len(flat) == len(jax.tree.leaves(eqx.filter(tiny, eqx.is_inexact_array)))


def test_initializers():
    w = np.asarray(variance_scaling_fan_avg_uniform(jr.key(7), (256, 256, 3, 3), 1.0, 9 * 256, 9 * 256))
    assert abs(float(w.std()) / math.sqrt(1 / 2304) - 1) < 0.01
    assert float(np.abs(w).max()) <= math.sqrt(3 / 2304)
    tiny_w = np.asarray(variance_scaling_fan_avg_uniform(jr.key(7), (1000,), 0.0, 10, 30))  # scale 0 -> 1e-10
    assert abs(float(tiny_w.std()) / math.sqrt(1e-10 / 20) - 1) < 0.1
    conv = conv3x3(jr.key(8), 64, 128, scale=0.1)
    assert conv.weight.shape == (128, 64, 3, 3) and conv.bias.shape == (128, 1, 1)
    assert abs(float(np.asarray(conv.weight).std()) / math.sqrt(0.1 / (9 * 96)) - 1) < 0.03  # fans include kh*kw
    assert not np.any(np.asarray(conv.bias))
    lin = dense(jr.key(9), 256, 512)
    assert lin.weight.shape == (512, 256) and not np.any(np.asarray(lin.bias))
    assert abs(float(np.asarray(lin.weight).std()) / math.sqrt(1 / 384) - 1) < 0.03
    for channels, groups in ((256, 32), (48, 12), (16, 4)):
        norm = group_norm(channels)
        assert (norm.groups, norm.channels, norm.eps) == (groups, channels, 1e-6)


def test_fir_hand_checked():
    down = fir_downsample(jnp.ones((1, 8, 8)))
    assert down.shape == (1, 4, 4)
    np.testing.assert_allclose(down[0, 1:-1, 1:-1], 1.0, rtol=1e-6)  # constant interior stays constant
    np.testing.assert_allclose(down[0, 0, 0], (7 / 8) ** 2, rtol=1e-6)  # one tap row/col in the padding
    up = fir_upsample(jnp.ones((1, 4, 4)))
    assert up.shape == (1, 8, 8)
    np.testing.assert_allclose(up[0, 1:-1, 1:-1], 1.0, rtol=1e-6)
    np.testing.assert_allclose(up[0, 0, 0], (3 / 4) ** 2, rtol=1e-6)
    delta = jnp.zeros((1, 6, 6)).at[0, 2, 2].set(1.0)
    expected = np.zeros((12, 12))
    expected[3:7, 3:7] = 4 * FIR_KERNEL  # a delta gives the (gain-4) kernel
    np.testing.assert_allclose(fir_upsample(delta)[0], expected, atol=1e-7)


def test_fir_matches_upfirdn():
    x = np.asarray(jr.normal(jr.key(10), (2, 8, 8)))
    down, up = np.asarray(fir_downsample(jnp.asarray(x))), np.asarray(fir_upsample(jnp.asarray(x)))
    for c in range(2):
        np.testing.assert_allclose(down[c], upfirdn_np(x[c], FIR_KERNEL, 1, 2, 1, 1), atol=1e-5)
        np.testing.assert_allclose(up[c], upfirdn_np(x[c], 4 * FIR_KERNEL, 2, 1, 2, 1), atol=1e-5)


def test_conv_down_matches_pad_blur_conv():
    layer = ConvDown(2, 3, key=jr.key(11))
    layer = eqx.tree_at(lambda m: m.conv.bias, layer, jnp.arange(3.0).reshape(3, 1, 1))
    x = np.asarray(jr.normal(jr.key(12), (2, 8, 8)))
    blurred = np.stack([upfirdn_np(x[c], FIR_KERNEL, 1, 1, 2, 2) for c in range(2)])  # (2, 9, 9)
    windows = sliding_window_view(blurred, (3, 3), axis=(1, 2))[:, ::2, ::2]  # (2, 4, 4, 3, 3), stride 2 VALID
    expected = np.einsum("ihwab,oiab->ohw", windows, np.asarray(layer.conv.weight)) + np.arange(3.0)[:, None, None]
    np.testing.assert_allclose(layer(jnp.asarray(x)), expected, atol=1e-5)
