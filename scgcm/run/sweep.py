"""The checkpoint sweep: FID, precision and recall of every saved checkpoint of a run
(checkpoints/latest/<step>) that metrics.jsonl holds no FID of yet, appended there, fid.png redrawn.
It only reads the checkpoints, so it can run beside training on another device.
"""

from pathlib import Path

from scgcm.errors import UserError
from scgcm.eval import fid
from scgcm.eval.scores import describe_scores, flat_scores
from scgcm.parallel.generate import MODES
from scgcm.run.checkpoint import Checkpointer
from scgcm.run.load import load_run_config, run_evaluator, run_extractor, run_network, state_skeleton
from scgcm.run.metrics import NUM_KEY, evaluated_steps, plot_fid
from scgcm.run.rundir import append_record


def check_modes(modes: tuple[str, ...]) -> None:
    """UserError unless `modes` are distinct sampling modes that need no options (not multistep)."""
    if unknown := [m for m in modes if m not in MODES or m == "multistep"]:
        raise UserError(f"--modes {' '.join(unknown)}: choose from onestep, twostep, heun")
    if not modes or len(set(modes)) != len(modes):
        raise UserError(f"--modes must name distinct modes, at least one (got {' '.join(modes)})")


def saved_steps(checkpoints: Path) -> list[int]:
    """Steps of the complete checkpoints in checkpoints/latest (orbax's temporary folders are not digits)."""
    folder = checkpoints / "latest"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def pending_steps(workdir: Path, modes: tuple[str, ...]) -> list[int]:
    """Saved checkpoints whose FID of some mode is not yet in metrics.jsonl."""
    done = evaluated_steps(workdir / "metrics.jsonl", modes)
    return [s for s in saved_steps(workdir / "checkpoints") if s not in done]


def sweep(workdir: Path, *, modes: tuple[str, ...] | None = None, num: int | None = None,
          batch_size: int | None = None, seed: int | None = None, fid_ref: str | None = None,
          extractor: fid.Extractor | None = None) -> list[int]:
    """Evaluate every pending checkpoint (oldest first), appending to metrics.jsonl; returns their steps.
    A checkpoint that training removed meanwhile, or that cannot be read, is skipped with a message.
    Each argument left None is the run's `--config.fid.*`."""
    cfg = load_run_config(workdir)
    modes = modes or cfg.fid.modes
    num, batch_size = num or cfg.fid.num, batch_size or cfg.fid.batch_size
    seed = cfg.fid.seed if seed is None else seed
    check_modes(modes)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    fid.check_sample_count(num, "--num", warn=False)  # FIDEvaluator warns below MIN_SAMPLES
    pending = pending_steps(workdir, modes)
    if not pending:
        print(f"{workdir}: every saved checkpoint has a FID of {', '.join(modes)}")
        return []
    extractor = extractor or run_extractor(cfg, batch_size)
    evaluator, ref_name = run_evaluator(cfg, extractor, modes=modes, num=num, batch_size=batch_size, seed=seed,
                                        fid_ref=fid_ref or cfg.fid.ref)
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    skeleton = state_skeleton(cfg)
    label = fid.fid_label(num, run_network(cfg))
    done = []
    try:
        for step in pending:
            try:
                state, _ = ckpt.restore(skeleton, step=step)
            except UserError as e:  # removed by training since we listed it (it keeps the last few), or damaged
                print(f"step {step}: skipped ({e})", flush=True)
                continue
            results = evaluator.evaluate(state.ema)
            append_record(workdir / "metrics.jsonl", step, {**flat_scores(results), NUM_KEY: num})
            plot_fid(workdir / "metrics.jsonl", workdir / "fid.png", network=run_network(cfg))
            print(f"step {step}: {label} {describe_scores(results)} (against {ref_name})", flush=True)
            done.append(step)
    finally:
        ckpt.close()
    return done
