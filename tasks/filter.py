"""Stage 4: keep/drop flags from uncertainty, near-duplicates and class balance."""

from __future__ import annotations

import numpy as np
import zarr
from prefect import get_run_logger, task

import storage
from labelfoundry.filtering import compute_flags


def manifest_hash(store_path: str) -> str:
    """Content hash of the committed manifest (checksums in id order)."""
    import hashlib

    m = storage.ShardStore.open(store_path).manifest()
    return hashlib.sha256("".join(m.sort_values("sample_id")["checksum"]).encode()).hexdigest()


def _dedup_vectors(store_path: str, ids: np.ndarray, kind: str) -> np.ndarray:
    g = zarr.open_group(f"{store_path}/data.zarr", mode="r")
    if kind == "latent":
        return np.asarray(g["w"].oindex[ids])[:, 0, :]
    imgs = np.asarray(g["image"].oindex[ids]).astype(np.float32) / 255.0
    n, h, w, c = imgs.shape
    f = max(1, h // 8)
    return imgs.reshape(n, h // f, f, w // f, f, c).mean(axis=(2, 4))


@task(name="filter")
def filter_task(store_path: str, manifest_hash_: str, filter_cfg: dict, code_version: str) -> dict:
    log = get_run_logger()
    store = storage.ShardStore.open(store_path, mode="a")
    m = store.manifest()
    vecs = None
    if filter_cfg["dedup"] != "none":
        vecs = _dedup_vectors(store_path, m["sample_id"].to_numpy(), filter_cfg["dedup"])
    flags = compute_flags(
        m, drop_top=filter_cfg["drop_top"], score=filter_cfg["score"], dedup_vectors=vecs,
        dedup_threshold=filter_cfg["dedup_threshold"], class_balance=filter_cfg["class_balance"] or None,
    )
    store.write_flags(flags, name="default")
    counts = {
        "total": int(len(flags)), "kept": int(flags["keep"].sum()),
        "dropped_uncertain": int(flags["uncertain"].sum()), "dropped_duplicate": int((flags["duplicate"] & ~flags["uncertain"]).sum()),
    }
    log.info("filter: %s", counts)
    return {"counts": counts, "flags_hash": flags_hash(store_path)}


def flags_hash(store_path: str) -> str:
    """Hash of the flags on disk: what the downstream stage trains on, and what a cache hit must find."""
    import hashlib

    m = storage.ShardStore.open(store_path).manifest()
    cols = [c for c in m.columns if c == "keep" or c.startswith("keep_")]
    return hashlib.sha256(m[["sample_id", *cols]].to_csv(index=False).encode()).hexdigest()
