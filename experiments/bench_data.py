"""Host time per training call: the host loader against data kept on the device (issue 13).

    python experiments/bench_data.py                                   # CIFAR-10-sized, batch 1024, 4 updates a call
    python experiments/bench_data.py --results experiments/RESULTS.md  # also append the table there

Per call of `steps_per_call` updates of a global batch `batch_size` from N uint8 images of 32 × 32 × 3
(random values: the content does not matter here), on one device:

- host loader (`loader.BatchLoader`): the work of its prefetch thread for one call (indices, gather, mirror,
  conversion to float32 channel-first) plus the transfer of that float32 batch to the device
  (`parallel.global_batch` and block_until_ready). The thread hides it from the training loop only
  while it has a core of its own and the host-to-device copy overlaps the step.
- on the device (`device_data`): the host sends nothing; each device computes its rows' images and flips
  from the step counter (`scgcm.order`, the host loader's own function) inside the step. The host's part
  is at most the dispatch of that work, timed here as the dispatch of `draw_batch` alone (in training it
  is part of the step's own dispatch); and, apart, the device time of `draw_batch` (order, gather,
  mirror, conversion), which moves into the step.

The median of `--calls` calls after `--warmup`; the baseline is the host loader, measured in the same run.
"""

import datetime
import functools
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from scgcm.data import loader, on_device as device_data
from scgcm.parallel.mesh import global_batch, make_mesh, replicate

SECTION = "## Data on the device: host time per call (issue 13)"


@dataclass(frozen=True)
class Args:
    num_images: int = 50_000
    """Training images (CIFAR-10: 50,000)."""
    batch_size: int = 1024
    """Global batch per update (the paper's)."""
    steps_per_call: int = 4
    """Updates per call (the paper's run)."""
    calls: int = 20
    """Timed calls (median reported)."""
    warmup: int = 3
    """Untimed calls first (compilation, first epoch's permutation)."""
    results: str | None = None
    """Append the table to this RESULTS.md (under its section, created if missing)."""


def _median_seconds(fn, calls: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args: Args) -> dict:
    images = np.random.default_rng(0).integers(0, 256, (args.num_images, 32, 32, 3), dtype=np.uint8)
    mesh = make_mesh(jax.devices()[:1])
    kwargs = dict(batch_size=args.batch_size, seed=42, steps_per_call=args.steps_per_call)

    host = loader.BatchLoader(images, **kwargs, prefetch=1)
    call = iter(range(10**9))
    try:
        host_s = _median_seconds(lambda: global_batch(host._make(next(call)), mesh).block_until_ready(), args.calls, args.warmup)
    finally:
        host.close()

    resident = replicate(images, mesh)
    draw = jax.jit(functools.partial(device_data.draw_batch, steps=args.steps_per_call, seed=42, batch_size=args.batch_size))
    rows = jnp.arange(args.batch_size, dtype=jnp.int32)
    steps = iter(range(0, 10**9, args.steps_per_call))
    pending = []
    device_host_s = _median_seconds(lambda: pending.append(draw(resident, jnp.int32(next(steps)), rows)), args.calls, args.warmup)
    jax.block_until_ready(pending)
    gather_s = _median_seconds(lambda: draw(resident, jnp.int32(next(steps)), rows).block_until_ready(), args.calls, args.warmup)

    row = {
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {platform.processor() or platform.machine()}",
        "date": datetime.date.today().isoformat(),
        "images": args.num_images, "batch": args.batch_size, "steps_per_call": args.steps_per_call,
        "host_loader_ms": 1e3 * host_s, "on_device_host_ms": 1e3 * device_host_s, "gather_on_device_ms": 1e3 * gather_s,
        "host_ratio": host_s / device_host_s,
        "bytes_per_call_host_loader": args.batch_size * args.steps_per_call * 3 * 32 * 32 * 4,
        "bytes_per_call_on_device": 0,
    }
    print(row)
    if args.results:
        append(Path(args.results), row, " ".join(["python", *sys.argv]))
    return row


def append(results: Path, row: dict, command: str) -> None:
    table = (
        f"\n`{command}` ({row['date']}, {row['device']}; {row['images']:,} images of 32×32×3, global batch "
        f"{row['batch']}, {row['steps_per_call']} updates a call; median of the timed calls):\n\n"
        "| path | host time per call | sent to the device per call | device time of the draw |\n|---|---|---|---|\n"
        f"| host loader (baseline) | {row['host_loader_ms']:.1f} ms "
        f"| {row['bytes_per_call_host_loader'] / 2**20:.1f} MiB float32 | — |\n"
        f"| data on the device | {row['on_device_host_ms']:.3f} ms dispatch ({row['host_ratio']:.0f}× less) | "
        f"nothing | {row['gather_on_device_ms']:.1f} ms |\n"
    )
    text = results.read_text() if results.exists() else "# Results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n"
    start = text.index(SECTION) + len(SECTION)
    following = text.find("\n## ", start)
    end = len(text) if following < 0 else following
    results.write_text(text[:end].rstrip("\n") + "\n" + table + text[end:])


if __name__ == "__main__":
    main(tyro.cli(Args))
