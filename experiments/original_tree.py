"""The arrays of the ORIGINAL code's checkpoint (github:boingkiri/stabilizing_consistency), by name,
shape and dtype, as its orbax CheckpointManager writes them: one StandardCheckpointHandler item per
model (`diffusion`: the consistency network, NCSN++; `head`: the score head, UNet++), each a flax
TrainState with `step`, `params`, `opt_state` and `params_ema` (utils/jax_utils.py; utils/fs_utils.py).

The table of `python -m scgcm.convert` (scgcm/nn/original_names.py) is checked against this file by
tests/test_convert.py: the same names and shapes. Nothing is materialised: the original's own
CMFramework init runs under jax.eval_shape (experiments/reference_plan.py's `build_reference`).

Set-up (the original needs flax and hydra; scgcm does not), then:

    python -m venv ../refenv && ../refenv/bin/pip install "jax[cpu]==$(python -c 'import jax; print(jax.__version__)')" flax optax hydra-core einops tqdm
    ../refenv/bin/python experiments/original_tree.py --src ../refsrc --out experiments/original_tree.json

`--config config_vanilla` for the vanilla variant (same networks). Prints the parameter counts.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import reference_plan  # noqa: E402  (puts --src on sys.path and stubs the original's I/O modules)


def flat(tree) -> list[list]:
    """[[keypath, shape, dtype], …] of every leaf, keypaths as '/'-joined names."""
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        rows.append([name, list(leaf.shape), str(leaf.dtype)])
    return rows


def collapse(opt_state: list[list], params: list[list]) -> list[list]:
    """The optimizer state with every copy of the parameter tree (moments, accumulated gradients) written
    once as [prefix + "/<params>", "params", ""]: the file stays small and the structure stays exact."""
    shapes = {name: shape for name, shape, _ in params}
    rows, seen = [], set()
    for name, shape, dtype in opt_state:
        for p in shapes:
            if (name == p or name.endswith("/" + p)) and shapes[p] == shape:
                prefix = name[: len(name) - len(p)].rstrip("/")
                if prefix not in seen:
                    seen.add(prefix)
                    rows.append([prefix + "/<params>", "params", dtype])
                break
        else:
            rows.append([name, shape, dtype])
    return rows


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=reference_plan.SRC)
    ap.add_argument("--config", default="config")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("original_tree.json"))
    args = ap.parse_args()
    cfg, fw, _ = reference_plan.build_reference(args.config)
    states = fw.training_states
    out = {}
    for item, key in (("diffusion", "torso_state"), ("head", "head_state")):
        state = states[key]
        params = flat(state.params)
        ema = flat(state.params_ema)
        assert [r[0] for r in ema] == [r[0] for r in params], "params_ema mirrors params"
        out[item] = {"step": flat(state.step), "params": params, "opt_state": collapse(flat(state.opt_state), params)}
        print(f"{item}: {len(params)} parameter arrays, "
              f"{sum(int(np.prod(r[1])) for r in params):,} numbers; {len(out[item]['opt_state'])} opt_state arrays")
    args.out.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
