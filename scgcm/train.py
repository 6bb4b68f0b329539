"""`python -m scgcm.train --config.variant score|vanilla [--config.preset smoke] [--config.workdir DIR]`

Read top to bottom: validate, lock the run directory, resume checks, data, model, resume, then one
loop of (batch, jitted updates, log, sample grids, checkpoint + FID); final samples at the end. An
existing run directory is resumed from its newest readable checkpoint. SIGTERM/SIGINT write a
checkpoint of the current step and exit; a second signal (a second or more later) exits at once; a signal during the final
sampling (the checkpoint is written by then) exits at once, saying how to finish with scgcm.sample.
"""

import dataclasses
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tqdm.auto import tqdm

from scgcm import data as data_lib
from scgcm import device_data, distributed
from scgcm import fid as fid_lib
from scgcm import inception
from scgcm.checkpoint import Checkpointer, NoReadableCheckpoint
from scgcm.config import PRESETS, TrainConfig, apply_recipe, build_loss, build_schedule, build_state, validate_config, with_variant_workdir
from scgcm.errors import UserError
from scgcm.evaluate import NUM_KEY, FIDEvaluator, data_reference, describe_scores, flat_scores, plot_fid
from scgcm.generate import generate, make_sampler
from scgcm.model import count_params
from scgcm.parallel import global_batch, make_mesh, make_train_fn, replicate
from scgcm.phema import sigma_rel_to_gamma
from scgcm.rundir import (MetricsLog, RunLock, close_logging, config_changes, log_to_file, previous_config, save_grid,
                          setup_logging, use_compile_cache, write_config)
from scgcm.state import make_optimizer

GRID_MODES = ("onestep", "heun")


