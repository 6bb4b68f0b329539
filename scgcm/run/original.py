"""Converting a checkpoint of the original code (github:boingkiri/stabilizing_consistency) into an scgcm run
directory (`python -m scgcm.convert`).

The original's experiment folder `experiments/<exp_name>/` holds `config.yaml` (its resolved hydra config,
written at the start of training) and `checkpoints/<step>/{diffusion,head}`: an orbax CheckpointManager with
one StandardCheckpointHandler item per network, each a flax TrainState of `step`, `params`, `params_ema` and
`opt_state` (optax MultiSteps around chain(radam): `mini_step`, `gradient_step`, `acc_grads`,
`inner_opt_state/0/0/{count, mu, nu}`, `inner_opt_state/0/1/count`).

What carries over (names and layouts: `scgcm.nn.original_names`, the one table):
- params → the model, params_ema → the EMA, every array exactly once (the frozen Fourier W included);
- RAdam's moments `mu`, `nu` and its `count` → scgcm's RAdam state of torso and head (scgcm's optimizer is the
  same RAdam, optax defaults, one per network, so the resumed updates are the ones the original would have
  made: resetting them would restart RAdam's warm-up, whose first updates are un-rectified momentum steps,
  and the variance estimate from zero, a jolt to a trained model). The moments of the frozen Fourier W are
  zero (it never gets a gradient) and scgcm keeps none for it; they are dropped;
- `gradient_step` (the number of updates) → the step; the checkpoint's folder number and the flax
  TrainState `step` (micro-steps) are only cross-checks;
- not carried: `acc_grads` (MultiSteps' pending micro-batch gradients: zero after every full update; if
  `mini_step` is not 0 they are dropped, with a note), the learning-rate schedule's counter `0/1/count`
  (a constant schedule), and the original's data order and dropout keys (scgcm's come from the seed).
"""

import dataclasses
import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import orbax.checkpoint as ocp

from scgcm.core.losses import default_huber_c
from scgcm.core.state import TrainState
from scgcm.errors import UserError
from scgcm.nn.original_names import ITEMS, expected_params, model_paths, original_table, to_scgcm
from scgcm.run.checkpoint import Checkpointer, flat_state, state_from_flat
from scgcm.run.config import HeadConfig, ModelConfig, TorsoConfig, TrainConfig
from scgcm.run.load import state_skeleton
from scgcm.run.rundir import write_config

MU, NU, COUNT = "opt_state/inner_opt_state/0/0/mu/", "opt_state/inner_opt_state/0/0/nu/", "opt_state/inner_opt_state/0/0/count"
ACC = "opt_state/acc_grads/"
COUNTERS = ("step", "opt_state/mini_step", "opt_state/gradient_step", COUNT, "opt_state/inner_opt_state/0/1/count")


# --- where the checkpoint and its config are ----------------------------------------------------------------

def find_source(path: Path) -> tuple[Path, Path | None]:
    """(the folder of numbered checkpoints, the original's config.yaml or None) of an experiment folder
    (`experiments/<exp_name>`, with checkpoints/ and config.yaml) or of its checkpoints/ folder."""
    if not path.is_dir():
        raise UserError(f"{path}: no such folder (give the original's experiment folder or its checkpoints/ folder)")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    yaml_path = next((p for p in (folder.parent / "config.yaml", folder / "config.yaml") if p.is_file()), None)
    return folder, yaml_path


