"""Loading a run for sampling and evaluation: its configuration (config.json), a checkpoint's state
(latest, best, a step, or a post-hoc EMA), and its samplers, FID reference and evaluator, as training
builds them.
"""

import dataclasses
import functools
import json
import math
import typing
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import numpy as np

from scgcm.core.state import TrainState, init_state, make_optimizer
from scgcm.errors import UserError
from scgcm.eval import digits as digits_net, fid, inception
from scgcm.eval.scores import FIDEvaluator, data_reference
from scgcm.parallel.generate import make_sampler
from scgcm.run.checkpoint import Checkpointer
from scgcm.run.config import TrainConfig, build_model, num_phema


def _from_dict(cls, values: dict):
    """Rebuild a (nested) config dataclass from its asdict() form; lists become tuples."""
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v, t = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(t):
            v = _from_dict(t, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def load_run_config(workdir: Path) -> TrainConfig:
    path = workdir / "config.json"
    if not path.exists():
        raise UserError(f"--workdir {workdir}: no config.json; it must be a run directory written by scgcm.train")
    try:
        return _from_dict(TrainConfig, json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--workdir {workdir}: {path.name} is unreadable ({type(e).__name__}: {str(e)[:100]})") from None


@functools.cache
def state_skeleton(cfg: TrainConfig) -> TrainState:
    """Shapes and dtypes of the run's TrainState (with its power-function EMAs under --config.phema);
    cached: it takes a second to trace and never changes."""
    optim = make_optimizer(cfg.optim.torso_lr, cfg.optim.head_lr, cfg.optim.optimizer)
    return eqx.filter_eval_shape(lambda k: init_state(build_model(cfg.model, key=k), optim, k, num_phema(cfg)), jr.key(0))


def phema_checkpoint_name(sigma_rel: float) -> str:
    """The checkpoint folder (and `--checkpoint`) of a σ_rel reconstructed by `python -m scgcm.phema`:
    three decimals when they are the number exactly ('phema_0.080' for 0.08), else the shortest digits that
    are ('phema_0.0801', 'phema_0.0001'): one name per σ_rel, and one σ_rel per name."""
    value = float(sigma_rel)
    short = f"{value:.3f}"
    return f"phema_{short if float(short) == value else repr(value)}"


def _phema_value(checkpoint: str) -> float | None:
    try:
        value = float(checkpoint.removeprefix("phema_"))
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def check_checkpoint_name(checkpoint: str) -> None:
    """The one rule for `--checkpoint` of every CLI: 'latest', 'best' (of the sampled mode), 'best_<mode>',
    'phema_<σ_rel>' (`python -m scgcm.phema`; any spelling of the number) or a step number; else a
    one-line UserError."""
    phema = checkpoint.startswith("phema_") and _phema_value(checkpoint) is not None
    if not (checkpoint.isdigit() or checkpoint in ("latest", "best") or checkpoint.startswith("best_") or phema):
        raise UserError(f"--checkpoint must be 'latest', 'best', 'best_<mode>', 'phema_<σ_rel>' or a step, "
                        f"not {checkpoint!r}")


def canonical_checkpoint_name(checkpoint: str) -> str:
    """`check_checkpoint_name`, then the folder's spelling of a phema name ('phema_0.08' → 'phema_0.080')."""
    check_checkpoint_name(checkpoint)
    return phema_checkpoint_name(_phema_value(checkpoint)) if checkpoint.startswith("phema_") else checkpoint


def load_state(workdir: Path, cfg: TrainConfig, checkpoint: str = "latest", mode: str = "onestep") -> tuple[TrainState, int]:
    """The state and step of a run's checkpoint (`check_checkpoint_name`); 'best' is that of `mode`."""
    checkpoint = canonical_checkpoint_name(checkpoint)
    skeleton = state_skeleton(cfg)
    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:  # closed on every path, errors included
        if checkpoint.isdigit():
            restored = ckpt.restore(skeleton, step=int(checkpoint))
        elif checkpoint.startswith("phema_"):
            restored = ckpt.restore(skeleton, which=checkpoint)
        elif checkpoint.startswith("best"):
            which = checkpoint.split("_", 1)[1] if "_" in checkpoint else mode
            restored = ckpt.restore(skeleton, which=which)
        else:
            restored = ckpt.restore(skeleton)
    if restored is None:
        raise UserError(f"--checkpoint {checkpoint}: no such checkpoint in {workdir / 'checkpoints'}")
    return restored


def run_reference(cfg: TrainConfig, extractor: fid.Extractor, fid_ref: str | None = None,
                  fid_source: str | None = None, *, ref_flag: str = "--fid-ref") -> tuple[fid.Stats, np.ndarray | None, str]:
    """Reference statistics, real features for precision/recall (None if the `fid_ref` file holds
    none) and their description: `fid_ref` (given as `ref_flag`), else `fid_source`'s train split, else
    the run's data. `extractor` may be a function that builds one: it is called only if features must be
    computed."""
    if fid_ref:
        stats, features = fid.read_reference(Path(fid_ref), ref_flag, need_features=True)
        return stats, features, fid_ref
    if fid_source:
        stats, features = fid.reference(fid_source, extractor, flag="--fid-source", need_features=True)
        return stats, features, f"{fid_source} (train)"
    d, m = cfg.data, cfg.model
    stats, features = data_reference(d.source, extractor, split=d.split, image_size=m.image_size, channels=m.channels,
                                     synthetic_size=d.synthetic_size, seed=cfg.seed, need_features=True)
    return stats, features, f"the run's data {d.source or 'cifar10'} ({d.split})"


def run_sampler(cfg: TrainConfig, mode: str, *, two_step_sigma: float | jax.Array | None = None,
                sigmas: tuple[float, ...] = (80.0, 0.661), heun_steps: int | None = None):
    """The run's sampler of `mode` (its model shape, σ range, two-step σ and Heun steps unless given)."""
    m = cfg.model
    return make_sampler(
        mode, shape=(m.channels, m.image_size, m.image_size), sigma_min=m.sigma_min, sigma_max=m.sigma_max,
        two_step_sigma=cfg.sample.two_step_sigma if two_step_sigma is None else two_step_sigma, sigmas=sigmas,
        heun_steps=heun_steps or cfg.sample.heun_steps,
    )


def fid_extractor(batch_size: int, *, progress: bool = True) -> fid.FeatureExtractor:
    """The standard Inception network, at most `batch_size` images at a time (and the backend's default)."""
    return fid.FeatureExtractor(inception.load_inception(), batch_size=min(batch_size, fid.default_batch_size()),
                                progress=progress)


def run_network(cfg: TrainConfig) -> str:
    """'inception' or 'digits': the run's `--config.fid.network`, 'auto' resolved by its data."""
    return digits_net.resolve_network(cfg.fid.network, cfg.data.source)


def run_extractor(cfg: TrainConfig, batch_size: int, *, progress: bool = True, lazy: bool = True) -> fid.Extractor:
    """The run's feature network: the digits classifier (small: built now, it names the reference cache), or
    Inception at most `batch_size` images at a time, built only when features are needed if `lazy`."""
    if run_network(cfg) == "digits":
        return digits_net.load_network()
    if lazy:
        return functools.cache(lambda: fid_extractor(batch_size, progress=progress))
    return fid_extractor(batch_size, progress=progress)


def run_evaluator(cfg: TrainConfig, extractor: fid.Extractor, *, modes: tuple[str, ...], num: int, batch_size: int,
                  seed: int, fid_ref: str | None = None) -> tuple[FIDEvaluator, str]:
    """An evaluator of a run's models (`num` images of each of `modes` from `seed`, against `run_reference`)
    and the reference's description; the reference is read (or a bad `fid_ref` refused) before the network is built."""
    ref_stats, ref_features, ref_name = run_reference(cfg, extractor, fid_ref)
    evaluator = FIDEvaluator(ref_stats, fid.resolve(extractor), {m: run_sampler(cfg, m) for m in modes}, num=num,
                             batch_size=batch_size, seed=seed, progress=True, ref_features=ref_features)
    return evaluator, ref_name
