"""The one rule for image arrays, used by training data, FID (`ref` and `calc`) and editing.

    accepted     uint8, 4-d, channels last  [N, H, W, C]             used as is
    converted    uint8, 4-d, channels first [N, C, H, W]             transposed to [N, H, W, C]
                 uint8, 3-d [N, H, W], when one channel is asked for  read as [N, H, W, 1]
    refused      any other dtype (float, int64, bool: scale and cast to uint8 0..255 yourself;
                 samples in [-1, 1] go through `to_uint8` below), other ranks, no images,
                 a channel count that is not asked for, a size other than `image_size`

The channel axis is the last one when its length is an accepted channel count, else axis 1 when
its length is; when both are (e.g. [N, 3, 3, 3]) the reading that gives square images wins, and if
that does not decide, the array is refused as ambiguous. Sizes are never changed here: training
needs exactly `image_size`×`image_size`; FID passes `image_size=None` (any H×W, since Inception
resizes every image to 299×299 itself) and channels (1, 3), grey being repeated to RGB by `rgb`.
"""

import struct
import warnings
import zipfile
import zlib
from collections.abc import Collection
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8
from PIL import Image, UnidentifiedImageError

from scgcm.errors import UserError

FID_CHANNELS = (1, 3)


class ImageArrayError(UserError, ValueError):
    """An image array that breaks the rule; the message is one line starting with the array's name."""


def as_nhwc_uint8(array: np.ndarray, *, image_size: int | None = None, channels: int | Collection[int] = 3,
                  name: str = "images") -> UInt8[np.ndarray, "n h w c"]:
    """`array` as C-contiguous uint8 [N, H, W, C] by the module's rule, or a one-line ImageArrayError.

    `image_size`: required height = width (None: any H×W). `channels`: the accepted channel count(s)."""
    images = np.asarray(array)
    allowed = (channels,) if isinstance(channels, int) else tuple(channels)
    want = " or ".join(map(str, allowed))
    if images.size == 0:
        raise ImageArrayError(f"{name}: no images (array of shape {images.shape})")
    if images.dtype != np.uint8:
        hint = " (scale to 0..255 and cast to uint8 first)" if images.dtype.kind in "fc" else ""
        raise ImageArrayError(f"{name}: values must be uint8 0..255, got dtype {images.dtype}{hint}")
    if images.ndim == 3 and 1 in allowed:
        images = images[..., None]
    if images.ndim != 4:
        raise ImageArrayError(f"{name}: expected a 4-d [N, H, W, C] (or [N, C, H, W]) array, got shape {images.shape}")
    readings = [x for x, axis in (("nhwc", 3), ("nchw", 1)) if images.shape[axis] in allowed]
    if len(readings) == 2:
        hw = {"nhwc": images.shape[1:3], "nchw": images.shape[2:4]}
        square = [x for x in readings if hw[x][0] == hw[x][1]]
        if len(square) != 1:
            raise ImageArrayError(f"{name}: shape {images.shape} could be [N, H, W, C] or [N, C, H, W]; "
                                  "save the images as [N, H, W, C]")
        readings = square
    if not readings:
        raise ImageArrayError(f"{name}: images have {images.shape[3]} channels, expected {want} "
                              f"(shape {images.shape}, read as [N, H, W, C] or [N, C, H, W])")
    if readings[0] == "nchw":
        images = images.transpose(0, 2, 3, 1)
    h, w = images.shape[1:3]
    if image_size is not None and (h, w) != (image_size, image_size):
        raise ImageArrayError(f"{name}: images are {h}x{w}, expected {image_size}x{image_size}")
    return np.ascontiguousarray(images)


def rgb(images: UInt8[np.ndarray, "n h w c"]) -> UInt8[np.ndarray, "n h w 3"]:
    """uint8 NHWC with 1 or 3 channels → 3 channels (grey repeated), as Inception expects."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def read_npz(path: str | Path) -> np.ndarray:
    """The images of an `.npz`: its array "images", else its first array (layout not yet checked)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not npz.files:
                raise ImageArrayError(f"{path}: the .npz holds no arrays")
            return npz["images" if "images" in npz.files else npz.files[0]]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, ImageArrayError):
            raise
        raise ImageArrayError(f"{path}: not a readable .npz ({type(e).__name__}: {str(e)[:120]})") from None


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
"""PIL modes of single-channel (grey) image files."""


def read_image_file(path: str | Path, mode: str, size: tuple[int, int] | None = None) -> UInt8[np.ndarray, "h w c"]:
    """One image file decoded to PIL `mode` ("L", "RGB", "RGBA") as uint8 [H, W, C], or a one-line
    ImageArrayError naming the file: not an image, damaged or truncated, a declared size over PIL's
    decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`), or, when `size` (W, H) is given, any other size.
    Sizes are read from the header and checked before anything is decoded."""
    return read_image_file_and_mode(path, mode, size)[0]


def read_image_file_and_mode(path: str | Path, mode: str,
                             size: tuple[int, int] | None = None) -> tuple[UInt8[np.ndarray, "h w c"], str]:
    """`read_image_file`, and the PIL mode the file was stored in (e.g. "L" for a grey PNG)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused, not decoded
            with Image.open(path) as image:
                if size is not None and image.size != tuple(size):
                    raise ImageArrayError(f"{path}: image is {image.size[0]}x{image.size[1]}, "
                                          f"expected {size[0]}x{size[1]}")
                stored = image.mode
                array = np.asarray(image.convert(mode), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageArrayError(f"{path}: refused before decoding, its header declares a huge image ({e})") from None
    except UnidentifiedImageError:
        raise ImageArrayError(f"{path}: not an image file PIL can read (unknown or damaged format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        if isinstance(e, ImageArrayError):
            raise
        why = (str(e).splitlines() or [""])[0][:120]
        raise ImageArrayError(f"{path}: damaged or truncated image ({type(e).__name__}: {why})") from None
    return array.reshape(*array.shape[:2], -1), stored


def to_model_range(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 [..., C, H, W] in [-1, 1], as x/127.5 − 1."""
    out = np.moveaxis(images_u8, -1, -3).astype(np.float32, order="C")
    out /= 127.5
    out -= 1.0
    return out


def to_uint8(x: Float[Array, "*shape"]) -> UInt8[Array, "*shape"]:
    """Samples in [-1, 1] → uint8 by rounding: clip(round((x + 1)·127.5), 0, 255), ties up.

    The rule of EDM's `(x * 127.5 + 128).clip(0, 255).to(uint8)` (fid.md). The original Flax
    consistency-model code truncated instead, which darkens by half a level on average."""
    return jnp.clip(jnp.floor(x * 127.5 + 128.0), 0, 255).astype(jnp.uint8)


def to_uint8_nhwc(images: Float[Array, "*b c h w"]) -> UInt8[Array, "*b h w c"]:
    """[-1, 1] channel-first floats → uint8 channel-last with EDM's rounding (the reference truncated, quirk Q8)."""
    return jnp.moveaxis(to_uint8(images), -3, -1)
