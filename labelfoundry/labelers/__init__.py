"""Labelers: methods that turn a generated batch (ws, image, taps) into labels + uncertainty."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from .base import GenBatch, LabelBatch, Labeler
from .handsoff import HandsOffConfig, HandsOffLabeler

_FORMATS = {"labelfoundry-handsoff": HandsOffLabeler}


def load_labeler(path: str | Path, device: str = "cpu") -> Labeler:
    """Load any saved labeler by the format recorded in its safetensors header."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        fmt = (f.metadata() or {}).get("format")
    if fmt not in _FORMATS:
        raise ValueError(f"{path}: unknown labeler format {fmt!r}; expected one of {sorted(_FORMATS)}")
    return _FORMATS[fmt].load(path, device=device)


__all__ = ["GenBatch", "HandsOffConfig", "HandsOffLabeler", "LabelBatch", "Labeler", "load_labeler"]
