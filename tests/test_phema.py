"""Post-hoc EMA (EDM2 §3): σ_rel ↔ γ, the power EMA against its closed-form weights, the profile inner
product against numerical integration, the reconstruction on a synthetic trajectory, and end to end:
the power EMAs in the training step, `python -m scgcm.phema`, and sampling the checkpoint it writes."""

import functools
import json
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.integrate
from jaxtyping import Array, Float
from tiny import MICRO_MODEL, tiny_config

from scgcm import phema as phema_cli
from scgcm.core import ema as ema_lib, phema
from scgcm.core.losses import JointLoss
from scgcm.errors import UserError, run_cli


def test_sigma_rel_and_gamma_invert_each_other_and_match_the_profiles_std():
    for sigma_rel in (0.05, 0.075, 0.10, 0.15):
        gamma = ema_lib.sigma_rel_to_gamma(sigma_rel)
        assert ema_lib.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
        t = 100_000  # the discrete weights' std relative to t tends to σ_rel
        w, tau = phema.power_ema_weights(t, gamma), np.arange(1, t + 1)
        mean = w @ tau
        assert np.sqrt(w @ tau**2 - mean**2) / t == pytest.approx(sigma_rel, rel=1e-6)
    assert ema_lib.sigma_rel_to_gamma(0.10) == pytest.approx(6.9372, abs=1e-4)  # EDM2's two defaults
    assert ema_lib.sigma_rel_to_gamma(0.05) == pytest.approx(16.9722, abs=1e-4)
    with pytest.raises(ValueError, match="sigma_rel"):
        ema_lib.sigma_rel_to_gamma(0.3)


def test_power_ema_update_has_the_closed_form_weights():
    gamma, t_end = 3.5, 50
    thetas = np.random.default_rng(0).standard_normal((t_end, 4))
    ema = jnp.zeros(4)
    for t in range(1, t_end + 1):
        ema = ema_lib.power_ema_update(ema, jnp.asarray(thetas[t - 1]), jnp.asarray(t), gamma)
    w = phema.power_ema_weights(t_end, gamma)
    assert w.sum() == pytest.approx(1.0, abs=1e-12) and float(ema_lib.power_ema_beta(1, gamma)) == 0.0
    np.testing.assert_allclose(np.asarray(ema), w @ thetas, rtol=1e-5, atol=1e-6)


def test_profile_inner_product_matches_numerical_integration():
    def profile(t, g):
        return lambda x: (g + 1) * x**g / t ** (g + 1) if x <= t else 0.0

    for (ta, ga), (tb, gb) in [((100.0, 3.0), (250.0, 7.0)), ((300.0, 16.9), (120.0, 6.9)), ((80.0, 2.0), (80.0, 2.0))]:
        pa, pb = profile(ta, ga), profile(tb, gb)
        numeric = scipy.integrate.quad(lambda x, pa=pa, pb=pb: pa(x) * pb(x), 0, min(ta, tb), limit=200)[0]
        assert phema.profile_inner_product(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-8)
        assert phema.profile_inner_product(tb, gb, ta, ga) == pytest.approx(numeric, rel=1e-8)


def _trajectory_and_snapshots(T=2000, every=100, stored=(0.05, 0.10)):
    """A smooth random-walk trajectory θ_1..θ_T and its power EMAs at every `every` updates (float64)."""
    rng = np.random.default_rng(0)
    tau = np.arange(1, T + 1)[:, None]
    theta = np.cumsum(rng.standard_normal((T, 6)), 0) / np.sqrt(T) + np.sin(tau / np.array([100, 300, 700, 50, 1000, 2000]))
    gammas = [ema_lib.sigma_rel_to_gamma(s) for s in stored]
    emas, snaps = [theta[0] * 0 for _ in gammas], []
    for t in range(1, T + 1):
        for i, g in enumerate(gammas):
            beta = (1 - 1 / t) ** (g + 1)
            emas[i] = beta * emas[i] + (1 - beta) * theta[t - 1]
        if t % every == 0:
            snaps.append((t, [e.copy() for e in emas]))
    snap_t = np.repeat([t for t, _ in snaps], len(stored)).astype(np.float64)
    snap_gamma = np.tile(gammas, len(snaps))
    values = [e for _, es in snaps for e in es]
    return theta, snap_t, snap_gamma, values


