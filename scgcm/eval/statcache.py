"""FID statistics files, and the one cache of them: keyed by content, verified on every load.

A statistics file is an `.npz` with `mu` [d], `sigma` [d, d] (float64) and `stats_sha256`, the
digest of both (`stats_digest`); a cached one also holds `key`, the JSON of everything its numbers
depend on (the data's content fingerprint, split, image size and channels, the network's weights
hash and the preprocessing version). Its file name ends in that key's digest, so other data,
another network or another preprocessing never finds it; on load the digest and the key are checked
again, and a file that fails (edited, truncated, unreadable, made for other data) is recomputed
with a warning. Reference statistics of `scgcm.fid ref/calc --source`, of training and of
`scgcm.sample --fid` all go through `cached_reference`.

A file may also hold `features` [n, d] (float32), real Inception features for precision/recall,
with their own digest `features_sha256`, checked whenever they are read.
"""

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

Stats = tuple[np.ndarray, np.ndarray]


class StatisticsError(ValueError):
    """A statistics file that cannot be used; the message is one line naming the file."""


def stats_digest(mu: np.ndarray, sigma: np.ndarray) -> str:
    """sha256 over dtype, shape and bytes of μ and Σ, as float64."""
    h = hashlib.sha256()
    for a in (mu, sigma):
        a = np.ascontiguousarray(a, dtype=np.float64)
        h.update(f"{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def key_json(key: Mapping[str, str | int | None]) -> str:
    return json.dumps(dict(key), sort_keys=True, separators=(",", ":"))


def features_digest(features: np.ndarray) -> str:
    """sha256 over dtype, shape and bytes of features, as float32."""
    a = np.ascontiguousarray(features, dtype=np.float32)
    h = hashlib.sha256(f"{a.dtype.str}:{a.shape};".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, features: np.ndarray | None = None,
                    **meta: str | int) -> None:
    """Write μ, Σ (float64), their `stats_sha256`, optionally real `features` (float32) with their
    `features_sha256`, and `meta`, atomically (a partial file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    extra = {}
    if features is not None:
        features = np.asarray(features, np.float32)
        extra = {"features": features, "features_sha256": np.asarray(features_digest(features))}
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, stats_sha256=np.asarray(stats_digest(mu, sigma)), **extra,
                 **{k: np.asarray(v) for k, v in meta.items()})
    partial.replace(path)


def read_statistics(path: str | Path, *, require_digest: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(μ, Σ, the other entries as strings), checked: readable, shapes [d] and [d, d], finite, and
    the stored `stats_sha256` matching (a file without one passes unless `require_digest`)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise StatisticsError(f"{path} holds no FID statistics (arrays mu and sigma)")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            meta = {k: str(z[k]) for k in z.files if k not in ("mu", "sigma", "features") and z[k].ndim == 0}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, StatisticsError):
            raise
        raise StatisticsError(f"{path} is not a readable .npz ({type(e).__name__}: {str(e)[:120]})") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise StatisticsError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [d] and [d, d]")
    if "stats_sha256" in meta:
        if meta["stats_sha256"] != stats_digest(mu, sigma):
            raise StatisticsError(f"{path}: mu and sigma do not match their stored sha256 (edited or corrupted)")
    elif require_digest:
        raise StatisticsError(f"{path} has no stats_sha256 to verify it by")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatisticsError(f"{path}: mu or sigma holds NaN or infinite values")
    return mu, sigma, meta


def read_features(path: str | Path, *, require_digest: bool = False) -> np.ndarray | None:
    """The real features stored with statistics (float32 [n, d]), or None if the file holds none;
    checked against the stored `features_sha256` (a file without one passes unless `require_digest`)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "features" not in z.files:
                return None
            features = z["features"].astype(np.float32)
            digest = str(z["features_sha256"]) if "features_sha256" in z.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise StatisticsError(f"{path} is not a readable .npz ({type(e).__name__}: {str(e)[:120]})") from None
    if features.ndim != 2:
        raise StatisticsError(f"{path}: features {features.shape} are not [n, d]")
    if digest is None and require_digest:
        raise StatisticsError(f"{path} has no features_sha256 to verify its features by")
    if digest is not None and digest != features_digest(features):
        raise StatisticsError(f"{path}: the features do not match their stored sha256 (edited or corrupted)")
    return features


def cached_reference(cache_dir: str | Path, stem: str, key: Mapping[str, str | int | None],
                     compute: Callable[[], tuple[Stats, np.ndarray | None]], *,
                     need_features: bool = False) -> tuple[Stats, np.ndarray | None]:
    """((μ, Σ), features) from `<cache_dir>/<stem>-<key digest>.npz` if it verifies against `key`
    (and, when `need_features`, holds verified features), else from `compute()` (then stored).
    The features are returned only when `need_features` (they are not read otherwise). A cached file
    that fails verification is replaced, with a warning; one without features, silently."""
    text = key_json(key)
    path = Path(cache_dir) / f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            mu, sigma, meta = read_statistics(path, require_digest=True)
            if meta.get("key") != text:
                raise StatisticsError(f"{path} was computed for other data or settings")
            features = read_features(path, require_digest=True) if need_features else None
            if features is not None or not need_features:
                return (mu, sigma), features
        except StatisticsError as e:
            warnings.warn(f"cached statistics are not used: {e}; recomputing", stacklevel=2)
    (mu, sigma), features = compute()
    save_statistics(path, mu, sigma, features=features, key=text)
    return (mu, sigma), features if need_features else None

