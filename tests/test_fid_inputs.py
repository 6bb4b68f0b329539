"""Issue 14, the FID side: statistics caches keyed by content and verified, too few images, every
input checked before the network is loaded, one rule for image arrays, the CPU batch default.
A cheap stand-in replaces Inception; the loader of the real network is made to fail wherever it
must not be reached."""

import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float
from PIL import Image
from tiny import tiny_config

from scgcm import fid as fid_cli, sample
from scgcm.data.images import FID_CHANNELS, ImageArrayError, as_nhwc_uint8
from scgcm.data.sources import DataError, load_images, source_fingerprint
from scgcm.errors import UserError, run_cli
from scgcm.eval import fid, inception, statcache
from scgcm.eval.scores import data_statistics


class StandIn(eqx.Module):
    """Inception's contract ((b, 299, 299, 3) → (b, d)) at a fraction of the cost."""

    w: Float[Array, "3 4"]

    def __call__(self, x: Float[Array, "b 299 299 3"]) -> Float[Array, "b 4"]:
        return jnp.mean(jnp.tanh(3 * x[:, ::23, ::23] @ self.w), axis=(1, 2))


class Counting(fid.FeatureExtractor):
    """The extractor, counting the images it is given."""

    def __init__(self, net, calls: list):
        super().__init__(net, batch_size=8)
        self.calls = calls

    def features(self, images):
        self.calls.append(len(images))
        return super().features(images)


@pytest.fixture(scope="module")
def net():
    return StandIn(jax.random.normal(jax.random.key(2), (3, 4)))


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Loading the network (or its weights) fails the test; the statistics cache is a fresh folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was loaded")

    monkeypatch.setattr(inception, "load_inception", refuse)
    monkeypatch.setattr(inception, "load_params", refuse)
    monkeypatch.setenv("SCGCM_CACHE", str(tmp_path / "cache"))


