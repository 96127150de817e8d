"""Find pretrained weights in the local torch hub cache only -- never download."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def local_checkpoint(filename: str) -> Path | None:
    """Path of ``<torch.hub.get_dir()>/checkpoints/<filename>`` if that file exists, else None."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return path if path.is_file() else None


def load_local_state_dict(url: str, what: str) -> dict[str, torch.Tensor] | None:
    """Load the state dict that ``url`` would have been cached as, from the local hub cache.

    Args:
        url: the canonical download URL; only its basename is used to find the cached file.
        what: human-readable name of the module the weights are for (used in the log line).

    Returns:
        The state dict (loaded with ``weights_only=True``), or None after logging a warning
        naming the expected file when it is absent. No network access is ever attempted.
    """
    filename = url.rsplit("/", 1)[-1]
    path = local_checkpoint(filename)
    if path is None:
        expected = Path(torch.hub.get_dir()) / "checkpoints" / filename
        log.warning(
            "pretrained weights for %s not found at %s; using RANDOM initialisation "
            "(place that file there to use ImageNet weights; nothing is downloaded)",
            what,
            expected,
        )
        return None
    log.info("loading pretrained weights for %s from %s", what, path)
    return torch.load(path, map_location="cpu", weights_only=True)
