"""`python -m scgcm.train --config.variant score|vanilla [--config.preset smoke] [--config.workdir DIR]`

Trains (or resumes) a run: `scgcm.run.loop` reads top to bottom, validate, lock the run directory, resume
checks, data, model, resume, then one loop of (batch, jitted updates, log, sample grids, checkpoint + FID);
final samples at the end. An existing run directory is resumed from its newest readable checkpoint.
SIGTERM/SIGINT write a checkpoint of the current step and exit; a second signal (a second or more later)
exits at once; a signal during the final sampling (the checkpoint is written by then) exits at once, saying
how to finish with scgcm.sample.
"""

import signal
import sys
from dataclasses import dataclass

import jax
import tyro

from scgcm.parallel import distributed
from scgcm.run.config import PRESETS, TrainConfig, apply_recipe, validate_config, with_variant_workdir
from scgcm.run.loop import train


@dataclass
class Args:
    config: TrainConfig


def _flag(argv: list[str], name: str) -> str | None:
    """The value of the last `name VALUE` or `name=VALUE` in argv."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        elif a == name and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def parse(argv: list[str]) -> TrainConfig:
    """tyro CLI whose defaults come from the preset named by --config.preset (paper by default), with
    the choices of --config.recipe applied; any other flag given still wins."""
    preset = _flag(argv, "--config.preset") or "paper"
    recipe = "ict" if _flag(argv, "--config.recipe") == "ict" else "reference"
    default = apply_recipe(PRESETS.get(preset, PRESETS["paper"]), recipe)
    return tyro.cli(Args, args=argv, default=Args(default), description=__doc__).config


def run(argv: list[str]) -> int:
    """The CLI; bad input raises UserError (see `main`)."""
    cfg = with_variant_workdir(parse(argv))
    distributed.initialize(cfg.distributed, cfg.coordinator, cfg.num_processes, cfg.process_id,
                           init_timeout=cfg.distributed_timeout, heartbeat_timeout=cfg.heartbeat_timeout)
    errors = validate_config(cfg, num_devices=jax.device_count())
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    """`run` under the one-line error rule: a UserError is `error: …` and exit code 2 (traceback with --debug).
    In a multi-process run a failed process leaves at once (`distributed.exit_now`); a stop on a signal,
    agreed by all processes at the same step, ends normally."""
    return distributed.run_cli_or_leave(run, argv, normal=(0, 128 + signal.SIGTERM, 128 + signal.SIGINT))


if __name__ == "__main__":
    sys.exit(main())
