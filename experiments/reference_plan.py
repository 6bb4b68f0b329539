"""Baseline for bench_train --memory-only: XLA's memory plan, compile time and FLOPs of the ORIGINAL
reference training step (github:boingkiri/stabilizing_consistency, Flax linen), on one device of this host.

It builds the reference's own CMFramework (framework/diffusion/consistency_framework.py) from the
reference's own Hydra configs (configs/config.yaml = score variant), takes the per-device `update`
closure (the body of its `jax.pmap(partial(jax.lax.scan, update))`), and lowers and compiles ONE update
(not its 4-step scan) under jit, the pmap axis "batch" bound by a 1-device shard_map, the state donated.
Parameters are never materialised (the reference's init runs under jax.eval_shape). Nothing of the
reference is rewritten; modules used only for I/O (LPIPS, file system, wandb) are stubbed, and two
names removed from JAX since 0.4.20 are aliased.

Set-up (a separate environment: the reference needs flax and hydra, scgcm does not):

    git clone https://github.com/boingkiri/stabilizing_consistency ../refsrc   # or the `fetch` snapshot
    python -m venv ../refenv && ../refenv/bin/pip install "jax[cpu]==$(python -c 'import jax; print(jax.__version__)')" flax optax hydra-core einops tqdm
    ../refenv/bin/python experiments/reference_plan.py --src ../refsrc --batch-sizes 4 8

Compare with `python experiments/bench_train.py --memory-only --batch-sizes 4 8 --dtypes float32 --variants score`
under the same JAX version on the same host (experiments/RESULTS.md, "Memory").
"""
import argparse
import os
import sys
import time
import types

_src = argparse.ArgumentParser(add_help=False)
_src.add_argument("--src", default=os.environ.get("SCGCM_REFERENCE_SRC", "../refsrc"))
SRC = os.path.abspath(_src.parse_known_args()[0].src)  # the reference checkout, imported below
sys.path.insert(0, SRC)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

# ---------------------------------------------------------------- compatibility shims
# (API renames/removals between JAX 0.4.20 and 0.10.2; no semantic change)
if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree_util.tree_map          # used by utils/ema/*.py
if not hasattr(jax.sharding, "PositionalSharding"):
    class _PositionalShardingUnused:               # imported (unused) by utils/jax_utils.py
        pass
    jax.sharding.PositionalSharding = _PositionalShardingUnused

# ---------------------------------------------------------------- stubs for I/O-only modules
# consistency_framework imports these at module level; none is used by the train step.
_lp = types.ModuleType("lpips_jax")
class _LPIPSEvaluatorStub:                          # only used for loss: lpips (not selected)
    def __init__(self, *a, **k): pass
_lp.LPIPSEvaluator = _LPIPSEvaluatorStub
sys.modules["lpips_jax"] = _lp

_fs = types.ModuleType("utils.fs_utils")            # checkpoint/file I/O (tf, PIL, matplotlib, orbax)
class FSUtils:
    def load_model_state(self, states):             # no checkpoint on disk -> identity
        return states
_fs.FSUtils = FSUtils
sys.modules["utils.fs_utils"] = _fs

_log = types.ModuleType("utils.log_utils")          # wandb logging
class WandBLog:
    def update_log(self, d): pass
_log.WandBLog = WandBLog
sys.modules["utils.log_utils"] = _log

import utils  # noqa: E402  (package in src/)

utils.fs_utils = _fs
utils.log_utils = _log

import flax  # noqa: E402
import flax.jax_utils  # noqa: E402
from framework.diffusion import consistency_framework as cf  # noqa: E402  (reference code)
from hydra import compose, initialize_config_dir  # noqa: E402


