"""Stage 3: mass generation into the shard store, one task per group of whole shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import get_run_logger, task

import storage
from labelfoundry.generation import generate_samples

from .common import Artifact, load_generator_cached, load_labeler_cached, retry_transient, set_threads


def dataset_path(run_dir: str, generator_hash: str, labeler: Artifact, gen_cfg: dict, seed: int, code_version: str) -> str:
    """Each (generator, labeler, generate config, seed) gets its own dataset directory, so a changed
    upstream never mixes into, or overwrites, samples already stored."""
    key = hashlib.sha256(json.dumps([generator_hash, labeler.hash, gen_cfg, seed, code_version], sort_keys=True).encode()).hexdigest()
    return str(Path(run_dir) / "datasets" / key[:12])


def prepare_store(path: str, G, labeler, gen_cfg: dict, provenance: dict) -> storage.ShardStore:
    """Create (or reopen, on resume) the preallocated store for this generation."""
    R = G.resolution
    task_ = labeler.cfg.task
    label_shape = (R, R) if task_ == "segmentation" else (labeler.num_outputs, R, R)
    return storage.ShardStore.create(
        path,
        num_samples=gen_cfg["num_samples"],
        image_shape=(R, R),
        label_shape=label_shape,
        label_dtype="uint8" if task_ == "segmentation" else "float16",
        schema=labeler.meta["schema"],
        samples_per_shard=gen_cfg["samples_per_shard"],
        with_uncertainty=True,
        w_shape=(G.num_ws, G.w_dim) if gen_cfg["store_w"] else None,
        provenance=provenance,
        level=gen_cfg["compression_level"],
    )


@task(name="generate-shards", retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=1)
def generate_shards_task(
    store_path: str,
    shard_indices: list[int],
    generator: str,
    generator_hash: str,
    labeler: Artifact,
    gen_cfg: dict,
    run_seed: int,
    code_version: str,
    device: str,
    torch_threads: int,
) -> list[int]:
    """Generate, label and commit whole shards; already committed shards are skipped (idempotent)."""
    log = get_run_logger()
    set_threads(torch_threads)
    G = load_generator_cached(generator, device)
    lab = load_labeler_cached(labeler.path, labeler.hash, device)
    store = storage.ShardStore.open(store_path, mode="a")
    committed = set(store.committed_shards())
    for idx in shard_indices:
        if idx in committed:
            continue
        ids = list(store.shard_range(idx))
        arrays, cols = generate_samples(
            G, lab, ids, run_seed, psi=gen_cfg["psi"], batch=gen_cfg["batch"], store_w=gen_cfg["store_w"], device=device
        )
        store.write_shard(idx, arrays, cols)
        log.info("committed shard %d (%d samples)", idx, len(ids))
    return shard_indices