def test_reconstruction_on_a_synthetic_trajectory():
    theta, snap_t, snap_gamma, values = _trajectory_and_snapshots()
    T = len(theta)
    spread = np.abs(values[-1] - values[-2]).max()  # how far the two stored EMAs are apart at T
    for sigma_rel, tol in ((0.10, 1e-12), (0.05, 1e-12), (0.075, 1e-3 * spread)):
        gamma = ema_lib.sigma_rel_to_gamma(sigma_rel)
        x = phema.solve_coefficients(snap_t, snap_gamma, T, gamma)
        assert x.sum() == pytest.approx(1.0, abs=1e-12)
        reconstructed = phema.combine([jnp.asarray(v, jnp.float32) for v in values], x)  # float64 sum, float32 out
        in_float64 = x @ np.stack(values)
        direct = phema.power_ema_weights(T, gamma) @ theta
        # stored σ_rel: a unit vector, exact to round-off; in between: the least-squares profile
        # (measured 9e-5 here, 2e-4 of the spread), far closer than either stored EMA
        assert np.abs(in_float64 - direct).max() <= tol, sigma_rel
        np.testing.assert_allclose(np.asarray(reconstructed), in_float64, rtol=1e-6, atol=1e-6)
    assert np.abs(values[-1] - direct).max() > 30 * 1e-3 * spread


# ---------------------------------------------------------------------------------- end to end


class StandIn(eqx.Module):
    """Inception's contract ((b, 299, 299, 3) in [-1, 1] → (b, 6)) at a fraction of the cost, as in test_evaluate.py."""

    w: jax.Array = eqx.field(default_factory=lambda: jax.random.normal(jax.random.key(1), (3, 6)))

    def __call__(self, x: Float[Array, "b 299 299 3"]) -> Float[Array, "b 6"]:
        return jnp.mean(jnp.tanh(4 * x[:, ::13, ::13] @ self.w), axis=(1, 2))


class ParamLoss(JointLoss):
    """A loss of the parameters alone (no network pass), so that the step compiles in seconds."""

    def __call__(self, model, y, noise, sigma, sigma_prev, weight, key):
        leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
        value = sum(jnp.sum(jnp.sin(leaf)) for leaf in leaves) * (1 + jnp.mean(y) + 0 * sigma)
        return value, 0.1 * value


def test_train_step_updates_the_power_emas():
    from scgcm.core.state import init_state
    from scgcm.core.step import train_step
    from scgcm.nn.model import split_trainable
    from scgcm.run.config import build_model, build_schedule

    gammas = (ema_lib.sigma_rel_to_gamma(0.05), ema_lib.sigma_rel_to_gamma(0.10))
    optim = optax.sgd(0.1)
    # the model's structure is what matters (the loss reads only the parameters): filled shapes, not an
    # eager initialisation, which compiles hundreds of small programs
    shapes = eqx.filter_eval_shape(build_model, MICRO_MODEL, key=jax.random.key(0))
    model = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype) if isinstance(s, jax.ShapeDtypeStruct) else s,
                                   shapes)
    state = init_state(model, optim, jax.random.key(1), num_phema=2)
    step = eqx.filter_jit(functools.partial(train_step, optim=optim, schedule=build_schedule(tiny_config()),
                                            loss_fn=ParamLoss(), ema_decay=0.9, phema_gammas=gammas))
    images, ids = jnp.zeros((2, 3, 8, 8)), jnp.arange(2)
    # numpy: no compiles
    trainable = lambda m: [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(split_trainable(m)[0])]
    expected = [trainable(state.model)] * 2
    for t in range(1, 4):
        state, _ = step(state, images, ids)
        theta = trainable(state.model)
        for i, g in enumerate(gammas):
            beta = (1 - 1 / t) ** (g + 1)  # θ̂_1 = θ_1
            expected[i] = [beta * e + (1 - beta) * p for e, p in zip(expected[i], theta)]
            for got, want in zip(trainable(state.phema[i]), expected[i]):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trainable(state.phema[0])[0], trainable(state.phema[1])[0])


