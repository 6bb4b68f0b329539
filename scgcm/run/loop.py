"""The training loop of `python -m scgcm.train`.

Read top to bottom: validate, lock the run directory, resume checks, data, model, resume, then one
loop of (batch, jitted updates, log, sample grids, checkpoint + FID); final samples at the end. An
existing run directory is resumed from its newest readable checkpoint. SIGTERM/SIGINT write a
checkpoint of the current step and exit; a second signal (a second or more later) exits at once; a signal during the final
sampling (the checkpoint is written by then) exits at once, saying how to finish with scgcm.sample.
"""

import dataclasses
import logging
import os
import signal
import time
import traceback
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from scgcm.core.ema import sigma_rel_to_gamma
from scgcm.core.state import TrainState, make_optimizer
from scgcm.data import loader as data_loader, on_device, sources as data_sources
from scgcm.errors import UserError
from scgcm.eval import fid as fid_lib
from scgcm.eval.scores import FIDEvaluator, describe_scores, flat_scores
from scgcm.nn.model import count_params
from scgcm.parallel import distributed
from scgcm.parallel.generate import generate
from scgcm.parallel.mesh import global_batch, make_mesh, replicate
from scgcm.parallel.train_fn import make_train_fn
from scgcm.run import accelerator
from scgcm.run.checkpoint import Checkpointer, NoReadableCheckpoint
from scgcm.run.config import TrainConfig, build_loss, build_schedule, build_state, config_warnings
from scgcm.run.load import run_extractor, run_network, run_reference, run_sampler
from scgcm.run.metrics import NUM_KEY, plot_fid
from scgcm.run.rundir import (
    MetricsLog,
    RunLock,
    close_logging,
    config_changes,
    log_to_file,
    previous_config,
    save_grid,
    setup_logging,
    use_compile_cache,
    write_config,
)
from scgcm.run.signals import StopSignal

GRID_MODES = ("onestep", "twostep", "heun")


class NonFiniteError(RuntimeError):
    pass


