"""The joint objective: boundary condition, gradient routing of the two variants, a loss that drops."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from tiny import MICRO_ATTN_MODEL, MICRO_MODEL, tiny_config

from scgcm.core.losses import JointLoss, default_huber_c, pseudo_huber
from scgcm.nn.model import split_trainable
from scgcm.run.config import build_loss, build_model, build_schedule


@pytest.fixture(scope="module")
def model():
    return eqx.filter_jit(build_model)(MICRO_ATTN_MODEL, key=jr.key(0))


@pytest.fixture(scope="module")
def perturbed(model):
    """Weights moved off their (near-zero) init so every path carries signal."""
    trainable, frozen = split_trainable(model)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jr.split(jr.key(1), len(leaves))
    leaves = [x + 0.05 * jr.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), frozen)


def example(shape=(3, 8, 8)):
    y = jr.uniform(jr.key(2), shape, minval=-1, maxval=1)
    return y, jr.normal(jr.key(3), shape)


def test_boundary_condition_exact(perturbed):
    y, _ = example()
    d, _, _ = eqx.filter_jit(perturbed.consistency)(y, jnp.asarray(0.002, jnp.float32), key=jr.key(4))
    assert jnp.array_equal(d, y)


def test_pseudo_huber_forms():
    delta = jnp.array([[[0.3, -0.4]]])
    np.testing.assert_allclose(pseudo_huber(delta, 0.1, "elementwise"),
                               np.mean([np.sqrt(0.09 + 0.01) - 0.1, np.sqrt(0.16 + 0.01) - 0.1]), rtol=1e-6)
    np.testing.assert_allclose(pseudo_huber(delta, 0.1, "per_image"), np.sqrt(0.25 + 0.01) - 0.1, rtol=1e-6)
    np.testing.assert_allclose(default_huber_c("per_image", 3072), 0.00054 * np.sqrt(3072))
    assert default_huber_c("elementwise", 3072) == 0.003


def test_loss_values_closed_form(model):
    """At init the torso's F is ~0, so D = c_skip·x; the CT loss then has a closed form."""
    y, z = example()
    sigma, sigma_prev, weight = jnp.asarray(2.5152), jnp.asarray(0.9654), jnp.asarray(1 / (2.5152 - 0.9654))
    loss = JointLoss()
    ct, dsm = eqx.filter_jit(loss)(model, y, z, sigma, sigma_prev, weight, jr.key(5))
    cs = lambda s: 0.25 / ((s - 0.002) ** 2 + 0.25)
    delta = cs(sigma) * (y + sigma * z) - cs(sigma_prev) * (y + sigma_prev * z)
    expected = weight * jnp.mean(jnp.sqrt(delta**2 + 0.003**2) - 0.003)
    np.testing.assert_allclose(ct, expected, rtol=2e-3)
    head_out = cs(sigma) * (y + sigma * z)  # the head's F_h is ~0 at init too
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    np.testing.assert_allclose(dsm, 0.3 * w * jnp.mean((head_out - y) ** 2), rtol=2e-3)


@pytest.fixture(scope="module")
def grads(perturbed):
    """Gradients of each loss term in each variant, w.r.t. the trainable arrays, in one compile."""
    y, z = example()
    trainable, frozen = split_trainable(perturbed)

    @eqx.filter_jit
    def all_grads(trainable):
        def term(variant, index):
            def f(tr):
                losses = JointLoss(variant=variant)(eqx.combine(tr, frozen), y, z, jnp.asarray(1.3), jnp.asarray(0.9),
                                                   jnp.asarray(2.5), jr.key(6))
                return losses[index]
            return eqx.filter_grad(f)(trainable)

        return {(v, name): term(v, i) for v in ("score", "vanilla") for i, name in enumerate(("ct", "dsm"))}

    return all_grads(trainable)


def _nonzero(tree):
    return [bool(jnp.any(g != 0)) for g in jax.tree_util.tree_leaves(tree)]


