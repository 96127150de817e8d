"""Stage 2: fit the HandsOff label generator on the inverted latents and their labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from labelfoundry.inversion.optimize import InversionResult
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler

from .common import Artifact, file_hash, load_generator_cached


@task(name="fit", retries=1)
def fit_task(
    run_dir: str, generator: str, generator_hash: str, inverted: Artifact, labeler_cfg: dict, code_version: str, device: str
) -> Artifact:
    log = get_run_logger()
    G = load_generator_cached(generator, device)
    inv_dir = Path(inverted.path).parent
    inv = InversionResult.load(inverted.path)
    data = np.load(inv_dir / "labeled.npz")
    schema = json.loads((inv_dir / "schema.json").read_text())
    cfg = HandsOffConfig.model_validate(labeler_cfg)
    keep = ~inv.flagged if inv.flagged.sum() < len(inv.flagged) / 2 else np.ones_like(inv.flagged)
    if (~keep).any():
        log.warning("fitting without %d poorly reconstructed images", int((~keep).sum()))
    kw = {}
    if cfg.task == "segmentation":
        kw = {"masks": data["mask"][keep], "num_classes": len(schema["class_names"])}
    elif cfg.task == "keypoints":
        kw = {"keypoints": data["keypoints"][keep]}
    else:
        kw = {"depth": data["depth"][keep], "depth_valid": data["depth_valid"][keep] if "depth_valid" in data else None}
    labeler = HandsOffLabeler.fit(G, inv.ws[keep], cfg, device=device, progress=lambda d: log.info("fit %s", d), **kw)
    labeler.meta["schema"] = schema
    out = Path(run_dir) / "fit"
    out.mkdir(parents=True, exist_ok=True)
    labeler.save(out / "labeler.safetensors")
    log.info("label generator fitted: %s", labeler.meta)
    return Artifact(path=str(out / "labeler.safetensors"), hash=file_hash(out / "labeler.safetensors"))
