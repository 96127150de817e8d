"""Labelers: methods that turn a generated batch (ws, image, taps) into labels + uncertainty.

Supervised: handsoff (paper 000, needs inverted labeled images), gradient_matching (paper 001,
any labeled images). Unsupervised fg/bg: latent_direction (002), stylemix (003), labels4free (004).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from safetensors import safe_open

from .base import GenBatch, LabelBatch, Labeler
from .handsoff import HandsOffConfig, HandsOffLabeler

# method -> (module, labeler class, config class); modules load on first use.
METHODS = {
    "handsoff": ("handsoff", "HandsOffLabeler", "HandsOffConfig"),
    "gradient_matching": ("gradient_matching", "GradientMatchingLabeler", "GradientMatchingConfig"),
    "stylemix": ("stylemix", "StyleMixLabeler", "StyleMixConfig"),
    "latent_direction": ("latent_direction", "LatentDirectionLabeler", "LatentDirectionConfig"),
    "labels4free": ("labels4free", "Labels4FreeLabeler", "Labels4FreeConfig"),
}
SUPERVISED = {"handsoff", "gradient_matching"}
NEEDS_INVERSION = {"handsoff"}


def labeler_class(method: str):
    if method not in METHODS:
        raise ValueError(f"unknown labeler method {method!r}; choose one of {sorted(METHODS)}")
    mod, cls, _ = METHODS[method]
    return getattr(importlib.import_module(f"{__name__}.{mod}"), cls)


def load_labeler(path: str | Path, device: str = "cpu") -> Labeler:
    """Load any saved labeler by the format recorded in its safetensors header."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        fmt = (f.metadata() or {}).get("format") or ""
    method = fmt.removeprefix("labelfoundry-")
    if not fmt.startswith("labelfoundry-") or method not in METHODS:
        raise ValueError(f"{path}: unknown labeler format {fmt!r}; expected labelfoundry-<{'|'.join(METHODS)}>")
    return labeler_class(method).load(path, device=device)


__all__ = ["GenBatch", "HandsOffConfig", "HandsOffLabeler", "LabelBatch", "Labeler", "METHODS", "labeler_class", "load_labeler"]