def load_training_images(cfg: TrainConfig) -> np.ndarray:
    m = cfg.model
    if cfg.data.source == "synthetic":
        return data_sources.synthetic_images(cfg.data.synthetic_size, image_size=m.image_size, channels=m.channels, seed=cfg.seed)
    return data_sources.load_images(cfg.data.source, split=cfg.data.split, image_size=m.image_size, channels=m.channels)


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
    for the whole call; a fatal error (a UserError or any other exception) is also written to log.txt.
    SIGTERM/SIGINT are caught from here on, so a signal during the set-up (data, initialisation, restore,
    the first evaluation) stops the run at its first step boundary too: JAX's own SIGTERM handler in a
    multi-process run would otherwise swallow it and let the run go on."""
    launched = time.perf_counter()
    stop = StopSignal()
    try:
        return _train_in_run_directory(cfg, extractor, launched, stop)
    finally:
        stop.restore()


def _train_in_run_directory(cfg: TrainConfig, extractor, launched: float, stop: StopSignal) -> int:
    workdir = Path(cfg.workdir)
    # A new run directory is made only once its data has loaded: data that fails leaves nothing behind. An
    # existing one is resumed in the usual order (an unreadable checkpoint stops it before the data is read).
    images, early_warnings = _load_before_the_run_directory(cfg) if is_new_run_directory(workdir) else (None, [])
    workdir.mkdir(parents=True, exist_ok=True)
    lock = log = None
    try:
        lock = RunLock(workdir) if jax.process_index() == 0 else None  # one trainer per run directory
        log = setup_logging(workdir, jax.process_index())  # log.txt: process 0's
        for w in early_warnings:  # the data's warnings (a dataset fall-back) go to the run's log as usual
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if lock is not None and getattr(lock, "stale", ""):
            log.info("%s was left by a trainer that ended without releasing it (%s)", lock.path, lock.stale)
        return _train(cfg, workdir, log, launched, extractor, images, stop)
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


def _load_before_the_run_directory(cfg: TrainConfig) -> tuple[np.ndarray, list[warnings.WarningMessage]]:
    """The training images and the warnings loading them gave, kept for the run's log (made after); if
    the data fails, those warnings are shown at once, before the error."""
    images = error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            images = load_training_images(cfg)
        except Exception as e:  # noqa: BLE001 (re-raised below, after the warnings)
            error = e
    if error is not None:
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        raise error
    return images, list(caught)


def is_new_run_directory(workdir: Path) -> bool:
    """Whether `workdir` is yet to be made: it does not exist, or is an empty folder."""
    return not workdir.exists() or (workdir.is_dir() and not any(workdir.iterdir()))


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
           extractor: fid_lib.FeatureExtractor | None, images: np.ndarray | None, stop: StopSignal) -> int:
    check_resume(cfg, workdir)
    cache = use_compile_cache(cfg.compile_cache)
    log.info("XLA compilation cache: %s", cache or "off")
    n = cfg.steps_per_call

    # resume first (shapes only, nothing compiled), so that an unreadable run stops before any heavy work
    optim = make_optimizer(cfg.optim.torso_lr, cfg.optim.head_lr, cfg.optim.optimizer)
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
        if restored is not None and cfg.phema:
            write_missing_snapshots(ckpt, skeleton, restored, log)
        return training_loop(cfg, workdir, log, launched, extractor, optim, ckpt, restored, images, stop)
    finally:
        ckpt.close()


def write_missing_snapshots(ckpt: Checkpointer, skeleton: TrainState, restored: tuple[TrainState, int], log) -> None:
    """A kept checkpoint without its post-hoc EMA snapshot (written by a version that saved the snapshot after
    the checkpoint, and killed between the two) gets it now, from its own state: the snapshots are those of
    the uninterrupted run. One warning line per snapshot written, and per checkpoint too damaged to give one."""
    state, step = restored
    counters = dict(ckpt.counters)  # restoring another step below replaces them
    snapshots = set(ckpt.steps("phema"))
    for s in [s for s in ckpt.steps() if s <= step and s not in snapshots]:
        try:
            phema = state.phema if s == step else ckpt.restore(skeleton, step=s)[0].phema
        except UserError as e:
            log.warning("checkpoint %d has no post-hoc EMA snapshot and can't give it (%s); the fits of "
                        "scgcm.phema will go without step %d", s, e, s)
            continue
        ckpt.save_named("phema", s, phema)
        log.warning("checkpoint %d had no post-hoc EMA snapshot (a kill between the two?): written from it", s)
    ckpt.counters = counters


def _initial_state(cfg: TrainConfig, optim, ckpt: Checkpointer, restored, log) -> tuple[TrainState, int, int]:
    """(state, step, skipped updates so far): the restored checkpoint's, else a new state at step 0."""
    if restored is None:
        return build_state(cfg, optim), 0, 0
    (state, step), skipped_total = restored, ckpt.counters.get("skipped_total", 0)
    log.info("resumed from %s at step %d", ckpt.directory / "latest", step)
    written = (ckpt.counters.get("process_count"), ckpt.counters.get("devices_per_process"))
    if None not in written and written != distributed.layout():
        log.info("layout changed: the checkpoint of step %d was written by %s, this run has %s (same global "
                 "batch, same numbers)", step, distributed.describe_layout(*written),
                 distributed.describe_layout(*distributed.layout()))
    return state, step, skipped_total


def _train_fn(cfg: TrainConfig, mesh, state: TrainState, optim, dataset):
    """The jitted call of `steps_per_call` updates (`dataset`: the images on the devices, or None)."""
    return make_train_fn(
        mesh, state, dataset=dataset, seed=cfg.seed, batch_size=cfg.batch_size, steps_per_call=cfg.steps_per_call,
        flip=cfg.data.flip,
        optim=optim, schedule=build_schedule(cfg), loss_fn=build_loss(cfg), ema_decay=cfg.optim.ema_decay,
        ema_copy_steps=cfg.optim.ema_copy_steps, grad_accum=cfg.grad_accum,
        phema_gammas=tuple(sigma_rel_to_gamma(s) for s in cfg.phema_sigma_rels) if cfg.phema else (),
        compute_dtype=jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None,
    )


