"""`python -m scgcm.convert`: a checkpoint of the original code (github:boingkiri/stabilizing_consistency) becomes
an scgcm run directory.

The original checkpoints here are made from the table (scgcm/nn/original_names.py) with random values and
written the way the original writes them (utils/fs_utils.py): an orbax CheckpointManager with one
StandardCheckpointHandler item per network, each a TrainState of step, params, params_ema and the optax
MultiSteps(chain(radam(constant schedule))) state the original's create_optimizer builds, beside a resolved
config.yaml in the experiment folder. Only flax's TrainState class is replaced by a dict of its saved fields
(flax is not a dependency): orbax stores a struct dataclass by its field names, the same tree.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import yaml
from cli import TINY_ARGS, run_train, train_env
from tiny import MICRO_ATTN_MODEL

from scgcm.convert import main as convert_main
from scgcm.errors import run_cli
from scgcm.nn.original_names import expected_params, model_paths, original_table, to_original, to_scgcm
from scgcm.run.config import TrainConfig, build_model
from scgcm.run.load import load_run_config, load_state

REPO = Path(__file__).resolve().parents[1]
TREE = json.loads((Path(__file__).parent.parent / "experiments" / "original_tree.json").read_text())


def test_table_names_and_shapes_are_the_originals():
    """The table for the paper model gives exactly the names and shapes the original's own init made
    (experiments/original_tree.json): 445 torso and 210 head arrays."""
    model = eqx.filter_eval_shape(lambda k: build_model(TrainConfig().model, key=k), jr.key(0))
    expected = expected_params(model)
    for item in ("diffusion", "head"):
        assert expected[item] == {name: tuple(shape) for name, shape, _ in TREE[item]["params"]}
    layouts = {r.layout for r in original_table(model)}
    assert layouts == {"same", "dense", "conv", "nin", "bias"}


def _nest(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _yaml(model, *, step_total: int, batch: int, lr: float, ema: float, s1: int, jitted: int, saving: int) -> dict:
    """The resolved config.yaml of the original for `model` (a ModelConfig), trimmed to what it holds about
    the networks and the training (the original's configs/*.yaml, composed by hydra)."""
    t, h = model.torso, model.head
    return {
        "model": {
            "diffusion": {"type": "original_unetpp", "image_channels": model.channels, "nf": t.nf, "ch_mult": list(t.ch_mult),
                          "num_res_blocks": t.num_res_blocks, "attn_resolutions": list(t.attn_resolutions),
                          "dropout": t.dropout, "fourier_scale": t.fourier_scale, "embedding_type": "fourier",
                          "resblock_type": "biggan", "progressive": "none", "progressive_input": "residual",
                          "progressive_combine": "sum", "fir": True, "fir_kernel": [1, 3, 3, 1], "skip_rescale": True,
                          "double_heads": False, "data_std": 0.5, "sigma_min": 0.002, "sigma_max": 80.0},
            "head": {"type": "unetpp", "image_channels": model.channels, "n_channels": h.model_channels,
                     "ch_mults": list(h.channel_mult), "is_atten": [i in h.attn_levels for i in range(len(h.channel_mult))],
                     "n_blocks": h.num_blocks, "n_heads": 1, "dropout_rate": 0.0, "label_dim": 0, "input_t_embed": True,
                     "embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
                     "resample_filter": [1, 1], "input_channels": t.nf * t.ch_mult[0]},
        },
        "framework": {"diffusion": {
            "type": "cm", "loss": "huber", "params_ema_for_training": [0.9, 10, s1], "sigma_min": 0.002, "sigma_max": 80,
            "rho": 7, "pseudo_huber_loss_c": 0.003, "gradient_flow_from_head": True, "joint_training_weight": 0.3,
            "train": {"head_learning_rate": lr, "torso_learning_rate": lr, "total_batch_size": batch,
                      "batch_size_per_rounds": batch, "total_step": step_total, "optimizer": {"type": "radam"}}}},
        "ema": {"beta": ema},
        "dataset": {"name": "cifar10", "data_size": [model.image_size, model.image_size, model.channels]},
        "rand_seed": 42, "n_jitted_steps": jitted, "saving_step": saving, "sampling_step": saving,
        "exp_name": "ict_with_score_head_added",
    }


def write_original(exp_dir: Path, model_cfg, step: int, seed: int = 0, **yaml_values) -> dict[str, dict[str, np.ndarray]]:
    """An experiment folder of the original (config.yaml, checkpoints/<step>/{diffusion,head}) for `model_cfg`,
    with random params, EMA and RAdam moments; returns {item: {name: array}} as written."""
    skeleton = eqx.filter_eval_shape(lambda k: build_model(model_cfg, key=k), jr.key(0))
    rng = np.random.default_rng(seed)
    params = expected_params(skeleton)
    tx = optax.MultiSteps(optax.chain(optax.radam(optax.constant_schedule(1e-4))), every_k_schedule=1)
    written, states = {}, {}
    for item, shapes in params.items():
        draw = lambda positive=False, shapes=shapes: {
            n: (np.abs if positive else np.asarray)(rng.standard_normal(s).astype(np.float32)) for n, s in shapes.items()}
        p, ema, mu, nu = draw(), draw(), draw(), draw(positive=True)
        state = tx.init(_nest(p))
        (adam, schedule), = state.inner_opt_state
        adam = adam._replace(count=np.int32(step), mu=_nest(mu), nu=_nest(nu))
        state = state._replace(gradient_step=np.int32(step), inner_opt_state=((adam, schedule._replace(count=np.int32(step))),))
        states[item] = {"step": np.int32(step), "params": _nest(p), "params_ema": _nest(ema), "opt_state": state}
        written[item] = {**{f"params/{n}": v for n, v in p.items()}, **{f"params_ema/{n}": v for n, v in ema.items()},
                         **{f"mu/{n}": v for n, v in mu.items()}, **{f"nu/{n}": v for n, v in nu.items()}}
    folder = exp_dir / "checkpoints"
    folder.mkdir(parents=True)
    items = ("diffusion", "head")
    with ocp.CheckpointManager(folder.absolute(), item_names=items, options=ocp.CheckpointManagerOptions(max_to_keep=1),
                               item_handlers={k: ocp.StandardCheckpointHandler() for k in items}) as manager:
        manager.save(step, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in states.items()}))
        manager.wait_until_finished()
    (exp_dir / "config.yaml").write_text(yaml.safe_dump(_yaml(model_cfg, **yaml_values)))
    return written


