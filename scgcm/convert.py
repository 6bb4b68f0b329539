"""`python -m scgcm.convert ORIGINAL_CKPT_DIR --workdir RUN [--step N] [--original-config FILE] [--config.* overrides]`

Turns a checkpoint of the original code (github:boingkiri/stabilizing_consistency, Flax + orbax) into an scgcm
run directory that `scgcm.sample`, `scgcm.fid`, `scgcm.edit`, `scgcm.evaluate` and `scgcm.train` (resume) use
like any other. ORIGINAL_CKPT_DIR is the original's experiment folder (`experiments/<exp_name>`, holding
`config.yaml` and `checkpoints/<step>/{diffusion,head}`) or its `checkpoints/` folder; give it first.

The configuration starts from scgcm's paper defaults, takes the original's `config.yaml` values that decide
the architecture and the training (`scgcm.run.original.config_from_original` lists them; `--original-config`
names the file if it is not beside the checkpoints; without one the original's shipped config is assumed,
which is the paper's), then any `--config.*` flag of `scgcm.train` on top (`--config.workdir` is `--workdir`).
The model gets `params`, the EMA `params_ema`, the optimizer RAdam's `mu`, `nu` and `count` of both
networks (the same RAdam as scgcm's, so a resumed run makes the updates the original would have), the step
the number of updates (`gradient_step`). A checkpoint that does not match the architecture is one line
naming the first array that differs (exit code 2).
"""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jax
import tyro

from scgcm.errors import UserError, run_cli
from scgcm.run import original
from scgcm.run.config import TrainConfig, validate_config


@dataclass(frozen=True)
class ConvertArgs:
    original: tyro.conf.Positional[str] = ""
    """The original's experiment folder (with config.yaml and checkpoints/) or its checkpoints/ folder."""
    workdir: str = ""
    """The scgcm run directory to write (new, or without checkpoints)."""
    step: int | None = None
    """The original checkpoint (its folder number) to convert; default: the newest."""
    original_config: str | None = None
    """The original's resolved config.yaml, if it is not in the experiment folder."""
    config: TrainConfig = field(default_factory=TrainConfig)
    """The run's configuration (defaults: the paper's, with the original's config.yaml values applied)."""


@dataclass(frozen=True)
class _Paths:
    original: tyro.conf.Positional[str] = ""
    workdir: str = ""
    step: int | None = None
    original_config: str | None = None


def _yaml_path(args: _Paths) -> Path | None:
    if args.original_config:
        return Path(args.original_config)
    return original.find_source(Path(args.original))[1] if args.original else None


def parse(argv: list[str]) -> tuple[ConvertArgs, str]:
    """The arguments, whose --config defaults are the paper's with the original's config.yaml applied, and
    where that configuration came from."""
    base, source = TrainConfig(), "the original's shipped configs/config.yaml (the paper's values)"
    if not {"-h", "--help"} & set(argv):
        paths, _ = tyro.cli(_Paths, args=argv, return_unknown_args=True)
        yaml_path = _yaml_path(paths)
        if yaml_path is not None:
            if not yaml_path.is_file():
                raise UserError(f"--original-config {yaml_path}: no such file")
            base, source = original.config_from_original(original.read_yaml(yaml_path), base, str(yaml_path)), str(yaml_path)
    args = tyro.cli(ConvertArgs, args=argv, default=ConvertArgs(config=base), description=__doc__)
    return args, source


def main(argv: list[str] | None = None) -> int:
    args, source = parse(list(sys.argv[1:] if argv is None else argv))
    if not args.original:
        raise UserError("give the original's experiment or checkpoints folder: python -m scgcm.convert DIR --workdir RUN")
    if not args.workdir:
        raise UserError("--workdir RUN is required: the scgcm run directory to write")
    workdir = Path(args.workdir)
    original.check_new_run(workdir)
    folder, _ = original.find_source(Path(args.original))
    step_dir = original.pick_step(folder, args.step)
    cfg = dataclasses.replace(args.config, workdir=args.workdir)

    found = original.read_checkpoint(step_dir)
    original.check_arrays(step_dir, found, cfg, source)
    state, step, notes = original.convert_state(found, cfg)
    resumable = original.resumable(cfg, step)
    if resumable != cfg:
        notes.append(f"--config.steps-per-call {cfg.steps_per_call} → {resumable.steps_per_call}, so that training can "
                     f"resume at update {step}")
    errors = validate_config(resumable, num_devices=jax.device_count())
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    record = {"source": str(step_dir.absolute()), "folder_step": int(step_dir.name), "step": step,
              "config_from": source, "notes": notes}
    where = original.write_run(workdir, resumable, state, step, record)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"converted {step_dir} (update {step}; configuration from {source}) into {where}: model (params), "
          f"EMA (params_ema), RAdam state of torso and head. Sample with: python -m scgcm.sample --workdir {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
