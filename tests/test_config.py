"""Presets and the iCT recipe (issue 10): what `--config.preset` and `--config.recipe` resolve to."""

import dataclasses
import math

import pytest

from scgcm.run.config import CPU, PRESETS, SMOKE, TrainConfig, apply_recipe, build_loss, config_warnings, validate_config
from scgcm.train import parse


def flat(cfg) -> dict:
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value

    walk("", dataclasses.asdict(cfg))
    return out


@pytest.mark.parametrize("name", ["paper", "smoke", "cpu", "digits"])
def test_presets_resolve_and_validate(name):
    cfg = parse(["--config.preset", name])
    assert cfg == PRESETS[name] and cfg.preset == name and cfg.recipe == "reference"
    assert validate_config(cfg, num_devices=1) == []


def test_documented_values():
    assert PRESETS["paper"] == TrainConfig() and TrainConfig().batch_size == 1024 and TrainConfig().total_steps == 400_000
    assert SMOKE.total_steps == 200 and not SMOKE.fid.enabled
    assert CPU.data.source == "../shared/data/cifar10-subset" and CPU.model.image_size == 32
    assert CPU.fid.enabled and CPU.fid.at_start and CPU.fid.modes == ("onestep",)
    assert (CPU.fid.num, CPU.fid.final_num, CPU.fid.final_modes) == (250, 1000, ("onestep", "twostep"))
    assert CPU.total_steps % CPU.steps_per_call == 0 and CPU.total_steps % CPU.saving_step == 0


@pytest.mark.parametrize("name", ["paper", "smoke", "cpu", "digits"])
def test_ict_recipe_changes_exactly_q1_q2_q6(name):
    reference, ict = flat(PRESETS[name]), flat(apply_recipe(PRESETS[name], "ict"))
    changed = {k: (reference[k], ict[k]) for k in reference if reference[k] != ict[k]}
    assert changed == {
        "recipe": ("reference", "ict"),
        "loss.huber_form": ("elementwise", "per_image"),  # Q1
        "model.noise_scale": (1.0, 1000.0),  # Q2
        "sample.two_step_sigma": (0.661, 0.821),  # Q6
    }
    loss = build_loss(apply_recipe(PRESETS[name], "ict"))
    d = PRESETS[name].model.channels * PRESETS[name].model.image_size ** 2
    assert loss.huber_c == pytest.approx(0.00054 * math.sqrt(d))  # 0.0299 for CIFAR-10


def test_recipe_flag_and_explicit_flags_win():
    cfg = parse(["--config.preset", "cpu", "--config.recipe", "ict"])
    assert cfg == apply_recipe(CPU, "ict")
    cfg = parse(["--config.recipe=ict", "--config.model.noise-scale", "7", "--config.preset=smoke"])
    assert cfg.model.noise_scale == 7 and cfg.loss.huber_form == "per_image" and cfg.total_steps == SMOKE.total_steps


def test_help_shows_the_preset_defaults(capsys):
    with pytest.raises(SystemExit):
        parse(["--config.preset", "cpu", "--config.recipe", "ict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {CPU.total_steps})" in text and "(default: per_image)" in text and "(default: 0.821)" in text


@pytest.mark.parametrize("name", ["radam", "adam"])
def test_optimizer_first_update_closed_form(name):
    """The first update of a gradient g: Adam's −lr·g/(|g| + ε) (≈ −lr·sign g, full steps from the start);
    RAdam's, unrectified while its ρ_t ≤ 5, the bias-corrected momentum −lr·g (optax defaults)."""
    import equinox as eqx
    import jax
    import jax.random as jr
    import numpy as np

    from scgcm.core.state import make_optimizer
    from scgcm.nn.model import split_trainable
    from scgcm.run.config import build_model
    from tests.tiny import MICRO_MODEL

    optim = make_optimizer(0.1, 0.01, name)

    @eqx.filter_jit  # one program (op by op, the 155 arrays' few ops each took ~20 s to compile)
    def first_update():
        params, _ = split_trainable(build_model(MICRO_MODEL, key=jr.key(0)))
        grads = jax.tree_util.tree_map(lambda x: jr.normal(jr.key(x.size), x.shape), params)
        return grads, optim.update(grads, optim.init(params), params)[0]

    grads, updates = first_update()
    for part, lr in (("torso", 0.1), ("head", 0.01)):
        for got, g in zip(jax.tree_util.tree_leaves(getattr(updates, part)), jax.tree_util.tree_leaves(getattr(grads, part))):
            g = np.asarray(g)
            want = -lr * g / (np.abs(g) + 1e-8) if name == "adam" else -lr * g
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-7)
    assert parse(["--config.preset", "digits", "--config.optim.optimizer", name]).optim.optimizer == name


def test_digits_with_flips_warns_and_the_preset_does_not_flip():
    """The digits preset trains on the digits as they are; asking for flips on digits is allowed, with one warning."""
    assert config_warnings(parse(["--config.preset", "digits"])) == []
    assert config_warnings(parse([])) == []  # CIFAR-10 is flipped, as the method does
    (warning,) = config_warnings(parse(["--config.preset", "digits", "--config.data.flip"]))
    assert "--config.data.no-flip" in warning
    assert parse(["--config.preset", "digits"]).data.flip is False and parse([]).data.flip is True
