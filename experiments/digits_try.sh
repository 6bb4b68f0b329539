#!/usr/bin/env bash
# A candidate digits run (issue #20, not yet a preset): 400 updates of batch 32 on the 8x8 digits, FID network = the
# digits classifier, 250 one- and two-step samples at steps 0, 200, 400. Usage: experiments/digits_try.sh RUN_DIR [flags]
W=$1; shift
JAX_PLATFORMS=cpu python -m scgcm.train --config.preset smoke \
  --config.model.image-size 8 --config.model.channels 1 --config.model.torso.nf 16 --config.model.torso.ch-mult 1 2 \
  --config.model.torso.attn-resolutions --config.model.head.channel-mult 1 2 --config.model.head.attn-levels \
  --config.batch-size 32 --config.steps-per-call 4 --config.optim.torso-lr 4e-4 --config.optim.head-lr 4e-4 \
  --config.ict.s1 160 --config.optim.ema-decay 0.99 --config.total-steps 400 --config.saving-step 200 \
  --config.sample.sampling-step 200 --config.sample.grid-size 64 --config.log-every 20 \
  --config.data.source digits --config.fid.enabled --config.fid.num 250 --config.fid.batch-size 250 \
  --config.fid.modes onestep twostep --config.fid.at-start --config.sample.no-final-sampling --config.workdir $W "$@"
