"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", §3 and Appendix C).

    python -m scgcm.phema RUN --sigma-rel 0.08 [0.12 ...] [--fid [--num N] [--modes onestep ...]]

A power-function EMA of exponent γ averages the weights of updates τ = 1 … t with a profile
∝ τ^γ; its width relative to t is σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))). With `--config.phema`
training keeps two of them (σ_rel 0.05 and 0.10) beside the usual EMA and saves a snapshot of both
at every checkpoint (`checkpoints/phema/<step>`, all kept). Any other σ_rel is then a linear
combination of the snapshots (`scgcm.core.phema`). This CLI writes it as a
checkpoint `checkpoints/phema_<σ_rel>/<step>` (the full state of that step, else the newest, with
its EMA replaced; checksummed like every checkpoint) that
`python -m scgcm.sample --workdir RUN --checkpoint phema_0.080` samples; with `--fid` it also
prints the FID of each σ_rel, and plots FID against σ_rel in RUN/phema_fid.png.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from scgcm.errors import UserError, run_cli
from scgcm.eval.fid import check_sample_count, fid_label
from scgcm.eval.plot import plot_lines
from scgcm.eval.scores import describe_scores, flat_scores
from scgcm.run.load import load_run_config, load_state, run_evaluator, run_extractor, run_network
from scgcm.run.posthoc import checkpoint_name, distinct_sigma_rels, reconstruct
from scgcm.run.rundir import dumps_finite, use_compile_cache
from scgcm.run.sweep import check_modes


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


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(PhemaArgs, args=sys.argv[1:] if argv is None else argv, description=__doc__)
    workdir = Path(args.workdir)
    if not (workdir / "config.json").is_file():
        raise UserError(f"{workdir}: not a run directory (no config.json)")
    cfg = load_run_config(workdir)
    distinct_sigma_rels(args.sigma_rel)  # before any --fid work
    use_compile_cache(args.compile_cache)
    if args.fid:  # every --fid input (and the reference) before the reconstruction
        check_modes(args.modes)
        check_sample_count(args.num, "--num", warn=False)  # FIDEvaluator warns below MIN_SAMPLES
        extractor = run_extractor(cfg, args.batch_size)
        evaluator, ref_name = run_evaluator(cfg, extractor, modes=args.modes, num=args.num,
                                                   batch_size=args.batch_size, seed=args.seed,
                                                   fid_ref=args.fid_ref or cfg.fid.ref)
    sigma_rels = distinct_sigma_rels(args.sigma_rel)  # none is an error; each once
    written, target = reconstruct(workdir, sigma_rels, args.step)
    if not args.fid:
        return 0
    results, label = {}, fid_label(args.num, run_network(cfg))
    for s in sigma_rels:
        state, _ = load_state(workdir, cfg, checkpoint_name(s))
        results[s] = evaluator.evaluate(state.ema)
        print(f"σ_rel {checkpoint_name(s).removeprefix('phema_')}: {label} {describe_scores(results[s])} "
              f"(against {ref_name})")
    record = {"step": target, "num": args.num, "seed": args.seed, "label": label, "reference": ref_name,
              "results": [{"sigma_rel": s, **flat_scores(r)} for s, r in results.items()]}
    (workdir / "phema_fid.json").write_text(dumps_finite(record, indent=2) + "\n")
    series = {m: [(s, r[m]["fid"]) for s, r in results.items()] for m in args.modes}
    plot_lines(series, workdir / "phema_fid.png", xlabel="σ_rel", ylabel=f"{label}, step {target}")
    print(f"wrote {workdir / 'phema_fid.json'}, {workdir / 'phema_fid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
