"""The digits testbed: scikit-learn's digits as a data source, and its classifier as the FID network."""

import numpy as np
import pytest

from scgcm.data import digits
from scgcm.data.sources import DataError, load_images, source_fingerprint


def test_digit_levels_map_to_uint8_by_hand():
    np.testing.assert_array_equal(digits.digits_to_uint8(np.array([0, 1, 8, 15, 16])), [0, 16, 128, 239, 255])
    assert digits.digits_to_uint8(np.array([4.0])).dtype == np.uint8  # 63.75 + 0.5 → 64
    assert digits.digits_to_uint8(np.array([4.0]))[0] == 64
    with pytest.raises(ValueError, match="lie in"):
        digits.digits_to_uint8(np.array([17]))


def test_split_is_fixed_and_disjoint():
    test, train = digits.split_mask(1797, "test"), digits.split_mask(1797, "train")
    assert test.sum() == 360 and train.sum() == 1437 and not (test & train).any()
    assert test[0] and test[5] and not test[1]
    with pytest.raises(ValueError, match="splits"):
        digits.split_mask(10, "validation")


def test_source_loads_through_the_image_rule():
    from sklearn.datasets import load_digits

    raw = load_digits()
    train = load_images("digits", split="train", image_size=8, channels=1)
    test = load_images("digits", split="test", image_size=8, channels=1)
    assert train.shape == (1437, 8, 8, 1) and test.shape == (360, 8, 8, 1) and train.dtype == np.uint8
    np.testing.assert_array_equal(test[1, ..., 0], digits.digits_to_uint8(raw.images[5]))
    assert source_fingerprint("digits", split="train") == source_fingerprint("digits", split="train")
    assert source_fingerprint("digits", split="train") != source_fingerprint("digits", split="test")
    with pytest.raises(DataError, match="--config.data.split"):
        load_images("digits", split="validation", image_size=8, channels=1)
    with pytest.raises(DataError):  # a 3-channel model is refused, not silently fed grey digits
        load_images("digits", image_size=8, channels=3)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits-cache")


@pytest.fixture(scope="module")
def network(digits_cache):
    from scgcm.eval.digits import load_network

    return load_network(digits_cache)


def test_classifier_is_accurate_deterministic_and_cached(network, tmp_path_factory):
    from scgcm.eval.digits import MIN_ACCURACY, load_network

    assert network.accuracy >= MIN_ACCURACY
    cache = tmp_path_factory.getbasetemp()
    files = list(cache.rglob("digits-mlp-*.npz"))
    assert len(files) == 1
    again = load_network(files[0].parent)  # read from the cache: the same weights
    assert again.weights_id == network.weights_id and again.accuracy == network.accuracy


def test_digit_scores_tell_real_copied_and_noise_images_apart(network):
    from scgcm.eval.digits import nearest_distances

    held_out, _ = digits.load_digits("test")
    train, _ = digits.load_digits("train")
    real = network.image_scores(held_out)
    assert real["confident"] > 0.9 and real["classes"] == 10
    assert 0.0 < real["memorised"] < 0.15  # 5 % of real held-out digits by construction, with the cutoff's ties
    assert network.image_scores(train[:200])["memorised"] == 1.0  # copies of training digits
    noise = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    scored = network.image_scores(noise)
    assert scored["confident"] < real["confident"] and scored["memorised"] == 0.0
    np.testing.assert_allclose(nearest_distances(np.array([[0.0, 0.0], [3.0, 4.0]]), np.array([[0.0, 1.0], [6.0, 8.0]])),
                               [1.0, np.sqrt(9 + 9)])
    assert network.features(np.repeat(held_out[:3], 3, axis=-1)).shape == (3, 64)  # RGB copies read as grey


