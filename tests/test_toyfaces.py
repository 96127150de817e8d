import numpy as np
import pytest

from labelfoundry.domains import toyfaces


def test_same_seed_same_pixels_regardless_of_batch():
    a = toyfaces.render([5, 6, 7], 32)
    b = toyfaces.render([7], 32)
    assert np.array_equal(a["image"][2], b["image"][0])
    assert np.array_equal(a["mask"][2], b["mask"][0])


def test_labels_consistent():
    r = toyfaces.render(list(range(64)), 64)
    m = r["mask"]
    assert m.dtype == np.int64 and m.min() >= 0 and m.max() < len(toyfaces.CLASSES)
    assert np.isfinite(r["depth"]).all()
    # background plane is the farthest surface; the head is closer
    assert np.all(r["depth"][m == 0] == 10.0)
    assert r["depth"][m == toyfaces.CLASSES.index("skin")].max() < 10.0
    # every visible keypoint sits inside the head (skin/eyes/nose/mouth/brows/glasses), not on background/hair
    kp = r["keypoints"]
    face = [toyfaces.CLASSES.index(c) for c in ("skin", "eyes", "brows", "nose", "mouth", "glasses")]
    for i in range(len(kp)):
        for x, y, v in kp[i]:
            if v > 0:
                assert m[i, int(round(y)), int(round(x))] in face


def test_every_face_has_its_parts_and_rare_classes_are_rare():
    r = toyfaces.render(toyfaces.split_seeds("train", 600), 64)
    m = r["mask"]
    for c in ("skin", "hair", "eyes", "mouth", "nose"):
        present = (m == toyfaces.CLASSES.index(c)).any(axis=(1, 2))
        assert present.mean() > 0.9, c
    assert 0.02 < r["has_glasses"].mean() < 0.09
    assert 0.01 < r["has_hat"].mean() < 0.06
    assert np.array_equal(r["has_hat"], (m == toyfaces.CLASSES.index("hat")).any(axis=(1, 2)))


def test_splits_are_disjoint_and_fixed():
    tr, va, te = (set(toyfaces.split_seeds(s, 1000)) for s in ("train", "val", "test"))
    assert not (tr & va or tr & te or va & te)
    assert toyfaces.split_seeds("val", 3) == toyfaces.split_seeds("val", 3)
    with pytest.raises(ValueError, match="unknown split"):
        toyfaces.split_seeds("holdout", 3)


@pytest.mark.parametrize("res", [16, 32, 128])
def test_any_power_of_two_resolution(res):
    r = toyfaces.render([1, 2], res)
    assert r["image"].shape == (2, res, res, 3) and r["mask"].shape == (2, res, res)


def test_bad_resolution():
    with pytest.raises(ValueError, match="power of two"):
        toyfaces.render([1], 48)


def test_samples_are_labeled_samples():
    s = toyfaces.samples("val", 3, 32)
    assert [x.sample_id for x in s] == ["toyfaces-val-0000000", "toyfaces-val-0000001", "toyfaces-val-0000002"]
    assert s[0].image.shape == (32, 32, 3) and s[0].keypoints.shape == (5, 3)
