"""The dataset-item contract of the segmenters and its conversion to model tensors.

A dataset item is a dict:

* ``image``: uint8 (3, H, W) RGB;
* ``label``: segmentation -> int64/uint8 (H, W) class ids (255 = ignore);
  keypoints -> float (K, H, W) heatmaps; depth -> float (H, W) depth in metres;
* ``valid``: bool (H, W), depth only (optional; defaults to the finite pixels of ``label``);
* ``keypoints``: float (K, 3) rows of (x, y, visible), keypoints only, optional -- used by
  evaluation; when absent the ground-truth keypoints are decoded from the heatmaps.

After default collation every entry gains a leading batch dimension N.
"""

from __future__ import annotations

import torch

from labelfoundry.segmenters.models import Task


def images_to_input(image: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) in [0, 255] -> float32 (N, 3, H, W) in [-1, 1]."""
    return image.float() / 127.5 - 1.0


def prepare_batch(
    batch: dict[str, torch.Tensor], task: Task, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Move a collated batch to ``device``.

    Returns:
        ``(x, targets)`` with x float (N, 3, H, W) in [-1, 1] and targets holding ``label``
        (segmentation: int64 (N, H, W); keypoints: float (N, K, H, W); depth: float (N, H, W)),
        plus ``valid`` bool (N, H, W) for depth and ``keypoints`` (N, K, 3) when present.
    """
    x = images_to_input(batch["image"].to(device, non_blocking=True))
    label = batch["label"].to(device, non_blocking=True)
    targets: dict[str, torch.Tensor] = {}
    if task == "segmentation":
        targets["label"] = label.long()
    elif task == "keypoints":
        targets["label"] = label.float()
        if "keypoints" in batch:
            targets["keypoints"] = batch["keypoints"].to(device).float()
    elif task == "depth":
        label = label.float()
        valid = batch["valid"].to(device).bool() if "valid" in batch else torch.isfinite(label)
        targets["label"] = torch.nan_to_num(label, nan=0.0, posinf=0.0, neginf=0.0)
        targets["valid"] = valid & torch.isfinite(label)
    else:
        raise ValueError(f"unknown task {task!r}")
    return x, targets
