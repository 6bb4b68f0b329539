"""The feature network of the digits testbed (`--config.data.source digits`), in place of Inception,
which is never run on 8×8 digits.

A one-hidden-layer classifier of the real training digits (scikit-learn's `MLPClassifier`, 64 ReLU units,
fixed seed: deterministic), cached by content (the data's digest, the hyper-parameters and scikit-learn's
version) next to the Inception weights. Its held-out accuracy is measured on the fixed test split and
stored with it. `DigitsNetwork` is a feature extractor like `fid.FeatureExtractor`, so the evaluator,
the sweep, `scgcm.sample --fid` and the report use it unchanged:

* `features`: the hidden layer; the Fréchet distance on them is the testbed's FID (logged as `fid_<mode>`);
* `image_scores` adds, per mode: `confident` (share of samples classified with probability ≥ 0.8),
  `classes` (distinct classes among those) and `memorised` (share of samples nearer, in pixels, to a
  training digit than 95 % of the real held-out digits are: about 0.05 for new digits, 1 for copies).
"""

import hashlib
import json
from pathlib import Path

import numpy as np
from jaxtyping import Float, UInt8

from scgcm.data import digits
from scgcm.eval import inception
from scgcm.eval.fid import FeatureExtractor

HIDDEN = 64
SEED = 0
MAX_ITER = 500
CONFIDENT = 0.8
MEMORISED_QUANTILE = 0.05
MIN_ACCURACY = 0.97


def _pixels(images: UInt8[np.ndarray, "n 8 8 c"]) -> Float[np.ndarray, "n 64"]:
    """The classifier's input: channel 0 (grey; RGB copies of it) as [0, 1] floats."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:3] != (8, 8):
        raise ValueError(f"the digits network takes [N, 8, 8, C] images, got {images.shape}")
    return images[..., 0].reshape(len(images), 64).astype(np.float64) / 255.0


def nearest_distances(a: Float[np.ndarray, "n d"], b: Float[np.ndarray, "m d"]) -> Float[np.ndarray, " n"]:
    """Euclidean distance of each row of `a` to its nearest row of `b`."""
    d2 = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.sqrt(np.maximum(d2.min(1), 0.0))


class DigitsNetwork(FeatureExtractor):
    """Features, class probabilities and digit scores of uint8 [N, 8, 8, C] images: a `FeatureExtractor`
    whose network is three numpy arrays (nothing to shard or jit)."""

    feature_dim = HIDDEN

    def __init__(self, params: dict[str, np.ndarray]):
        self.w1, self.b1, self.w2, self.b2 = (np.asarray(params[k], np.float64) for k in ("w1", "b1", "w2", "b2"))
        self.accuracy = float(params["accuracy"])
        self.train_pixels = np.asarray(params["train_pixels"], np.float64)
        self.memorised_radius = float(params["memorised_radius"])
        h = hashlib.sha256()
        for k in ("w1", "b1", "w2", "b2"):
            h.update(np.ascontiguousarray(params[k], np.float64).tobytes())
        self.weights_id = "digits-mlp:" + h.hexdigest()[:16]

    def features(self, images: UInt8[np.ndarray, "n 8 8 c"]) -> Float[np.ndarray, "n 64"]:
        return np.maximum(_pixels(images) @ self.w1 + self.b1, 0.0)

    def probabilities(self, images: UInt8[np.ndarray, "n 8 8 c"]) -> Float[np.ndarray, "n 10"]:
        logits = self.features(images) @ self.w2 + self.b2
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def image_scores(self, images: UInt8[np.ndarray, "n 8 8 c"]) -> dict[str, float]:
        p = self.probabilities(images)
        sure = p.max(1) >= CONFIDENT
        memorised = nearest_distances(_pixels(images), self.train_pixels) < self.memorised_radius
        return {"confident": float(sure.mean()), "classes": float(len(set(p.argmax(1)[sure].tolist()))),
                "memorised": float(memorised.mean())}


def train_network() -> dict[str, np.ndarray]:
    """Fit the classifier on the training split; its held-out accuracy and the memorisation radius (the
    MEMORISED_QUANTILE of the held-out digits' distances to their nearest training digit) come with it."""
    from sklearn.neural_network import MLPClassifier  # scikit-learn takes ~1 s to import

    train_images, train_labels = digits.load_digits("train")
    test_images, test_labels = digits.load_digits("test")
    x, x_test = _pixels(train_images), _pixels(test_images)
    mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN,), max_iter=MAX_ITER, random_state=SEED).fit(x, train_labels)
    params = {"w1": mlp.coefs_[0], "b1": mlp.intercepts_[0], "w2": mlp.coefs_[1], "b2": mlp.intercepts_[1],
              "train_pixels": x}
    net = DigitsNetwork({**params, "accuracy": 0.0, "memorised_radius": 0.0})
    params["accuracy"] = np.float64((net.probabilities(test_images).argmax(1) == test_labels).mean())
    params["memorised_radius"] = np.float64(np.quantile(nearest_distances(x_test, x), MEMORISED_QUANTILE))
    return params


def resolve_network(network: str, source: str | None) -> str:
    """'inception' or 'digits': a feature-network choice (`--config.fid.network`, `--network`), 'auto' resolved
    by the data source (Inception is never run on 8×8 digits)."""
    if network != "auto":
        return network
    return "digits" if source == "digits" else "inception"


def cache_key() -> dict[str, str | int]:
    import sklearn

    return {"kind": "digits-mlp", "data": digits.fingerprint("train") + "," + digits.fingerprint("test"),
            "hidden": HIDDEN, "seed": SEED, "max_iter": MAX_ITER, "quantile": MEMORISED_QUANTILE,
            "sklearn": sklearn.__version__}


def load_network(cache_dir: str | Path | None = None) -> DigitsNetwork:
    """The cached classifier (trained on the first call, ~20 s here); refuses one below MIN_ACCURACY."""
    key = cache_key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir if cache_dir is not None else inception.cache_dir()) / f"digits-mlp-{digest}.npz"
    params = None
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                params = {k: f[k] for k in f.files}
        except (OSError, ValueError):
            params = None  # a damaged cache file is made again
    if params is None:
        params = train_network()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **params)
        tmp.replace(path)
    net = DigitsNetwork(params)
    if net.accuracy < MIN_ACCURACY:
        raise RuntimeError(f"the digits classifier reaches {net.accuracy:.1%} held-out accuracy, under {MIN_ACCURACY:.0%}")
    return net
