"""Training throughput: images/s, step time, time to first step, peak memory, FLOPs and MFU (issue 5).

    python experiments/bench_train.py --tiny --batch-sizes 8 16 --steps 5                     # CPU, minutes
    python experiments/bench_train.py --batch-sizes 128 256 --peak-tflops 989 --isolate \\
        --results experiments/RESULTS.md                                                     # GPU, paper model
    python experiments/bench_train.py --flops-only --batch-sizes 2 --dtypes float32          # FLOPs/image, any host
    python experiments/bench_train.py --memory-only --batch-sizes 8 16 --dtypes float32      # XLA memory plan

One row per (variant, dtype, batch size): the jitted `make_train_fn` step (shard_map over `--devices`
devices, donated state) on random images. Times, separately: model + optimizer init, trace + lowering,
XLA compilation, the first call; then the median of `--steps` further calls. FLOPs per image come from
XLA's cost analysis of the *un-optimised* HLO of one `train_step` on one device (`jit(...).lower(...)
.cost_analysis()`, built from shapes only, so it costs seconds even for the paper model). That count
sees every convolution and dot on every backend; the cost analysis of a *compiled* GPU program does
not (cuDNN convolutions become custom calls), so do not take it from there (`compiled_flops_per_image`
is that count, a diagnostic: on CPU it shows what the optimised program really does). MFU = FLOPs/image × images/s
/ (`--peak-tflops` × devices). Peak memory is `memory_stats()["peak_bytes_in_use"]` of the first device
(None on CPU, which has no allocator statistics; the compiled program's own estimate, arguments +
outputs + temporaries, is reported as `xla_bytes`). The peak counter never resets within a process:
use `--isolate` (one subprocess per row) for per-configuration peaks and cold init/compile times.
Every row is printed as a JSON line, with its ratios to the first row of the run (the baseline).
"""

import dataclasses
import datetime
import gzip
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import tyro

from scgcm.core.losses import Variant
from scgcm.core.state import init_state, make_optimizer
from scgcm.core.step import train_step
from scgcm.parallel.mesh import global_batch, make_mesh, replicate
from scgcm.parallel.train_fn import make_train_fn
from scgcm.run.config import PRESETS, TrainConfig, build_loss, build_model, build_schedule, build_state

Dtype = Literal["float32", "bfloat16"]
SECTION = "## Training throughput"


@dataclass(frozen=True)
class Args:
    tiny: bool = False
    """The smoke preset's tiny model and hyperparameters (CPU); default: the paper model and run."""
    batch_sizes: tuple[int, ...] = (128, 256)
    """Global batch sizes (over all devices)."""
    dtypes: tuple[Dtype, ...] = ("float32", "bfloat16")
    """Compute dtypes (parameters, optimizer state, EMA and loss reductions stay float32)."""
    variants: tuple[Variant, ...] = ("score", "vanilla")
    """Training variants."""
    steps: int = 10
    """Timed calls after the first (warm-up) call."""
    steps_per_call: int = 1
    """Updates per jitted call (lax.scan); step time = call time / steps_per_call."""
    grad_accum: int = 1
    """Micro-batches per update."""
    remat: bool = False
    """Rematerialise the torso blocks."""
    devices: int | None = None
    """Use the first N local devices (default: all)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device in the compute dtype, for MFU (e.g. 989 for H100 SXM bf16)."""
    flops: bool = True
    """Count FLOPs per image (one extra trace and lowering per row, no compilation)."""
    gflops_per_image: float | None = None
    """Use this FLOP count per image for MFU instead of counting (e.g. 216.3 for the paper model, RESULTS.md)."""
    flops_only: bool = False
    """Only count FLOPs per image, from shapes (no init, no compilation, no run)."""
    profile: str | None = None
    """Trace a few more calls with jax.profiler into this folder (TensorBoard/Perfetto files) and report the
    device time per part of the step: convolutions, normalization, attention, optimizer, EMA, ..."""
    memory_only: bool = False
    """Only compile from shapes and report XLA's memory plan per device (no init, no run)."""
    isolate: bool = False
    """Run every row in its own subprocess: per-row peak memory, cold init and compile times."""
    results: str | None = None
    """Append a dated markdown table to this file, at the end of its '## Training throughput' section."""


