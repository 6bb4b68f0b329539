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
def network(tmp_path_factory):
    from scgcm.eval.digits import load_network

    return load_network(tmp_path_factory.mktemp("digits-cache"))


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