class StopSignal:
    """First SIGTERM/SIGINT: ask the loop to checkpoint and stop. Second (DUPLICATE_S or more later): exit at once.

    Signals are counted by a watcher thread reading Python's signal wakeup fd, so a second
    signal acts even while the main thread is inside a long compile or a jitted call.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    DUPLICATE_S = 1.0
    """A second signal this soon after the first is the same request delivered twice: `timeout` and
    schedulers (SLURM) signal both the process and its process group. Only a later one exits at once."""

    def __init__(self):
        self.signum: int | None = None
        self._first_at = 0.0
        self._exit_message: str | None = None
        self._on_exit = None
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = {s: signal.signal(s, lambda *_: None) for s in self.SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, daemon=True, name="scgcm-signals").start()

    def _watch(self) -> None:
        while data := os.read(self._read, 1):
            signum = data[0]
            if signum not in self.SIGNALS:
                continue
            name = signal.Signals(signum).name
            if self._exit_message is not None:
                message = f"{name} {self._exit_message}"
                sys.stderr.write(f"\n{message}\n")
                sys.stderr.flush()
                if self._on_exit is not None:
                    self._on_exit(message)
                os._exit(128 + signum)
            if self.signum is not None:
                if time.monotonic() - self._first_at < self.DUPLICATE_S:
                    continue
                sys.stderr.write(f"\nsecond signal {name}: exiting now\n")
                sys.stderr.flush()
                os._exit(128 + signum)
            self.signum, self._first_at = signum, time.monotonic()
            sys.stderr.write(f"\n{name}: saving a checkpoint, then exiting (signal again to exit now)\n")
            sys.stderr.flush()

    def exit_at_once(self, message: str, on_exit=None) -> None:
        """From now on a signal exits at once with 128 + signum, after printing '<SIGNAL> <message>'
        and passing that line to `on_exit` (for log.txt)."""
        self._on_exit = on_exit
        self._exit_message = message

    def restore(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        os.close(self._write)


class NonFiniteError(RuntimeError):
    pass


def load_training_images(cfg: TrainConfig) -> np.ndarray:
    m = cfg.model
    if cfg.data.source == "synthetic":
        return data_lib.synthetic_images(cfg.data.synthetic_size, image_size=m.image_size, channels=m.channels, seed=cfg.seed)
    return data_lib.load_images(cfg.data.source, split=cfg.data.split, image_size=m.image_size, channels=m.channels)


def first_bad_update(metrics: dict[str, np.ndarray]) -> tuple[int, str] | None:
    """(index in the call, name of the first non-finite term) or None."""
    for j in range(len(metrics["finite_ct"])):
        for name, flag in (("consistency loss (loss_ct)", "finite_ct"), ("DSM loss (loss_dsm)", "finite_dsm"),
                           ("gradient", "finite_grad")):
            if not metrics[flag][j]:
                return j, name
    return None


def train(cfg: TrainConfig, *, extractor: fid_lib.FeatureExtractor | None = None) -> int:
    """Run (or resume) training; returns the process exit code. `extractor` gives the FID features
    (default: the standard Inception network; tests pass a cheap stand-in). The run directory is locked
    for the whole call; a fatal error (a UserError or any other exception) is also written to log.txt."""
    launched = time.perf_counter()
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = log = None
    try:
        lock = RunLock(workdir) if jax.process_index() == 0 else None  # one trainer per run directory
        log = setup_logging(workdir, jax.process_index())  # log.txt: process 0's
        if lock is not None and getattr(lock, "stale", ""):
            log.info("%s was left by a trainer that ended without releasing it (%s)", lock.path, lock.stale)
        return _train(cfg, workdir, log, launched, extractor)
    except UserError as e:
        log_to_file(workdir, str(e))  # the CLI prints it on stderr
        raise
    except Exception:
        log_to_file(workdir, "fatal error: " + traceback.format_exc().rstrip())
        raise
    finally:
        if log is not None:
            close_logging(log)
        if lock is not None:
            lock.release()


def check_resume(cfg: TrainConfig, workdir: Path) -> None:
    """Before anything is written: a run directory with checkpoints may only be resumed with the same
    run-math configuration (rundir.MATH_FIELDS) unless --config.allow-config-change, and its
    checkpoints folder must be writable."""
    folder = workdir / "checkpoints"
    has_checkpoints = (folder / "latest").is_dir() and any(p.name.isdigit() for p in (folder / "latest").iterdir())
    previous = previous_config(workdir) if has_checkpoints else None
    if previous is not None and not cfg.allow_config_change:
        changes = config_changes(previous, dataclasses.asdict(cfg))
        if changes:
            raise UserError(f"--config.workdir {workdir}: its checkpoints were made with another configuration "
                            f"({'; '.join(changes)}); pass --config.allow-config-change to resume anyway, "
                            "or use another --config.workdir")
    try:  # a file named checkpoints, a read-only folder: found now, not at the first save
        (folder / "latest").mkdir(parents=True, exist_ok=True)
        probe = folder / "latest" / f".write-test-{jax.process_index()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--config.workdir {workdir}: cannot write checkpoints in {folder} "
                        f"({type(e).__name__}: {e.strerror or e})") from None


def _train(cfg: TrainConfig, workdir: Path, log, launched: float,
           extractor: fid_lib.FeatureExtractor | None) -> int:
    check_resume(cfg, workdir)
    if jax.process_index() == 0:
        write_config(workdir, cfg)
    cache = use_compile_cache(cfg.compile_cache)
    log.info("XLA compilation cache: %s", cache or "off")
    m = cfg.model
    shape = (m.channels, m.image_size, m.image_size)
    n = cfg.steps_per_call

    # resume first (shapes only, nothing compiled), so that an unreadable run stops before any heavy work
    optim = make_optimizer(cfg.optim.torso_lr, cfg.optim.head_lr)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints, best_modes=cfg.fid.modes if cfg.fid.enabled else ())
    try:
        try:
            skeleton = eqx.filter_eval_shape(build_state, cfg, optim) if ckpt.steps() else None
            restored = ckpt.restore(skeleton, move_aside=True) if skeleton is not None else None
        except NoReadableCheckpoint as e:
            if not cfg.restart_from_scratch:
                raise UserError(f"{e}. Not starting again from step 0: check the disk, mount and permissions; "
                                "or pass --config.restart-from-scratch (the unreadable checkpoints are moved aside), "
                                f"or move {ckpt.directory} aside") from None
            for s in ckpt.steps():
                ckpt.move_aside(s)
            log.warning("every checkpoint in %s was unreadable: moved aside to corrupt-<step>; starting again from "
                        "step 0 (--config.restart-from-scratch)", ckpt.directory / "latest")
            restored = None
        if restored is not None and restored[1] % n:
            raise UserError(f"--config.steps-per-call {n}: the run resumes at step {restored[1]}, which is not a "
                            "multiple of it; use the steps-per-call the run was started with")
        return _run(cfg, workdir, log, launched, extractor, optim, ckpt, restored, shape)
    finally:
        ckpt.close()


def _run(cfg, workdir, log, launched, extractor, optim, ckpt, restored, shape) -> int:
    m = cfg.model
    images = load_training_images(cfg)
    log.info("data: %d images of %s from %s", len(images), images.shape[1:], cfg.data.source or "Hugging Face cifar10")

    mesh = make_mesh()
    if restored is not None:
        (state, step), skipped_total = restored, ckpt.counters.get("skipped_total", 0)
        log.info("resumed from %s at step %d", ckpt.directory / "latest", step)
        written = (ckpt.counters.get("process_count"), ckpt.counters.get("devices_per_process"))
        if None not in written and written != distributed.layout():
            log.info("layout changed: the checkpoint of step %d was written by %s, this run has %s (same global "
                     "batch, same numbers)", step, distributed.describe_layout(*written),
                     distributed.describe_layout(*distributed.layout()))
    else:
        state, step, skipped_total = build_state(cfg, optim), 0, 0
    (tp, ta), (hp, ha) = count_params(state.model.torso), count_params(state.model.head)
    log.info("devices: %s (%d processes)", jax.devices(), jax.process_count())
    log.info("parameters: torso %s in %d arrays, head %s in %d arrays", f"{tp:,}", ta, f"{hp:,}", ha)
    state = replicate(state, mesh)
    fault_nan_step = int(os.environ["SCGCM_FAULT_NAN_STEP"]) if os.environ.get("SCGCM_FAULT_NAN_STEP") else None
    on_device = device_data.fits(images, cfg.device_data_mb, cfg.batch_size) and fault_nan_step is None  # faults: host batches
    log.info("data: %s (%.1f MiB of uint8 images; --config.device-data-mb %g)",
             "kept on every device, batches drawn in the step" if on_device else "host loader",
             images.nbytes / 2**20, cfg.device_data_mb)

    schedule = build_schedule(cfg)
    train_fn = make_train_fn(
        mesh, state, dataset=replicate(images, mesh) if on_device else None, seed=cfg.seed, batch_size=cfg.batch_size,
        steps_per_call=cfg.steps_per_call,
        optim=optim, schedule=schedule, loss_fn=build_loss(cfg), ema_decay=cfg.optim.ema_decay,
        ema_copy_steps=cfg.optim.ema_copy_steps, grad_accum=cfg.grad_accum,
        phema_gammas=tuple(sigma_rel_to_gamma(s) for s in cfg.phema_sigma_rels) if cfg.phema else (),
        compute_dtype=jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None,
    )
    samplers = {mode: make_sampler(mode, shape=shape, sigma_min=m.sigma_min, sigma_max=m.sigma_max,
                                   two_step_sigma=cfg.sample.two_step_sigma, heun_steps=cfg.sample.heun_steps)
                for mode in dict.fromkeys((*GRID_MODES, *cfg.fid.modes, *(cfg.fid.final_modes or ()), "onestep"))}
    evaluator = final_evaluator = None
    if cfg.fid.enabled:
        if extractor is None:
            extractor = fid_lib.FeatureExtractor(inception.load_inception(),  # at most 32 images at a time on a CPU
                                                 batch_size=min(cfg.fid.batch_size, fid_lib.default_batch_size()))
        d = cfg.data
        if cfg.fid.ref:  # precision/recall only if the file holds real features (`scgcm.fid ref --out` writes them)
            ref_stats, ref_features = fid_lib.read_reference(Path(cfg.fid.ref), "--config.fid.ref", need_features=True)
        else:
            ref_stats, ref_features = data_reference(
                d.source, extractor, split=d.split, image_size=m.image_size, channels=m.channels,
                synthetic_size=d.synthetic_size, seed=cfg.seed, need_features=True)
        evaluator = FIDEvaluator(ref_stats, extractor, {mode: samplers[mode] for mode in cfg.fid.modes},
                                 num=cfg.fid.num, batch_size=cfg.fid.batch_size, seed=cfg.fid.seed, mesh=mesh,
                                 ref_features=ref_features)
        final_modes, final_num = cfg.fid.final_modes or cfg.fid.modes, cfg.fid.final_num or cfg.fid.num
        final_evaluator = FIDEvaluator(ref_stats, extractor, {mode: samplers[mode] for mode in final_modes},
                                       num=final_num, batch_size=cfg.fid.batch_size, seed=cfg.fid.seed, mesh=mesh,
                                       ref_features=ref_features)
    metrics_log = MetricsLog(workdir, resume_step=step, tensorboard=cfg.tensorboard, wandb=cfg.wandb, config=cfg)
    # wall-clock seconds of the run over all its starts (set-up and compilation included), for comparisons
    elapsed_before, started_at = metrics_log.last("elapsed_s", 0.0), launched

    def save_grids(at: int) -> None:
        for mode in GRID_MODES:
            grid = generate(state.ema, samplers[mode], seed=cfg.seed, num=cfg.sample.grid_size, batch_size=cfg.sample.batch_size, mesh=mesh)
            if jax.process_index() == 0:
                save_grid(grid, workdir / "samples" / f"{mode}_{at:07d}.png")

    fids: dict[str, float] = {}  # the latest evaluation, shown in the progress bar

    def evaluate_fid(at: int, final: bool = False) -> dict[str, float]:
        which = final_evaluator if final else evaluator
        results = which.evaluate(state.ema)
        scores = {mode: r["fid"] for mode, r in results.items()}
        fids.update(scores)
        metrics_log.write(at, {**flat_scores(results), NUM_KEY: which.num})
        log.info("%s at step %d: %s", fid_lib.fid_label(which.num), at, describe_scores(results))
        if jax.process_index() == 0:
            plot_fid(workdir / "metrics.jsonl", workdir / "fid.png")
        return scores

    def save_checkpoint(at: int, with_fid: bool = False, final: bool = False) -> None:
        """The latest checkpoint; with FID enabled and `with_fid`, first the FIDs (the final evaluation's
        modes and count when `final`), then the best per mode."""
        scores = evaluate_fid(at, final) if with_fid and evaluator is not None else {}
        processes, per_process = distributed.layout()  # recorded, so that a resume on another layout says so
        ckpt.save(at, state, counters={"skipped_total": skipped_total, "process_count": processes,
                                       "devices_per_process": per_process})
        if state.phema is not None and at not in ckpt.steps("phema"):  # snapshots for post-hoc EMA, all kept
            ckpt.save_named("phema", at, state.phema)
        log.info("checkpoint saved at step %d", at)
        comparable = not final or (evaluator is not None and final_evaluator.num == evaluator.num)  # FID depends on N
        for mode, value in scores.items():
            if comparable and mode in cfg.fid.modes and np.isfinite(value):
                ckpt.save_best(mode, at, state, value)

    end = min(cfg.total_steps, cfg.stop_at) if cfg.stop_at is not None else cfg.total_steps
    start_step = step
    n = cfg.steps_per_call
    loader = None if on_device else data_lib.BatchLoader(
        images, batch_size=cfg.batch_size, seed=cfg.seed, start_step=step, steps_per_call=n,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    stop = StopSignal()
    interval: list[dict] = []
    busy, timed = 0.0, 0  # seconds in training calls since the last log line (not sampling, saving or the
    # first call's compilation), and the updates they made
    bar = tqdm(total=end, initial=step, desc=f"{cfg.variant}", dynamic_ncols=True, disable=jax.process_index() != 0)
    code = 0
    try:
        if evaluator is not None and cfg.fid.at_start and step == 0:
            evaluate_fid(0)  # the untrained model: the baseline of every later FID
        while step < end:
            started = time.perf_counter()
            batch = None  # drawn on the devices
            if loader is not None:
                host_batch = next(loader)
                if fault_nan_step is not None and step <= fault_nan_step < step + n:
                    host_batch[fault_nan_step - step] = np.nan  # fault injection (SCGCM_FAULT_NAN_STEP), for tests
                batch = global_batch(host_batch, mesh)
            state, metrics = train_fn(state, batch)
            metrics = jax.device_get(metrics)
            if launched is not None:  # once per process: what a researcher waits for before training starts
                log.info("first call done %.1f s after start (data, init, restore, compile, %d updates)",
                         time.perf_counter() - launched, n)
                launched = None
            else:
                busy, timed = busy + time.perf_counter() - started, timed + n
            bad = None if cfg.skip_nonfinite else first_bad_update(metrics)
            if bad is not None:
                j, what = bad
                last = ckpt.steps()
                raise NonFiniteError(
                    f"non-finite {what} at step {step + j} (update {step + j + 1}); stopping without saving. "
                    f"Last good checkpoint: {('step %d' % last[-1]) if last else 'none'} in {ckpt.directory / 'latest'}. "
                    "Use --config.skip-nonfinite to skip such updates instead."
                )
            step += n
            skipped_total += int(np.sum(metrics["skipped"]))
            interval.append({k: float(np.mean(v)) for k, v in metrics.items() if not k.startswith("finite")}
                            | {"grad_norm_max": float(np.max(metrics["grad_norm"]))})
            bar.update(n)

            if step % cfg.log_every < n or step >= end:
                record = {k: float(np.mean([r[k] for r in interval])) for k in interval[0]}
                record["grad_norm_max"] = max(r["grad_norm_max"] for r in interval)
                record.update(images_per_sec=timed * cfg.batch_size / busy if timed else None,  # None: compile only
                              kimg=step * cfg.batch_size / 1000, skipped_total=skipped_total,
                              elapsed_s=elapsed_before + time.perf_counter() - started_at,
                              lr_torso=cfg.optim.torso_lr, lr_head=cfg.optim.head_lr)
                metrics_log.write(step, record)
                bar.set_postfix(ct=f"{record['loss_ct']:.4f}", dsm=f"{record['loss_dsm']:.4f}",
                                N=int(record["num_scales"]), lr=cfg.optim.torso_lr, ips=f"{record['images_per_sec'] or 0:.0f}",
                                **{f"fid_{k}": f"{v:.2f}" for k, v in fids.items()})
                interval, busy, timed = [], 0.0, 0
            if step % cfg.sample.sampling_step < n:
                save_grids(step)
            if step % cfg.saving_step < n and step < end:
                save_checkpoint(step, with_fid=True)
            signum = distributed.max_over_processes(stop.signum or 0)  # all processes stop at the same step
            if signum:
                save_checkpoint(step)
                log.info("stopped by %s at step %d", signal.Signals(signum).name, step)
                return 128 + signum
        save_checkpoint(step, with_fid=step > start_step, final=step >= cfg.total_steps)
        if step >= cfg.total_steps and cfg.sample.final_sampling:
            bar.close()
            code = final_sampling(cfg, workdir, log, stop, state, samplers["onestep"], evaluator, mesh, step)
    except NonFiniteError as e:
        log.error("%s", e)
        code = 3
    finally:
        stop.restore()
        bar.close()
        if loader is not None:
            loader.close()
        metrics_log.close()
    return code


def final_sampling(cfg: TrainConfig, workdir: Path, log, stop: StopSignal, state, sampler, evaluator, mesh,
                   step: int) -> int:
    """`final_num` one-step images (and their FID) after the last checkpoint. A signal now exits at once
    (nothing is lost: the checkpoint is written), saying how to make the same images with scgcm.sample."""
    out = workdir / "samples" / "final_onestep.npz"
    finish = (f"python -m scgcm.sample --workdir {workdir} --checkpoint {step} --mode onestep "
              f"--num {cfg.sample.final_num} --seed {cfg.seed} --out {out}"
              + (" --fid" + (f" --fid-ref {cfg.fid.ref}" if cfg.fid.ref else "")
                 if evaluator is not None and cfg.sample.final_num >= cfg.fid.num else ""))
    message = (f"during the final sampling: stopped; the checkpoint of step {step} is saved. "
               f"To make the final samples: {finish}")
    stop.exit_at_once(message, on_exit=lambda line: log_to_file(workdir, line, "WARNING"))
    if stop.signum is not None:  # a signal came during the last checkpoint
        log.warning("%s %s", signal.Signals(stop.signum).name, message)
        return 128 + stop.signum
    log.info("final sampling: %d one-step images", cfg.sample.final_num)
    samples = generate(state.ema, sampler, seed=cfg.seed, num=cfg.sample.final_num,
                       batch_size=cfg.sample.batch_size, mesh=mesh, progress=True)
    if jax.process_index() == 0:  # every process holds all the samples; one writes them
        out.parent.mkdir(exist_ok=True)  # no grid may have been written yet
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("wb") as f:  # renamed when complete: a kill never leaves half a file
            np.savez_compressed(f, images=samples)
        os.replace(tmp, out)
        save_grid(samples[:64], workdir / "samples" / "final_onestep.png")
    log.info("final samples: %s", out)
    if evaluator is not None and len(samples) >= cfg.fid.num:  # fewer would not be comparable with the evaluations
        log.info("final %s (onestep, seed %d): %s", fid_lib.fid_label(len(samples)), cfg.seed,
                 describe_scores({"onestep": evaluator.scores(samples, "final onestep")}))
    return 0


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
    default = apply_recipe(PRESETS.get(preset, PRESETS["paper"]), "ict" if _flag(argv, "--config.recipe") == "ict" else "reference")
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