def images(n, seed=0, size=8, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m scgcm.fid ARGV`, in this process."""
    code = run_cli(fid_cli.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def tamper(path: Path) -> None:
    """Add 1 to μ in an .npz, keeping every other entry (and so the stored digest) as it was."""
    with np.load(path) as z:
        entries = {k: z[k] for k in z.files}
    entries["mu"] = entries["mu"] + 1.0
    np.savez(path, **entries)


# ------------------------------------------------------------------- 1. content-keyed, verified caches


def test_replaced_data_is_recomputed(net, tmp_path):
    calls, cache = [], tmp_path / "cache"
    first, second = images(12, seed=1), images(12, seed=2)
    np.savez(tmp_path / "data.npz", images=first)
    ref = lambda: fid.reference_statistics(str(tmp_path / "data.npz"), Counting(net, calls), cache)  # noqa: E731
    a = ref()
    np.testing.assert_array_equal(ref()[0], a[0])
    assert calls == [12]  # the second call was a cache hit
    np.savez(tmp_path / "data.npz", images=second)  # the same path, other images
    b = ref()
    assert calls == [12, 12]
    np.testing.assert_allclose(b[1], fid.compute_statistics(Counting(net, []).features(second))[1], rtol=1e-6)
    assert not np.allclose(a[0], b[0])

    folder = tmp_path / "pngs"  # a folder: its files' names, sizes and mtimes
    folder.mkdir()
    for i, im in enumerate(first[:6]):
        Image.fromarray(im).save(folder / f"{i}.png")
    before = source_fingerprint(str(folder))
    assert source_fingerprint(str(folder)) == before
    fid.reference_statistics(str(folder), Counting(net, calls), cache)
    Image.fromarray(second[0]).save(folder / "0.png")
    os.utime(folder / "0.png", ns=(1, 1))  # even with an old mtime, the size or time differs
    assert source_fingerprint(str(folder)) != before
    stats = fid.reference_statistics(str(folder), Counting(net, calls), cache)
    assert calls == [12, 12, 6, 6]
    expected = np.concatenate([second[:1], first[1:6]])
    np.testing.assert_allclose(stats[0], fid.compute_statistics(Counting(net, []).features(expected))[0], rtol=1e-6)


def test_tampered_cache_is_recomputed_with_a_warning(net, tmp_path):
    np.savez(tmp_path / "data.npz", images=images(10, seed=3))
    calls, cache = [], tmp_path / "cache"
    getters = {  # the cache of `fid ref`/`calc --source`, and training's (`data_statistics`) for other sizes
        "fid-ref-*data.npz-train-*.npz": lambda: fid.reference_statistics(str(tmp_path / "data.npz"),
                                                                          Counting(net, calls), cache),
        "fid-ref-synthetic-*8x3-*.npz": lambda: data_statistics("synthetic", Counting(net, calls), image_size=8,
                                                                synthetic_size=10, seed=0, cache_dir=cache),
    }
    for pattern, get in getters.items():
        calls.clear()
        honest = get()
        (path,) = cache.glob(pattern)
        tamper(path)
        with pytest.warns(UserWarning, match="do not match their stored sha256"):
            again = get()
        assert calls == [10, 10]
        np.testing.assert_array_equal(again[0], honest[0])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the file was rewritten: no warning now
            np.testing.assert_array_equal(get()[0], honest[0])
        assert calls == [10, 10]


def test_cache_file_of_other_data_is_not_used(tmp_path):
    computed = []

    def compute(value):
        computed.append(value)
        return (np.full(2, value), np.eye(2) * value), None

    def cached(key, value):
        return statcache.cached_reference(tmp_path, "s", {"data": key}, lambda: compute(value))[0]

    stats = cached("a", 1.0)
    np.testing.assert_array_equal(cached("a", 9.0)[0], stats[0])
    (only,) = tmp_path.glob("s-*.npz")
    cached("b", 2.0)
    (other,) = set(tmp_path.glob("s-*.npz")) - {only}
    other.write_bytes(only.read_bytes())  # a valid file under another key's name
    with pytest.warns(UserWarning, match="computed for other data"):
        assert cached("b", 2.0)[0][0] == 2.0
    other.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="not a readable .npz"):
        assert cached("b", 2.0)[0][0] == 2.0
    assert computed == [1.0, 2.0, 2.0, 2.0]


def test_real_features_are_cached_verified_and_added_when_needed(tmp_path):
    """Precision/recall's real features live in the same content-keyed files, under their own digest."""
    computed = []

    def compute(features):
        def run():
            computed.append(len(features))
            return fid.compute_statistics(features), features
        return run

    a, b = (np.random.default_rng(i).standard_normal((6, 3)).astype(np.float32) for i in (0, 1))
    stats, none = statcache.cached_reference(tmp_path, "r", {"data": "x"}, lambda: (compute(a)()[0], None))
    assert none is None and computed == [6]
    (path,) = tmp_path.glob("r-*.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file without features is no fault: recomputed silently when they are needed
        got_stats, got = statcache.cached_reference(tmp_path, "r", {"data": "x"}, compute(a), need_features=True)
    np.testing.assert_array_equal(got, a)
    assert computed == [6, 6]
    assert statcache.cached_reference(tmp_path, "r", {"data": "x"}, compute(b), need_features=True)[1] is not None
    assert computed == [6, 6]  # now a hit, features included
    assert statcache.cached_reference(tmp_path, "r", {"data": "x"}, compute(b))[1] is None  # not read unless needed

    with np.load(path) as z:
        entries = {k: z[k] for k in z.files}
    entries["features"] = entries["features"] + 1.0  # μ, Σ and the features' digest kept
    np.savez(path, **entries)
    assert statcache.cached_reference(tmp_path, "r", {"data": "x"}, compute(b))[1] is None  # μ, Σ still verify
    with pytest.warns(UserWarning, match="features do not match their stored sha256"):
        _, again = statcache.cached_reference(tmp_path, "r", {"data": "x"}, compute(b), need_features=True)
    np.testing.assert_array_equal(again, b)
    assert computed == [6, 6, 6]

    statcache.save_statistics(tmp_path / "ref.npz", *stats, features=a)  # what `fid ref --out` writes
    np.testing.assert_array_equal(fid.read_reference(tmp_path / "ref.npz", need_features=True)[1], a)
    np.savez(tmp_path / "ref.npz", **entries)
    with pytest.raises(UserError, match="--fid-ref .*features do not match"):
        fid.read_reference(tmp_path / "ref.npz", "--fid-ref", need_features=True)


# --------------------------------------------------------------------------------- 2. too few images


def test_one_image_is_refused_at_once(tmp_path):
    np.savez(tmp_path / "one.npz", images=images(1))
    statcache.save_statistics(tmp_path / "ref.npz", np.zeros(4), np.eye(4))
    env = {**os.environ, "SCGCM_CACHE": str(tmp_path / "cache"), "SCGCM_INCEPTION_WEIGHTS": str(tmp_path / "none.pt")}
    done = subprocess.run([sys.executable, "-m", "scgcm.fid", "calc", str(tmp_path / "one.npz"), "--ref",
                           str(tmp_path / "ref.npz")], env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: {tmp_path / 'one.npz'}: FID needs at least 2 images, got 1"

    def distance_of_one_image():
        try:
            outcome.append(fid.frechet_distance(np.zeros(4), np.full((4, 4), np.nan), np.zeros(4), np.eye(4)))
        except ValueError as e:
            outcome.append(e)

    outcome = []  # sqrtm of a NaN matrix used to spin for ever: the guard must answer at once
    thread = threading.Thread(target=distance_of_one_image, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert outcome and isinstance(outcome[0], ValueError) and "NaN" in str(outcome[0])
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute_statistics(np.ones((1, 4)))


def test_two_images_give_a_number_and_a_warning(net, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inception, "load_inception", lambda: net)
    two, many = images(2, seed=4), images(40, seed=5)
    np.savez(tmp_path / "two.npz", images=two)
    statcache.save_statistics(tmp_path / "ref.npz", *fid.compute_statistics(Counting(net, []).features(many)))
    code, out, err = cli(["calc", str(tmp_path / "two.npz"), "--ref", str(tmp_path / "ref.npz")], capsys)
    assert code == 0 and np.isfinite(float(out))
    # one line says the FID is biased; scipy's "Matrix is singular" (which that implies) is not printed beside it
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.search("FID of 2 images .* biased upward and not comparable", warnings[0]), err
    assert "singular" not in err.lower() and "LinAlgWarning" not in err and ".py:" not in err


# ----------------------------------------------------------------- 3. every input before the network


def bad_calc_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    good, ref = tmp / "good.npz", tmp / "ref.npz"
    np.savez(good, images=images(4))
    statcache.save_statistics(ref, np.zeros(4), np.eye(4))
    np.savez(tmp / "no-arrays.npz")
    np.savez(tmp / "empty.npz", images=np.zeros((0, 8, 8, 3), np.uint8))
    np.savez(tmp / "float.npz", images=images(4).astype(np.float32))
    np.savez(tmp / "rgba.npz", images=images(4, channels=4))
    (tmp / "text.npz").write_text("not a zip")
    (tmp / "pngs").mkdir()
    statcache.save_statistics(tmp / "edited.npz", np.zeros(4), np.eye(4))
    tamper(tmp / "edited.npz")
    np.savez(tmp / "source.npz", images=images(4))
    return {
        "missing": ([str(tmp / "nowhere.npz")], "nowhere.npz: no such file"),
        "no arrays": ([str(tmp / "no-arrays.npz")], "holds no arrays"),
        "empty": ([str(tmp / "empty.npz")], "no images"),
        "empty, with --source": ([str(tmp / "empty.npz"), "--source", str(tmp / "source.npz")], "no images"),
        "float": ([str(tmp / "float.npz")], "must be uint8"),
        "4 channels": ([str(tmp / "rgba.npz")], "4 channels, expected 1 or 3"),
        "not an npz": ([str(tmp / "text.npz")], "not a readable .npz"),
        "no pngs": ([str(tmp / "pngs")], "no .png files"),
        "ref missing": ([str(good), "--ref", str(tmp / "no-ref.npz")], "--ref .*no-ref.npz: no such file"),
        "ref edited": ([str(good), "--ref", str(tmp / "edited.npz")], "--ref .*edited.npz: .*sha256"),
        "ref not statistics": ([str(good), "--ref", str(good)], "--ref .*holds no FID statistics"),
        "batch size": ([str(good), "--ref", str(ref), "--batch-size", "0"], "--batch-size must be positive"),
        "ref and source": ([str(good), "--ref", str(ref), "--source", str(good)], "--ref and --source"),
        "source missing": ([str(good), "--source", str(tmp / "gone")], "'.*gone' does not exist; pass --source"),
    }


@pytest.mark.filterwarnings("ignore:FID of 4 images")
def test_bad_calc_inputs_are_one_line_before_the_network(no_network, tmp_path, monkeypatch, capsys):
    for case, (args, expected) in bad_calc_inputs(tmp_path).items():
        code, _, err = cli(["calc", *args], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (case, err)
        assert re.search(expected, err), (case, err)
        assert "--config.data.source" not in err
    assert not (tmp_path / "cache").exists()  # nothing computed or cached for --source


def test_ref_names_its_own_flag(no_network, tmp_path, capsys):
    code, _, err = cli(["ref", "--source", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist; pass --source PATH" in err and "--config" not in err
    (tmp_path / "out").mkdir()
    code, _, err = cli(["ref", "--source", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "--out" in err


def test_sample_fid_reference_checked_before_the_network(no_network, tmp_path):
    def refuse():
        raise AssertionError("the network was built")

    cfg = tiny_config()
    statcache.save_statistics(tmp_path / "edited.npz", np.zeros(4), np.eye(4))
    tamper(tmp_path / "edited.npz")
    for kwargs, expected in [({"fid_source": str(tmp_path / "gone")}, "does not exist; pass --fid-source PATH"),
                             ({"fid_ref": str(tmp_path / "edited.npz")}, "--fid-ref .*sha256"),
                             ({"fid_ref": str(tmp_path / "edited.npz"), "fid_source": "x"}, "exclude each other")]:
        with pytest.raises(UserError, match=expected):
            sample.reference(sample.SampleArgs(workdir=str(tmp_path), fid=True, **kwargs), cfg, refuse)
    with pytest.raises(UserError, match="--num: FID needs at least 2 images, got 1"):
        sample.main(["--workdir", str(tmp_path / "no-run"), "--fid", "--num", "1"])


# -------------------------------------------------------------------------------- 4. one array rule


@pytest.mark.parametrize("shape, kwargs, result", [
    ((2, 5, 5, 3), {}, "as is"),
    ((2, 3, 5, 5), {}, "transposed"),  # NCHW
    ((2, 5, 5), {"channels": 1}, "as is"),  # grey without a channel axis
    ((2, 1, 3, 3), {"channels": FID_CHANNELS}, "transposed"),  # both axes could be channels: the square reading
    ((2, 7, 5, 1), {"channels": FID_CHANNELS}, "as is"),  # any size for FID
    ((2, 3, 3, 3), {}, "error: could be [N, H, W, C] or [N, C, H, W]"),
    ((2, 5, 5), {}, "error: expected a 4-d"),
    ((2, 5, 5, 4), {}, "error: 4 channels, expected 3"),
    ((2, 6, 6, 3), {"image_size": 5}, "error: 6x6, expected 5x5"),
    ((0, 5, 5, 3), {}, "error: no images"),
])
def test_image_array_rule(shape, kwargs, result):
    array = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    kwargs = {"image_size": None, **kwargs}
    if result.startswith("error: "):
        with pytest.raises(ImageArrayError, match=re.escape(result.removeprefix("error: "))) as info:
            as_nhwc_uint8(array, name="x.npz", **kwargs)
        assert str(info.value).startswith("x.npz: ")
        return
    out = as_nhwc_uint8(array, **kwargs)
    expected = array.transpose(0, 2, 3, 1) if result == "transposed" else array.reshape(*shape[:3], -1)
    assert out.flags.c_contiguous and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_image_array_rule_refuses_other_dtypes():
    for dtype, hint in ((np.float32, "scale to 0..255"), (np.int64, "got dtype int64"), (bool, "got dtype bool")):
        with pytest.raises(ImageArrayError, match=hint):
            as_nhwc_uint8(np.zeros((2, 4, 4, 3), dtype))


def test_ref_calc_and_training_read_arrays_alike(net, tmp_path):
    nhwc, grey = images(6, seed=7, size=28), images(6, seed=8, size=28, channels=1)
    np.savez(tmp_path / "nchw.npz", nhwc.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "grey.npz", images=grey)
    extractor = Counting(net, [])
    for path, pixels in (("nchw.npz", nhwc), ("grey.npz", np.repeat(grey, 3, axis=-1))):
        calc = fid.load_samples(tmp_path / path)
        np.testing.assert_array_equal(calc, pixels)
        ref = fid.reference_statistics(str(tmp_path / path), extractor, tmp_path / "cache")
        np.testing.assert_array_equal(ref[0], fid.compute_statistics(extractor.features(calc))[0])
    np.testing.assert_array_equal(load_images(tmp_path / "nchw.npz", image_size=28), nhwc)
    np.testing.assert_array_equal(load_images(tmp_path / "grey.npz", image_size=28, channels=1), grey)
    with pytest.raises(DataError, match="28x28, expected 32x32"):
        load_images(tmp_path / "nchw.npz")  # training: the model's size, never resized


# ------------------------------------------------------------------------------------ 5. CPU memory


def test_default_batch_follows_the_backend(net):
    assert fid.default_batch_size("cpu") == 32 and fid.default_batch_size("gpu") == fid.default_batch_size("tpu") == 256
    assert fid.FeatureExtractor(net).batch_size == 32  # on this CPU (8 simulated devices)
    assert fid_cli.cli(["calc", "s.npz"]).batch_size is None and fid_cli.cli(["ref"]).batch_size is None
    # the jitted per-batch function takes the uint8 batch at its own size and resizes inside
    jaxpr = jax.make_jaxpr(fid._extract)(net, jnp.zeros((2, 8, 8, 3), jnp.uint8))
    assert jaxpr.in_avals[-1].shape == (2, 8, 8, 3) and "299" in str(jaxpr)
