"""Stage 2: fit the labeler — HandsOff on inverted latents, the others on labeled images or on nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from labelfoundry.domains.base import LabeledSample
from labelfoundry.inversion.optimize import InversionResult
from labelfoundry.labelers import SUPERVISED, labeler_class
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler

from .common import Artifact, file_hash, load_generator_cached, retry_transient

FG_BG_SCHEMA = {"class_names": ["background", "foreground"], "colors": [[0, 0, 0], [255, 255, 255]], "keypoint_names": []}


def _fit_handsoff(G, data, inv_path: Path, cfg: HandsOffConfig, schema: dict, device: str, log) -> HandsOffLabeler:
    inv = InversionResult.load(inv_path)
    keep = ~inv.flagged if inv.flagged.sum() < len(inv.flagged) / 2 else np.ones_like(inv.flagged)
    if (~keep).any():
        log.warning("fitting without %d poorly reconstructed images", int((~keep).sum()))
    if cfg.task == "segmentation":
        kw = {"masks": data["mask"][keep], "num_classes": len(schema["class_names"])}
    elif cfg.task == "keypoints":
        kw = {"keypoints": data["keypoints"][keep]}
    else:
        kw = {"depth": data["depth"][keep], "depth_valid": data["depth_valid"][keep] if "depth_valid" in data else None}
    return HandsOffLabeler.fit(G, inv.ws[keep], cfg, device=device, progress=lambda d: log.info("fit %s", d), **kw)


@task(name="fit", retries=1, retry_condition_fn=retry_transient)
def fit_task(
    run_dir: str, generator: str, generator_hash: str, inverted: Artifact, labeler_cfg: dict, code_version: str, device: str
) -> Artifact:
    from labelfoundry.config import parse_config

    log = get_run_logger()
    G = load_generator_cached(generator, device)
    inv_dir = Path(inverted.path).parent
    data = np.load(inv_dir / "labeled.npz")
    schema = json.loads((inv_dir / "schema.json").read_text())
    cfg = parse_config({"labeler": labeler_cfg}).labeler
    if cfg.method == "handsoff":
        labeler = _fit_handsoff(G, data, inv_dir / "inversion.pt", cfg, schema, device, log)
    else:
        labeled = None
        if cfg.method in SUPERVISED:
            labeled = [LabeledSample(str(i), data["image"][j], data["mask"][j]) for j, i in enumerate(data["ids"])]
        else:
            schema = FG_BG_SCHEMA
        labeler = labeler_class(cfg.method).fit(
            G, cfg, labeled=labeled, num_classes=len(schema["class_names"]), device=device,
            progress=lambda d: log.info("fit %s", d),
        )
    labeler.meta["schema"] = schema
    out = Path(run_dir) / "fit"
    out.mkdir(parents=True, exist_ok=True)
    labeler.save(out / "labeler.safetensors")
    log.info("%s labeler fitted", cfg.method)
    return Artifact(path=str(out / "labeler.safetensors"), hash=file_hash(out / "labeler.safetensors"))
