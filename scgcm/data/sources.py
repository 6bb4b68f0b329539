"""Training images as uint8 NHWC arrays: CIFAR-10 and the other data sources.

`load_images` reads one of several on-disk forms (or the Hugging Face hub) into a uint8
[N, H, W, C] array; `synthetic_images` makes a stand-in data set; `source_fingerprint` keys caches by
a source's content. NHWC exists only in `scgcm.data`: everything downstream sees `c h w`.
"""

import codecs
import hashlib
import io
import os
import pickle
import socket
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np

from scgcm.data import digits
from scgcm.data.images import GREY_MODES, ImageArrayError, as_nhwc_uint8, read_image_file_and_mode, read_npz
from scgcm.errors import UserError

HF_CIFAR10 = "uoft-cs/cifar10"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CIFAR_SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
SOURCE_FLAG = "--config.data.source"
SOURCE_HELP = (
    f"pass {SOURCE_FLAG} PATH with a cifar-10-batches-py folder (or its parent), "
    "cifar-10-python.tar.gz, an .npz of uint8 NHWC images, a folder of image files, "
    "a datasets save_to_disk folder, or hf:<name>"
)
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class DataError(UserError, ValueError):
    """A data problem the user can fix; the message is one line."""


# ----------------------------------------------------------------------------- loading


def load_images(
    source: str | os.PathLike | None, *, split: str = "train", image_size: int | None = 32,
    channels: int | tuple[int, ...] = 3, flag: str = SOURCE_FLAG,
) -> np.ndarray:
    """uint8 [N, H, W, C] from the hub (None, "cifar10", "hf:<name>") or a path; labels ignored.

    Arrays follow `scgcm.images.as_nhwc_uint8` (image_size None: any size; channels a tuple:
    any of those, decoded files as RGB). `flag` is the option named in error messages."""
    try:
        text = "" if source is None else str(source)
        decode = channels if isinstance(channels, int) else 3
        if text in ("", "cifar10") or text.startswith("hf:"):
            hub_name = text[3:] if text.startswith("hf:") else HF_CIFAR10
            images, name = _from_hub(hub_name, split, decode), f"hf:{hub_name}"
        elif text == "digits":
            images, name = _from_digits(split), "digits"
        else:
            images, name = _from_path(Path(text).expanduser(), split, image_size, decode), text
        return as_nhwc_uint8(images, image_size=image_size, channels=channels, name=name)
    except (DataError, ImageArrayError) as e:
        raise DataError(str(e).replace(SOURCE_FLAG, flag)) from None


def _from_digits(split: str) -> np.ndarray:
    try:
        return digits.load_digits(split)[0]
    except ValueError as e:
        raise DataError(f"{SOURCE_FLAG} digits: {e} (--config.data.split)") from None


HUB_ADDRESS = ("huggingface.co", 443)


