"""scgcm.data: every source form loads the same pixels, batches are exact functions of the step."""

import os
import pickle
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from scgcm.data import order
from scgcm.data.images import to_model_range
from scgcm.data.loader import BatchLoader, batch_indices
from scgcm.data.sources import DataError, load_images, synthetic_images, validate_images
from scgcm.run.config import DIGITS, TrainConfig

REPO = Path(__file__).parents[1]
SUBSET = Path(__file__).parents[2] / "shared/data/cifar10-subset"
BATCHES = SUBSET / "cifar-10-batches-py"
needs_subset = pytest.mark.skipif(not (BATCHES / "test_batch").is_file(), reason="CIFAR-10 subset absent")


def write_official(folder: Path, name: str, images: np.ndarray) -> None:
    """images uint8 [N, 32, 32, 3] as an official python batch: rows of R, G, B planes."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    batch = {b"batch_label": name.encode(), b"labels": [0] * len(images), b"data": rows, b"filenames": []}
    (folder / name).write_bytes(pickle.dumps(batch))


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    return synthetic_images(12, seed=3)


# ----------------------------------------------------------------------------- sources


@needs_subset
def test_official_subset_matches_a_direct_decode():
    with open(BATCHES / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    r, g, b = (raw[0, 1024 * c : 1024 * (c + 1)].reshape(32, 32) for c in range(3))
    with pytest.warns(UserWarning, match="test split"):  # only test_batch ships, asked for train
        images = load_images(str(BATCHES))
    assert images.shape == (1017, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], np.stack([r, g, b], axis=-1))
    np.testing.assert_array_equal(load_images(str(SUBSET), split="test"), images)  # the parent folder


def test_train_split_concatenates_batches_in_order(tmp_path, small):
    write_official(tmp_path, "data_batch_2", small[8:])
    write_official(tmp_path, "data_batch_1", small[:8])
    write_official(tmp_path, "test_batch", small[:1])
    np.testing.assert_array_equal(load_images(str(tmp_path)), small)
    np.testing.assert_array_equal(load_images(str(tmp_path), split="test"), small[:1])


def test_tar_npz_image_folder_and_save_to_disk_agree(tmp_path, small):
    write_official(tmp_path / "cifar-10-batches-py", "data_batch_1", small)
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    np.testing.assert_array_equal(load_images(str(tar_path)), small)

    np.savez(tmp_path / "a.npz", images=small)
    np.savez(tmp_path / "nchw.npz", small.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(load_images(tmp_path / "a.npz"), small)  # a Path works too
    np.testing.assert_array_equal(load_images(str(tmp_path / "nchw.npz")), small)

    from PIL import Image

    for i, image in enumerate(small):  # nested and zero-padded: recursive, sorted
        (tmp_path / "png" / str(i // 5)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "png" / str(i // 5) / f"{i:03d}.png")
    np.testing.assert_array_equal(load_images(str(tmp_path / "png")), small)

    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    with_images = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(a) for a in small], "label": [0] * len(small)}, features=features
    )
    with_images.save_to_disk(str(tmp_path / "hf"))
    np.testing.assert_array_equal(load_images(str(tmp_path / "hf")), small)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"pixels": small, "image": small})}).save_to_disk(
        str(tmp_path / "hf_dict")
    )
    np.testing.assert_array_equal(load_images(str(tmp_path / "hf_dict")), small)


def test_hub_offline_names_the_flag(tmp_path, monkeypatch):
    # datasets reads these variables at import, so the load runs in a fresh interpreter
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    code = (
        "from scgcm.data.sources import DataError, load_images\n"
        "try:\n    load_images(None)\nexcept DataError as e:\n    print('DataError:', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=120
    )
    line = done.stdout.strip()
    assert line.startswith("DataError:") and "--config.data.source" in line and "\n" not in line, done.stderr


def test_missing_path_names_the_flag(tmp_path):
    with pytest.raises(DataError, match="--config.data.source") as info:
        load_images(str(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="--config.data.source"):
        load_images(str(tmp_path))  # exists, but holds nothing loadable


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((0, 32, 32, 3), np.uint8), "no images"),
        (np.zeros((2, 32, 32), np.uint8), "4-d"),
        (np.zeros((2, 28, 28, 3), np.uint8), "28x28, expected 32x32"),
        (np.zeros((2, 32, 32, 1), np.uint8), "1 channels, expected 3"),
        (np.zeros((2, 32, 32, 3), np.float32), "must be uint8 0..255"),
        (np.zeros((2, 32, 32, 3), np.int64), "must be uint8"),
    ],
)
def test_validate_images_rejects(images, match):
    with pytest.raises(DataError, match=match) as info:
        validate_images(images, image_size=32, channels=3, name="my-source")
    assert str(info.value).startswith("my-source:")


def test_validate_images_returns_contiguous(small):
    out = validate_images(small[:, ::-1], image_size=32, channels=3)
    assert out.flags.c_contiguous and np.array_equal(out, small[:, ::-1])


def test_synthetic_images_are_deterministic_and_varied():
    a = synthetic_images(40, seed=1)
    assert a.shape == (40, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, synthetic_images(40, seed=1))
    assert not np.array_equal(a, synthetic_images(40, seed=2))
    np.testing.assert_array_equal(synthetic_images(1100, seed=1)[:40], a)  # chunking changes nothing
    assert a.std(axis=(1, 2)).mean() > 10 and len(np.unique(a.reshape(40, -1), axis=0)) == 40
    assert synthetic_images(3, image_size=8, channels=1).shape == (3, 8, 8, 1)


# ----------------------------------------------------------------------------- batches


def test_each_epoch_visits_every_image_once():
    n, b = 60, 12
    for epoch in range(3):
        steps = [batch_indices(epoch * n // b + s, batch_size=b, num_images=n, seed=5) for s in range(n // b)]
        seen = np.concatenate([i for i, _ in steps])
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))
        np.testing.assert_array_equal(seen, order.permute(5, epoch, np.arange(n), n))
    assert not np.array_equal(order.permute(5, 0, np.arange(n), n), order.permute(5, 1, np.arange(n), n))
    i1, f1 = batch_indices(7, batch_size=b, num_images=n, seed=5)
    i2, f2 = batch_indices(7, batch_size=b, num_images=n, seed=5)
    assert np.array_equal(i1, i2) and np.array_equal(f1, f2) and i1.dtype == np.int64 and f1.dtype == bool
    assert not np.array_equal(i1, batch_indices(7, batch_size=b, num_images=n, seed=6)[0])


def test_batch_straddling_an_epoch_boundary():
    n, b = 10, 4  # step 2 holds examples 8, 9 of epoch 0 and 0, 1 of epoch 1
    indices, flips = batch_indices(2, batch_size=b, num_images=n, seed=0)
    e0, e1 = (order.permute(0, e, np.arange(n), n) for e in (0, 1))
    np.testing.assert_array_equal(indices, [e0[8], e0[9], e1[0], e1[1]])
    big, _ = batch_indices(1, batch_size=25, num_images=n, seed=0)  # examples 25..49: epochs 2, 3, 4
    np.testing.assert_array_equal(big[5:15], order.permute(0, 3, np.arange(n), n))
    np.testing.assert_array_equal(np.concatenate([batch_indices(s, batch_size=b, num_images=n, seed=0)[1]
                                                  for s in range(5)]),
                                  np.concatenate([batch_indices(s, batch_size=2, num_images=n, seed=0)[1]
                                                  for s in range(10)]))  # flips: a function of position


def test_flips_are_about_half():
    flips = np.concatenate([batch_indices(s, batch_size=500, num_images=1000, seed=0)[1] for s in range(20)])
    assert abs(flips.mean() - 0.5) < 0.02


def test_to_model_range():
    x = np.array([0, 255, 51], np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=-1)
    y = to_model_range(x)
    assert y.shape == (1, 3, 1, 3) and y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y[0, 0, 0], [-1, 1, 51 / 127.5 - 1], rtol=1e-6)


def expected_batch(images, step, *, batch_size, seed):
    indices, flips = batch_indices(step, batch_size=batch_size, num_images=len(images), seed=seed)
    raw = images[indices]
    return to_model_range(np.where(flips[:, None, None, None], raw[:, :, ::-1], raw))


def test_loader_shape_range_flips_and_resume(small):
    with BatchLoader(small, batch_size=8, seed=4, steps_per_call=3) as loader:
        items = [next(loader) for _ in range(3)]
    assert items[0].shape == (3, 8, 3, 32, 32) and items[0].dtype == np.float32
    assert items[0].min() >= -1 and items[0].max() <= 1
    steps = np.concatenate(items)  # global steps 0..8
    for s in range(9):
        np.testing.assert_array_equal(steps[s], expected_batch(small, s, batch_size=8, seed=4))
    flips = np.concatenate([batch_indices(s, batch_size=8, num_images=12, seed=4)[1] for s in range(9)])
    indices = np.concatenate([batch_indices(s, batch_size=8, num_images=12, seed=4)[0] for s in range(9)])
    j = int(np.argmax(flips))  # a flipped example really is mirrored left-right
    np.testing.assert_array_equal(steps.reshape(-1, 3, 32, 32)[j], to_model_range(small[indices[j]][None, :, ::-1])[0])
    with BatchLoader(small, batch_size=8, seed=4, start_step=5) as resumed:
        for s in range(5, 9):
            np.testing.assert_array_equal(next(resumed)[0], steps[s])


def test_no_flip_loads_the_images_as_they_are(small):
    """--config.data.no-flip (the digits preset's): the same images in the same order, none mirrored."""
    with BatchLoader(small, batch_size=8, seed=4, steps_per_call=3, flip=False) as loader:
        steps = np.concatenate([next(loader) for _ in range(2)])
    for s in range(6):
        indices, flips = batch_indices(s, batch_size=8, num_images=12, seed=4)
        assert flips.any()  # the flags still say "mirror" for some: they are ignored
        np.testing.assert_array_equal(steps[s], to_model_range(small[indices]))
    assert not DIGITS.data.flip and TrainConfig().data.flip  # digits are not mirror-symmetric; CIFAR-10 is flipped


def test_processes_split_the_global_batch(small):
    with BatchLoader(small, batch_size=8, seed=1) as whole:
        full = [next(whole) for _ in range(4)]
    parts = []
    for p in range(2):
        with BatchLoader(small, batch_size=8, seed=1, process_index=p, process_count=2) as loader:
            parts.append([next(loader) for _ in range(4)])
    for k in range(4):
        assert parts[0][k].shape == (1, 4, 3, 32, 32)
        np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]], axis=1), full[k])
    with pytest.raises(DataError, match="multiple of the process count"):
        BatchLoader(small, batch_size=9, seed=1, process_count=2)


def test_close_ends_the_thread(small):
    before = set(threading.enumerate())
    loader = BatchLoader(small, batch_size=4, seed=0, prefetch=1)
    next(loader)
    started = set(threading.enumerate()) - before
    assert started and all(t.is_alive() for t in started)
    loader.close()
    loader.close()
    assert not any(t.is_alive() for t in started)
    with pytest.raises(StopIteration):
        next(loader)


def test_worker_exception_reaches_the_caller(small, monkeypatch):
    import scgcm.data.loader

    def broken(step, **kwargs):
        if step == 2:
            raise RuntimeError("boom at step 2")
        return batch_indices(step, **kwargs)

    monkeypatch.setattr(scgcm.data.loader, "batch_indices", broken)
    loader = BatchLoader(small, batch_size=4, seed=0)
    next(loader), next(loader)
    with pytest.raises(RuntimeError, match="boom at step 2"):
        next(loader)
    assert not loader._thread.is_alive()
