"""Labelers: methods that turn a generated batch (ws, image, taps, G) into labels + uncertainty.

Supervised: handsoff (paper 000, needs inverted labeled images), gradient_matching (paper 001,
any labeled images). Unsupervised fg/bg: latent_direction (002), stylemix (003), labels4free (004).
Every one meets `base.Labeler`; `registry.REGISTRY` lists them and their modules load on first use.
"""

from __future__ import annotations

from pathlib import Path

from .base import FG_BG_SCHEMA, FitData, GenBatch, LabelBatch, Labeler, generator_fingerprint, labeler_format
from .registry import NEEDS_INVERSION, REGISTRY, SUPERVISED, entry


def labeler_class(method: str):
    return entry(method).labeler_class()


def load_labeler(path: str | Path, device: str = "cpu") -> Labeler:
    """Load any saved labeler by the format recorded in its safetensors header."""
    fmt = labeler_format(path)
    method = fmt.removeprefix("labelfoundry-")
    if not fmt.startswith("labelfoundry-") or method not in REGISTRY:
        raise ValueError(f"{path}: unknown labeler format {fmt!r}; expected labelfoundry-<{'|'.join(REGISTRY)}>")
    return labeler_class(method).load(path, device=device)


__all__ = [
    "FG_BG_SCHEMA", "FitData", "GenBatch", "LabelBatch", "Labeler", "NEEDS_INVERSION", "REGISTRY", "SUPERVISED",
    "generator_fingerprint", "labeler_class", "load_labeler",
]