def test_score_variant_dsm_reaches_torso(grads):
    g = grads["score", "dsm"]
    flags = _nonzero(g.torso)
    # everything upstream of (t_emb, last_x_emb): all but the output conv's kernel and bias
    assert len(flags) - sum(flags) == 2, f"{len(flags) - sum(flags)} torso arrays without DSM gradient"
    zero = [x.shape for x, f in zip(jax.tree_util.tree_leaves(g.torso), flags) if not f]
    assert all(s[0] == 3 for s in zero), zero  # the 3-channel output conv
    assert all(_nonzero(g.head))


def test_vanilla_variant_dsm_stops_at_torso(grads):
    g = grads["vanilla", "dsm"]
    assert not any(_nonzero(g.torso))
    assert all(_nonzero(g.head))


@pytest.mark.parametrize("variant", ["score", "vanilla"])
def test_consistency_loss_never_reaches_head(grads, variant):
    g = grads[variant, "ct"]
    assert not any(_nonzero(g.head))
    assert sum(_nonzero(g.torso)) == len(jax.tree_util.tree_leaves(g.torso))


def test_fourier_weights_are_not_trainable(model):
    """The only frozen array is the Fourier W (nf weights); everything else is trainable."""
    trainable, frozen = split_trainable(model)
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    n_all = sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)))
    frozen_arrays = jax.tree_util.tree_leaves(eqx.filter(frozen, eqx.is_inexact_array))
    assert [x.size for x in frozen_arrays] == [MICRO_ATTN_MODEL.torso.nf]
    assert n_all - n_train == MICRO_ATTN_MODEL.torso.nf


def test_a_few_updates_lower_the_loss_on_a_fixed_batch(model):
    """40 updates on 4 images lower the DSM loss at a fixed evaluation draw (σ, noise, dropout).
    The consistency loss is not a fixed objective (its target is the moving sg(θ)), so it only has
    to stay finite."""
    from tiny import tiny_train_step

    from scgcm.core.state import init_state
    from scgcm.core.step import batch_loss

    step, optim = tiny_train_step()
    cfg = tiny_config(model=MICRO_ATTN_MODEL)
    images = jr.uniform(jr.key(7), (4, 3, 8, 8), minval=-1, maxval=1)
    ids = jnp.arange(4)
    evaluate = eqx.filter_jit(lambda m: batch_loss(*split_trainable(m), images, ids, jnp.asarray(0), jr.key(8),
                                                   schedule=build_schedule(cfg), loss_fn=build_loss(cfg))[1])
    state = init_state(model, optim, jr.key(9))
    ct_before, dsm_before = map(float, evaluate(state.model))
    for _ in range(40):
        state, metrics = step(state, images, ids)
    assert int(state.step) == 40 and not int(metrics["skipped"])
    ct_after, dsm_after = map(float, evaluate(state.model))
    assert dsm_after < 0.99 * dsm_before, (dsm_before, dsm_after)
    assert np.isfinite(ct_after)


def test_compiled_initial_state_equals_the_eager_one():
    """build_state (one compiled program) gives the same state as building and initialising op by op."""
    from scgcm.core.state import init_state, make_optimizer
    from scgcm.run.config import build_state

    cfg = tiny_config(seed=3, model=MICRO_MODEL)
    optim = make_optimizer(cfg.optim.torso_lr, cfg.optim.head_lr)
    model_key, train_key = jr.split(jr.key(3))
    eager = init_state(build_model(cfg.model, key=model_key), optim, train_key)
    compiled = build_state(cfg, optim)
    leaves = lambda s: jax.tree_util.tree_leaves(eqx.filter(s, eqx.is_inexact_array))
    assert len(leaves(compiled)) == len(leaves(eager)) > 50
    for a, b in zip(leaves(compiled), leaves(eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert jnp.array_equal(jr.key_data(compiled.key), jr.key_data(eager.key)) and int(compiled.step) == 0
