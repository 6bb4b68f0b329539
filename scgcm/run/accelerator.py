"""What the machine can do for this run, said in one line at the start of training.

Three situations would otherwise surface as an hour-long silent run or a traceback later:

* no accelerator, and the preset is sized for one (the paper run): training goes on, after one line
  with the platform, the estimated time per update here and the two ways out (the install extra, or a
  preset sized for a CPU);
* JAX's CUDA (or TPU) plugin is installed but JAX found no such device and fell back to the CPU: one
  line naming the plugin and what to check, and training goes on;
* a GPU/TPU with too little memory for the chosen batch: XLA's buffer plan of one update (compiled
  from shapes, nothing allocated) against the device's `bytes_limit`, before the first step; a
  UserError (one line, exit 2) with the flags that make it fit.

The decisions are pure functions of a `Platform` (the facts, passed in so tests can state any
machine) and numbers; `check_platform` gathers the facts and is what `scgcm.train` calls.
"""

import importlib.metadata
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp

from scgcm.core.state import make_optimizer
from scgcm.core.step import train_step
from scgcm.errors import UserError
from scgcm.run.config import PRESETS, build_loss, build_schedule, build_state

# The presets sized for an accelerator: on a CPU each of their updates takes an hour or more.
ACCELERATOR_PRESETS = ("paper",)
# Install extra of each JAX accelerator plugin distribution (see pyproject's optional dependencies).
PLUGINS = {"jax-cuda12-plugin": "cuda12", "jax-cuda13-plugin": "cuda13", "libtpu": "tpu", "libtpu-nightly": "tpu"}


@dataclass(frozen=True)
class Platform:
    """What JAX found: `backend` is `jax.default_backend()` ('cpu', 'gpu', 'tpu'); `plugins` the install
    extras of the accelerator plugins present ('cuda12', 'tpu'); `bytes_limit` one device's memory for
    XLA (None where the backend does not say, as on a CPU)."""

    backend: str
    device_kind: str
    num_devices: int
    plugins: tuple[str, ...] = ()
    bytes_limit: int | None = None


def detect_platform() -> Platform:
    """The facts of this process's JAX (impure: reads the installed distributions and the devices)."""
    plugins = []
    for dist, extra in PLUGINS.items():
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        plugins.append(extra)
    devices = jax.local_devices()
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    return Platform(backend=jax.default_backend(), device_kind=devices[0].device_kind, num_devices=len(devices),
                    plugins=tuple(dict.fromkeys(plugins)), bytes_limit=stats.get("bytes_limit"))


def format_seconds(s: float | int) -> str:
    """3.2 s, 14 min, 2.5 h, 3.1 days."""
    if s < 60:
        return f"{s:.2g} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def no_accelerator_notice(platform: Platform, preset: str, seconds_per_update: float | None,
                          cpu_presets: Sequence[str]) -> str | None:
    """The one line for a run on the CPU that should not be there, or None: a preset sized for an
    accelerator, or an accelerator plugin that found no device. Training goes on after it."""
    if platform.backend != "cpu":
        return None
    sized = preset in ACCELERATOR_PRESETS
    if not sized and not platform.plugins:
        return None
    where = f"{platform.num_devices} CPU device{'s' if platform.num_devices > 1 else ''} ({platform.device_kind})"
    if platform.plugins:
        extras = "/".join(platform.plugins)
        head = (f"JAX's {extras} plugin is installed but found no {'TPU' if extras == 'tpu' else 'GPU'}, "
                f"so training runs on {where} (check `nvidia-smi`, the driver and CUDA_VISIBLE_DEVICES, or "
                "JAX_PLATFORMS=cuda to see JAX's own error)")
    else:
        head = f"no accelerator found: training runs on {where}"
    if not sized:
        return head + "; going on"
    per_update = (f"about {format_seconds(seconds_per_update)} per update here (estimated)"
                  if seconds_per_update else "hours per update here")
    ways = (f"pip install -e '.[cuda12]' on a machine with an NVIDIA GPU (TPU: '.[tpu]'), "
            f"or --config.preset {'|'.join(cpu_presets)} (sized for a CPU)")
    return f"{head}; the {preset} preset is sized for an accelerator: {per_update}. Ways out: {ways}; going on"