def test_phema_cli_writes_a_checkpoint_that_samples(smoke_run, tmp_path, monkeypatch, capsys):
    """Snapshots made by hand (perturbed copies of the smoke run's EMA, at steps 4 and 8) in a copy of
    the smoke run marked --config.phema; the CLI's reconstruction is checked, then sampled with --fid.
    Orbax reads and writes cost seconds each here, so there are as few as the path allows."""
    from scgcm import sample
    from scgcm.eval import inception
    from scgcm.run import load
    from scgcm.run.checkpoint import CHECKSUMS, Checkpointer

    workdir = tmp_path / "run"
    shutil.copytree(smoke_run, workdir)  # other tests read the session's run
    cfg = load.load_run_config(workdir)
    as_jax = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, tree)
    state = as_jax(load.load_state(workdir, cfg, "8")[0])  # restored leaves are numpy
    config = json.loads((workdir / "config.json").read_text())
    config["config"].update(phema=True, phema_sigma_rels=[0.05, 0.10])
    (workdir / "config.json").write_text(json.dumps(config))
    shift = lambda tree, c: jax.tree_util.tree_map(lambda x: x + c if eqx.is_inexact_array(x) else x, tree)
    snapshots = {t: (shift(state.ema, 0.01 * t), shift(state.ema, -0.02 * t)) for t in (4, 8)}
    ckpt = Checkpointer(workdir / "checkpoints")
    for t in (4, 8):  # the full states now need their power EMAs: step 8's is rewritten with them
        ckpt.latest.delete(t)
        ckpt.save_named("phema", t, snapshots[t])
    ckpt.save(8, eqx.tree_at(lambda st: st.phema, state, snapshots[8], is_leaf=lambda x: x is None))  # no __init__ re-check
    ckpt.close()
    assert (workdir / "checkpoints" / "phema" / "4" / CHECKSUMS).is_file()  # main's checksums, as every checkpoint

    assert phema_cli.main([str(workdir), "--sigma-rel", "0.08"]) == 0
    assert "--checkpoint phema_0.080" in capsys.readouterr().out
    assert (workdir / "checkpoints" / "phema_0.080" / "8" / CHECKSUMS).is_file()
    leaf = lambda tree: np.asarray(tree.torso.conv_in.weight, np.float64)
    between, step = load.load_state(workdir, load.load_run_config(workdir), "phema_0.08")  # any spelling of 0.08
    gammas = [ema_lib.sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
    x = phema.solve_coefficients(np.array([4.0, 4, 8, 8]), np.tile(gammas, 2), 8, ema_lib.sigma_rel_to_gamma(0.08))
    assert step == 8
    want = sum(c * leaf(m) for c, m in zip(x, (*snapshots[4], *snapshots[8])))
    np.testing.assert_allclose(leaf(between.ema), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(leaf(between.ema), leaf(snapshots[8][0]), atol=1e-4)
    np.testing.assert_array_equal(leaf(between.model), leaf(state.model))  # the rest: the full state of step 8

    monkeypatch.setenv("SCGCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "load_inception", StandIn)
    out = tmp_path / "phema.npz"
    assert sample.main(["--workdir", str(workdir), "--checkpoint", "phema_0.080", "--num", "6", "--batch-size", "8",
                        "--out", str(out), "--fid"]) == 0
    printed = capsys.readouterr().out
    assert "6 images (onestep, step 8, EMA weights)" in printed and "FID (6 samples): " in printed
    assert np.load(out)["images"].shape == (6, 8, 8, 3)
    assert json.loads(out.with_suffix(".fid.json").read_text())["checkpoint"] == "phema_0.080"
    with pytest.raises(UserError, match="--sigma-rel 0.5"):
        phema_cli.main([str(workdir), "--sigma-rel", "0.5"])
    with pytest.raises(UserError, match=r"no snapshot at --step 6 \(snapshots: 4, 8\)"):  # the fit would extrapolate
        phema_cli.main([str(workdir), "--sigma-rel", "0.08", "--step", "6"])


    # σ_rel that agree to three decimals get a folder each; one given twice is written once; none is an error
    assert phema_cli.main([str(workdir), "--sigma-rel", "0.0801", "0.0804", "0.0801"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" -> ") == 2, printed
    assert "--checkpoint phema_0.0801)" in printed and "--checkpoint phema_0.0804)" in printed, printed
    near = [load.load_state(workdir, load.load_run_config(workdir), f"phema_{s}")[0].ema for s in ("0.0801", "0.0804")]
    assert not np.array_equal(leaf(near[0]), leaf(near[1]))
    assert sorted(p.name for p in (workdir / "checkpoints").glob("phema_*")) == ["phema_0.080", "phema_0.0801",
                                                                                  "phema_0.0804"]
    assert run_cli(phema_cli.main, [str(workdir), "--sigma-rel"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --sigma-rel"), err

    # a damaged snapshot: one line naming it and what to do, with the flags the CLI has
    data = next(p for p in sorted((workdir / "checkpoints" / "phema" / "4" / "default").rglob("*")) if p.is_file()
                and p.stat().st_size > 100)
    data.write_bytes(b"\0" * data.stat().st_size)
    with pytest.raises(UserError) as bad:
        phema_cli.main([str(workdir), "--sigma-rel", "0.08"])
    message = str(bad.value)
    assert "--checkpoint" not in message and "phema/4" in message and "--step" in message, message
