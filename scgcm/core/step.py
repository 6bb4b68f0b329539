"""One training update, and a scan of several, as pure functions of (state, batch).

Every per-example draw (σ index, noise, dropout masks) comes from
`fold_in(fold_in(state.key, step), global example index)`, so the result does not depend on
how the batch is split over devices or micro-batches. Inside `shard_map` pass `axis_name`:
losses and gradients are then averaged over that axis before the optimizer sees them.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, Float, Int, PyTree

from scgcm.core.ema import ema_update, power_ema_update
from scgcm.core.ict import ICTSchedule
from scgcm.core.losses import JointLoss
from scgcm.core.state import TrainState
from scgcm.nn.model import SCGCM, split_trainable


def _all_finite(tree: PyTree) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def cast_floats(tree: PyTree, dtype) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def batch_loss(
    trainable: SCGCM,
    frozen: SCGCM,
    images: Float[Array, "b c h w"],
    example_ids: Int[Array, " b"],
    step: Int[Array, ""],
    step_key,
    *,
    schedule: ICTSchedule,
    loss_fn: JointLoss,
    compute_dtype=None,
) -> tuple[Float[Array, ""], tuple[Float[Array, ""], Float[Array, ""]]]:
    """Mean of L_CT + L_DSM over the batch, and the two means as aux."""
    model = eqx.combine(trainable, frozen)
    if compute_dtype is not None:
        model = cast_floats(model, compute_dtype)

    def one(y, example_id):
        sigma_key, noise_key, dropout_key = jr.split(jr.fold_in(step_key, example_id), 3)
        sigma, sigma_prev, weight = schedule.sample(sigma_key, step)
        noise = jr.normal(noise_key, y.shape, y.dtype)
        return loss_fn(model, y, noise, sigma, sigma_prev, weight, dropout_key)

    loss_ct, loss_dsm = jax.vmap(one)(images, example_ids)
    loss_ct, loss_dsm = jnp.mean(loss_ct), jnp.mean(loss_dsm)
    return loss_ct + loss_dsm, (loss_ct, loss_dsm)


def gradients(
    trainable: SCGCM,
    frozen: SCGCM,
    images: Float[Array, "b c h w"],
    example_ids: Int[Array, " b"],
    step: Int[Array, ""],
    step_key,
    *,
    schedule: ICTSchedule,
    loss_fn: JointLoss,
    grad_accum: int = 1,
    compute_dtype=None,
    axis_name: str | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""], SCGCM]:
    """(mean L_CT, mean L_DSM, their gradient) over the batch, accumulated over `grad_accum` equal
    micro-batches, and averaged over `axis_name` under shard_map."""
    grad_fn = eqx.filter_value_and_grad(batch_loss, has_aux=True)
    kwargs = dict(schedule=schedule, loss_fn=loss_fn, compute_dtype=compute_dtype)
    # Under shard_map the replicated weights are device-invariant and AD would already sum their gradients
    # over `axis_name` (then ×devices after the pmean below): differentiate a device-varying view instead.
    vary = (lambda t: t) if axis_name is None else (lambda t: jax.lax.pcast(t, axis_name, to="varying"))
    params = vary(trainable)

    if grad_accum == 1:
        (_, (loss_ct, loss_dsm)), grads = grad_fn(params, frozen, images, example_ids, step, step_key, **kwargs)
    else:  # micro-batches of equal size: the mean of their means is the full-batch mean
        micro = lambda a: a.reshape(grad_accum, a.shape[0] // grad_accum, *a.shape[1:])

        def accumulate(carry, batch):
            (_, aux), g = grad_fn(params, frozen, *batch, step, step_key, **kwargs)
            return jax.tree_util.tree_map(jnp.add, carry, (aux, g)), None

        zeros = vary(((jnp.zeros(()), jnp.zeros(())), jax.tree_util.tree_map(jnp.zeros_like, trainable)))
        ((loss_ct, loss_dsm), grads), _ = jax.lax.scan(accumulate, zeros, (micro(images), micro(example_ids)))
        loss_ct, loss_dsm, grads = jax.tree_util.tree_map(lambda x: x / grad_accum, (loss_ct, loss_dsm, grads))

    if axis_name is not None:
        loss_ct, loss_dsm, grads = jax.lax.pmean((loss_ct, loss_dsm, grads), axis_name)
    return loss_ct, loss_dsm, grads


def update_emas(state: TrainState, new_trainable: SCGCM, step: Int[Array, ""], *, ema_decay: float,
                ema_copy_steps: int, phema_gammas: tuple[float, ...]) -> tuple[SCGCM, tuple[SCGCM, ...] | None]:
    """The EMA and the power-function EMAs (`state.phema`, exponents `phema_gammas`) after update `step`."""
    ema_trainable, ema_frozen = split_trainable(state.ema)
    with jax.named_scope("ema"):
        ema = eqx.combine(ema_update(ema_trainable, new_trainable, step, ema_decay, ema_copy_steps), ema_frozen)
    phema = state.phema
    if phema is not None:
        if len(phema_gammas) != len(phema):
            raise ValueError(f"{len(phema)} power-function EMAs in the state but {len(phema_gammas)} exponents")
        with jax.named_scope("phema"):
            phema = tuple(eqx.combine(power_ema_update(split_trainable(p)[0], new_trainable, step, g), split_trainable(p)[1])
                          for p, g in zip(phema, phema_gammas))
    return ema, phema


def keep_if_finite(state: TrainState, new_state: TrainState, loss_ct, loss_dsm, grads) -> tuple[TrainState, dict, Array]:
    """`new_state` if both losses and every gradient are finite, else `state`'s model, EMAs and optimizer
    state with `new_state`'s step; with the `finite_*` flags and their conjunction."""
    parts = lambda s: (eqx.filter(s.model, eqx.is_array), eqx.filter(s.ema, eqx.is_array), s.opt_state,
                       eqx.filter(s.phema, eqx.is_array))
    with jax.named_scope("nan_guard"):
        finite = {
            "finite_ct": jnp.isfinite(loss_ct),
            "finite_dsm": jnp.isfinite(loss_dsm),
            "finite_grad": _all_finite(grads),
        }
        ok = finite["finite_ct"] & finite["finite_dsm"] & finite["finite_grad"]
        # one cond, not a select per array: the per-array selects tripled the step's XLA compile time on CPU
        model, ema, opt_state, phema = jax.lax.cond(ok, lambda: parts(new_state), lambda: parts(state))
    phema = None if state.phema is None else eqx.combine(phema, state.phema)
    kept = TrainState(eqx.combine(model, state.model), eqx.combine(ema, state.ema), opt_state, new_state.step,
                      state.key, phema)
    return kept, finite, ok


