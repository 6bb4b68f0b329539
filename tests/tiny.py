"""The tiny configuration every test shares (16×16 images, a few thousand parameters per block)."""

import dataclasses

from scgcm.config import SMOKE, HeadConfig, ModelConfig, TorsoConfig, TrainConfig

TINY_MODEL = ModelConfig(
    torso=TorsoConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,)),
    head=HeadConfig(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,)),
    image_size=16,
)


def tiny_config(**overrides) -> TrainConfig:
    base = dataclasses.replace(SMOKE, model=TINY_MODEL, batch_size=8, steps_per_call=2)
    return dataclasses.replace(base, **overrides)
