"""Stage 3b: refine the generated labels by self-training (labelfoundry.refine).

Members train side by side (one cached task each, resumable from their checkpoints), then shard
groups are relabeled side by side into a refined copy of the dataset: same images, w and extra
label arrays, `label` and `uncertainty` from the ensemble. The source store is never written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.utilities.annotations import quote
from safetensors.torch import load_file, save_file

import storage
from labelfoundry.atomic import atomic_path
from labelfoundry.config import RefinerTraining, RunConfig
from labelfoundry.refine import build_member, relabel, train_member
from labelfoundry.segmenters import TrainConfig
from storage.manifest import COMPUTED_COLUMNS, FLAG_COLUMNS

from . import names
from .common import Artifact, LabelerArtifact, cached, file_hash, log_progress, retry_transient, run_side_by_side, torch_threads
from .evaluate import generated_set, labeled_dataset

# the refined store's manifest keeps the labeler's own scores beside the ensemble's
UNREFINED = {"score": "score_unrefined", "score_top10": "score_top10_unrefined"}


def refine_skipped(cfg: RunConfig) -> str | None:
    """None when the run refines its labels, else why not (for the log)."""
    from labelfoundry.labelers import SUPERVISED

    if not cfg.refine.enabled:
        return "refine.enabled is false"
    if cfg.labeler.task != "segmentation":
        return f"it refines segmentation labels; labeler.task is {cfg.labeler.task}"
    if cfg.labeler.method not in SUPERVISED:
        return f"{cfg.labeler.method} labels foreground/background, not the labeled images' classes"
    return None


def not_refused(manifest: pd.DataFrame) -> np.ndarray:
    """Mask of the samples the labeler did not refuse (the filter drops the refused ones from the
    refined store too): every sample where the labeler refuses none."""
    if "rejected" not in manifest.columns:
        return np.ones(len(manifest), dtype=bool)
    return ~manifest["rejected"].to_numpy(dtype=bool)


@task(name="refine-member", task_run_name=names.refine_member, retries=1, retry_condition_fn=retry_transient)
def refine_member_task(run_dir: str, store_path: str, manifest_hash_: str, inverted: Artifact, training: RefinerTraining,
                       num_classes: int, resolution: int, seed: int, code_version: str, device: str) -> Artifact:
    """One ensemble member trained on every generated sample, then fine-tuned on the labeled images;
    its weights as a safetensors file (checkpoints under run_dir/refine resume a killed training)."""
    log = get_run_logger()
    _, generated = generated_set(store_path, not_refused)
    labeled = labeled_dataset(np.load(Path(inverted.path).parent / "labeled.npz"), "segmentation", resolution, 2.0)
    key = hashlib.sha256(json.dumps([store_path, manifest_hash_, inverted.hash, training.model_dump(), seed, code_version],
                                    sort_keys=True).encode()).hexdigest()[:12]
    out = Path(run_dir) / "refine" / f"member-{key}"
    train_cfg = TrainConfig(lr=training.lr, batch_size=training.batch_size, max_steps=training.steps, seed=seed,
                            checkpoint_every=max(100, training.steps // 4), log_every=100)
    with torch_threads(1):  # one thread per process, members side by side: the same weights whatever ran before
        model = train_member(generated, labeled, arch=training.arch, num_classes=num_classes, train_cfg=train_cfg,
                             finetune_steps=training.finetune_steps, out_dir=out, device=device,
                             progress=log_progress(log, f"refiner (seed {seed}) training"))
    path = out / "member.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return Artifact(path=str(path), hash=file_hash(path))


def load_members(members: list[Artifact], arch: str, num_classes: int, device: str) -> list:
    """The members' networks from their weight files (safetensors: no code is loaded)."""
    nets = []
    for a in members:
        net = build_member(arch, num_classes, seed=0)
        net.load_state_dict(load_file(a.path, device=str(device)))
        nets.append(net.to(device).eval())
    return nets


def shard_rows(manifest: pd.DataFrame, layout, index: int) -> pd.DataFrame:
    """The source shard's per-sample columns as write_shard takes them (no computed, class-fraction
    or flag columns)."""
    rows = manifest[manifest["shard"] == index].sort_values("sample_id")
    drop = set(COMPUTED_COLUMNS) | set(layout.fraction_columns()) | set(FLAG_COLUMNS)
    return rows[[c for c in rows.columns if c not in drop and not str(c).startswith("keep_")]].reset_index(drop=True)


@task(name="refine-shards", task_run_name=names.refine_shards, retries=2, retry_condition_fn=retry_transient,
      retry_delay_seconds=1)