def original_steps(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def pick_step(folder: Path, step: int | None) -> Path:
    """The checkpoint folder of `step` (default: the newest); a one-line UserError if there is none."""
    steps = original_steps(folder)
    if not steps:
        raise UserError(f"{folder}: no checkpoint (no numbered step folder); is it the original's checkpoints folder?")
    if step is not None and step not in steps:
        raise UserError(f"--step {step}: no such checkpoint in {folder} (available: {', '.join(map(str, steps))})")
    step_dir = folder / str(steps[-1] if step is None else step)
    missing = [item for item in ITEMS if not (step_dir / item).is_dir()]
    if missing:
        found = ", ".join(sorted(p.name for p in step_dir.iterdir() if p.is_dir())) or "nothing"
        raise UserError(f"{step_dir}: not a checkpoint of the original code (no item {missing[0]!r}; found: {found})")
    return step_dir


# --- reading it ----------------------------------------------------------------------------------------------

def _flat_names(tree, prefix: str = "") -> dict[str, object]:
    """{'/'-joined name: leaf} of the nested dicts and lists orbax's metadata and restore return."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix.rstrip("/"): tree}
    out = {}
    for k, v in items:
        out.update(_flat_names(v, f"{prefix}{k}/"))
    return out


def _is_array_metadata(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


class _NoItemMetadataNote(logging.Filter):
    """Drops orbax's note that an item folder (written by a CheckpointManager) has no checkpoint metadata of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


def read_item(item_dir: Path) -> dict[str, np.ndarray]:
    """Every array of one orbax item, by '/'-joined name; a one-line UserError if orbax cannot read it."""
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    quiet, absl = _NoItemMetadataNote(), logging.getLogger("absl")
    absl.addFilter(quiet)
    try:
        metadata = checkpointer.metadata(item_dir.absolute())
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), tree, is_leaf=_is_array_metadata)
        restored = checkpointer.restore(item_dir.absolute(), args=ocp.args.StandardRestore(target))
    except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many types; all mean unreadable)
        raise UserError(f"{item_dir}: unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None
    finally:
        checkpointer.close()
        absl.removeFilter(quiet)
    return {k: np.asarray(v) for k, v in _flat_names(restored).items()}


def read_checkpoint(step_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """{item: {name: array}} of an original checkpoint folder (`checkpoints/<step>`)."""
    return {item: read_item(step_dir / item) for item in ITEMS}


# --- the configuration from the original's yaml ---------------------------------------------------------------

# Values of the original's config that scgcm's networks and training do not have: a yaml with another one
# describes a model this converter cannot map (one line naming the key).
FIXED = {
    "model.diffusion.type": "original_unetpp", "model.diffusion.embedding_type": "fourier",
    "model.diffusion.resblock_type": "biggan", "model.diffusion.progressive": "none",
    "model.diffusion.progressive_input": "residual", "model.diffusion.progressive_combine": "sum",
    "model.diffusion.attention_type": "ddpm", "model.diffusion.fir": True, "model.diffusion.fir_kernel": [1, 3, 3, 1],
    "model.diffusion.skip_rescale": True, "model.diffusion.resamp_with_conv": True, "model.diffusion.conditional": True,
    "model.diffusion.double_heads": False, "model.head.type": "unetpp", "model.head.embedding_type": "positional",
    "model.head.encoder_type": "standard", "model.head.decoder_type": "standard", "model.head.resample_filter": [1, 1],
    "model.head.n_heads": 1, "model.head.label_dim": 0, "model.head.input_t_embed": True, "model.head.dropout_rate": 0.0,
    "framework.diffusion.loss": "huber", "framework.diffusion.train.optimizer.type": "radam",
}
NOT_SUPPORTED = ("framework.diffusion.train.warmup", "framework.diffusion.train.gradient_clip")


def _get(values: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return default
        values = values[part]
    return values


def read_yaml(path: Path) -> dict:
    import yaml  # PyYAML, a dependency of `datasets`; only the converter reads yaml

    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: not the original's config (a YAML mapping with model, framework, dataset)")
    return values


def config_from_original(values: dict, base: TrainConfig, source: str = "config.yaml") -> TrainConfig:
    """`base` with the values of the original's resolved config that determine scgcm's: the architecture
    (model.diffusion: nf, ch_mult, num_res_blocks, attn_resolutions, dropout, fourier_scale, image_channels;
    model.head: n_channels, ch_mults, n_blocks, is_atten; dataset.data_size; framework.diffusion: sigma_min,
    sigma_max) and, so that a resumed run goes on as the original would have, the training
    (framework.diffusion: gradient_flow_from_head → variant, params_ema_for_training [μ0, s0, s1] → ict.s0/s1,
    rho, pseudo_huber_loss_c, joint_training_weight, train.{torso,head}_learning_rate, total_batch_size,
    total_step; ema.beta; rand_seed; n_jitted_steps; saving_step; sampling_step). A value the converter
    cannot express (another block type, a warm-up, clipping) is a one-line UserError naming it."""
    for key, want in FIXED.items():
        got = _get(values, key)
        if got is not None and got != want and not (isinstance(want, list) and list(got) == want):
            raise UserError(f"{source}: {key} is {got!r}; scgcm's model has {want!r}, so this checkpoint cannot be converted")
    for key in NOT_SUPPORTED:
        if _get(values, key) is not None:
            raise UserError(f"{source}: {key} is set; scgcm's optimizer has no such option, so a resumed run would differ")
    # YAML writes 80 for 80.0 and 1e-4 as a string: every value is cast to its field's type
    top = lambda k, default, cast: _cast(_get(values, k), default, cast, k, source)
    d = lambda k, default, cast: top(f"model.diffusion.{k}", default, cast)
    h = lambda k, default, cast: top(f"model.head.{k}", default, cast)
    f = lambda k, default, cast: top(f"framework.diffusion.{k}", default, cast)
    ints = lambda v: tuple(int(x) for x in v)
    m, t, hd = base.model, base.model.torso, base.model.head
    size = _get(values, "dataset.data_size")
    if size is not None and (len(size) != 3 or size[0] != size[1]):
        raise UserError(f"{source}: dataset.data_size {size}: scgcm models square images [H, H, C]")
    is_atten = _get(values, "model.head.is_atten")
    torso = TorsoConfig(nf=d("nf", t.nf, int), ch_mult=d("ch_mult", t.ch_mult, ints),
                        num_res_blocks=d("num_res_blocks", t.num_res_blocks, int),
                        attn_resolutions=d("attn_resolutions", t.attn_resolutions, ints),
                        dropout=d("dropout", t.dropout, float), fourier_scale=d("fourier_scale", t.fourier_scale, float))
    head = HeadConfig(model_channels=h("n_channels", hd.model_channels, int), channel_mult=h("ch_mults", hd.channel_mult, ints),
                      num_blocks=h("n_blocks", hd.num_blocks, int),
                      attn_levels=hd.attn_levels if is_atten is None else tuple(i for i, a in enumerate(is_atten) if a))
    model = ModelConfig(torso=torso, head=head, image_size=int(size[0]) if size else m.image_size,
                        channels=d("image_channels", int(size[2]) if size else m.channels, int),
                        sigma_min=f("sigma_min", m.sigma_min, float), sigma_max=f("sigma_max", m.sigma_max, float),
                        sigma_data=m.sigma_data, noise_scale=m.noise_scale)
    ema = f("params_ema_for_training", None, lambda v: (float(v[0]), int(v[1]), int(v[2])))
    train = lambda k, default, cast: f(f"train.{k}", default, cast)
    flow = f("gradient_flow_from_head", None, bool)
    # the original's loss is the elementwise pseudo-Huber; its published c (0.003) stays scgcm's default (None)
    huber_c = f("pseudo_huber_loss_c", base.loss.huber_c, float)
    if base.loss.huber_form == "elementwise" and huber_c == default_huber_c("elementwise", 1):
        huber_c = base.loss.huber_c
    return dataclasses.replace(
        base, model=model,
        variant=base.variant if flow is None else ("score" if flow else "vanilla"),
        seed=top("rand_seed", base.seed, int),
        total_steps=train("total_step", base.total_steps, int),
        batch_size=train("total_batch_size", base.batch_size, int),
        steps_per_call=top("n_jitted_steps", base.steps_per_call, int),
        saving_step=top("saving_step", base.saving_step, int),
        ict=dataclasses.replace(base.ict, s0=ema[1] if ema else base.ict.s0, s1=ema[2] if ema else base.ict.s1,
                                rho=f("rho", base.ict.rho, float)),
        loss=dataclasses.replace(base.loss, huber_c=huber_c, dsm_weight=f("joint_training_weight", base.loss.dsm_weight, float)),
        optim=dataclasses.replace(base.optim, torso_lr=train("torso_learning_rate", base.optim.torso_lr, float),
                                  head_lr=train("head_learning_rate", base.optim.head_lr, float),
                                  ema_decay=top("ema.beta", base.optim.ema_decay, float)),
        sample=dataclasses.replace(base.sample, sampling_step=top("sampling_step", base.sample.sampling_step, int)),
    )


def _cast(value, default, cast, key: str, source: str):
    if value is None:
        return default
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {key} is {value!r}, not a {getattr(cast, '__name__', 'value')} scgcm can use") from None


def resumable(cfg: TrainConfig, step: int) -> TrainConfig:
    """`cfg` with steps_per_call reduced (to a common divisor) if the step, total or saving step is not a
    multiple of it: training resumes only at a multiple of steps_per_call."""
    n = math.gcd(cfg.steps_per_call, step, cfg.total_steps, cfg.saving_step)
    return cfg if n == cfg.steps_per_call else dataclasses.replace(cfg, steps_per_call=n)


# --- the conversion ---------------------------------------------------------------------------------------------

def expected_arrays(params: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every array of one item of a matching original checkpoint (its TrainState)."""
    out = {name: () for name in COUNTERS}
    for prefix in ("params/", "params_ema/", MU, NU, ACC):
        out.update({prefix + n: s for n, s in params.items()})
    return out


def check_arrays(step_dir: Path, found: dict[str, dict[str, np.ndarray]], cfg: TrainConfig, config_source: str) -> None:
    """A one-line UserError naming the first array (in sorted order) whose name or shape differs from what the
    configured architecture needs."""
    skeleton = state_skeleton(cfg)
    for item, params in expected_params(skeleton.model).items():
        want, have = expected_arrays(params), {k: tuple(v.shape) for k, v in found[item].items()}
        for name in sorted(want.keys() | have.keys()):
            if want.get(name) == have.get(name):
                continue
            if name not in have:
                what = f"has no array {name} (shape {want[name]})"
            elif name not in want:
                what = f"has {name} {have[name]}, which the model does not"
            else:
                what = f"has {name} of shape {have[name]}, the model needs {want[name]}"
            raise UserError(f"{step_dir / item} {what}: not the architecture of {config_source} "
                            "(pass --config.model.* flags for another)")


def convert_state(found: dict[str, dict[str, np.ndarray]], cfg: TrainConfig) -> tuple[TrainState, int, list[str]]:
    """The scgcm TrainState of an original checkpoint (checked with `check_arrays`), its step (the number of
    updates) and notes for the user. Every array of the state is filled exactly once (asserted)."""
    skeleton = state_skeleton(cfg)
    want = flat_state(skeleton)
    flat: dict[str, np.ndarray] = {}

    def put(key: str, value: np.ndarray | np.generic | jax.Array) -> None:
        assert key in want and key not in flat, key
        flat[key] = np.asarray(value, want[key].dtype).reshape(want[key].shape)

    trainable = {p for p in model_paths(skeleton.model) if not p.endswith("fourier_w.value")}
    for row in original_table(skeleton.model):
        src = found[row.item]
        put(".model" + row.path, to_scgcm(row.layout, src["params/" + row.original]))
        put(".ema" + row.path, to_scgcm(row.layout, src["params_ema/" + row.original]))
        for i in range(len(skeleton.phema or ())):  # power-function EMAs (--config.phema) start at the model
            put(f".phema[{i}]" + row.path, to_scgcm(row.layout, src["params/" + row.original]))
        if row.path in trainable:
            part = "torso" if row.path.startswith(".torso") else "head"
            for prefix, moment in ((MU, "mu"), (NU, "nu")):
                put(f".opt_state.inner_states['{part}'].inner_state[0].{moment}{row.path}",
                    to_scgcm(row.layout, src[prefix + row.original]))
    notes = []
    steps = {item: int(found[item]["opt_state/gradient_step"]) for item in ITEMS}
    if len(set(steps.values())) > 1:
        raise UserError(f"the networks' checkpoints disagree on the number of updates ({steps}); not one training state")
    step = steps["diffusion"]
    for item, part in (("diffusion", "torso"), ("head", "head")):
        put(f".opt_state.inner_states['{part}'].inner_state[0].count", found[item][COUNT])
        if int(found[item]["opt_state/mini_step"]):
            notes.append(f"{item}: {int(found[item]['opt_state/mini_step'])} accumulated micro-batches of an update not "
                         "yet applied are dropped")
    put(".step", np.int32(step))
    put(".key", jax.random.key_data(jr.split(jr.key(cfg.seed))[1]))
    assert flat.keys() == want.keys(), sorted(want.keys() - flat.keys())[:3]
    return state_from_flat({k: jnp.asarray(v) for k, v in flat.items()}, skeleton), step, notes


def check_new_run(workdir: Path) -> None:
    """A one-line UserError if `workdir` already holds checkpoints (a conversion never mixes runs)."""
    folder = workdir / "checkpoints"
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: not a directory")
    if folder.exists() and any(folder.rglob("*")):
        raise UserError(f"--workdir {workdir}: it already holds checkpoints; convert into a new run directory")


def write_run(workdir: Path, cfg: TrainConfig, state: TrainState, step: int, record: dict) -> Path:
    """An scgcm run directory: config.json (and config_history.jsonl), checkpoints/latest/<step> (checksummed),
    and converted_from.json (`record`: where the checkpoint came from). Returns the checkpoint folder."""
    check_new_run(workdir)
    folder = workdir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    write_config(workdir, cfg)
    ckpt = Checkpointer(folder, keep=cfg.keep_checkpoints)
    try:
        ckpt.save(step, state, counters={"skipped_total": 0})
        where = ckpt.step_dir(step)
    finally:
        ckpt.close()
    (workdir / "converted_from.json").write_text(json.dumps(record, indent=2) + "\n")
    return where