def train_step(
    state: TrainState,
    images: Float[Array, "b c h w"],
    example_ids: Int[Array, " b"],
    *,
    optim: optax.GradientTransformation,
    schedule: ICTSchedule,
    loss_fn: JointLoss,
    ema_decay: float,
    ema_copy_steps: int = 2,
    phema_gammas: tuple[float, ...] = (),
    grad_accum: int = 1,
    compute_dtype=None,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """One update: gradients → optimizer → EMAs → NaN guard → metrics. A non-finite loss or gradient
    leaves model, EMA and optimizer state as they were (the step still advances) and sets `skipped`; the
    caller decides whether to stop or go on. `phema_gammas` are the exponents of `state.phema`'s
    power-function EMAs (`scgcm.core.ema`)."""
    trainable, frozen = split_trainable(state.model)
    loss_ct, loss_dsm, grads = gradients(
        trainable, frozen, images, example_ids, state.step, jr.fold_in(state.key, state.step), schedule=schedule,
        loss_fn=loss_fn, grad_accum=grad_accum, compute_dtype=compute_dtype, axis_name=axis_name)

    with jax.named_scope("optimizer"):  # scopes name the parts in profiles (experiments/bench_train.py --profile)
        updates, opt_state = optim.update(grads, state.opt_state, trainable)
        new_trainable = eqx.apply_updates(trainable, updates)
    step = state.step + 1
    ema, phema = update_emas(state, new_trainable, step, ema_decay=ema_decay, ema_copy_steps=ema_copy_steps,
                             phema_gammas=phema_gammas)
    new_state, finite, ok = keep_if_finite(
        state, TrainState(eqx.combine(new_trainable, frozen), ema, opt_state, step, state.key, phema),
        loss_ct, loss_dsm, grads)

    with jax.named_scope("metrics"):
        grad_norm = optax.global_norm(grads.torso)
        update_distance = optax.global_norm(jax.tree_util.tree_map(jnp.subtract, new_trainable.torso, trainable.torso))
    metrics = {
        "loss_ct": loss_ct,
        "loss_dsm": loss_dsm,
        "grad_norm": grad_norm,
        "update_distance": update_distance,
        "num_scales": schedule.num_scales(state.step),
        "skipped": (~ok).astype(jnp.int32),
        **finite,
    }
    return new_state, metrics


def train_steps(
    state: TrainState, images: Float[Array, "n b c h w"], offset: Int[Array, ""] | int = 0, **kwargs
) -> tuple[TrainState, dict[str, Array]]:
    """`n` consecutive updates in one lax.scan; metrics are stacked along a leading axis of size n.

    `offset` is the global index of this device's first example (0 on a single device).
    """
    example_ids = offset + jnp.arange(images.shape[1])
    arrays, static = eqx.partition(state, eqx.is_array)  # the scan carry must hold arrays only

    def body(arrays, batch):
        new_state, metrics = train_step(eqx.combine(arrays, static), batch, example_ids, **kwargs)
        return eqx.filter(new_state, eqx.is_array), metrics

    arrays, metrics = jax.lax.scan(body, arrays, images)
    return eqx.combine(arrays, static), metrics