def refine_shards_task(src_path: str, dst_path: str, shard_indices: list[int], members: list[Artifact],
                       arch: str, batch: int, num_classes: int, device: str, mirror: list[int] | None = None) -> list[int]:
    """Relabel the source's shards into the refined store; committed ones are skipped (idempotent)."""
    log = get_run_logger()
    with torch_threads(1):
        nets = load_members(members, arch, num_classes, device)
        src = storage.open_dataset(src_path, filter=None)
        manifest = src.manifest
        with storage.ShardStore.open(dst_path, mode="a") as dst:
            done = set(dst.committed_shards())
            for index in shard_indices:
                if index in done:
                    continue
                ids = np.asarray(dst.shard_range(index))
                arrays = {name: src.read_array(name, ids) for name in dst.layout.arrays}
                new = relabel(nets, arrays["image"], batch=batch, device=device, mirror=mirror)
                arrays["label"], arrays["uncertainty"] = new["label"], new["uncertainty"].astype(np.float16)
                rows = shard_rows(manifest, src.layout, index).rename(columns=UNREFINED)
                rows["score"], rows["score_top10"] = new["score"], new["score_top10"]
                dst.write_shard(index, arrays, rows)
                log.info("refined shard %d (%d samples)", index, len(ids))
    return shard_indices


def refined_path(store_path: str, members: list[Artifact], mirror: list[int] | None) -> str:
    """The refined copy's directory, beside the source: one per (source, members, mirrored pass)."""
    key = hashlib.sha256(json.dumps([store_path, [m.hash for m in members], mirror]).encode()).hexdigest()[:12]
    return f"{store_path}-refined-{key}"


def refine_stage(cfg: RunConfig, run_dir: Path, inverted: Artifact, labeler: LabelerArtifact, store_path: str, mh: str,
                 device: str, cv: str) -> str:
    """Train the members, relabel every shard into the refined store and return its path."""
    log = get_run_logger()
    rc = cfg.refine
    num_classes = labeler.num_outputs
    mirror = rc.resolved_mirror(cfg.labeled.source, num_classes)  # a bad permutation fails here, before any training
    params = [{k: quote(v) for k, v in dict(
        run_dir=str(run_dir), store_path=store_path, manifest_hash_=mh, inverted=inverted, training=rc.training,
        num_classes=num_classes, resolution=labeler.resolution, seed=cfg.seed + i, code_version=cv, device=device).items()}
        for i in range(rc.members)]
    members = run_side_by_side([(cached(refine_member_task, run_dir), p) for p in params], rc.workers)
    gone = [i for i, m in enumerate(members) if not m.exists_unchanged()]
    if gone:  # a cached member whose weights were deleted or changed since: train it again (its checkpoints resume)
        log.warning("refiner weights %s missing or changed; recomputing", [members[i].path for i in gone])
        again = run_side_by_side([(cached(refine_member_task, run_dir, refresh=True), params[i]) for i in gone], rc.workers)
        for i, m in zip(gone, again):
            members[i] = m
    src = storage.ShardStore.open(store_path)
    path = refined_path(store_path, members, mirror)
    provenance = {**src.layout.provenance, "refined_from": store_path, "refined_from_manifest": mh,
                  "refine": rc.model_dump(exclude={"workers", "batch"}), "refine_members": [m.hash for m in members],
                  "refine_mirror": mirror}
    dst = storage.ShardStore.create_like(src, path, provenance=provenance)
    recheck = storage.repair(path, deep=False)  # as generation does: a re-run re-checks what is committed
    if recheck.repaired:
        log.warning("re-check of %s found damaged shards %s; uncommitted them to relabel:\n%s",
                    path, recheck.repaired, "\n".join(str(b) for b in recheck.bad))
    todo = dst.uncommitted_shards()
    groups = [g for g in np.array_split(np.asarray(todo, dtype=int), min(rc.workers, len(todo)) or 1) if len(g)]
    shard_jobs = [(refine_shards_task, {k: quote(v) for k, v in dict(
        src_path=store_path, dst_path=path, shard_indices=[int(i) for i in g], members=members, arch=rc.arch,
        batch=rc.batch, num_classes=num_classes, device=device, mirror=mirror).items()}) for g in groups]
    run_side_by_side(shard_jobs, rc.workers)
    missing = storage.ShardStore.open(path).uncommitted_shards()
    if missing:
        raise RuntimeError(f"refined store {path}: shards {missing[:10]} not committed after relabeling; re-run to resume")
    log.info("refined %d samples into %s (%d members)", src.num_samples, path, len(members))
    return path