def hub_unreachable(timeout: float = 3.0, env=os.environ) -> str | None:
    """Why the Hugging Face hub can't be reached (one quick TCP connection), or None if it can, or if
    that can't be told from here (offline mode with a local cache, a proxy, another endpoint)."""
    if any(env.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return None  # the datasets cache answers
    if env.get("HF_ENDPOINT") or any(env.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        socket.create_connection(HUB_ADDRESS, timeout=timeout).close()
        return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _from_hub(name: str, split: str, channels: int) -> np.ndarray:
    return _from_hf_dataset(_hub_dataset(name, split), split, channels, f"hf:{name}")


def _hub_dataset(name: str, split: str):
    what = "CIFAR-10" if name == HF_CIFAR10 else repr(name)
    if (why := hub_unreachable()) is not None:
        raise DataError(f"cannot reach the Hugging Face hub for {what} ({why}); set HF_HUB_OFFLINE=1 to use a "
                        "cached copy, or " + SOURCE_HELP)
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 (offline, unknown name, no such split: all end here)
        cause = (str(exc).splitlines() or [""])[0][:160]
        raise DataError(
            f"could not download {what} from the Hugging Face hub (offline? {type(exc).__name__}: {cause}); "
            + SOURCE_HELP
        ) from None


def _from_path(path: Path, split: str, image_size: int | None, channels: int) -> np.ndarray:
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist; " + SOURCE_HELP)
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return _from_cifar_tar(path, split)
        if path.suffix == ".npz":
            return _from_npz(path, channels)
        raise DataError(f"data source {str(path)!r} is a file of unknown type; " + SOURCE_HELP)
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    elif (path / "cifar-10-python.tar.gz").is_file():
        return _from_cifar_tar(path / "cifar-10-python.tar.gz", split)
    if any((path / f).is_file() for files in CIFAR_SPLITS.values() for f in files):
        available = {p.name: p for p in path.iterdir() if p.is_file()}
        chosen = _cifar_files(available, split, str(path))
        return np.concatenate([_decode_cifar_batch(available[f].read_bytes(), str(available[f])) for f in chosen])
    if any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        import datasets

        return _from_hf_dataset(datasets.load_from_disk(str(path)), split, channels, str(path))
    return _from_image_folder(path, image_size, channels)


def _cifar_files(available: dict, split: str, where: str) -> list[str]:
    """The batch files of `split`, or of the other split (with a warning) if only those exist."""
    if split not in CIFAR_SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {sorted(CIFAR_SPLITS)}")
    chosen = [f for f in CIFAR_SPLITS[split] if f in available]
    if not chosen:
        other = "test" if split == "train" else "train"
        chosen = [f for f in CIFAR_SPLITS[other] if f in available]
        if not chosen:
            raise DataError(f"{where}: no CIFAR-10 batch files (data_batch_1..5, test_batch); " + SOURCE_HELP)
        warnings.warn(f"{where}: no {split} batches, using the {other} split ({', '.join(chosen)})", stacklevel=4)
    return chosen


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that asks for a global outside `CifarUnpickler.ALLOWED`."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as protocol-2 pickles of Python 3 use it for bytes: text → latin-1 bytes only."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise RefusedPickle(f"_codecs.encode with {type(text).__name__} and encoding {encoding!r}")
    return text.encode("latin-1")


def _numpy_reconstructors() -> dict[tuple[str, str], object]:
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    found = {}
    for package in ("numpy.core", "numpy._core"):  # written by numpy 1 or 2: the same functions
        found[(f"{package}.multiarray", "_reconstruct")] = _reconstruct
        found[(f"{package}.numeric", "_frombuffer")] = _frombuffer
    return found


class CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 python batch without running code from it: the only globals it hands out
    are numpy's array reconstruction (`ndarray`, `dtype`, `_reconstruct` of protocols 0-4, `_frombuffer`
    of protocol 5) and `_codecs.encode` restricted to latin-1 (how Python 3 writes bytes in protocol 2);
    the rest of a batch (dict, list, bytes, str, int) needs no global. Any other global (os.system,
    builtins.eval, a function of some module) raises RefusedPickle before it is even imported."""

    ALLOWED: ClassVar[dict] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode, **_numpy_reconstructors()}

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise RefusedPickle(f"persistent id {str(pid)[:40]!r}")


def _decode_cifar_batch(raw: bytes, name: str) -> np.ndarray:
    """One official python batch: rows of 3072 bytes, the R, G, B 32×32 planes in turn. Read by
    `CifarUnpickler`: a pickle that would call anything else is refused, and nothing of it runs."""
    try:
        batch = CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except RefusedPickle as exc:
        raise DataError(f"{name}: refused the pickled global {exc} (a CIFAR-10 python batch holds only dicts, lists, "
                        "bytes, str, int and numpy arrays; this file would run code): not loaded") from None
    except Exception as exc:  # noqa: BLE001 (a damaged pickle raises almost anything)
        raise DataError(f"{name}: not a CIFAR-10 python batch (damaged: {type(exc).__name__})") from None
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    if not isinstance(data, (np.ndarray, list)) or np.asarray(data).dtype == object or np.asarray(data).size % 3072:
        raise DataError(f"{name}: not a CIFAR-10 python batch (no 'data' of 3072-byte rows)")
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _from_cifar_tar(path: Path, split: str) -> np.ndarray:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {}
            for member in tar.getmembers():
                if member.isfile():
                    members.setdefault(Path(member.name).name, member)
            chosen = _cifar_files(members, split, str(path))
            return np.concatenate([_decode_cifar_batch(tar.extractfile(members[f]).read(), f"{path} ({f})") for f in chosen])
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{path}: damaged or truncated archive ({type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0][:120]}); download it again") from None


def _from_npz(path: Path, channels: int) -> np.ndarray:
    return read_npz(path)  # "images" or the first array; the layout is as_nhwc_uint8's to check


def _pil_to_array(image, channels: int) -> np.ndarray:
    if channels not in PIL_MODES:
        raise DataError(f"cannot decode images to {channels} channels (1, 3 or 4)")
    return np.asarray(image.convert(PIL_MODES[channels]), dtype=np.uint8).reshape(*image.size[::-1], channels)


def _from_image_folder(path: Path, image_size: int | None, channels: int) -> np.ndarray:
    """Every image file under `path`, sorted; all image_size×image_size (None: all the first one's size).
    A file that is not an image, is damaged or declares a huge size is a one-line error (`read_image_file`)."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: no CIFAR-10 batches, dataset or image files (png/jpg/jpeg/bmp/webp); " + SOURCE_HELP)
    if channels not in PIL_MODES:
        raise DataError(f"cannot decode images to {channels} channels (1, 3 or 4)")
    size = None if image_size is None else (image_size, image_size)
    images, grey = None, []
    for i, file in enumerate(files):
        image, stored = read_image_file_and_mode(file, PIL_MODES[channels], size)
        if images is None:
            images, size = np.empty((len(files), *image.shape), np.uint8), image.shape[1::-1]
        images[i] = image
        if stored in GREY_MODES and channels > 1:
            grey.append(file)
    if grey:  # decoded as colour images whose channels are all the grey level: said, not silent
        warnings.warn(f"{path}: {len(grey)} of {len(files)} images are grey ({grey[0].name}"
                      f"{', …' if len(grey) > 1 else ''}), decoded as {PIL_MODES[channels]} with the grey level "
                      "in every channel", stacklevel=4)
    return images


def _from_hf_dataset(ds, split: str, channels: int, where: str) -> np.ndarray:
    """A `datasets.Dataset` (or DatasetDict) -> uint8 NHWC, from its "img"/"image"/first Image column."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            if len(ds) != 1:
                raise DataError(f"{where}: no split {split!r} (has {', '.join(ds)})")
            warnings.warn(f"{where}: no {split} split, using {next(iter(ds))!r}", stacklevel=4)
        ds = ds[split] if split in ds else next(iter(ds.values()))
    image_columns = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    column = next((c for c in ("img", "image") if c in ds.column_names), None) or next(iter(image_columns), None)
    if column is None:
        raise DataError(f"{where}: no image column ('img', 'image' or an Image feature) in {ds.column_names}")
    is_image = column in image_columns
    ds = ds.select_columns([column])
    ds = ds if is_image else ds.with_format("numpy")
    chunks = []
    for batch in ds.iter(batch_size=1024):
        if is_image:
            try:
                chunks.append(np.stack([_pil_to_array(image, channels) for image in batch[column]]))
            except ValueError:
                raise DataError(f"{where}: images in column {column!r} differ in size") from None
        else:
            chunk = np.asarray(batch[column])
            # the numpy formatter widens uint8 features to int64; narrow them back when lossless
            if np.issubdtype(chunk.dtype, np.integer) and chunk.size and 0 <= chunk.min() and chunk.max() <= 255:
                chunk = chunk.astype(np.uint8)
            chunks.append(chunk)
    return np.concatenate(chunks) if chunks else np.zeros((0,), np.uint8)


def source_fingerprint(source: str | os.PathLike | None, *, split: str = "train", flag: str = SOURCE_FLAG) -> str:
    """A digest of what `load_images(source, split=split)` reads, which changes when that does: the
    sha256 of a file's bytes; for a folder, of (relative path, size, mtime_ns) of every file under
    it; for the hub, the `datasets` fingerprint of the split. For caches keyed by content."""
    text = "" if source is None else str(source)
    try:
        if text in ("", "cifar10") or text.startswith("hf:"):
            hub_name = text[3:] if text.startswith("hf:") else HF_CIFAR10
            return f"hf:{hub_name}:{split}:{_hub_dataset(hub_name, split)._fingerprint}"
        if text == "digits":
            _from_digits(split)  # a bad split is refused here as there
            return digits.fingerprint(split)
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"data source {str(path)!r} does not exist; " + SOURCE_HELP)
        h = hashlib.sha256()
        if path.is_file():
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return f"sha256:{h.hexdigest()}"
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            st = file.stat()
            h.update(f"{file.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return f"files:{h.hexdigest()}"
    except DataError as e:
        raise DataError(str(e).replace(SOURCE_FLAG, flag)) from None


def validate_images(images: np.ndarray, *, image_size: int, channels: int, name: str = "dataset") -> np.ndarray:
    """The array as C-contiguous uint8 [N, image_size, image_size, channels] by the rule of
    `scgcm.images.as_nhwc_uint8` (NCHW is transposed), or a one-line DataError."""
    try:
        return as_nhwc_uint8(images, image_size=image_size, channels=channels, name=name)
    except ImageArrayError as e:
        raise DataError(str(e)) from None


def synthetic_images(num: int, *, image_size: int = 32, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A deterministic toy set: a smooth two-colour gradient with up to three discs or squares on it.

    Drawn in blocks of 1024 from default_rng([seed, block]), so image i does not depend on `num`.
    """
    yy, xx = (np.mgrid[:image_size, :image_size] + 0.5 - image_size / 2).astype(np.float32)
    out = np.empty((num, image_size, image_size, channels), np.uint8)
    for block, lo in enumerate(range(0, num, 1024)):
        rng, n = np.random.default_rng([seed, block]), min(1024, num - lo)
        draws = [  # all 1024 of a block are drawn; only the first n are drawn on
            rng.random((1024, 2, channels), np.float32),  # gradient end colours
            rng.uniform(0, 2 * np.pi, 1024).astype(np.float32),  # gradient direction
            rng.random((1024, 3)) < 0.7,  # shape k present
            rng.random((1024, 3)) < 0.5,  # disc, else square
            (rng.uniform(-0.35, 0.35, (1024, 3, 2)) * image_size).astype(np.float32),  # centre (y, x)
            (rng.uniform(0.08, 0.22, (1024, 3)) * image_size).astype(np.float32),  # radius
            rng.random((1024, 3, channels), np.float32),  # fill colour
        ]
        colours, angle, shown, is_disc, centre, radius, fill = (d[:n, None, None] for d in draws)
        t = np.clip((xx * np.cos(angle) + yy * np.sin(angle)) / image_size + 0.5, 0, 1)[..., None]
        image = colours[..., 0, :] * (1 - t) + colours[..., 1, :] * t
        for k in range(3):
            dy, dx, r = yy - centre[..., k, 0], xx - centre[..., k, 1], radius[..., k]
            inside = np.where(is_disc[..., k], dx**2 + dy**2 <= r**2, np.maximum(abs(dx), abs(dy)) <= 0.8 * r)
            image = np.where((inside & shown[..., k])[..., None], fill[..., k, :], image)
        out[lo : lo + n] = np.round(image * 255)
    return out
