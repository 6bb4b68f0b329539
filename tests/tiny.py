"""The tiny configuration every test shares (16×16 images, a few thousand parameters per block)."""

import dataclasses
import functools

from scgcm.run.config import SMOKE, HeadConfig, ModelConfig, TorsoConfig, TrainConfig

TINY_MODEL = ModelConfig(
    torso=TorsoConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,)),
    head=HeadConfig(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,)),
    image_size=16,
)

# Smaller still (one level, no attention), where only the plumbing matters: fewest ops, fastest compiles.
MICRO_MODEL = ModelConfig(
    torso=TorsoConfig(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()),
    head=HeadConfig(model_channels=8, channel_mult=(1,), num_blocks=1, attn_levels=()),
    image_size=8,
)

# MICRO_MODEL with self-attention in torso and head: every kind of layer the step has, at the least
# compile cost (the shard_map, accumulation, bfloat16, remat and benchmark tests).
MICRO_ATTN_MODEL = ModelConfig(
    torso=TorsoConfig(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,)),
    head=HeadConfig(model_channels=8, channel_mult=(1,), num_blocks=1, attn_levels=(0,)),
    image_size=8,
)


def tiny_config(**overrides) -> TrainConfig:
    base = dataclasses.replace(SMOKE, model=TINY_MODEL, batch_size=8, steps_per_call=2)
    return dataclasses.replace(base, **overrides)


@functools.cache
def tiny_train_step():
    """One jitted single-device `train_step` of MICRO_ATTN_MODEL with fixed tiny hyperparameters,
    shared by every test that needs it (one compile per session)."""
    import equinox as eqx
    import optax

    from scgcm.core.step import train_step
    from scgcm.run.config import build_loss, build_schedule

    cfg = tiny_config(model=MICRO_ATTN_MODEL)
    optim = optax.adam(1e-3)  # RAdam's warm-up would need hundreds of updates to show a trend
    step = functools.partial(train_step, optim=optim, schedule=build_schedule(cfg), loss_fn=build_loss(cfg), ema_decay=0.9)
    return eqx.filter_jit(step), optim
