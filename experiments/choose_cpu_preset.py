"""Measure candidate model sizes for the `cpu` preset: training images/s on this machine (issue 10).

    python experiments/choose_cpu_preset.py                 # every candidate, a JSON line each
    python experiments/choose_cpu_preset.py --names n32-b1  # some of them

Each candidate is the smoke preset with another torso/head size and batch, at 32×32: we build the
state, compile the real training call (`make_train_fn`, `steps_per_call` updates) and time `--calls`
calls after the first. Images/s × 25 minutes is the number of images the run can see, which is the
budget the preset is chosen against (experiments/RESULTS.md, "CPU study").
"""

import dataclasses
import json
import sys
import time
from dataclasses import dataclass

import jax
import numpy as np
import tyro

from scgcm.core.state import make_optimizer
from scgcm.parallel.mesh import global_batch, make_mesh, replicate
from scgcm.parallel.train_fn import make_train_fn
from scgcm.run.config import SMOKE, HeadConfig, ModelConfig, TorsoConfig, build_loss, build_schedule, build_state


def candidate(nf: int, ch_mult: tuple[int, ...], blocks: int, attn: tuple[int, ...], head: int, batch: int):
    model = ModelConfig(
        torso=TorsoConfig(nf=nf, ch_mult=ch_mult, num_res_blocks=blocks, attn_resolutions=attn, dropout=0.0),
        head=HeadConfig(model_channels=head, channel_mult=(1, 2), num_blocks=1, attn_levels=()),
    )
    return dataclasses.replace(SMOKE, model=model, batch_size=batch, steps_per_call=4)


CANDIDATES = {
    "n8-2lvl-bs32": candidate(8, (1, 2), 1, (), 8, 32),
    "n16-2lvl-bs32": candidate(16, (1, 2), 1, (), 16, 32),
    "n32-2lvl-bs32": candidate(32, (1, 2), 1, (), 16, 32),
    "n16-b1-bs32": candidate(16, (1, 2, 2), 1, (), 16, 32),
    "n32-b1-bs32": candidate(32, (1, 2, 2), 1, (), 16, 32),
    "n32-b1-attn8-bs32": candidate(32, (1, 2, 2), 1, (8,), 16, 32),
    "n32-b2-bs32": candidate(32, (1, 2, 2), 2, (), 16, 32),
    "n64-b1-bs32": candidate(64, (1, 2, 2), 1, (), 32, 32),
    "n32-b1-bs64": candidate(32, (1, 2, 2), 1, (), 16, 64),
}


@dataclass(frozen=True)
class Args:
    names: tuple[str, ...] = tuple(CANDIDATES)
    """Candidates to measure."""
    calls: int = 3
    """Timed calls after the first (compiling) one."""


def measure(name: str, cfg, calls: int) -> dict:
    mesh = make_mesh(jax.devices()[:1])
    optim = make_optimizer(cfg.optim.torso_lr, cfg.optim.head_lr)
    state = replicate(build_state(cfg, optim), mesh)
    params = sum(x.size for x in jax.tree_util.tree_leaves(state.model) if hasattr(x, "size"))
    fn = make_train_fn(mesh, state, optim=optim, schedule=build_schedule(cfg), loss_fn=build_loss(cfg),
                       ema_decay=cfg.optim.ema_decay, ema_copy_steps=2)
    rng = np.random.default_rng(0)
    batch = lambda: global_batch(rng.uniform(-1, 1, (cfg.steps_per_call, cfg.batch_size, 3, 32, 32)).astype(np.float32), mesh)
    t0 = time.perf_counter()
    state, m = fn(state, batch())
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        state, m = fn(state, batch())
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    per_update = min(times) / cfg.steps_per_call
    return {"name": name, "params": int(params), "batch": cfg.batch_size, "first_call_s": round(first, 1),
            "s_per_update": round(per_update, 3), "images_per_s": round(cfg.batch_size / per_update, 1),
            "updates_in_25_min": int(25 * 60 / per_update),
            "kimg_in_25_min": round(25 * 60 / per_update * cfg.batch_size / 1000, 1)}


def main(args: Args) -> None:
    for name in args.names:
        print(json.dumps(measure(name, CANDIDATES[name], args.calls)), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args, args=sys.argv[1:]))
