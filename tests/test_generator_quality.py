"""Generator-quality metrics on hand-built feature sets, where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from labelfoundry.generator_quality import frechet_distance, head_fraction, knn_membership, knn_precision_recall, presence


def _blob(rng, n, centre, d=8, scale=1.0):
    return (rng.normal(size=(n, d)) * scale + centre).astype(np.float32)


def test_identical_sets_give_full_precision_and_recall():
    x = _blob(np.random.default_rng(0), 300, 0.0)
    assert knn_precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_far_apart_sets_give_zero_precision_and_recall():
    rng = np.random.default_rng(1)
    assert knn_precision_recall(_blob(rng, 300, 0.0), _blob(rng, 300, 100.0), k=3) == (0.0, 0.0)


def test_mode_collapse_keeps_precision_and_halves_recall():
    """Generated samples from one of two real modes: as realistic as a fresh draw of both modes
    (same precision), but they cover half of what a fresh draw covers (half the recall)."""
    rng = np.random.default_rng(2)
    real = np.concatenate([_blob(rng, 400, 0.0), _blob(rng, 400, 50.0)])
    fresh = np.concatenate([_blob(rng, 200, 0.0), _blob(rng, 200, 50.0)])
    collapsed = _blob(rng, 400, 0.0)
    p_fresh, r_fresh = knn_precision_recall(real, fresh, k=3)
    p, r = knn_precision_recall(real, collapsed, k=3)
    assert abs(p - p_fresh) < 0.1
    assert r == pytest.approx(r_fresh / 2, abs=0.1)


def test_membership_names_the_real_mode_left_uncovered():
    """Per-sample membership says which real samples the generated set misses (the rare-part recall
    reads it per class), and its means are precision and recall."""
    rng = np.random.default_rng(3)
    real = np.concatenate([_blob(rng, 300, 0.0), _blob(rng, 100, 50.0)])  # a common and a rare mode
    collapsed = _blob(rng, 400, 0.0)
    fake_in, real_in = knn_membership(real, collapsed, k=3)
    assert fake_in.shape == (400,) and real_in.shape == (400,)
    assert real_in[:300].mean() > 0.5 and real_in[300:].mean() == 0.0  # the rare mode: none covered
    assert (float(fake_in.mean()), float(real_in.mean())) == knn_precision_recall(real, collapsed, k=3)


def test_precision_recall_rejects_mismatched_features():
    with pytest.raises(ValueError, match="one D"):
        knn_precision_recall(np.zeros((10, 4), np.float32), np.zeros((10, 5), np.float32))
    with pytest.raises(ValueError, match="more than k"):
        knn_precision_recall(np.zeros((3, 4), np.float32), np.zeros((10, 4), np.float32), k=3)


def test_frechet_distance_is_zero_for_same_set_and_grows_with_shift():
    rng = np.random.default_rng(3)
    a = _blob(rng, 2000, 0.0, d=4)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    b = a + 3.0
    assert frechet_distance(a, b) == pytest.approx(4 * 9.0, rel=1e-6)  # |mu1 - mu2|^2, same covariance


def test_presence_and_head_fraction_count_pixels():
    pred = np.zeros((2, 10, 10), np.uint8)
    pred[0, :2, :2] = 8   # 4 px of class 8 in image 0
    pred[1, :5, :] = 2    # half the pixels are class 2 in image 1
    assert presence(pred, 8, 0.04).tolist() == [True, False]
    assert presence(pred, 8, 0.05).tolist() == [False, False]
    assert head_fraction(pred).tolist() == pytest.approx([0.04, 0.5])
