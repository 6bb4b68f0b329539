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
from scgcm.run.load import load_run_config, state_skeleton


def checkpoint_name(sigma_rel: float) -> str:
    """'phema_0.080': the checkpoint folder (and `scgcm.sample --checkpoint`) of a reconstructed σ_rel."""
    return f"phema_{sigma_rel:.3f}"


def reconstruct(workdir: Path, sigma_rels: Sequence[float], step: int | None = None) -> tuple[dict[float, Path], int]:
    """Write `checkpoints/phema_<σ>/<step>` for each σ_rel; returns ({σ: folder}, step)."""
    cfg = load_run_config(workdir)
    if not cfg.phema:
        raise UserError(f"{workdir}: the run was not trained with --config.phema (no power-function EMA snapshots)")
    for s in sigma_rels:
        try:
            sigma_rel_to_gamma(s)
        except ValueError as e:
            raise UserError(f"--sigma-rel {s}: {e}") from None
    ckpt = Checkpointer(workdir / "checkpoints")
    available = ckpt.steps("phema")
    if not available or (step is not None and step not in available):  # between snapshots the fit would extrapolate
        ckpt.close()
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
        ckpt.close()
        raise UserError(f"{workdir / 'checkpoints' / 'latest'}: no readable checkpoint")
    state = jax.tree_util.tree_map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, restored[0])
    out = {}
    coefficients = {s: solve_coefficients(snap_t, snap_gamma, target, sigma_rel_to_gamma(s)) for s in sigma_rels}
    total = {s: None for s in sigma_rels}
    for i, at in enumerate(steps):  # one snapshot in memory at a time
        snapshot = ckpt.restore_phema(skeleton.phema, at)
        for s in sigma_rels:
            total[s] = accumulate(total[s], list(snapshot), coefficients[s][i * len(stored):(i + 1) * len(stored)])
    for s in sigma_rels:
        name = checkpoint_name(s)
        ckpt.save_named(name, target, eqx.tree_at(lambda st: st.ema, state, finish(total[s], state.ema)))
        out[s] = ckpt.directory / name / str(target)
        print(f"σ_rel {s:.3f} (γ = {sigma_rel_to_gamma(s):.3f}) at step {target} from {len(steps)} snapshots "
              f"× {len(stored)} EMAs -> {out[s]}  (sample with --checkpoint {name})")
    ckpt.close()
    return out, target
