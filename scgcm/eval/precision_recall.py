"""Improved precision and recall (Kynkäänniemi et al. 2019) on Inception features.

Each set's manifold is the union of balls around its points, of radius the distance to the k-th
nearest other point of the same set (k = 3). Precision: the fraction of generated features inside
the real manifold; recall: the fraction of real features inside the generated one. A point lies
inside when its distance to some ball's centre is ≤ that ball's radius, as in the authors' code.

Pairwise distances are computed on the accelerator, a fixed block of rows at a time inside one jitted
`lax.map`, so a 50,000 × 50,000 matrix is never held whole (one block is block × N floats).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

K = 3
BLOCK = 1024

_HIGHEST = jax.lax.Precision.HIGHEST  # TF32 on GPUs would move distances at the 1e-3 level


def _squared_distances(a: Float[Array, "m d"], b: Float[Array, "n d"]) -> Float[Array, "m n"]:
    """‖a_i − b_j‖², via ‖a‖² + ‖b‖² − 2a·b in float32 at full matmul precision, clipped at 0."""
    cross = jnp.matmul(a, b.T, precision=_HIGHEST)
    d2 = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * cross
    return jnp.maximum(d2, 0.0)


def _blocks(x: Float[Array, "n d"], block: int) -> Float[Array, "nb block d"]:
    """Rows of x padded (with zeros) to a multiple of `block` and split into blocks."""
    pad = -x.shape[0] % block
    return jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block, x.shape[1])


@partial(jax.jit, static_argnames=("k", "block"))
def knn_radii(features: Float[Array | np.ndarray, "n d"], k: int = K, block: int = BLOCK) -> Float[Array, " n"]:
    """Distance from each feature to its k-th nearest neighbour in the same set, itself excluded."""
    n = features.shape[0]

    def one(rows):
        d2 = _squared_distances(rows, features)
        smallest = -jax.lax.top_k(-d2, k + 1)[0]  # ascending; the first is the point itself (distance 0)
        return smallest[:, k]

    radii2 = jax.lax.map(one, _blocks(features, block)).reshape(-1)[:n]
    return jnp.sqrt(radii2)


@partial(jax.jit, static_argnames=("block",))
def inside_manifold(queries: Float[Array, "m d"], centres: Float[Array, "n d"], radii: Float[Array, " n"],
                    block: int = BLOCK) -> Bool[Array, " m"]:
    """Whether each query lies within radii[j] of some centres[j]."""
    m = queries.shape[0]
    r2 = radii**2

    def one(rows):
        return jnp.any(_squared_distances(rows, centres) <= r2[None, :], axis=1)

    return jax.lax.map(one, _blocks(queries, block)).reshape(-1)[:m]


def precision_recall(real: Float[Array | np.ndarray, "n d"], generated: Float[Array | np.ndarray, "m d"], k: int = K,
                     block: int = BLOCK) -> tuple[float, float]:
    """(precision, recall) of `generated` against `real` features, with k-th-neighbour balls."""
    real = jnp.asarray(real, jnp.float32)
    generated = jnp.asarray(generated, jnp.float32)
    for name, x in (("real", real), ("generated", generated)):
        if x.ndim != 2 or x.shape[0] <= k:
            raise ValueError(f"precision/recall needs more than k={k} {name} features as [N, d], got {x.shape}")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, generated {generated.shape[1]}")
    precision = jnp.mean(inside_manifold(generated, real, knn_radii(real, k, block), block))
    recall = jnp.mean(inside_manifold(real, generated, knn_radii(generated, k, block), block))
    return float(precision), float(recall)


def subsample(features: np.ndarray, max_rows: int, seed: int = 0) -> np.ndarray:
    """At most `max_rows` rows of `features`, a fixed random subset (in their original order) when there are more."""
    if len(features) <= max_rows:
        return features
    keep = np.sort(np.random.default_rng(seed).choice(len(features), max_rows, replace=False))
    return features[keep]
