"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", §3 and Appendix C).

    python -m scgcm.phema RUN --sigma-rel 0.08 [0.12 ...] [--fid [--num N] [--modes onestep ...]]

A power-function EMA of exponent γ averages the weights of updates τ = 1 … t with a profile
∝ τ^γ; its width relative to t is σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))). With `--config.phema`
training keeps two of them (σ_rel 0.05 and 0.10) beside the usual EMA and saves a snapshot of both
at every checkpoint (`checkpoints/phema/<step>`, all kept). Any other σ_rel is then a linear
combination of the snapshots: the one whose profile is closest in L2 to the wanted profile, from
the closed-form inner products of power profiles (a least-squares solve). This CLI writes it as a
checkpoint `checkpoints/phema_<σ_rel>/<step>` (the full state of that step, else the newest, with
its EMA replaced; checksummed like every checkpoint) that
`python -m scgcm.sample --workdir RUN --checkpoint phema_0.080` samples; with `--fid` it also
prints the FID of each σ_rel, and plots FID against σ_rel in RUN/phema_fid.png.
"""

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jaxtyping import Array, Float, Int, PyTree

from scgcm.errors import UserError

DEFAULT_SIGMA_RELS = (0.05, 0.10)
ArrayOrScalar = Float[np.ndarray, "..."] | float | int


# ------------------------------------------------------------------------------------------ math


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative std of the power profile ∝ τ^γ on [0, 1] (paper eq. 123)."""
    g = np.float64(gamma)
    return float(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ with `gamma_to_sigma_rel(γ) = sigma_rel`: the largest real root of
    γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0 (paper eq. 126, Algorithm 2)."""
    if not 0 < sigma_rel < gamma_to_sigma_rel(0.0):  # γ = 0 (uniform average) is the widest profile
        raise ValueError(f"sigma_rel must lie in (0, {gamma_to_sigma_rel(0.0):.4f}), got {sigma_rel}")
    t = np.float64(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_ema_beta(step: Int[Array, ""] | int, gamma: float) -> Float[Array, ""]:
    """Decay of the power-function EMA at update `step` (1 at the first): β = (1 − 1/step)^(γ+1)
    (paper eq. 127 with one update per step), so that the first update copies the weights."""
    t = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def power_ema_update(ema: PyTree, params: PyTree, step: Int[Array, ""], gamma: float) -> PyTree:
    """θ̂ ← β θ̂ + (1 − β) θ with β = power_ema_beta(step, γ)."""
    beta = power_ema_beta(step, gamma)
    return jax.tree_util.tree_map(lambda e, p: (beta * e + (1 - beta) * p).astype(e.dtype), ema, params)


def power_ema_weights(t: int, gamma: float | int) -> Float[np.ndarray, " t"]:
    """Weights of θ_1 … θ_t in the power EMA after update t: (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1)
    (the product of the β's above; they sum to 1)."""
    tau = np.arange(1, t + 1, dtype=np.float64)
    return (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / np.float64(t) ** (gamma + 1)


def profile_inner_product(t_a: ArrayOrScalar, gamma_a: ArrayOrScalar, t_b: ArrayOrScalar,
                          gamma_b: ArrayOrScalar) -> Float[np.ndarray, "..."] | np.float64:
    """∫ p_a p_b dτ of the continuous power profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]:
    (γa+1)(γb+1) / ((γa+γb+1) t_max) · (t_min/t_max)^γ, γ that of the longer profile (paper eq. 151)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    t_max, ratio = np.maximum(t_a, t_b), np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
    gamma_long = np.where(t_a < t_b, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_max) * ratio**gamma_long


def solve_coefficients(snapshot_t: Float[np.ndarray, " n"], snapshot_gamma: Float[np.ndarray, " n"],
                       target_t: float | int, target_gamma: float) -> Float[np.ndarray, " n"]:
    """x minimising ‖p_target − Σᵢ xᵢ pᵢ‖² over the snapshot profiles (normal equations A x = b with
    A_ij = ⟨pᵢ, pⱼ⟩, b_i = ⟨pᵢ, p_target⟩), rescaled to sum to 1 as in the reference (Algorithm 3)."""
    t, g = np.asarray(snapshot_t, np.float64), np.asarray(snapshot_gamma, np.float64)
    a = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner_product(t, g, np.float64(target_t), np.float64(target_gamma))
    x = np.linalg.solve(a, b)
    return x / x.sum()


def accumulate(total: PyTree | None, trees: Sequence[PyTree], coefficients: Float[np.ndarray, " n"] | Sequence[float]) -> PyTree:
    """total + Σᵢ cᵢ treeᵢ over the inexact arrays, as float64 host arrays (None: start from zero)."""
    arrays = [jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), eqx.filter(t, eqx.is_inexact_array))
              for t in trees]
    part = jax.tree_util.tree_map(lambda *xs: sum(np.float64(c) * x for c, x in zip(coefficients, xs)), *arrays)
    return part if total is None else jax.tree_util.tree_map(np.add, total, part)


def finish(total: PyTree, like: PyTree) -> PyTree:
    """An `accumulate` total cast back to the dtypes of `like`, with its other leaves."""
    arrays = eqx.filter(like, eqx.is_inexact_array)
    return eqx.combine(jax.tree_util.tree_map(lambda s, x: jnp.asarray(s, x.dtype), total, arrays), like)


def combine(trees: Sequence[PyTree], coefficients: Float[np.ndarray, " n"] | Sequence[float]) -> PyTree:
    """Σᵢ cᵢ treeᵢ of the inexact arrays (summed in float64); other leaves from trees[0]."""
    return finish(accumulate(None, trees, coefficients), trees[0])


# ------------------------------------------------------------------------------------------- CLI


def checkpoint_name(sigma_rel: float) -> str:
    """'phema_0.080': the checkpoint folder (and `scgcm.sample --checkpoint`) of a reconstructed σ_rel."""
    return f"phema_{sigma_rel:.3f}"


@dataclass(frozen=True)
class PhemaArgs:
    workdir: tyro.conf.Positional[str]
    """Run directory trained with --config.phema."""
    sigma_rel: tuple[float, ...] = (0.05, 0.075, 0.10, 0.15)
    """Relative EMA lengths to reconstruct (EDM2's best for CIFAR-scale models lie around 0.05–0.15)."""
    step: int | None = None
    """Reconstruct the EMA at this snapshot's update (the snapshots up to it are used); default: the newest."""
    fid: bool = False
    """Also compute the FID of each σ_rel (and plot FID against σ_rel in RUN/phema_fid.png)."""
    modes: tuple[str, ...] = ("onestep",)
    """Sampling modes for --fid."""
    num: int = 50_000
    """Samples per σ_rel and mode for --fid."""
    batch_size: int = 256
    """Sampling and Inception batch for --fid."""
    seed: int = 42
    """Seed of the --fid latents (the same for every σ_rel)."""
    fid_ref: str | None = None
    """Reference statistics .npz for --fid (default: the run's --config.fid.ref, else its data, cached)."""
    compile_cache: str = "auto"
    """XLA's persistent compilation cache: 'auto', a folder, or 'off'."""


def reconstruct(workdir: Path, sigma_rels: Sequence[float], step: int | None = None) -> tuple[dict[float, Path], int]:
    """Write `checkpoints/phema_<σ>/<step>` for each σ_rel; returns ({σ: folder}, step)."""
    from scgcm.checkpoint import Checkpointer
    from scgcm.sample import load_run_config, state_skeleton

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


def main(argv: list[str] | None = None) -> int:
    import functools

    from scgcm import sample
    from scgcm.evaluate import check_modes, describe_scores, flat_scores, plot_lines
    from scgcm.fid import check_sample_count, fid_label
    from scgcm.rundir import dumps_finite, use_compile_cache

    args = tyro.cli(PhemaArgs, args=sys.argv[1:] if argv is None else argv, description=__doc__)
    workdir = Path(args.workdir)
    if not (workdir / "config.json").is_file():
        raise UserError(f"{workdir}: not a run directory (no config.json)")
    cfg = sample.load_run_config(workdir)
    use_compile_cache(args.compile_cache)
    if args.fid:  # every --fid input (and the reference) before the reconstruction
        check_modes(args.modes)
        check_sample_count(args.num, "--num", warn=False)  # FIDEvaluator warns below MIN_SAMPLES
        extractor = functools.cache(lambda: sample.fid_extractor(args.batch_size))
        evaluator, ref_name = sample.run_evaluator(cfg, extractor, modes=args.modes, num=args.num,
                                                   batch_size=args.batch_size, seed=args.seed,
                                                   fid_ref=args.fid_ref or cfg.fid.ref)
    written, target = reconstruct(workdir, args.sigma_rel, args.step)
    if not args.fid:
        return 0
    results = {}
    for s in args.sigma_rel:
        state, _ = sample.load_state(workdir, cfg, checkpoint_name(s))
        results[s] = evaluator.evaluate(state.ema)
        print(f"σ_rel {s:.3f}: {fid_label(args.num)} {describe_scores(results[s])} (against {ref_name})")
    record = {"step": target, "num": args.num, "seed": args.seed, "label": fid_label(args.num), "reference": ref_name,
              "results": [{"sigma_rel": s, **flat_scores(r)} for s, r in results.items()]}
    (workdir / "phema_fid.json").write_text(dumps_finite(record, indent=2) + "\n")
    series = {m: [(s, r[m]["fid"]) for s, r in results.items()] for m in args.modes}
    plot_lines(series, workdir / "phema_fid.png", xlabel="σ_rel", ylabel=f"{fid_label(args.num)}, step {target}")
    print(f"wrote {workdir / 'phema_fid.json'}, {workdir / 'phema_fid.png'}")
    return 0


if __name__ == "__main__":
    from scgcm.errors import run_cli

    sys.exit(run_cli(main))
