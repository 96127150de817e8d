"""Per-task training losses for the downstream networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labelfoundry.segmenters.models import Task


def task_loss(
    out: torch.Tensor, targets: dict[str, torch.Tensor], task: Task, ignore_index: int = 255
) -> torch.Tensor:
    """Scalar float32 loss of model output ``out`` (N, C, H, W) against ``targets``.

    * segmentation: cross-entropy over C logits vs int64 (N, H, W), ``ignore_index`` skipped
      (a batch whose pixels are all ignored yields a zero loss that still has a graph);
    * keypoints: MSE between (N, K, H, W) heatmaps and the float targets;
    * depth: MSE over the valid pixels only (``targets["valid"]`` (N, H, W) bool) of channel 0.
    """
    out = out.float()
    label = targets["label"]
    if task == "segmentation":
        if not bool((label != ignore_index).any()):
            return out.sum() * 0.0
        return F.cross_entropy(out, label, ignore_index=ignore_index)
    if task == "keypoints":
        return F.mse_loss(out, label)
    if task == "depth":
        valid = targets["valid"].float()
        return ((out[:, 0] - label) ** 2 * valid).sum() / valid.sum().clamp_min(1.0)
    raise ValueError(f"unknown task {task!r}")
