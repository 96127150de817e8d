"""Stage 1: read the labeled images and invert them into W+ latents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from labelfoundry.config import LabeledSection
from labelfoundry.domains import check_for_inversion, load_labeled
from labelfoundry.inversion.optimize import InversionConfig, invert
from labelfoundry.report import save_png

from .common import Artifact, file_hash, load_generator_cached, log_progress, retry_transient
from . import names


@task(name="invert", task_run_name=names.invert, retries=1, retry_condition_fn=retry_transient)
def invert_task(
    run_dir: str, generator: str, generator_hash: str, labeled_cfg: LabeledSection, inversion_cfg: InversionConfig | None,
    code_version: str, device: str,
) -> Artifact:
    """Writes invert/labeled.npz (the labeled set with ids, the artifact's path; at labeled.resolution
    when set, else the generator's) and, unless inversion_cfg is None, invert/inversion.pt (ids, W+,
    reconstructions, losses, poor-reconstruction flags)."""
    log = get_run_logger()
    G = load_generator_cached(generator, device)
    section = labeled_cfg
    if inversion_cfg is not None:  # fail before rendering/reading anything if the set cannot be inverted
        for msg in check_for_inversion(section, G.resolution):
            log.warning(msg)
    samples, schema = load_labeled(section, G.resolution)
    out = Path(run_dir) / "invert"
    out.mkdir(parents=True, exist_ok=True)
    images = np.stack([s.image for s in samples])
    payload = {"ids": np.array([s.sample_id for s in samples]), "image": images}
    for field in ("mask", "keypoints", "depth", "depth_valid"):
        vals = [getattr(s, field) for s in samples]
        if all(v is not None for v in vals):
            payload[field] = np.stack(vals)
    np.savez_compressed(out / "labeled.npz", **payload)
    (out / "schema.json").write_text(json.dumps(schema.to_json()))
    companions = {str(out / "schema.json"): file_hash(out / "schema.json")}
    if inversion_cfg is None:  # this labeler reads labeled images directly (or none): no latents needed
        log.info("read %d labeled images; no inversion needed", len(samples))
        return Artifact(path=str(out / "labeled.npz"), hash=file_hash(out / "labeled.npz"), companions=companions)
    cfg = inversion_cfg
    res = invert(G, images, cfg, ids=[s.sample_id for s in samples], device=device,
                 progress=log_progress(log, "inversion"))
    res.save(out / "inversion.pt")
    save_png(np.concatenate([images[:8], res.recon[:8]], axis=2).reshape(-1, images.shape[2] * 2, 3), out / "reconstructions.png")
    if res.flagged.any():
        log.warning("poor reconstructions (loss > %.1fx median): %s", cfg.flag_factor, [i for i, f in zip(res.ids, res.flagged) if f])
    log.info("inverted %d images: mean loss %.4f", len(samples), float(res.loss.mean()))
    companions[str(out / "inversion.pt")] = file_hash(out / "inversion.pt")
    return Artifact(path=str(out / "labeled.npz"), hash=file_hash(out / "labeled.npz"), companions=companions)
