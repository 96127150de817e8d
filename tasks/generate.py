"""Stage 3: mass generation into the shard store, one task per group of whole shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import get_run_logger, task

import storage
from labelfoundry.config import GenerateSection
from labelfoundry.generation import generate_shards

from .common import Artifact, LabelerArtifact, load_generator_cached, load_labeler_cached, retry_transient, set_threads
from . import names


def dataset_path(run_dir: str, generator_hash: str, labeler: Artifact, gen: GenerateSection, seed: int, code_version: str,
                 extra_labelers: dict[str, LabelerArtifact] | None = None) -> str:
    """Each (generator, labelers, generate config, seed) gets its own dataset directory, so a changed
    upstream never mixes into, or overwrites, samples already stored."""
    labelers = [labeler.hash] + [f"{k}:{a.hash}" for k, a in sorted((extra_labelers or {}).items())]
    key = hashlib.sha256(
        json.dumps([generator_hash, labelers if extra_labelers else labeler.hash, gen.model_dump(), seed, code_version],
                   sort_keys=True).encode()
    ).hexdigest()
    return str(Path(run_dir) / "datasets" / key[:12])


def prepare_store(path: str, labeler: LabelerArtifact, gen: GenerateSection, provenance: dict,
                  extra_labelers: dict[str, LabelerArtifact] | None = None) -> storage.ShardStore:
    """Create (or reopen, on resume) the preallocated store for this generation, sized from the
    fit stage's artifacts (no model is loaded); extra labelers add their label arrays."""
    R = labeler.resolution
    extra = {name: (a.task, a.label_shape) for name, a in (extra_labelers or {}).items()}
    return storage.ShardStore.create(
        path,
        num_samples=gen.num_samples,
        image_shape=(R, R),
        label_shape=labeler.label_shape,
        label_dtype=labeler.label_dtype,
        schema=labeler.label_schema,
        samples_per_shard=gen.samples_per_shard,
        with_uncertainty=True,
        w_shape=tuple(labeler.latent_shape) if gen.store_w else None,
        provenance=provenance,
        level=gen.compression_level,
        label_task=labeler.task if extra else None,
        extra_labels=extra or None,
    )


@task(name="generate-shards", task_run_name=names.generate_shards, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=1)
def generate_shards_task(
    store_path: str,
    shard_indices: list[int],
    generator: str,
    generator_hash: str,
    labeler: Artifact,
    gen: GenerateSection,
    run_seed: int,
    code_version: str,
    device: str,
    torch_threads: int,
    extra_labelers: dict[str, LabelerArtifact] | None = None,
) -> list[int]:
    """Generate, label and commit whole shards (each store write overlapping the next shard's
    generation); already committed shards are skipped (idempotent). Extra labelers label the same
    generated images, from the same synthesis pass, into their own arrays."""
    log = get_run_logger()
    set_threads(torch_threads)
    G = load_generator_cached(generator, device)
    lab = load_labeler_cached(labeler.path, labeler.hash, device)
    if extra_labelers:
        lab = {"label": lab, **{k: load_labeler_cached(a.path, a.hash, device) for k, a in extra_labelers.items()}}
    with storage.ShardStore.open(store_path, mode="a") as store:
        committed = set(store.committed_shards())
        generate_shards(
            G, lab, store, [i for i in shard_indices if i not in committed], run_seed,
            psi=gen.psi, batch=gen.batch, store_w=gen.store_w, device=device, precision=gen.precision,
            compile_labels=gen.compile_labels,
            on_commit=lambda idx, n: log.info("committed shard %d (%d samples)", idx, n),
        )
    return shard_indices