def _evaluators(cfg: TrainConfig, extractor, samplers, mesh) -> tuple[FIDEvaluator | None, FIDEvaluator | None]:
    """The evaluators of the checkpoints and of the end of training (None, None without FID), sharing one
    reference: `--config.fid.ref`, else the run's data."""
    if not cfg.fid.enabled:
        return None, None
    extractor = extractor or run_extractor(cfg, cfg.fid.batch_size, progress=False, lazy=False)  # ≤ 32 a time on CPU
    ref_stats, ref_features, _ = run_reference(cfg, extractor, cfg.fid.ref, ref_flag="--config.fid.ref")

    def evaluator(modes, num) -> FIDEvaluator:
        return FIDEvaluator(ref_stats, extractor, {mode: samplers[mode] for mode in modes}, num=num,
                            batch_size=cfg.fid.batch_size, seed=cfg.fid.seed, mesh=mesh, ref_features=ref_features)

    return evaluator(cfg.fid.modes, cfg.fid.num), evaluator(cfg.fid.final_modes or cfg.fid.modes,
                                                            cfg.fid.final_num or cfg.fid.num)


@dataclasses.dataclass
class Outputs:
    """What the loop writes besides metrics: sample grids, FID evaluations, checkpoints (with the best per
    mode and the post-hoc EMA snapshots)."""

    cfg: TrainConfig
    workdir: Path
    log: logging.Logger
    ckpt: Checkpointer
    mesh: object
    samplers: dict
    evaluator: FIDEvaluator | None
    final_evaluator: FIDEvaluator | None
    metrics_log: MetricsLog
    fids: dict[str, float] = dataclasses.field(default_factory=dict)
    """The latest evaluation, shown in the progress bar."""

    def grids(self, state: TrainState, at: int) -> None:
        for mode in GRID_MODES:
            grid = generate(state.ema, self.samplers[mode], seed=self.cfg.seed, num=self.cfg.sample.grid_size,
                            batch_size=self.cfg.sample.batch_size, mesh=self.mesh)
            if jax.process_index() == 0:
                save_grid(grid, self.workdir / "samples" / f"{mode}_{at:07d}.png")

    def evaluate_fid(self, state: TrainState, at: int, final: bool = False) -> dict[str, float]:
        which = self.final_evaluator if final else self.evaluator
        results = which.evaluate(state.ema)
        scores = {mode: r["fid"] for mode, r in results.items()}
        self.fids.update(scores)
        self.metrics_log.write(at, {**flat_scores(results), NUM_KEY: which.num})
        self.log.info("%s at step %d: %s", fid_lib.fid_label(which.num, run_network(self.cfg)), at, describe_scores(results))
        if jax.process_index() == 0:
            plot_fid(self.workdir / "metrics.jsonl", self.workdir / "fid.png", network=run_network(self.cfg))
        return scores

    def checkpoint(self, state: TrainState, at: int, skipped_total: int, with_fid: bool = False,
                   final: bool = False) -> None:
        """The latest checkpoint; with FID enabled and `with_fid`, first the FIDs (the final evaluation's
        modes and count when `final`), then the best per mode."""
        scores = self.evaluate_fid(state, at, final) if with_fid and self.evaluator is not None else {}
        processes, per_process = distributed.layout()  # recorded, so that a resume on another layout says so
        if state.phema is not None and (at not in self.ckpt.steps() or at not in self.ckpt.steps("phema")):
            # The post-hoc EMA snapshot (all kept) before the checkpoint: a latest checkpoint implies its snapshot.
            # A snapshot without its checkpoint (a kill between the two) is replaced by the same arrays.
            self.ckpt.save_named("phema", at, state.phema)
        self.ckpt.save(at, state, counters={"skipped_total": skipped_total, "process_count": processes,
                                            "devices_per_process": per_process})
        self.log.info("checkpoint saved at step %d", at)
        comparable = not final or (self.evaluator is not None and self.final_evaluator.num == self.evaluator.num)
        for mode, value in scores.items():  # a final FID of another count is not comparable: FID depends on N
            if comparable and mode in self.cfg.fid.modes and np.isfinite(value):
                self.ckpt.save_best(mode, at, state, value)


