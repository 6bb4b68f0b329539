"""Bad files never run code and end in one line (issue 21): CIFAR-10 pickles with a code payload are
refused by every entry point (folder, tar.gz, train, fid ref, edit) without running it; the real
batches still load bit-identically; broken image files (a declared 30000×30000 PNG, a truncated PNG, a
non-image named .png) are one `error:` line naming the file, exit code 2, in train, fid ref/calc and edit."""

import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scgcm.data.sources import DataError, load_images
from scgcm.errors import run_cli
from scgcm.run.config import SMOKE

SUBSET = Path(__file__).parents[2] / "shared/data/cifar10-subset"
BATCHES = SUBSET / "cifar-10-batches-py"
needs_subset = pytest.mark.skipif(not (BATCHES / "test_batch").is_file(), reason="CIFAR-10 subset absent")


# ----------------------------------------------------------------------------- payloads


class Payload:
    """Unpickling it calls `call(arg)`: each one would create the marker file."""

    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


def payloads(marker: Path) -> dict[str, object]:
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "pathlib.Path.touch": Payload(Path.touch, marker),  # any importable function, not only the usual suspects
    }


def evil_batch(payload, where: str = "data", protocol: int = 2) -> bytes:
    """An official-looking test_batch with `payload` as its data, or hidden in its labels."""
    rows = np.zeros((2, 3072), np.uint8)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [0, 1], b"data": rows, b"filenames": [b"a.png", b"b.png"]}
    batch[b"data" if where == "data" else b"labels"] = payload if where == "data" else [0, payload]
    return pickle.dumps(batch, protocol=protocol)


