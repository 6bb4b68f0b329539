"""Post-hoc EMA of a run: the EMA of any σ_rel at a snapshot, reconstructed from the power-function EMA
snapshots training saved (`--config.phema`, `checkpoints/phema/<step>`) with `scgcm.core.phema`'s
least-squares fit, and written as a checkpoint `checkpoints/phema_<σ_rel>/<step>` (the full state of that
step, else the newest, with its EMA replaced; checksummed like every checkpoint) that
`python -m scgcm.sample --checkpoint phema_<σ_rel>` samples.
"""

from collections.abc import Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from scgcm.core.ema import sigma_rel_to_gamma
from scgcm.core.phema import accumulate, finish, solve_coefficients
from scgcm.errors import UserError
from scgcm.run.checkpoint import Checkpointer
from scgcm.run.load import load_run_config, phema_checkpoint_name, state_skeleton


def checkpoint_name(sigma_rel: float) -> str:
    """'phema_0.080': the checkpoint folder (and `scgcm.sample --checkpoint`) of a reconstructed σ_rel, one per
    σ_rel ('phema_0.0801' when three decimals would not be exact; `run.load.phema_checkpoint_name`)."""
    return phema_checkpoint_name(sigma_rel)


def distinct_sigma_rels(sigma_rels: Sequence[float]) -> tuple[float, ...]:
    """The σ_rel to reconstruct, each once (in the order given); a UserError if there is none or one is
    out of range."""
    if not sigma_rels:
        raise UserError("--sigma-rel: give at least one σ_rel (e.g. --sigma-rel 0.05 0.1)")
    for s in sigma_rels:
        try:
            sigma_rel_to_gamma(s)
        except ValueError as e:
            raise UserError(f"--sigma-rel {s}: {e}") from None
    return tuple(dict.fromkeys(float(s) for s in sigma_rels))


def reconstruct(workdir: Path, sigma_rels: Sequence[float], step: int | None = None) -> tuple[dict[float, Path], int]:
    """Write `checkpoints/phema_<σ>/<step>` for each distinct σ_rel; returns ({σ: folder}, step)."""
    cfg = load_run_config(workdir)
    if not cfg.phema:
        raise UserError(f"{workdir}: the run was not trained with --config.phema (no power-function EMA snapshots)")
    sigma_rels = distinct_sigma_rels(sigma_rels)
    with Checkpointer(workdir / "checkpoints") as ckpt:  # closed on every path, errors included
        return _reconstruct(workdir, cfg, ckpt, sigma_rels, step)


def _reconstruct(workdir: Path, cfg, ckpt: Checkpointer, sigma_rels: tuple[float, ...],
                 step: int | None) -> tuple[dict[float, Path], int]:
    available = ckpt.steps("phema")
    if not available or (step is not None and step not in available):  # between snapshots the fit would extrapolate
        raise UserError(f"{workdir / 'checkpoints' / 'phema'}: no snapshot" + (f" at --step {step}" if step is not None else "")
                        + f" (snapshots: {', '.join(map(str, available)) or 'none'})")
    steps = [s for s in available if step is None or s <= step]
    target = steps[-1]
    skeleton = state_skeleton(cfg)
    stored = cfg.phema_sigma_rels
    snap_t = np.repeat(np.asarray(steps, np.float64), len(stored))
    snap_gamma = np.tile([sigma_rel_to_gamma(s) for s in stored], len(steps))
    restored = ckpt.restore(skeleton, step=target) if target in ckpt.steps() else ckpt.restore(skeleton)
    if restored is None:
        raise UserError(f"{workdir / 'checkpoints' / 'latest'}: no readable checkpoint")
    state = jax.tree_util.tree_map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, restored[0])
    out = {}
    coefficients = {s: solve_coefficients(snap_t, snap_gamma, target, sigma_rel_to_gamma(s)) for s in sigma_rels}
    total = {s: None for s in sigma_rels}
    for i, at in enumerate(steps):  # one snapshot in memory at a time
        try:
            snapshot = ckpt.restore_phema(skeleton.phema, at)
        except UserError as e:
            raise UserError(f"{e}; the fit at step {target} needs every snapshot up to it: move this one aside "
                            f"(to {ckpt.step_dir(at, 'phema').with_name(f'corrupt-{at}')}) to fit without it, or pass "
                            "--step with an earlier snapshot") from None
        for s in sigma_rels:
            total[s] = accumulate(total[s], list(snapshot), coefficients[s][i * len(stored):(i + 1) * len(stored)])
    for s in sigma_rels:
        name = checkpoint_name(s)
        ckpt.save_named(name, target, eqx.tree_at(lambda st: st.ema, state, finish(total[s], state.ema)))
        out[s] = ckpt.directory / name / str(target)
        print(f"σ_rel {name.removeprefix('phema_')} (γ = {sigma_rel_to_gamma(s):.3f}) at step {target} from {len(steps)} "
              f"snapshots × {len(stored)} EMAs -> {out[s]}  (sample with --checkpoint {name})")
    return out, target