def test_the_evaluator_scores_with_the_digits_network(network, tmp_path):
    """FID on the classifier's features (small for real held-out digits, large for noise) and its digit
    scores, through the evaluator's own scoring function: what training, the sweep and sample log."""
    from scgcm.eval.scores import data_reference, flat_scores, image_scores

    stats, features = data_reference("digits", network, image_size=8, channels=1, cache_dir=tmp_path,
                                     need_features=True)
    held_out, _ = digits.load_digits("test")
    noise = np.random.default_rng(1).integers(0, 256, (360, 8, 8, 1), dtype=np.uint8)
    real, fake = image_scores(held_out, stats, network, features), image_scores(noise, stats, network, features)
    assert real["fid"] < fake["fid"] / 5 and {"precision", "recall", "confident", "classes", "memorised"} <= set(real)
    assert set(flat_scores({"onestep": real})) >= {"fid_onestep", "confident_onestep", "classes_onestep"}
    assert list(tmp_path.glob("*.npz"))  # the reference is cached by content, keyed by the network


def test_fid_cli_measures_digits_with_the_classifier(network, digits_cache, tmp_path, monkeypatch, capsys):
    """`scgcm.fid ref/calc` choose the digits network for digits (auto) and print its scores; a reference
    of other features is refused in one line; the few-samples warning names the classifier's 64 dimensions."""
    from scgcm import fid as fid_cli
    from scgcm.errors import UserError
    from scgcm.eval.fid import few_samples_message
    from scgcm.eval.statcache import save_statistics

    monkeypatch.setenv("SCGCM_CACHE", str(digits_cache))  # the classifier trained once by the fixture
    ref = tmp_path / "ref.npz"
    assert fid_cli.main(["ref", "--source", "digits", "--out", str(ref)]) == 0
    held_out, _ = digits.load_digits("test")
    noise = np.random.default_rng(2).integers(0, 256, (360, 8, 8, 1), dtype=np.uint8)
    values = {}
    for name, images in (("real", held_out), ("noise", noise)):
        np.savez(tmp_path / f"{name}.npz", images=images)
        capsys.readouterr()
        assert fid_cli.main(["calc", str(tmp_path / f"{name}.npz"), "--ref", str(ref)]) == 0
        out, err = capsys.readouterr()
        values[name] = float(out.strip())
        assert "digits FD (360 samples)" in err and "classes" in err and "FID" not in err
    assert values["real"] < values["noise"] / 5
    assert "confident" in err
    bad_ref = tmp_path / "inception-like.npz"
    save_statistics(bad_ref, np.zeros(128), np.eye(128))
    with pytest.raises(UserError, match="128-dimensional features, but the digits network's have 64"):
        fid_cli.main(["calc", str(tmp_path / "real.npz"), "--ref", str(bad_ref), "--network", "digits"])
    assert fid_cli.chosen_network("auto", None, 64) == "digits" and fid_cli.chosen_network("auto", "digits") == "digits"
    assert fid_cli.chosen_network("auto", None, 2048) == "inception" and fid_cli.chosen_network("auto", None) == "inception"
    assert fid_cli.chosen_network("inception", "digits") == "inception"
    assert "fewer than 64," in few_samples_message(10, 64) and "published" not in few_samples_message(10, 64)
    assert "2,048" in few_samples_message(10)
    from scgcm.eval.fid import fid_label

    assert fid_label(500, "digits") == "digits FD (500 samples)" and fid_label(500) == "FID (500 samples)"


def test_the_evaluator_does_not_warn_about_inception_dimensions_for_digits(network, caplog):
    from scgcm.eval.scores import FIDEvaluator

    stats = (np.zeros(64), np.eye(64))
    with caplog.at_level("WARNING", logger="scgcm"):
        FIDEvaluator(stats, network, {}, num=500, batch_size=250)
    assert not caplog.records  # 500 samples are more than the classifier's 64 feature dimensions
    with caplog.at_level("WARNING", logger="scgcm"):
        FIDEvaluator(stats, network, {}, num=50, batch_size=50)
    assert "fewer than 64" in caplog.text