def write_evil(folder: Path, raw: bytes) -> Path:
    (folder / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
    (folder / "cifar-10-batches-py" / "test_batch").write_bytes(raw)
    return folder


def one_error_line(err: str) -> str:
    """The one `error:` line of a CLI's stderr (the trainer's log lines may come before it); no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", ["os.system", "builtins.exec", "pathlib.Path.touch"])
@pytest.mark.parametrize("where,protocol", [("data", 2), ("labels", 5)])
def test_payload_in_a_folder_is_refused_and_never_runs(tmp_path, name, where, protocol):
    marker = tmp_path / "ran"
    folder = write_evil(tmp_path / "data", evil_batch(payloads(marker)[name], where, protocol))
    with pytest.raises(DataError) as info:
        load_images(str(folder), split="test")
    message = str(info.value)
    assert not marker.exists()
    assert "\n" not in message and "test_batch" in message and "refused the pickled global" in message
    refused = message.split("refused the pickled global ")[1].split(" ")[0]  # e.g. posix.system, __builtin__.exec
    assert refused.endswith({"os.system": ".system", "builtins.exec": ".exec", "pathlib.Path.touch": "getattr"}[name]
                            if (name, protocol) == ("pathlib.Path.touch", 2) else name.rsplit(".", 1)[1]), message


def test_payload_in_a_tar_gz_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    folder = write_evil(tmp_path / "data", evil_batch(payloads(marker)["os.system"]))
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for source in (tar_path, tmp_path):  # the archive, and a folder holding it
        with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz \(test_batch\): refused the pickled global"):
            load_images(str(source), split="test")
    assert not marker.exists()


@pytest.fixture(scope="module")
def config_only_run(tmp_path_factory) -> Path:
    """A run directory holding only the config.json of the smoke preset (32×32 RGB, as CIFAR-10): enough
    for `scgcm.edit` to read its input, which comes before the checkpoint is looked for."""
    from scgcm.run.rundir import write_config

    workdir = tmp_path_factory.mktemp("config-only")
    write_config(workdir, SMOKE)
    return workdir


def _train(argv):
    from scgcm.train import main

    return main(argv)


def _fid(argv):
    from scgcm.fid import main

    return run_cli(main, argv)


def _edit(argv):
    from scgcm.edit import main

    return run_cli(main, argv)


def entry_points(run: Path, source: Path, workdir: Path):
    """(name, call) of every CLI that reads a dataset folder, each given `source`."""
    return [
        ("train", lambda: _train(["--config.preset", "smoke", "--config.batch-size", "8", "--config.workdir", str(workdir),
                                  "--config.data.source", str(source), "--config.data.split", "test"])),
        ("fid ref", lambda: _fid(["ref", "--source", str(source), "--split", "test"])),
        ("edit", lambda: _edit(["--workdir", str(run), "--task", "inpaint", "--input", str(source)])),
    ]


@pytest.fixture
def no_heavy_work(monkeypatch, tmp_path):
    """Fail the test if a CLI gets past its data: no Inception network, no checkpoint, no private cache hit."""
    import scgcm.edit
    import scgcm.eval.inception

    def forbidden(*a, **k):
        raise AssertionError("a bad file must be refused before any network or checkpoint is loaded")

    monkeypatch.setattr(scgcm.eval.inception, "load_inception", forbidden)
    monkeypatch.setattr(scgcm.edit, "load_state", forbidden)
    monkeypatch.setenv("SCGCM_CACHE", str(tmp_path / "cache"))


def test_payload_through_every_cli_is_refused_and_never_runs(config_only_run, tmp_path, capsys, no_heavy_work):
    marker = tmp_path / "ran"
    source = write_evil(tmp_path / "data", evil_batch(payloads(marker)["os.system"]))
    for name, call in entry_points(config_only_run, source, tmp_path / "w"):
        assert call() == 2, name
        line = one_error_line(capsys.readouterr().err)
        assert "test_batch" in line and "refused the pickled global" in line and "system" in line, (name, line)
        assert not marker.exists(), name


@needs_subset
def test_real_batches_unpickle_exactly_as_plain_pickle():
    from scgcm.data.sources import CifarUnpickler

    for name in ("test_batch", "batches.meta"):
        raw = (BATCHES / name).read_bytes()
        plain, safe = pickle.loads(raw, encoding="bytes"), CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
        assert list(safe) == list(plain)
        for key, value in plain.items():
            if isinstance(value, np.ndarray):
                assert safe[key].dtype == value.dtype and safe[key].shape == value.shape
                assert safe[key].tobytes() == value.tobytes()
            else:
                assert type(safe[key]) is type(value) and safe[key] == value
    rows = pickle.loads((BATCHES / "test_batch").read_bytes(), encoding="bytes")[b"data"]
    images = load_images(str(BATCHES), split="test")
    assert images.tobytes() == rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).tobytes()


def test_python3_pickles_of_every_protocol_still_load(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    rows = images.transpose(0, 3, 1, 2).reshape(3, -1)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        folder = tmp_path / str(protocol)
        folder.mkdir()
        (folder / "test_batch").write_bytes(pickle.dumps({b"data": rows, b"labels": [1, 2, 3]}, protocol=protocol))
        np.testing.assert_array_equal(load_images(str(folder), split="test"), images)


# ----------------------------------------------------------------------------- broken images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header declaring width×height RGB, with a few bytes of pixel data: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def truncated_png(size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


BROKEN = {
    "huge": (huge_png, "refused before decoding"),
    "truncated": (truncated_png, "damaged or truncated image"),
    "not-an-image": (lambda: b"this is a text file, not a PNG\n" * 4, "not an image file"),
}


def image_folder(folder: Path, kind: str, size: int = 32) -> Path:
    """Three good PNGs and one broken one, `bad.png`."""
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(folder / f"good{i}.png")
    make, _ = BROKEN[kind]
    (folder / "bad.png").write_bytes(make() if kind != "truncated" else truncated_png(size))
    return folder


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_image_is_one_line_in_every_cli(kind, config_only_run, tmp_path, capsys, no_heavy_work):
    folder = image_folder(tmp_path / "images", kind)
    needle = BROKEN[kind][1]
    calls = [*entry_points(config_only_run, folder, tmp_path / "w"),
             ("fid calc", lambda: _fid(["calc", str(folder), "--ref", str(tmp_path / "unused.npz")]))]
    for name, call in calls:
        assert call() == 2, name
        line = one_error_line(capsys.readouterr().err)
        assert "bad.png" in line and needle in line, (name, line)


def test_huge_declared_size_is_refused_from_the_header(tmp_path):
    """Not decoded: refused in milliseconds, even where any size is accepted (FID reads images at their own size)."""
    import time

    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "bad.png").write_bytes(huge_png())
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"bad\.png: refused before decoding"):
        load_images(str(folder), image_size=None, channels=(1, 3))
    assert time.perf_counter() - start < 2
