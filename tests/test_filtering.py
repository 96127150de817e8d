"""Unit tests of labelfoundry/filtering.py on hand-built manifests and vectors (no flow, no Prefect)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from labelfoundry.filtering import compute_flags, duplicate_flags, rebalance, uncertainty_flags


def manifest(scores, ids=None, index=None, **cols) -> pd.DataFrame:
    ids = list(range(len(scores))) if ids is None else ids
    m = pd.DataFrame({"sample_id": np.asarray(ids, dtype=np.int64), "score": np.asarray(scores, dtype=np.float64), **cols})
    if index is not None:
        m.index = index
    return m


# ----------------------------------------------------------------------------- uncertainty
@pytest.mark.parametrize(
    "n, q",
    [(10, 0.25), (10, 0.1), (64, 0.1), (7, 0.1), (100, 0.0), (30, 0.1), (10, 0.7), (3, 0.99),
     (100, 0.29),
     (100, 0.57)],
)
def test_uncertainty_flags_drop_exactly_floor_q_n_of_the_highest_scores(n, q):
    rng = np.random.default_rng(n)
    m = manifest(rng.random(n), ids=rng.permutation(n) + 1000)
    flags = uncertainty_flags(m, q)
    expected = (round(q * 100) * n) // 100  # floor(q * n) in exact arithmetic (q has two decimals)
    assert int(flags.sum()) == expected
    assert flags.dtype == bool and flags.index.equals(m.index)
    if 0 < expected < n:
        assert m.loc[flags, "score"].min() > m.loc[~flags, "score"].max()


def test_uncertainty_ties_are_broken_by_sample_id_and_follow_the_manifest_index():
    # ids 3, 1, 2 share the top score; two of them are dropped: the lowest ids (1 and 2)
    m = manifest([0.5, 0.9, 0.9, 0.1, 0.9, 0.2], ids=[10, 3, 1, 0, 2, 7], index=[50, 51, 52, 53, 54, 55])
    flags = uncertainty_flags(m, 0.34)  # floor(0.34 * 6) = 2
    assert flags.index.equals(m.index)
    assert sorted(m.loc[flags, "sample_id"]) == [1, 2]
    # a different score column
    m["score_top10"] = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert m.loc[uncertainty_flags(m, 0.2, score="score_top10"), "sample_id"].tolist() == [7]


def test_uncertainty_ties_do_not_depend_on_row_order():
    m = manifest(np.repeat([0.1, 0.5, 0.9], 10), ids=np.arange(30))
    picks = set()
    for seed in range(5):
        shuffled = m.sample(frac=1.0, random_state=seed)
        picks.add(tuple(sorted(shuffled.loc[uncertainty_flags(shuffled, 0.2), "sample_id"])))
    assert picks == {tuple(range(20, 26))}


# ----------------------------------------------------------------------------- duplicates
def near_copy_vectors(noise: float = 1e-3):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 32)).astype(np.float32)  # far apart: RMS distance ~1.4
    copy = base[2] + noise * rng.normal(size=32).astype(np.float32)  # RMS distance ~1e-3 to sample 2
    return np.concatenate([base, copy[None]])  # sample 6 is a near copy of sample 2


def test_duplicate_flags_drop_the_near_copy_and_keep_the_first_in_order():
    x = near_copy_vectors()
    order = np.array([0, 1, 2, 3, 4, 5, 6])  # the original (2) comes first: it is kept
    assert duplicate_flags(x, order, threshold=0.05).tolist() == [False] * 6 + [True]
    order = np.array([6, 0, 1, 3, 4, 5, 2])  # the copy comes first: the original is the duplicate
    assert np.flatnonzero(duplicate_flags(x, order, threshold=0.05)).tolist() == [2]


def test_duplicate_threshold_is_rms_distance_per_dimension():
    x = near_copy_vectors(noise=0.1)  # RMS distance ~0.1
    order = np.arange(7)
    assert not duplicate_flags(x, order, threshold=0.05).any()
    assert duplicate_flags(x, order, threshold=0.2).tolist() == [False] * 6 + [True]
    # multi-dimensional vectors (e.g. pooled images) are flattened
    assert duplicate_flags(x.reshape(7, 2, 4, 4), order, threshold=0.2).tolist() == [False] * 6 + [True]


def test_exact_copies_keep_one():
    x = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # 4 distinct vectors, 3 copies each
    dup = duplicate_flags(x, np.arange(12), threshold=0.01)
    assert dup.sum() == 8
    assert [int((~dup[i * 3:(i + 1) * 3]).sum()) for i in range(4)] == [1, 1, 1, 1]


def test_compute_flags_keeps_the_better_scored_original():
    x = near_copy_vectors()
    # the near copy (id 6) is less uncertain than its original (id 2): the copy is kept
    m = manifest([0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.25])
    f = compute_flags(m, drop_top=0.0, dedup_vectors=x, dedup_threshold=0.05)
    assert f.loc[~f["keep"], "sample_id"].tolist() == [2]
    assert f["duplicate"].tolist() == [False, False, True, False, False, False, False]
    # the original better scored: the copy goes
    m = manifest([0.5, 0.4, 0.1, 0.2, 0.3, 0.05, 0.25])
    f = compute_flags(m, drop_top=0.0, dedup_vectors=x, dedup_threshold=0.05)
    assert f.loc[~f["keep"], "sample_id"].tolist() == [6]
    assert not f["uncertain"].any()


def test_compute_flags_combines_uncertainty_and_duplicates_row_aligned():
    x = near_copy_vectors()
    m = manifest([0.5, 0.4, 0.1, 0.2, 0.3, 0.9, 0.25], ids=[10, 11, 12, 13, 14, 15, 16], index=range(100, 107))
    f = compute_flags(m, drop_top=0.15, dedup_vectors=x, dedup_threshold=0.05)  # floor(1.05) = 1 uncertain
    assert f["sample_id"].tolist() == m["sample_id"].tolist()
    assert f.loc[f["uncertain"], "sample_id"].tolist() == [15]
    assert f.loc[f["duplicate"], "sample_id"].tolist() == [16]
    assert sorted(f.loc[~f["keep"], "sample_id"]) == [15, 16]


# ----------------------------------------------------------------------------- class balance
def hair_manifest():
    # ids 0..9, score = id / 10; only the three most uncertain (7, 8, 9) contain hair
    return manifest(np.arange(10) / 10, frac_hair=[0.0] * 7 + [0.2, 0.1, 0.3], frac_skin=[0.5] * 10)


def test_rebalance_readmits_least_uncertain_samples_with_the_class_up_to_the_target():
    m = hair_manifest()
    keep = ~uncertainty_flags(m, 0.3)  # 7, 8, 9 dropped: no kept sample has hair
    assert not (keep & (m["frac_hair"] > 0)).any()
    out = rebalance(m, keep, {"hair": 0.2})
    # re-admit 7 (1/8 < 0.2), then 8 (2/9 >= 0.2): stop; 9 stays dropped
    assert sorted(m.loc[out & ~keep, "sample_id"]) == [7, 8]
    assert not out[m["sample_id"] == 9].any()
    assert (out & (m["frac_hair"] > 0)).sum() >= 0.2 * out.sum()
    assert keep.sum() == 7  # input not modified


def test_rebalance_readmits_all_it_can_and_leaves_satisfied_classes_alone():
    m = hair_manifest()
    keep = ~uncertainty_flags(m, 0.3)
    out = rebalance(m, keep, {"hair": 0.9})  # unreachable: every hair sample comes back, nothing else
    assert sorted(m.loc[out & ~keep, "sample_id"]) == [7, 8, 9]
    assert rebalance(m, keep, {"skin": 0.5}).equals(keep)


def test_compute_flags_class_balance():
    m = hair_manifest()
    f = compute_flags(m, drop_top=0.3, class_balance={"hair": 0.2})
    assert sorted(f.loc[f["keep"], "sample_id"]) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert f.loc[f["uncertain"], "sample_id"].tolist() == [7, 8, 9]  # the reason stays recorded


def test_rebalance_unknown_class_is_an_error_naming_it_and_the_known_ones():
    m = hair_manifest()
    with pytest.raises(ValueError, match="filter.class_balance") as e:
        rebalance(m, pd.Series(True, index=m.index), {"hat": 0.1})
    assert "'hat'" in str(e.value) and "hair" in str(e.value) and "skin" in str(e.value)
    with pytest.raises(ValueError, match="'hat'"):
        compute_flags(m, drop_top=0.1, class_balance={"hat": 0.1})