def memory_error(platform: Platform, need_bytes: int, per_device_batch: int, grad_accum: int) -> str | None:
    """The one line when XLA's plan of one update needs more than the device holds, or None."""
    limit = platform.bytes_limit
    if limit is None or need_bytes <= limit:
        return None
    gib = 2**30
    more = 2 * grad_accum if per_device_batch > 1 and per_device_batch % 2 == 0 else None
    fixes = [f"--config.grad-accum {more} (the same update in smaller pieces)"] if more else []
    fixes += ["--config.remat", "--config.compute-dtype bfloat16", "a smaller --config.batch-size", "more devices"]
    return (f"the batch does not fit: one update at {per_device_batch} images per device needs "
            f"{need_bytes / gib:.1f} GiB (XLA's plan), the {platform.device_kind} holds {limit / gib:.1f} GiB; "
            f"use {', '.join(fixes[:-1])} or {fixes[-1]}")


def estimate_seconds(flops_per_update: float, flops_per_second: float) -> float:
    """Wall time of one update at a sustained rate."""
    return flops_per_update / flops_per_second


# ------------------------------------------------------------------------------ measuring (impure)


def lower_update(cfg, micro_batch: int, *, donate: bool = False):
    """One update of `cfg` on one device at `micro_batch` images, lowered from shapes only (nothing is
    allocated or run): the program XLA plans per device and per accumulation step."""
    optim = make_optimizer(cfg.optim.torso_lr, cfg.optim.head_lr, cfg.optim.optimizer)
    shapes = eqx.filter_eval_shape(build_state, cfg, optim)
    leaf = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    arrays, static = eqx.partition(shapes, leaf, is_leaf=leaf)
    m = cfg.model
    images = jax.ShapeDtypeStruct((micro_batch, m.channels, m.image_size, m.image_size), jnp.float32)
    kwargs = dict(optim=optim, schedule=build_schedule(cfg), loss_fn=build_loss(cfg), ema_decay=cfg.optim.ema_decay,
                  ema_copy_steps=cfg.optim.ema_copy_steps,
                  compute_dtype=jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None)

    def update(arrays, images):
        state, metrics = train_step(eqx.combine(arrays, static), images, jnp.arange(images.shape[0]), **kwargs)
        return eqx.filter(state, eqx.is_array), metrics

    return jax.jit(update, donate_argnums=(0,) if donate else ()).lower(arrays, images)


def _flops(lowered) -> float | None:
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older JAX: one dict per program
    return float(cost["flops"]) if cost and cost.get("flops") else None


def planned_bytes(compiled) -> int:
    """What one device holds for the program: arguments + outputs + temporaries − donated (aliased) bytes."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def host_flops_per_second(n: int = 384, repeats: int = 3) -> float:
    """This host's sustained float32 rate on a jitted matmul (a fraction of a second)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def micro_batch(cfg, num_devices: int) -> int:
    return max(1, cfg.batch_size // max(1, num_devices) // max(1, cfg.grad_accum))


def check_platform(cfg, log, platform: Platform | None = None) -> Platform:
    """Before the first step: log the no-accelerator line (training goes on) or raise a UserError when
    one update does not fit in the device's memory. Costs a trace of one update on a CPU run of an
    accelerator preset, and one compile of one update where the device reports its memory."""
    platform = platform or detect_platform()
    cpu_presets = [name for name in PRESETS if name not in ACCELERATOR_PRESETS]
    b = micro_batch(cfg, platform.num_devices)
    if platform.backend == "cpu":
        seconds = None
        if cfg.preset in ACCELERATOR_PRESETS:
            flops = _flops(lower_update(cfg, b))
            if flops:  # the CPU devices share the host: every device's micro-batches run on it
                seconds = estimate_seconds(flops * platform.num_devices * cfg.grad_accum, host_flops_per_second())
        notice = no_accelerator_notice(platform, cfg.preset, seconds, cpu_presets)
        if notice:
            log.warning(notice)
        return platform
    if platform.bytes_limit is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            need = planned_bytes(lower_update(cfg, b, donate=True).compile())
        error = memory_error(platform, need, b, cfg.grad_accum)
        if error:
            raise UserError(error)
        log.info("memory: one update at %d images per device plans %.1f GiB of the %s's %.1f GiB", b,
                 need / 2**30, platform.device_kind, platform.bytes_limit / 2**30)
    return platform

