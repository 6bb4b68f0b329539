"""Zero-shot edits and interpolations of many images, in batches over the devices (`scgcm.core.editing`
holds the per-example math). Row r uses the key fold_in(key(seed), index of r), so a result depends on
the seed and its image index, not on the batch size or device count.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int

from scgcm.core.editing import Editor, OrthogonalMap, edit, fit_to_range, interpolate
from scgcm.nn.model import SCGCM


@eqx.filter_jit
def _edit_batch(model, keys, given, y, known, editor, amap):
    def one(k, g, yy, m):
        start, result = edit(model, k, g, yy, m, editor=editor, amap=amap)
        return start, fit_to_range(amap, result, yy, m)  # the written uint8 image keeps the constraint too

    return jax.vmap(one)(keys, given, y, known)


@eqx.filter_jit
def _interpolate_batch(model, keys_a, keys_b, positions, editor, shape):
    run = lambda a, b: interpolate(model, a, b, positions, editor=editor, shape=shape)  # noqa: E731
    return jax.vmap(run)(keys_a, keys_b)


def _padded_batches(num: int, batch_size: int, mesh: Mesh):
    ndev = mesh.devices.size
    batch_size = max(ndev, -(-batch_size // ndev) * ndev)
    for start in range(0, num, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), num - 1)  # the last batch repeats its last row
        yield start, rows


def _image_keys(seed: int, indices: np.ndarray) -> jax.Array:
    base = jr.key(seed)
    return jax.vmap(lambda i: jr.fold_in(base, i))(jnp.asarray(indices))


def edit_images(
    model: SCGCM,
    given: Float[Array | np.ndarray, "n c h w"],
    y: Float[Array | np.ndarray, "n c h w"],
    known: Float[Array | np.ndarray, "n c h w"],
    indices: Int[np.ndarray, " n"],
    *,
    seed: int,
    editor: Editor,
    amap: OrthogonalMap,
    batch_size: int = 64,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(start, result) float32 [n, c, h, w] for every row; row r uses the key fold_in(key(seed), indices[r]),
    so a result depends on the seed and its image index, not on the batch size or device count. Each
    result is `fit_to_range`'s: in [-1, 1] and keeping the known part, so its uint8 image keeps it too."""
    model = eqx.nn.inference_mode(model)
    mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    keys = _image_keys(seed, np.asarray(indices))
    starts, results = [], []
    for start, rows in _padded_batches(len(indices), batch_size, mesh):
        put = lambda a, rows=rows: jax.device_put(jnp.asarray(a)[rows], sharding)
        s, r = _edit_batch(model, put(keys), put(given), put(y), put(known), editor, amap)
        n = min(len(rows), len(indices) - start)
        starts.append(np.asarray(s)[:n])
        results.append(np.asarray(r)[:n])
    return np.concatenate(starts), np.concatenate(results)


def interpolate_rows(
    model: SCGCM,
    num: int,
    num_frames: int,
    *,
    seed: int,
    editor: Editor,
    shape: tuple[int, int, int],
    batch_size: int = 64,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """float32 [num, num_frames, c, h, w]: row i interpolates between the latents of images 2i and 2i + 1 of
    the seed (keys fold_in(key(seed), 2i) and fold_in(key(seed), 2i + 1)); with the one-step editor its ends are
    those images of `scgcm.sample --mode onestep`."""
    model = eqx.nn.inference_mode(model)
    mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    keys_a, keys_b = _image_keys(seed, 2 * np.arange(num)), _image_keys(seed, 2 * np.arange(num) + 1)
    positions = jnp.linspace(0.0, 1.0, num_frames)
    out = []
    for start, rows in _padded_batches(num, batch_size, mesh):
        put = lambda k, rows=rows: jax.device_put(k[rows], sharding)
        frames = _interpolate_batch(model, put(keys_a), put(keys_b), positions, editor, shape)
        out.append(np.asarray(frames)[: min(len(rows), num - start)])
    return np.concatenate(out)