class Interval:
    """The metrics of the calls since the last log line, and the seconds spent in them (not in sampling,
    saving or the first call's compilation) with the updates they made."""

    def __init__(self):
        self.records: list[dict] = []
        self.busy, self.timed = 0.0, 0

    def add(self, metrics: dict[str, np.ndarray]) -> None:
        self.records.append({k: float(np.mean(v)) for k, v in metrics.items() if not k.startswith("finite")}
                            | {"grad_norm_max": float(np.max(metrics["grad_norm"]))})

    def time(self, seconds: float, updates: int) -> None:
        self.busy, self.timed = self.busy + seconds, self.timed + updates

    def record(self, batch_size: int) -> dict:
        """Means over the interval (the largest gradient norm), images per second (None: compile only)."""
        record = {k: float(np.mean([r[k] for r in self.records])) for k in self.records[0]}
        record["grad_norm_max"] = max(r["grad_norm_max"] for r in self.records)
        record["images_per_sec"] = self.timed * batch_size / self.busy if self.timed else None
        return record


def _check_finite(cfg: TrainConfig, metrics: dict[str, np.ndarray], step: int, ckpt: Checkpointer) -> None:
    bad = None if cfg.skip_nonfinite else first_bad_update(metrics)
    if bad is not None:
        j, what = bad
        last = ckpt.steps()
        raise NonFiniteError(
            f"non-finite {what} at step {step + j} (update {step + j + 1}); stopping without saving. "
            f"Last good checkpoint: {('step %d' % last[-1]) if last else 'none'} in {ckpt.directory / 'latest'}. "
            "Use --config.skip-nonfinite to skip such updates instead."
        )


