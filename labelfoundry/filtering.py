"""Keep/drop flags for generated samples: uncertainty, near-duplicates, class balance.

Flags only; the stored data is never rewritten. The uncertainty rule is HandsOff's: rank by image
score and drop exactly floor(q * N) of the most uncertain (ties broken by sample id).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def uncertainty_flags(manifest: pd.DataFrame, drop_top: float, score: str = "score") -> pd.Series:
    """True where the sample is among the floor(drop_top * N) highest-scoring (most uncertain)."""
    n_drop = math.floor(round(drop_top * len(manifest), 9))  # 0.29 * 100 is 28.999... in floating point
    order = manifest.sort_values([score, "sample_id"], ascending=[False, True]).index[:n_drop]
    flags = pd.Series(False, index=manifest.index)
    flags.loc[order] = True
    return flags


def combined_score(manifest: pd.DataFrame, columns: list[str], rule: str) -> pd.Series:
    """One uncertainty score per sample from several label types' scores (a multi-label dataset).

    The types' scores live on different scales (JS divergence of class distributions, variance of
    heatmaps or depth), so they are compared by rank: each column becomes its percentile rank in
    (0, 1] (ties share their mean rank), and
      primary:  the first column alone (the `label` array's score);
      max_rank: the highest rank: a sample is as uncertain as its most uncertain label type, so
                dropping the top q drops every sample that is among the worst of any type first;
      mean_rank: the mean rank: uncertain in several types at once counts most.
    """
    if not columns:
        raise ValueError("combined_score needs at least one score column")
    missing = [c for c in columns if c not in manifest]
    if missing:
        raise ValueError(f"manifest has no score column(s) {missing}; columns: {sorted(manifest.columns)}")
    if rule == "primary" or len(columns) == 1:
        return manifest[columns[0]].astype(float)
    ranks = manifest[columns].rank(method="average", pct=True)
    if rule == "max_rank":
        return ranks.max(axis=1)
    if rule == "mean_rank":
        return ranks.mean(axis=1)
    raise ValueError(f"unknown score combination rule {rule!r}; use primary, max_rank or mean_rank")


def duplicate_flags(vectors: np.ndarray, order: np.ndarray, threshold: float, k: int = 10) -> np.ndarray:
    """Greedy near-duplicate removal with faiss: walk samples in `order` (best first) and drop a sample
    when an already-kept one lies within `threshold` (RMS distance per dimension)."""
    import faiss

    x = np.ascontiguousarray(vectors.reshape(len(vectors), -1), dtype=np.float32)
    d = x.shape[1]
    index = faiss.IndexFlatL2(d)
    index.add(x)
    dist, nbr = index.search(x, min(k + 1, len(x)))
    rms = np.sqrt(np.maximum(dist, 0.0) / d)
    kept = np.zeros(len(x), dtype=bool)
    dup = np.zeros(len(x), dtype=bool)
    for i in order:
        close = nbr[i][(rms[i] < threshold) & (nbr[i] != i) & (nbr[i] >= 0)]
        if kept[close].any():
            dup[i] = True
        else:
            kept[i] = True
    return dup


def rebalance(manifest: pd.DataFrame, keep: pd.Series, targets: dict[str, float], score: str = "score") -> pd.Series:
    """Re-admit dropped samples containing a class (least uncertain first) until at least
    `targets[class]` of kept samples contain it, or none are left."""
    keep = keep.copy()
    for cls, frac in targets.items():
        col = f"frac_{cls}"
        if col not in manifest:
            raise ValueError(f"filter.class_balance: unknown class {cls!r}; manifest has {sorted(c[5:] for c in manifest if c.startswith('frac_'))}")
        has = manifest[col] > 0
        pool = manifest[has & ~keep].sort_values([score, "sample_id"]).index
        for idx in pool:
            if (has & keep).sum() >= frac * keep.sum():
                break
            keep.loc[idx] = True
    return keep


def compute_flags(
    manifest: pd.DataFrame,
    *,
    drop_top: float,
    score: str = "score",
    dedup_vectors: np.ndarray | None = None,
    dedup_threshold: float = 0.05,
    class_balance: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Flags frame: sample_id, keep, uncertain, duplicate, labeler_rejected (aligned to manifest rows)."""
    m = manifest.reset_index(drop=True)
    uncertain = uncertainty_flags(m, drop_top, score)
    duplicate = pd.Series(False, index=m.index)
    if dedup_vectors is not None:
        order = m.sort_values([score, "sample_id"]).index.to_numpy()
        duplicate = pd.Series(duplicate_flags(dedup_vectors, order, dedup_threshold), index=m.index)
    rejected = m["rejected"].astype(bool) if "rejected" in m else pd.Series(False, index=m.index)
    keep = ~uncertain & ~duplicate & ~rejected
    if class_balance:
        keep = rebalance(m, keep, class_balance, score)
    return pd.DataFrame({"sample_id": m["sample_id"], "keep": keep, "uncertain": uncertain, "duplicate": duplicate,
                         "labeler_rejected": rejected})
