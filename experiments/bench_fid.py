"""Inception feature-extraction throughput: images/s and the wall time it implies for 50,000 images.

    python experiments/bench_fid.py --num 64 --batch-size 32        # CPU, a minute
    python experiments/bench_fid.py --num 10000 --batch-size 500    # accelerator

Random uint8 images at --image-size go through the whole pipeline (TF1 resize to 299, scaling,
InceptionV3), sharded over all local devices. The first batch (compilation) is timed apart.
Prints one JSON object.
"""

import json
import time
from dataclasses import dataclass

import jax
import numpy as np
import tyro

from scgcm import fid, inception


@dataclass(frozen=True)
class Args:
    num: int = 64
    """Images timed after the warm-up batch."""
    batch_size: int = 32
    """Images per step, over all local devices."""
    image_size: int = 32
    """Side of the input images (resized to 299 on device)."""


def main(args: Args) -> dict:
    t0 = time.perf_counter()
    net = inception.load_inception()
    load_s = time.perf_counter() - t0
    extractor = fid.FeatureExtractor(net, batch_size=args.batch_size)
    images = np.random.default_rng(0).integers(0, 256, (args.num, args.image_size, args.image_size, 3), np.uint8)
    t0 = time.perf_counter()
    extractor.features(images[: extractor.batch_size])  # compile + one batch
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    extractor.features(images)
    run_s = time.perf_counter() - t0
    ips = args.num / run_s
    return {
        "device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "devices": jax.device_count(),
        "num": args.num, "batch_size": extractor.batch_size, "image_size": args.image_size,
        "weights_load_s": round(load_s, 2), "warmup_s": round(warmup_s, 2), "run_s": round(run_s, 2),
        "images_per_s": round(ips, 2), "est_50k_s": round(50_000 / ips, 1), "measured_50k": args.num >= 50_000,
        "jax": jax.__version__,
    }


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Args))))
