"""Training state: model, EMA, optimizer state, step counter and the run's key.

`step` is the one counter: the number of completed optimizer updates. The curriculum reads it
before an update (0 at the first), the EMA rule after it (1 at the first update).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from scgcm.nn.model import SCGCM, split_trainable


class TrainState(eqx.Module):
    model: SCGCM
    ema: SCGCM
    opt_state: PyTree
    step: Int[Array, ""]
    key: PRNGKeyArray
    phema: tuple[SCGCM, ...] | None = None
    """Power-function EMAs for post-hoc EMA (`--config.phema`, `scgcm.phema`); None when off, so that a
    default state (and its checkpoints) is unchanged."""


OPTIMIZERS = {"radam": optax.radam, "adam": optax.adam}
"""Optax's RAdam (the method's) and Adam (no rectification: full steps from the first update)."""


def make_optimizer(torso_lr: float, head_lr: float, name: str = "radam") -> optax.GradientTransformation:
    """RAdam (or `name` in OPTIMIZERS; optax defaults) on torso and head, each with its own rate, no clipping,
    no decay."""
    opt = OPTIMIZERS[name]

    def labels(params: SCGCM) -> SCGCM:
        return eqx.tree_at(
            lambda m: (m.torso, m.head),
            params,
            (jax.tree_util.tree_map(lambda _: "torso", params.torso), jax.tree_util.tree_map(lambda _: "head", params.head)),
        )

    return optax.multi_transform({"torso": opt(torso_lr), "head": opt(head_lr)}, labels)


def init_state(model: SCGCM, optim: optax.GradientTransformation, key: PRNGKeyArray, num_phema: int = 0) -> TrainState:
    """`num_phema` power-function EMAs besides the EMA (0: none, the field is None)."""
    trainable, _ = split_trainable(model)
    copy = lambda: jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, model)  # own buffers
    phema = tuple(copy() for _ in range(num_phema)) if num_phema else None
    return TrainState(model, copy(), optim.init(trainable), jnp.zeros((), jnp.int32), key, phema)