def _copy(tree):
    """Fresh buffers for every array (the train function donates its inputs)."""
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def _compute_dtype(name: Dtype):
    return jnp.bfloat16 if name == "bfloat16" else None


def step_kwargs(cfg: TrainConfig, optim) -> dict:
    """The keyword arguments `scgcm.train` gives `make_train_fn`."""
    return dict(
        optim=optim, schedule=build_schedule(cfg), loss_fn=build_loss(cfg), ema_decay=cfg.optim.ema_decay,
        ema_copy_steps=cfg.optim.ema_copy_steps, grad_accum=cfg.grad_accum,
        compute_dtype=_compute_dtype(cfg.compute_dtype),
    )


def lower_from_shapes(cfg: TrainConfig, donate: bool = False):
    """`jax.jit(train_step)` for one device at batch `cfg.batch_size`, lowered from shapes only
    (no parameters are materialised, nothing runs)."""
    optim = make_optimizer(cfg.optim.torso_lr, cfg.optim.head_lr)
    shapes = eqx.filter_eval_shape(lambda k: init_state(build_model(cfg.model, key=k, remat=cfg.remat), optim, k),
                                   jr.key(0))
    is_leaf = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    arrays, static = eqx.partition(shapes, is_leaf, is_leaf=is_leaf)
    m = cfg.model
    images = jax.ShapeDtypeStruct((cfg.batch_size, m.channels, m.image_size, m.image_size), jnp.float32)
    kwargs = dict(step_kwargs(cfg, optim), grad_accum=1)  # accumulation changes nothing but the loop

    def one_update(arrays, images):
        state, metrics = train_step(eqx.combine(arrays, static), images, jnp.arange(images.shape[0]), **kwargs)
        return eqx.filter(state, eqx.is_array), metrics

    return jax.jit(one_update, donate_argnums=(0,) if donate else ()).lower(arrays, images)


def flops_per_image(cfg: TrainConfig) -> float | None:
    """FLOPs of one update per image: XLA cost analysis of the un-optimised HLO of `train_step`."""
    cost = lower_from_shapes(cfg).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older JAX returns one dict per program
    return float(cost["flops"]) / cfg.batch_size if cost and "flops" in cost else None


def flops_row(cfg: TrainConfig) -> dict:
    t0 = time.perf_counter()
    fpi = flops_per_image(cfg)
    return {"variant": cfg.variant, "dtype": cfg.compute_dtype, "batch": cfg.batch_size,
            "flops_per_image": fpi, "count_s": time.perf_counter() - t0}


