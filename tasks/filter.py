"""Stage 4: keep/drop flags from uncertainty, near-duplicates and class balance."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task

import storage
from labelfoundry.config import FilterSection
from labelfoundry.filtering import combined_score, compute_flags

from . import names


def _dedup_vectors(opened: storage.OpenedDataset, kind: str) -> np.ndarray:
    """Per-sample vectors to de-duplicate on: the first w row, or an 8x8-pooled image."""
    if kind == "latent":
        return opened.read_array("w")[:, 0, :]
    imgs = opened.read_array("image").astype(np.float32) / 255.0
    n, h, w, c = imgs.shape
    f = max(1, h // 8)
    return imgs.reshape(n, h // f, f, w // f, f, c).mean(axis=(2, 4))


@task(name="filter", task_run_name=names.filter_)
def filter_task(store_path: str, manifest_hash_: str, filter_cfg: FilterSection, code_version: str) -> dict:
    """Flags for every committed sample, stored as the dataset's "default" filter; returns the
    counts and the hash of the flags written (what a cache hit must find on disk)."""
    log = get_run_logger()
    opened = storage.open_dataset(store_path, filter=None)
    m = opened.manifest
    score = filter_cfg.score
    types = list(opened.layout.label_arrays)
    if len(types) > 1:  # one score per label type: combine them by the configured rule
        cols = [storage.score_column(a, top10=score == "score_top10") for a in types]
        m = m.assign(score_combined=combined_score(m, cols, filter_cfg.combine).to_numpy())
        score = "score_combined"
        log.info("filter: combining %s by %s", cols, filter_cfg.combine)
    vecs = _dedup_vectors(opened, filter_cfg.dedup) if filter_cfg.dedup != "none" else None
    flags = compute_flags(
        m, drop_top=filter_cfg.drop_top, score=score, dedup_vectors=vecs,
        dedup_threshold=filter_cfg.dedup_threshold, class_balance=filter_cfg.class_balance or None,
    )
    storage.ShardStore.open(store_path, mode="a").write_flags(flags, name="default")
    counts = {
        "total": int(len(flags)), "kept": int(flags["keep"].sum()),
        "dropped_uncertain": int(flags["uncertain"].sum()), "dropped_duplicate": int((flags["duplicate"] & ~flags["uncertain"]).sum()),
    }
    log.info("filter: kept %d of %d samples (dropped %d uncertain, %d duplicates)", counts["kept"], counts["total"],
             counts["dropped_uncertain"], counts["dropped_duplicate"])
    return {"counts": counts, "flags_hash": storage.flags_hash(store_path)}
