"""FID speed: Inception feature extraction (images/s), and the wall time of a whole training-time FID.

    python experiments/bench_fid.py --num 64 --batch-size 32                     # features, CPU, a minute
    python experiments/bench_fid.py --num 10000 --batch-size 500                 # features, accelerator
    python experiments/bench_fid.py --full --num 50000 --batch-size 500          # the 50k one-step FID, accelerator
    python experiments/bench_fid.py --full --preset smoke --num 32 --batch-size 16   # the same path, CPU

Features: random uint8 images at --image-size go through the whole pipeline (TF1 resize to 299,
scaling, InceptionV3 at HIGHEST precision), sharded over all local devices; the first batch
(compilation) is timed apart.

--full times what training does at every saving_step for one sampling mode (`FIDEvaluator`):
generate --num images with the preset's model (freshly initialised: the cost does not depend on the
weights), extract their features, compute (μ, Σ) and the Fréchet distance (scipy `sqrtm` of a
2048×2048 matrix on the host) against a reference. A first, short evaluation compiles everything and
is timed apart; the reference statistics (cached in training) are not part of the time.

--weights random builds the same network from random arrays of the standard shapes
(experiments/inception_shapes.json) for machines that cannot fetch the weights: the speed is the same,
the FID values are meaningless. Prints one JSON object.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.random as jr
import numpy as np
import tyro

from scgcm.eval import fid, inception
from scgcm.eval.scores import FIDEvaluator
from scgcm.parallel.generate import make_sampler
from scgcm.run.config import PRESETS, build_model

SHAPES = Path(__file__).with_name("inception_shapes.json")


@dataclass(frozen=True)
class Args:
    num: int = 64
    """Images timed (after the warm-up batch or evaluation)."""
    batch_size: int = 32
    """Images per step, over all local devices (sampling and Inception)."""
    image_size: int = 32
    """Side of the input images (resized to 299 on device); --full uses the model's."""
    weights: Literal["standard", "random"] = "standard"
    """'standard': the verified FID weights (fetched once); 'random': same shapes, for timing only."""
    full: bool = False
    """Time a whole FID evaluation (sampling + features + distance) instead of features alone."""
    preset: Literal["paper", "smoke"] = "paper"
    """--full: the model that samples."""
    mode: Literal["onestep", "twostep", "heun"] = "onestep"
    """--full: the sampling mode."""


def random_inception(seed: int = 0) -> inception.InceptionV3:
    """InceptionV3 of the standard shapes with random weights (timing only)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in json.loads(SHAPES.read_text()).items():
        kind = name.rsplit(".", 1)[-1]
        fan_in = int(np.prod(shape[1:])) if kind == "weight" else 1
        params[name] = (np.ones(shape, np.float32) if kind == "var" else
                        rng.normal(0, 1 / np.sqrt(fan_in), shape).astype(np.float32) if kind == "weight" else
                        np.zeros(shape, np.float32))
    return inception.InceptionV3(params)


def features_speed(args: Args, extractor: fid.FeatureExtractor) -> dict:
    images = np.random.default_rng(0).integers(0, 256, (args.num, args.image_size, args.image_size, 3), np.uint8)
    t0 = time.perf_counter()
    extractor.features(images[: extractor.batch_size])  # compile + one batch
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    extractor.features(images)
    run_s = time.perf_counter() - t0
    ips = args.num / run_s
    return {"image_size": args.image_size, "warmup_s": round(warmup_s, 2), "run_s": round(run_s, 2),
            "images_per_s": round(ips, 2), "est_50k_s": round(50_000 / ips, 1)}


def full_fid_time(args: Args, extractor: fid.FeatureExtractor) -> dict:
    cfg = PRESETS[args.preset]
    m = cfg.model
    model = build_model(m, key=jr.key(0))
    sampler = make_sampler(args.mode, shape=(m.channels, m.image_size, m.image_size), sigma_min=m.sigma_min,
                           sigma_max=m.sigma_max, two_step_sigma=cfg.sample.two_step_sigma,
                           heun_steps=cfg.sample.heun_steps)
    ref = fid.compute_statistics(np.random.default_rng(1).normal(size=(4096, 2048)).astype(np.float32))

    def evaluator(num: int) -> FIDEvaluator:
        return FIDEvaluator(ref, extractor, {args.mode: sampler}, num=num, batch_size=args.batch_size)

    t0 = time.perf_counter()
    evaluator(2 * args.batch_size)(model)  # compiles sampling and features (a full and a padded last batch)
    warmup_s = time.perf_counter() - t0
    ev = evaluator(args.num)
    t0 = time.perf_counter()
    images = ev.images(model, args.mode)
    sample_s = time.perf_counter() - t0
    feats = extractor.features(images)
    features_s = time.perf_counter() - t0 - sample_s
    value = fid.frechet_distance(*fid.compute_statistics(feats), *ref)
    total_s = time.perf_counter() - t0
    return {"preset": args.preset, "mode": args.mode, "warmup_s": round(warmup_s, 2), "sample_s": round(sample_s, 2),
            "features_s": round(features_s, 2), "distance_s": round(total_s - sample_s - features_s, 2),
            "total_s": round(total_s, 2), "fid_value_meaningless": float(value),
            "sample_images_per_s": round(args.num / sample_s, 1), "feature_images_per_s": round(args.num / features_s, 1)}


def main(args: Args) -> dict:
    t0 = time.perf_counter()
    net = inception.load_inception() if args.weights == "standard" else random_inception()
    load_s = time.perf_counter() - t0
    extractor = fid.FeatureExtractor(net, batch_size=args.batch_size)
    result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "devices": jax.device_count(),
              "num": args.num, "batch_size": extractor.batch_size, "weights": args.weights,
              "weights_load_s": round(load_s, 2), "measured_50k": args.num >= 50_000, "jax": jax.__version__}
    result.update(full_fid_time(args, extractor) if args.full else features_speed(args, extractor))
    return result


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Args))))