def build_reference(config_name="config"):
    with initialize_config_dir(version_base=None, config_dir=os.path.join(SRC, "configs")):
        cfg = compose(config_name=config_name)

    # 1) init_model_state under eval_shape: the reference's own init (model.init, model.apply,
    #    create_optimizer, TrainState.create, head.init) but abstract -> no params materialised.
    orig_init = cf.CMFramework.init_model_state

    def abstract_init(self, config):
        key0 = self.rand_key
        out = jax.eval_shape(lambda: orig_init(self, config))
        self.rand_key = key0                        # don't keep the leaked tracer
        return out

    # 2) capture the pmapped functions instead of pmapping them; skip replication.
    captured = {}
    orig_pmap, orig_repl = jax.pmap, flax.jax_utils.replicate

    def fake_pmap(f, **kw):
        captured.setdefault("pmaps", []).append((f, kw))
        return ("pmap", f, kw)

    cf.CMFramework.init_model_state = abstract_init
    jax.pmap = fake_pmap
    flax.jax_utils.replicate = lambda x, *a, **k: x
    try:
        fw = cf.CMFramework(cfg, jax.random.PRNGKey(cfg.rand_seed), FSUtils(), WandBLog())
    finally:
        cf.CMFramework.init_model_state = orig_init
        jax.pmap = orig_pmap
        flax.jax_utils.replicate = orig_repl

    tag, scan_partial, kw = fw.update_fn
    assert scan_partial.func is jax.lax.scan and kw == {"axis_name": "batch"}
    update = scan_partial.args[0]                  # the reference's per-device `update(carry, x0)`
    return cfg, fw, update


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=SRC, help="the reference repository's checkout")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--config", default="config")   # config = score, config_vanilla = vanilla
    ap.add_argument("--scan4", action="store_true",
                    help="also lower the reference's real n_jitted_steps=4 lax.scan body")
    args = ap.parse_args()

    print("jax", jax.__version__, "flax", flax.__version__, "devices", jax.devices())
    t0 = time.perf_counter()
    cfg, fw, update = build_reference(args.config)
    print(f"reference built (abstract init) in {time.perf_counter() - t0:.1f}s; "
          f"gradient_flow_from_head={cfg.framework.diffusion.gradient_flow_from_head}")
    states = fw.training_states                     # {'torso_state', 'head_state'} abstract TrainStates
    tp, hp = states["torso_state"].params, states["head_state"].params
    print(f"params torso={count(tp):,} head={count(hp):,}")
    print(f"state leaves total (params+ema+opt) = {count(states):,} elements")

    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))

    def per_device(carry, x0):                      # one update; pmean over a 1-device axis
        return update(carry, x0)

    def per_device_scan(carry, xs):                 # what pmap(partial(lax.scan, update)) runs
        return jax.lax.scan(update, carry, xs)

    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)    # jax.random.PRNGKey (raw uint32 key)
    results = {}
    for B in args.batch_sizes:
        for name, fn, xshape in ([("step", per_device, (B, 32, 32, 3))]
                                 + ([("scan4", per_device_scan, (4, B, 32, 32, 3))] if args.scan4 else [])):
            sm = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P()), out_specs=(P(), P()),
                               check_vma=False)
            jf = jax.jit(sm, donate_argnums=(0,))
            x0 = jax.ShapeDtypeStruct(xshape, jnp.float32)
            t1 = time.perf_counter()
            lowered = jf.lower((rng, states), x0)
            t_lower = time.perf_counter() - t1
            ca = lowered.cost_analysis()
            flops = ca["flops"] if isinstance(ca, dict) else ca[0]["flops"]
            t2 = time.perf_counter()
            compiled = lowered.compile()
            t_compile = time.perf_counter() - t2
            ma = compiled.memory_analysis()
            r = dict(arg=ma.argument_size_in_bytes, out=ma.output_size_in_bytes,
                     temp=ma.temp_size_in_bytes, alias=ma.alias_size_in_bytes,
                     gen_code=ma.generated_code_size_in_bytes,
                     lower_s=t_lower, compile_s=t_compile, flops=flops)
            nimg = B * (4 if name == "scan4" else 1)
            results[(name, B)] = r
            print(f"[{name} B={B}] args={r['arg']:,} out={r['out']:,} temp={r['temp']:,} "
                  f"alias={r['alias']:,} code={r['gen_code']:,} lower={t_lower:.1f}s "
                  f"compile={t_compile:.1f}s flops={flops:.4e} ({flops / nimg / 1e9:.1f} GFLOP/img)",
                  flush=True)
    bs = sorted(b for (n, b) in results if n == "step")
    if len(bs) >= 2:
        b0, b1 = bs[0], bs[-1]
        t0_, t1_ = results[("step", b0)]["temp"], results[("step", b1)]["temp"]
        slope = (t1_ - t0_) / (b1 - b0)
        print(f"temp slope per image = {slope:,.0f} B; fixed part (temp at B=0) = {t0_ - slope * b0:,.0f} B")


if __name__ == "__main__":
    main()