def convert(*argv: str) -> int:
    return run_cli(convert_main, [str(a) for a in argv])


@pytest.fixture(scope="module")
def attn_original(tmp_path_factory):
    """The original's experiment folder for the micro model with attention in torso and head (every kind of
    layer of the table: BigGAN blocks, NIN attention, the input pyramid, UNet blocks with qkv), at update 12."""
    exp = tmp_path_factory.mktemp("orig") / "ict_with_score_head_added"
    written = write_original(exp, MICRO_ATTN_MODEL, step=12, step_total=400, batch=8, lr=2e-4, ema=0.999, s1=40,
                             jitted=4, saving=100)
    return exp, written


def test_converted_arrays_equal_the_originals(attn_original, tmp_path, capsys):
    exp, written = attn_original
    run = tmp_path / "run"
    assert convert(exp, "--workdir", run) == 0
    out = capsys.readouterr().out
    assert "update 12" in out and str(exp / "config.yaml") in out

    cfg = load_run_config(run)  # the architecture and training values came from config.yaml
    assert cfg.model == MICRO_ATTN_MODEL
    assert (cfg.batch_size, cfg.total_steps, cfg.optim.torso_lr, cfg.optim.ema_decay, cfg.ict.s1, cfg.steps_per_call,
            cfg.variant, cfg.workdir) == (8, 400, 2e-4, 0.999, 40, 4, "score", str(run))
    assert (run / "checkpoints" / "latest" / "12" / "scgcm_checksums.json").is_file()
    assert json.loads((run / "converted_from.json").read_text())["step"] == 12

    state, step = load_state(run, cfg)
    assert step == 12 and int(state.step) == 12
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(state, lambda x: isinstance(x, np.ndarray | jax.Array)))[0]
    leaves = [(p, x) for p, x in leaves if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
    moment = lambda part, name, path: flat.get(f".opt_state.inner_states['{part}'].inner_state[0].{name}{path}")
    rows = original_table(state.model)
    assert len(rows) == len(model_paths(state.model)) == sum(len(v) for v in written.values()) // 4
    for row in rows:
        src, ours = written[row.item], flat[".model" + row.path]
        assert np.array_equal(to_original(row.layout, ours), src["params/" + row.original]), row
        assert np.array_equal(ours, to_scgcm(row.layout, src["params/" + row.original])), row
        assert np.array_equal(to_original(row.layout, flat[".ema" + row.path]), src["params_ema/" + row.original]), row
        part = "torso" if row.path.startswith(".torso") else "head"
        if row.path.endswith("fourier_w.value"):
            assert moment(part, "mu", row.path) is None  # frozen: no moments in scgcm (the original's are zero)
            continue
        assert np.array_equal(to_original(row.layout, moment(part, "mu", row.path)), src["mu/" + row.original]), row
        assert np.array_equal(to_original(row.layout, moment(part, "nu", row.path)), src["nu/" + row.original]), row
    opt = {part: state.opt_state.inner_states[part].inner_state[0] for part in ("torso", "head")}
    assert int(opt["torso"].count) == int(opt["head"].count) == 12


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_foreign_damaged_and_mismatched_checkpoints_are_one_line(attn_original, tmp_path, capsys):
    exp, _ = attn_original
    # another architecture than the checkpoint's: the first array (in sorted order) that differs is named
    assert convert(exp, "--workdir", tmp_path / "a", "--config.model.head.model-channels", "16") == 2
    line = _one_error_line(capsys)
    assert "head/conv1/bias" in line and "(16,)" in line and "(8,)" in line
    assert not (tmp_path / "a" / "config.json").exists()
    # a missing step lists the ones there are
    assert convert(exp, "--workdir", tmp_path / "b", "--step", "7") == 2
    assert "available: 12" in _one_error_line(capsys)
    # a foreign checkpoint: an scgcm run's checkpoints folder (its item is `default`)
    assert convert(exp, "--workdir", tmp_path / "c") == 0
    capsys.readouterr()
    assert convert(tmp_path / "c" / "checkpoints" / "latest", "--workdir", tmp_path / "d") == 2
    line = _one_error_line(capsys)
    assert "not a checkpoint of the original code" in line and "default" in line
    # converting into a run that has checkpoints is refused
    assert convert(exp, "--workdir", tmp_path / "c") == 2
    assert "already holds checkpoints" in _one_error_line(capsys)
    # a damaged one: the array data files truncated
    damaged = tmp_path / "damaged"
    shutil.copytree(exp, damaged)
    for f in (damaged / "checkpoints" / "12" / "head").rglob("*"):
        if f.is_file() and "ocdbt.process" in str(f) and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    assert convert(damaged, "--workdir", tmp_path / "e") == 2
    line = _one_error_line(capsys)
    assert "unreadable" in line and str(damaged / "checkpoints" / "12" / "head") in line
    # a config.yaml describing a model scgcm does not have
    (damaged / "config.yaml").write_text(yaml.safe_dump({"model": {"diffusion": {"resblock_type": "ddpm"}}}))
    assert convert(damaged, "--workdir", tmp_path / "f") == 2
    assert "model.diffusion.resblock_type" in _one_error_line(capsys)


def _arg(name: str) -> str:
    return TINY_ARGS[TINY_ARGS.index(name) + 1]


def _python(*argv: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """A fresh interpreter. The steps of this test that go through tyro (which reads class sources with
    `ast.parse`) run apart from the test process: in a long pytest-xdist worker, CPython 3.11.7's AST
    recursion-depth bookkeeping was seen corrupted ("SystemError: AST constructor recursion depth
    mismatch", twice in the full suite, never alone), which breaks every later `ast.parse` there."""
    return subprocess.run([sys.executable, *map(str, argv)], env={**train_env(), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent)


def test_sample_and_resume_from_a_converted_run(tmp_path):
    """The micro model of tests/cli.py's tiny training run, converted at update 4, samples through scgcm.sample
    and resumes through scgcm.train (the same flags as the tiny run) for the remaining 4 updates."""
    from scgcm.run.config import SMOKE

    parsed = _python("-c", "import dataclasses, json; from cli import TINY_ARGS; from scgcm.train import parse; "
                           "print(json.dumps({'config': dataclasses.asdict(parse(TINY_ARGS))}))")
    assert parsed.returncode == 0, parsed.stderr[-2000:]
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(parsed.stdout)
    cfg = load_run_config(tmp_path / "tiny")  # the run the converted one must be, field for field
    assert cfg.model.head.attn_levels == () and cfg.ict.s1 == SMOKE.ict.s1
    exp = tmp_path / "orig"
    write_original(exp, cfg.model, step=4, step_total=cfg.total_steps, batch=cfg.batch_size, lr=cfg.optim.torso_lr,
                   ema=cfg.optim.ema_decay, s1=cfg.ict.s1, jitted=cfg.steps_per_call, saving=cfg.saving_step)
    run = tmp_path / "run"
    data = ["--config.data.source", "synthetic", "--config.data.synthetic-size", _arg("--config.data.synthetic-size")]
    converted = _python("-m", "scgcm.convert", exp, "--workdir", run, *data)
    assert converted.returncode == 0, converted.stderr[-2000:]

    out = tmp_path / "s.npz"
    sampled = _python("-m", "scgcm.sample", "--workdir", run, "--out", out, "--num", "4", "--batch-size", "8")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    images = np.load(out)["images"]
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8 and images.std() > 0

    result = run_train(run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'latest'} at step 4" in result.stderr
    assert (run / "checkpoints" / "latest" / "8").is_dir()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps and min(steps) > 4 and max(steps) == 8