def training_loop(cfg: TrainConfig, workdir: Path, log: logging.Logger, launched: float, extractor, optim,
                  ckpt: Checkpointer, restored, images: np.ndarray | None, stop: StopSignal) -> int:
    # Load dataset (a new run directory's is loaded before the directory is made).
    images = load_training_images(cfg) if images is None else images
    if jax.process_index() == 0:  # this start's configuration, once its data has loaded
        write_config(workdir, cfg)
    log.info("data: %d images of %s from %s", len(images), images.shape[1:], cfg.data.source or "Hugging Face cifar10")

    # Construct network and state, or resume.
    mesh = make_mesh()
    state, step, skipped_total = _initial_state(cfg, optim, ckpt, restored, log)
    (tp, ta), (hp, ha) = count_params(state.model.torso), count_params(state.model.head)
    log.info("devices: %s (%d processes)", jax.devices(), jax.process_count())
    log.info("parameters: torso %s in %d arrays, head %s in %d arrays", f"{tp:,}", ta, f"{hp:,}", ha)
    accelerator.check_platform(cfg, log)  # one line: no accelerator for an accelerator preset, or too little memory
    state = replicate(state, mesh)

    # Set up the data path and the jitted updates.
    fault_nan_step = int(os.environ["SCGCM_FAULT_NAN_STEP"]) if os.environ.get("SCGCM_FAULT_NAN_STEP") else None
    keep_on_device = on_device.fits(images, cfg.device_data_mb, cfg.batch_size) and fault_nan_step is None  # faults: host
    log.info("data: %s, %s (%.1f MiB of uint8 images; --config.device-data-mb %g)",
             "kept on every device, batches drawn in the step" if keep_on_device else "host loader",
             "half mirrored left-right" if cfg.data.flip else "not mirrored", images.nbytes / 2**20, cfg.device_data_mb)
    for warning in config_warnings(cfg):
        log.warning(warning)
    train_fn = _train_fn(cfg, mesh, state, optim, replicate(images, mesh) if keep_on_device else None)

    # Samplers, FID evaluators, logs.
    samplers = {mode: run_sampler(cfg, mode)
                for mode in dict.fromkeys((*GRID_MODES, *cfg.fid.modes, *(cfg.fid.final_modes or ()), "onestep"))}
    evaluator, final_evaluator = _evaluators(cfg, extractor, samplers, mesh)
    metrics_log = MetricsLog(workdir, resume_step=step, tensorboard=cfg.tensorboard, wandb=cfg.wandb, config=cfg)
    out = Outputs(cfg, workdir, log, ckpt, mesh, samplers, evaluator, final_evaluator, metrics_log)
    # wall-clock seconds of the run over all its starts (set-up and compilation included), for comparisons
    elapsed_before, started_at = metrics_log.last("elapsed_s", 0.0), launched

    # Train.
    n, end = cfg.steps_per_call, min(cfg.total_steps, cfg.stop_at) if cfg.stop_at is not None else cfg.total_steps
    loader = None if keep_on_device else data_loader.BatchLoader(
        images, batch_size=cfg.batch_size, seed=cfg.seed, start_step=step, steps_per_call=n,
        process_index=jax.process_index(), process_count=jax.process_count(), flip=cfg.data.flip,
    )
    start_step, interval, code = step, Interval(), 0
    bar = tqdm(total=end, initial=step, desc=f"{cfg.variant}", dynamic_ncols=True, disable=jax.process_index() != 0)
    try:
        if evaluator is not None and cfg.fid.at_start and step == 0:
            out.evaluate_fid(state, 0)  # the untrained model: the baseline of every later FID
        signum = distributed.max_over_processes(stop.signum or 0)  # a signal during the set-up
        if signum:
            out.checkpoint(state, step, skipped_total)
            log.info("stopped by %s before training, at step %d", signal.Signals(signum).name, step)
            return 128 + signum
        log.info("training: steps %d to %d", step, end)
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
                interval.time(time.perf_counter() - started, n)
            _check_finite(cfg, metrics, step, ckpt)
            step += n
            skipped_total += int(np.sum(metrics["skipped"]))
            interval.add(metrics)
            bar.update(n)

            if step % cfg.log_every < n or step >= end:
                record = interval.record(cfg.batch_size)
                record.update(kimg=step * cfg.batch_size / 1000, skipped_total=skipped_total,
                              elapsed_s=elapsed_before + time.perf_counter() - started_at,
                              lr_torso=cfg.optim.torso_lr, lr_head=cfg.optim.head_lr)
                metrics_log.write(step, record)
                bar.set_postfix(ct=f"{record['loss_ct']:.4f}", dsm=f"{record['loss_dsm']:.4f}",
                                N=int(record["num_scales"]), lr=cfg.optim.torso_lr, ips=f"{record['images_per_sec'] or 0:.0f}",
                                **{f"fid_{k}": f"{v:.2f}" for k, v in out.fids.items()})
                interval = Interval()
            if step % cfg.sample.sampling_step < n:
                out.grids(state, step)
            if step % cfg.saving_step < n and step < end:
                out.checkpoint(state, step, skipped_total, with_fid=True)
            signum = distributed.max_over_processes(stop.signum or 0)  # all processes stop at the same step
            if signum:
                out.checkpoint(state, step, skipped_total)
                log.info("stopped by %s at step %d", signal.Signals(signum).name, step)
                return 128 + signum
        out.checkpoint(state, step, skipped_total, with_fid=step > start_step, final=step >= cfg.total_steps)
        if step >= cfg.total_steps and cfg.sample.final_sampling:
            bar.close()
            code = final_sampling(cfg, workdir, log, stop, state, samplers["onestep"], evaluator, mesh, step)
    except NonFiniteError as e:
        log.error("%s", e)
        code = 3
    finally:
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
        log.info("final %s (onestep, seed %d): %s", fid_lib.fid_label(len(samples), run_network(cfg)), cfg.seed,
                 describe_scores({"onestep": evaluator.scores(samples, "final onestep")}))
    return 0