def _total_bytes(m) -> int:
    """What one device holds for the program: arguments + outputs + temporaries − donated (aliased) bytes."""
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def memory_plan(cfg: TrainConfig) -> dict:
    """XLA's buffer plan for one update on one device of this host's backend, compiled from shapes
    (state donated, as in training): argument, output, temporary and aliased bytes, and compile time.
    It needs no memory for the model, so it answers "does batch B fit?" before anything is allocated."""
    t0 = time.perf_counter()
    lowered = lower_from_shapes(cfg, donate=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        m = lowered.compile().memory_analysis()
    return {"variant": cfg.variant, "dtype": cfg.compute_dtype, "batch": cfg.batch_size, "remat": cfg.remat,
            "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
            "xla_bytes": _total_bytes(m), "compile_s": time.perf_counter() - t0}


# Parts of the step, by the op_name (JAX's name stack) XLA keeps on every instruction; first match wins.
# The scopes optimizer, ema, nan_guard, metrics and attention are jax.named_scope's in scgcm.
PARTS = (
    ("optimizer (RAdam)", r"(^|/)optimizer(/|$)"),
    ("EMA", r"(^|/)ema(/|$)"),
    ("NaN guard", r"nan_guard"),
    ("metrics (norms)", r"(^|/)metrics(/|$)"),
    ("gradient all-reduce", r"pmean|psum|all-reduce"),
    ("attention (QKᵀ, softmax, AV)", r"attention"),
    ("convolution", r"conv_general_dilated"),
    ("normalization", r"GroupNorm|LayerNorm"),
    ("RNG (dropout, noise, σ)", r"Dropout|bernoulli|threefry|random_bits|_uniform|_normal|randint"),
    ("SiLU", r"silu"),
)


def _part(op_name: str) -> str:
    for part, pattern in PARTS:
        if re.search(pattern, op_name):
            return part
    return "other (elementwise, dense, loss)"


def time_by_part(trace_dir: Path, hlo_text: str, calls: int) -> dict[str, float]:
    """Seconds per update of each part of the step (forward and backward apart), from the newest
    jax.profiler trace under `trace_dir`: every traced XLA op (on a GPU the "XLA Ops" line; on a CPU the
    thunks, with --xla_cpu_enable_xprof_traceme) is given its instruction's op_name from `hlo_text`.
    Loops and conditionals are left out (their time is that of the ops inside). On a CPU ops run on
    several threads at once, so the parts add up to more than the wall time."""
    instructions = {}  # name -> (control-flow opcode or "", rest of the line)
    for name, rest in re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", hlo_text, re.M):
        control = re.search(r"[\]})] (while|conditional|call)\(", rest)
        instructions[name] = (control.group(1) if control else "", rest)
    module = re.match(r"HloModule ([\w.\-]+)", hlo_text).group(1)  # other programs (input copies) are left out
    (path,) = sorted(trace_dir.glob("plugins/profile/*/*.trace.json.gz"), key=os.path.getmtime)[-1:]
    with gzip.open(path, "rb") as f:
        events = json.load(f)["traceEvents"]
    xla_ops = {(e["pid"], e["tid"]) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e["args"].get("name") == "XLA Ops"}
    totals: dict[str, float] = {}
    for e in events:
        op, args = (e.get("args") or {}).get("hlo_op"), e.get("args") or {}
        if (e.get("ph") != "X" or op is None or args.get("hlo_module", module) != module
                or (xla_ops and (e["pid"], e["tid"]) not in xla_ops)):
            continue
        control, rest = instructions.get(op, (None, ""))
        if control:
            continue
        name = re.search(r'op_name="([^"]*)"', rest)
        if control is None:
            key = "unattributed (op not in the program's text)"
        elif name is None:
            key = "no op_name (layout copies, buffers)"
        else:
            key = _part(name.group(1)) + (" backward" if "transpose(" in name.group(1) else "")
        totals[key] = totals.get(key, 0.0) + e["dur"] * 1e-6 / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _peak_bytes(device) -> int | None:
    stats = device.memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _xla_bytes(compiled) -> int | None:
    try:
        return _total_bytes(compiled.compiled.memory_analysis())
    except Exception:  # not every backend implements it
        return None


def _compiled_flops(compiled) -> float | None:
    try:
        cost = compiled.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])
    except Exception:
        return None


