"""FID statistics files, and the one cache of them: keyed by content, verified on every load.

A statistics file is an `.npz` with `mu` [d], `sigma` [d, d] (float64) and `stats_sha256`, the
digest of both (`stats_digest`); a cached one also holds `key`, the JSON of everything its numbers
depend on (the data's content fingerprint, split, image size and channels, the network's weights
hash and the preprocessing version). Its file name ends in that key's digest, so other data,
another network or another preprocessing never finds it; on load the digest and the key are checked
again, and a file that fails (edited, truncated, unreadable, made for other data) is recomputed
with a warning. Reference statistics of `scgcm.fid ref/calc --source`, of training and of
`scgcm.sample --fid` all go through `cached_statistics`.
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


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **meta: str | int) -> None:
    """Write μ, Σ (float64), their `stats_sha256` and `meta` atomically (a partial file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, stats_sha256=np.asarray(stats_digest(mu, sigma)),
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
            meta = {k: str(z[k]) for k in z.files if k not in ("mu", "sigma") and z[k].ndim == 0}
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


def cached_statistics(cache_dir: str | Path, stem: str, key: Mapping[str, str | int | None],
                      compute: Callable[[], Stats]) -> Stats:
    """(μ, Σ) from `<cache_dir>/<stem>-<key digest>.npz` if it verifies against `key`, else from
    `compute()` (then stored). A cached file that fails verification is replaced, with a warning."""
    text = key_json(key)
    path = Path(cache_dir) / f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            mu, sigma, meta = read_statistics(path, require_digest=True)
            if meta.get("key") != text:
                raise StatisticsError(f"{path} was computed for other data or settings")
            return mu, sigma
        except StatisticsError as e:
            warnings.warn(f"cached statistics are not used: {e}; recomputing", stacklevel=2)
    mu, sigma = compute()
    save_statistics(path, mu, sigma, key=text)
    return mu, sigma
