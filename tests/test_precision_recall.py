"""Improved precision/recall (Kynkäänniemi et al. 2019): closed cases, a hand-computed one, a
brute-force numpy check, and independence from the block size."""

import numpy as np
import pytest

from scgcm.eval.precision_recall import knn_radii, precision_recall, subsample


def _brute_force(real, gen, k):
    d = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    r_real = np.sort(d(real, real), axis=1)[:, k]
    r_gen = np.sort(d(gen, gen), axis=1)[:, k]
    precision = np.mean((d(gen, real) <= r_real[None, :]).any(1))
    recall = np.mean((d(real, gen) <= r_gen[None, :]).any(1))
    return precision, recall


def test_identical_sets_give_one_and_far_clusters_zero():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_hand_computed_one_dimensional_case():
    # k = 1. Real balls: 0±1, 1±1, 3±2, 7±4, 30±23; generated balls: 0.5±3.5, 4.5±4, 12±7.5, -3±3.5.
    real = np.array([[0.0], [1.0], [3.0], [7.0], [30.0]])
    gen = np.array([[0.5], [4.5], [12.0], [-3.0]])
    np.testing.assert_allclose(knn_radii(real, k=1), [1, 1, 2, 4, 23])
    precision, recall = precision_recall(real, gen, k=1)
    assert precision == pytest.approx(3 / 4)  # -3 lies outside every real ball
    assert recall == pytest.approx(4 / 5)  # 30 lies outside every generated ball


def test_matches_brute_force_and_block_size_does_not_matter():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((53, 8)).astype(np.float32)
    gen = (0.8 * rng.standard_normal((37, 8)) + 0.4).astype(np.float32)
    expected = _brute_force(real.astype(np.float64), gen.astype(np.float64), k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case that tests something
    results = {block: precision_recall(real, gen, k=3, block=block) for block in (5, 1024)}
    for block, result in results.items():
        assert result == pytest.approx(expected, abs=1e-6), block  # one point moves it by 1/53
        assert result == results[1024]


def test_duplicates_are_their_own_neighbours_but_self_is_excluded():
    x = np.array([[0.0], [0.0], [1.0], [3.0], [6.0]])
    np.testing.assert_allclose(knn_radii(x, k=1), [0, 0, 1, 2, 3])
    np.testing.assert_allclose(knn_radii(x, k=3), [3, 3, 2, 3, 6])


def test_input_checks_and_subsample():
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises((ValueError, TypeError)):  # jaxtyping catches it first when enabled
        precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))
    x = np.arange(20.0)[:, None]
    assert subsample(x, 30) is x
    kept = subsample(x, 5)
    assert kept.shape == (5, 1) and np.all(np.diff(kept[:, 0]) > 0)
    np.testing.assert_array_equal(kept, subsample(x, 5))