def bench_one(cfg: TrainConfig, args: Args, state_template=None, init_s: float | None = None) -> dict:
    """Init (unless a template state is given), lower, compile and time one configuration."""
    devices = jax.local_devices()[: args.devices] if args.devices else jax.local_devices()
    mesh = make_mesh(devices)
    optim = make_optimizer(cfg.optim.torso_lr, cfg.optim.head_lr)
    t0 = time.perf_counter()
    if state_template is None:
        state_template = build_state(cfg, optim)  # as scgcm.train does: one compiled program
        jax.block_until_ready(state_template)
    state = replicate(_copy(state_template), mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0 if init_s is None else init_s

    m = cfg.model
    host = np.random.default_rng(0).uniform(-1, 1, (cfg.steps_per_call, cfg.batch_size, m.channels, m.image_size,
                                                    m.image_size)).astype(np.float32)
    images = global_batch(host, mesh)
    fresh_images = lambda: jnp.array(images, copy=True)  # keeps the sharding

    fn = make_train_fn(mesh, state, **step_kwargs(cfg, optim))
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the images are donated too, and cannot be reused for outputs
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        lowered = fn.lower(state, images)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    x = fresh_images()
    t0 = time.perf_counter()
    state, metrics = compiled(state, x)
    jax.block_until_ready((state, metrics))
    first_call_s = time.perf_counter() - t0

    times = []
    for _ in range(args.steps):
        x = fresh_images()
        jax.block_until_ready(x)
        t0 = time.perf_counter()
        state, metrics = compiled(state, x)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    parts = None
    if args.profile:
        trace_dir = Path(args.profile) / f"{cfg.variant}-{cfg.compute_dtype}-{cfg.batch_size}"
        calls = 3
        with jax.profiler.trace(str(trace_dir)):
            for _ in range(calls):
                state, metrics = compiled(state, fresh_images())
                jax.block_until_ready((state, metrics))
        parts = time_by_part(trace_dir, compiled.compiled.as_text(), calls * cfg.steps_per_call)
    step_s = statistics.median(times) / cfg.steps_per_call if times else first_call_s / cfg.steps_per_call
    ips = cfg.batch_size / step_s
    fpi = args.gflops_per_image * 1e9 if args.gflops_per_image else flops_per_image(cfg) if args.flops else None
    compiled_flops = _compiled_flops(compiled)  # per device, the scan body once (= one update)
    mfu = fpi * ips / (args.peak_tflops * 1e12 * len(devices)) if fpi and args.peak_tflops else None
    return {
        "variant": cfg.variant, "dtype": cfg.compute_dtype, "batch": cfg.batch_size, "devices": len(devices),
        "grad_accum": cfg.grad_accum, "remat": cfg.remat, "steps_per_call": cfg.steps_per_call,
        "timed_calls": len(times), "images_per_s": ips, "step_s": step_s,
        "step_s_min": min(times) / cfg.steps_per_call if times else step_s,  # robust to a busy shared host
        "init_s": init_s, "lower_s": lower_s, "compile_s": compile_s, "first_call_s": first_call_s,
        "time_to_first_step_s": init_s + lower_s + compile_s + first_call_s,
        "peak_bytes": _peak_bytes(devices[0]), "xla_bytes": _xla_bytes(compiled),
        "flops_per_image": fpi, "mfu": mfu,
        "compiled_flops_per_image": compiled_flops and compiled_flops * len(devices) / cfg.batch_size,
        "seconds_by_part": parts,
        "loss_ct": float(metrics["loss_ct"][-1]), "loss_dsm": float(metrics["loss_dsm"][-1]),
        "finite": bool(np.all(metrics["finite_ct"]) and np.all(metrics["finite_dsm"]) and np.all(metrics["finite_grad"])),
    }


def _grid(args: Args, base: TrainConfig) -> list[TrainConfig]:
    return [
        dataclasses.replace(base, variant=v, compute_dtype=d, batch_size=b, steps_per_call=args.steps_per_call,
                            grad_accum=args.grad_accum, remat=args.remat)
        for v in args.variants for d in args.dtypes for b in args.batch_sizes
    ]


def _child_command(args: Args, cfg: TrainConfig) -> list[str]:
    one = dataclasses.replace(args, variants=(cfg.variant,), dtypes=(cfg.compute_dtype,), batch_sizes=(cfg.batch_size,),
                              isolate=False, results=None)
    flags = []
    for f in dataclasses.fields(one):
        value, default = getattr(one, f.name), f.default
        if value == default:
            continue
        name = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(name if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            flags += [name, *map(str, value)]
        else:
            flags += [name, str(value)]
    return [sys.executable, os.path.abspath(__file__), *flags]


def _with_ratios(rows: list[dict]) -> list[dict]:
    base = rows[0]
    for r in rows:
        r["images_per_s_ratio"] = r["images_per_s"] / base["images_per_s"]
        r["step_s_ratio"] = r["step_s"] / base["step_s"]
    return rows


def main(args: Args, base: TrainConfig | None = None) -> list[dict]:
    """All rows of the grid; `base` replaces the preset (tests pass their tiny configuration)."""
    if args.profile and "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
        # lets a CPU trace name every op (read when the backend starts, i.e. after this); no effect on GPUs
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    base = base if base is not None else PRESETS["smoke" if args.tiny else "paper"]
    grid = _grid(args, base)
    if args.flops_only or args.memory_only:  # from shapes: nothing initialised, nothing run
        rows = []
        for cfg in grid:
            rows.append(memory_plan(cfg) if args.memory_only else flops_row(cfg))
            print(json.dumps(rows[-1]), flush=True)
        return rows

    rows, template, init_s = [], None, None
    for cfg in grid:
        if args.isolate:
            out = subprocess.run(_child_command(args, cfg), check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
        else:
            if template is None:  # one init for the whole process: the model does not depend on the row
                t0 = time.perf_counter()
                optim = make_optimizer(cfg.optim.torso_lr, cfg.optim.head_lr)
                template = build_state(cfg, optim)
                jax.block_until_ready(template)
                init_s = time.perf_counter() - t0
            row = bench_one(cfg, args, template, init_s)
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows = _with_ratios(rows)
    if args.results:
        append_table(Path(args.results), rows, args)
    return rows


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(rows: list[dict], args: Args) -> str:
    dev = jax.local_devices()[0]
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = "python experiments/bench_train.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    lines = [
        f"### {when}: {dev.device_kind} ({dev.platform}) × {rows[0]['devices']}, "
        f"{'tiny (smoke)' if args.tiny else 'paper'} model",
        "",
        f"Command: `{command}`; JAX {jax.__version__}; load average {_fmt(load, '.1f')} at the end. "
        "Baseline (×1.00) = the first row. s/step = median of the timed calls. "
        f"Time to first step = init + lower + compile + first call"
        f"{' (init measured once per process)' if not args.isolate else ''}.",
        "",
        "| variant | dtype | batch | img/s | ×base | s/step | ×base | fastest s/step | init s | lower s | compile s "
        "| first step s | peak GiB | XLA est. GiB | GFLOP/img | MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gib = lambda b: None if b is None else b / 2**30
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['dtype']} | {r['batch']} | {r['images_per_s']:.1f} | {r['images_per_s_ratio']:.2f} "
            f"| {r['step_s']:.4f} | {r['step_s_ratio']:.2f} | {r['step_s_min']:.4f} | {r['init_s']:.1f} "
            f"| {r['lower_s']:.1f} | {r['compile_s']:.1f} "
            f"| {r['time_to_first_step_s']:.1f} | {_fmt(gib(r['peak_bytes']), '.2f')} | {_fmt(gib(r['xla_bytes']), '.2f')} "
            f"| {_fmt(r['flops_per_image'] and r['flops_per_image'] / 1e9, '.3f')} | {_fmt(r['mfu'], '.1%')} |"
        )
    for r in rows:
        if r.get("seconds_by_part"):
            total = sum(r["seconds_by_part"].values())
            lines += ["", f"Where the time goes ({r['variant']}, {r['dtype']}, batch {r['batch']}; traced XLA ops, "
                      f"{total * 1e3:.1f} ms per update in all, {r['step_s'] * 1e3:.1f} ms wall):", "",
                      "| part | ms / update | share |", "|---|---:|---:|"]
            lines += [f"| {k} | {v * 1e3:.2f} | {v / total:.1%} |" for k, v in r["seconds_by_part"].items()]
    return "\n".join(lines) + "\n"


def append_table(path: Path, rows: list[dict], args: Args) -> None:
    """Insert the table at the end of the '## Training throughput' section (created if missing)."""
    table = markdown(rows, args)
    text = path.read_text() if path.exists() else ""
    if SECTION not in text:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + SECTION + "\n\n"
    start = text.index(SECTION) + len(SECTION)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt + 1
    text = text[:end].rstrip() + "\n\n" + table + ("\n" + text[end:] if end < len(text) else "")
    path.write_text(text)


if __name__ == "__main__":
    main(tyro.cli(Args))
