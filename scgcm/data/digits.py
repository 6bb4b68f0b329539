"""scikit-learn's handwritten digits as a data source (`--config.data.source digits`): 1,797 real 8×8 grey
images of the 10 digits (the UCI optdigits test set, shipped inside scikit-learn, no download).

Pixels are counts 0 … 16 (of a 4×4 block of a 32×32 bitmap); they become uint8 by
`round_half_up(v · 255 / 16)`: 0 → 0, 1 → 16, 8 → 128, 16 → 255 (`digits_to_uint8`). The split is fixed:
image i is held out (`split="test"`, 360 images) when i % 5 == 0, else it trains (`split="train"`, 1,437).
"""

import hashlib

import numpy as np
from jaxtyping import Int, UInt8

LEVELS = 16
HELD_OUT_EVERY = 5
SPLITS = ("train", "test")


def digits_to_uint8(values: np.ndarray) -> UInt8[np.ndarray, "..."]:
    """Counts 0 … 16 → uint8 0 … 255, v·255/16 rounded half up."""
    v = np.asarray(values, np.float64)
    if v.size and (v.min() < 0 or v.max() > LEVELS):
        raise ValueError(f"digit pixels must lie in [0, {LEVELS}], got [{v.min()}, {v.max()}]")
    return np.floor(v * 255.0 / LEVELS + 0.5).astype(np.uint8)


def split_mask(num: int, split: str) -> np.ndarray:
    """The images of `split`: held out are those with index % HELD_OUT_EVERY == 0."""
    if split not in SPLITS:
        raise ValueError(f"the digits have the splits {', '.join(SPLITS)}, not {split!r}")
    held_out = np.arange(num) % HELD_OUT_EVERY == 0
    return held_out if split == "test" else ~held_out


def load_digits(split: str = "train") -> tuple[UInt8[np.ndarray, "n 8 8 1"], Int[np.ndarray, " n"]]:
    """(uint8 images [N, 8, 8, 1], labels [N]) of one split."""
    from sklearn.datasets import load_digits as sklearn_digits  # scikit-learn takes ~1 s to import

    raw = sklearn_digits()
    mask = split_mask(len(raw.target), split)
    return digits_to_uint8(raw.images[mask])[..., None], raw.target[mask].astype(np.int64)


def fingerprint(split: str = "train") -> str:
    """A digest of the split's pixels and labels, for caches keyed by content."""
    images, labels = load_digits(split)
    h = hashlib.sha256(images.tobytes())
    h.update(labels.tobytes())
    return f"digits:{split}:{h.hexdigest()[:16]}"
