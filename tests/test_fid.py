"""FID statistics, the Fréchet distance against closed forms, sharded batching (with a cheap stand-in
for Inception, on the eight simulated devices), the reference cache, sample loading and the CLI."""

import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float
from PIL import Image

from scgcm import fid as fid_cli
from scgcm.eval import fid, inception, statcache


class TinyNet(eqx.Module):
    """Stands in for InceptionV3: same input contract (b, 299, 299, 3), 4-d features."""

    w: Float[Array, "3 4"]

    def __call__(self, x: Float[Array, "b 299 299 3"]) -> Float[Array, "b 4"]:
        return jnp.mean(jnp.tanh(x @ self.w), axis=(1, 2)) + jnp.mean(x[:, ::37, ::41] ** 2, axis=(1, 2, 3))[:, None]


@pytest.fixture(scope="module")
def tiny():
    return TinyNet(jax.random.normal(jax.random.key(0), (3, 4)))


@pytest.fixture(scope="module")
def extractor(tiny):
    return fid.FeatureExtractor(tiny, batch_size=5)


def _images(n, seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    one_d = [np.array(v) for v in ([1.0], [[4.0]], [3.0], [[9.0]])]
    assert fid.frechet_distance(*one_d) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_full_covariances_symmetric_and_zero_on_self():
    rng = np.random.default_rng(1)
    f1, f2 = rng.standard_normal((500, 8)), rng.standard_normal((400, 8)) @ rng.standard_normal((8, 8))
    s1, s2 = fid.compute_statistics(f1), fid.compute_statistics(f2)
    assert s1[0].dtype == s1[1].dtype == np.float64
    np.testing.assert_allclose(s1[1], np.cov(f1, rowvar=False))
    assert fid.frechet_distance(*s1, *s2) == pytest.approx(fid.frechet_distance(*s2, *s1), rel=1e-8)
    assert abs(fid.frechet_distance(*s1, *s1)) < 1e-9
    few = fid.compute_statistics(rng.standard_normal((20, 64)))  # singular, as with < 2048 images
    assert abs(fid.frechet_distance(*few, *few)) < 1e-6 * np.trace(few[1])


def test_features_sharded_batched_and_padded(extractor, tiny):
    assert extractor.mesh.size == len(jax.devices()) == 8 and extractor.batch_size == 8
    images = _images(13)
    feats = extractor.features(images)
    expected = np.asarray(tiny(inception.preprocess(jnp.asarray(images))))
    assert feats.shape == (13, 4) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, expected, atol=1e-5)
    np.testing.assert_allclose(extractor.features(images[:3]), expected[:3], atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        extractor.features(images.astype(np.float32))


def test_fid_from_images_of_a_set_against_itself(extractor):
    images = _images(40, seed=3)
    stats = fid.compute_statistics(extractor.features(images))
    assert abs(fid.fid_from_images(images, stats, extractor)) < 1e-6
    assert fid.fid_from_images(images // 2, stats, extractor) > 1e-3


class Counting(fid.FeatureExtractor):
    """The extractor, counting the images it is given (`calls`)."""

    def __init__(self, net, calls):
        super().__init__(net, batch_size=8)
        self.calls = calls

    def features(self, images):
        self.calls.append(len(images))
        return super().features(images)


def test_reference_statistics_cached(tiny, tmp_path):
    calls = []
    counting = lambda: Counting(tiny, calls)  # noqa: E731
    for name, seed in (("some.npz", 1), ("other.npz", 2)):
        np.savez(tmp_path / name, images=_images(16, seed=seed))
    first = fid.reference_statistics(str(tmp_path / "some.npz"), counting(), cache_dir=tmp_path / "c", split="test")
    second = fid.reference_statistics(str(tmp_path / "some.npz"), counting(), cache_dir=tmp_path / "c", split="test")
    assert calls == [16]
    np.testing.assert_array_equal(first[1], second[1])
    fid.reference_statistics(str(tmp_path / "other.npz"), counting(), cache_dir=tmp_path / "c", split="test")
    assert len(calls) == 2 and len(list((tmp_path / "c").glob("fid-ref-*.npz"))) == 2


def test_load_samples(tmp_path):
    images = _images(3, size=8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(3))
    np.savez(tmp_path / "b.npz", images)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i:06d}.png")
    for source in ("a.npz", "b.npz", "."):
        np.testing.assert_array_equal(fid.load_samples(tmp_path / source), images)
    np.savez(tmp_path / "c.npz", images=images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fid.load_samples(tmp_path / "c.npz")


def test_cli_calc_prints_fid(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inception, "load_inception", lambda: tiny)
    images = _images(24, seed=5)
    np.savez(tmp_path / "samples.npz", images=images)
    mu, sigma = fid.compute_statistics(fid.FeatureExtractor(tiny).features(images))
    statcache.save_statistics(tmp_path / "ref.npz", mu, sigma)
    fid_cli.main(fid_cli.Calc(samples=tmp_path / "samples.npz", ref=tmp_path / "ref.npz"))
    assert abs(float(capsys.readouterr().out.strip())) < 1e-4


def test_cli_parses_and_helps(tmp_path, capsys):
    command = fid_cli.cli(["calc", "s.npz", "--ref", "r.npz", "--batch-size", "64"])
    assert command == fid_cli.Calc(samples=Path("s.npz"), ref=Path("r.npz"), batch_size=64)
    assert fid_cli.cli(["ref", "--source", "x", "--out", "o.npz"]) == fid_cli.Ref(source="x", out=Path("o.npz"))
    for args in (["calc", "--help"], ["ref", "--help"]):
        with pytest.raises(SystemExit) as e:
            fid_cli.cli(args)
        assert e.value.code == 0
    assert "--ref" in capsys.readouterr().out
    run = subprocess.run([sys.executable, "-m", "scgcm.fid", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "usage: python -m scgcm.fid" in run.stdout, run.stderr
