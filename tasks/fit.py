"""Stage 2: fit the labeler from one FitData, whatever the method (see labelfoundry.labelers.base)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from labelfoundry.inversion.optimize import InversionResult
from labelfoundry.labelers import FG_BG_SCHEMA, REGISTRY, FitData, labeler_class

from .common import Artifact, LabelerArtifact, file_hash, load_networks_cached, log_progress, retry_transient
from . import names


def fit_data(inverted: Artifact, method: str, discriminator=None, log=None) -> FitData:
    """The labeled set the invert stage wrote (images, labels, schema, and the W+ latents when the
    method fits on inverted images), as the method's FitData. Poorly reconstructed images are left
    out of an inversion-based fit unless they are half the set or more."""
    entry = REGISTRY[method]
    if not entry.supervised:  # fg/bg methods learn from the generator alone
        return FitData(schema=dict(FG_BG_SCHEMA), discriminator=discriminator)
    arrays = np.load(inverted.path)
    schema = json.loads(Path(inverted.companion("schema.json")).read_text())
    data = FitData(
        images=arrays["image"], masks=arrays["mask"] if "mask" in arrays else None,
        keypoints=arrays["keypoints"] if "keypoints" in arrays else None,
        depth=arrays["depth"] if "depth" in arrays else None,
        depth_valid=arrays["depth_valid"] if "depth_valid" in arrays else None,
        ids=[str(i) for i in arrays["ids"]], schema=schema, discriminator=discriminator,
    )
    if not entry.needs_inversion:
        return data
    inv = InversionResult.load(inverted.companion("inversion.pt"))
    data.latents = inv.ws
    keep = ~inv.flagged if inv.flagged.sum() < len(inv.flagged) / 2 else np.ones_like(inv.flagged)
    if (~keep).any() and log is not None:
        log.warning("fitting without %d poorly reconstructed images", int((~keep).sum()))
    return data.subset(keep) if not keep.all() else data


@task(name="fit", task_run_name=names.fit, retries=1, retry_condition_fn=retry_transient)
def fit_task(
    run_dir: str, generator: str, generator_hash: str, inverted: Artifact, labeler_cfg, code_version: str, device: str,
    array: str = "label",
) -> LabelerArtifact:
    """labeler_cfg: a registered labeler's pydantic config (the run's `labeler`, or one of its
    `extra_labelers`, whose label array `array` names its file)."""
    log = get_run_logger()
    nets = load_networks_cached(generator, device)
    data = fit_data(inverted, labeler_cfg.method, nets.D, log)
    labeler = labeler_class(labeler_cfg.method).fit(
        nets.G, data, labeler_cfg, device=device, progress=log_progress(log, f"fit {labeler_cfg.method}")
    )
    out = Path(run_dir) / "fit" / ("labeler.safetensors" if array == "label" else f"labeler-{array}.safetensors")
    labeler.save(out)
    log.info("%s labeler fitted", labeler_cfg.method)
    G = nets.G
    return LabelerArtifact(
        path=str(out), hash=file_hash(out), method=labeler_cfg.method, task=labeler_cfg.task,
        num_outputs=labeler.num_outputs, label_schema=labeler.schema, resolution=G.resolution,
        latent_shape=(G.num_ws, G.w_dim),
    )

