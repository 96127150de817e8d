"""Downstream metrics (HandsOff §4.3-4.4): mIoU, PCK@α, and depth mNMSE / RMSE / RMSE-log.

Definitions (all exact):

* **IoU** per class c: |pred==c ∧ gt==c| / |pred==c ∨ gt==c| accumulated over the whole
  dataset, pixels with gt == ``ignore_index`` excluded (torchmetrics
  ``MulticlassJaccardIndex``). A class absent from both predictions and targets has IoU NaN
  and is excluded from **mIoU** = nanmean of the per-class IoUs.
* **PCK@α**: a visible keypoint is correct iff ‖pred − gt‖₂ ≤ α·max(h, w), with h, w the
  height/width (max − min of the coordinates, pixels) of the tightest box around that
  image's *visible* ground-truth keypoints. PCK = correct / visible over the dataset;
  invisible keypoints count nowhere.
* **mNMSE** ("masked NMSE"): per image, Σ_M (ŷ − y)² / Σ_M y² over the valid pixels M,
  unclamped and uncropped; then the mean over images (images with no valid pixel or
  Σ_M y² = 0 are skipped).
* **RMSE / RMSE-log**: on the central crop (rows H//4 : H//4 + H//2, same for columns),
  prediction and target clamped to [0.001, 80], over the valid pixels of the crop;
  per image sqrt(mean((ŷ − y)²)) and sqrt(mean((log ŷ − log y)²)), then the mean over
  images (images with no valid pixel in the crop are skipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassJaccardIndex

from labelfoundry.segmenters.batch import prepare_batch
from labelfoundry.segmenters.heatmaps import (
    decode_heatmaps,
    keypoint_heatmaps,
    keypoints_from_heatmaps,
)
from labelfoundry.segmenters.models import Task

__all__ = [
    "PCK_ALPHAS",
    "DEPTH_MIN",
    "DEPTH_MAX",
    "SegmentationIoU",
    "segmentation_iou",
    "pck_correct",
    "pck",
    "decode_heatmaps",
    "keypoint_heatmaps",
    "central_crop",
    "depth_errors_per_image",
    "depth_metrics",
    "evaluate_segmenter",
]

PCK_ALPHAS: tuple[float, ...] = (0.1, 0.05, 0.02)
DEPTH_MIN, DEPTH_MAX = 0.001, 80.0


# ---------------------------------------------------------------- segmentation


class SegmentationIoU:
    """Streaming per-class IoU / mIoU over batches of label maps."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.metric = MulticlassJaccardIndex(
            num_classes=num_classes,
            average=None,
            ignore_index=ignore_index,
            zero_division=float("nan"),
        )

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: int (N, H, W) class ids (target may hold ``ignore_index``)."""
        self.metric.update(pred.detach().long().cpu(), target.detach().long().cpu())

    def compute(self) -> tuple[float, list[float]]:
        """(mIoU, per-class IoU list); absent classes are NaN and excluded from the mean."""
        per_class = self.metric.compute().double()
        return float(torch.nanmean(per_class)), [float(v) for v in per_class]


def segmentation_iou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> tuple[float, list[float]]:
    """mIoU and per-class IoU of int (N, H, W) predictions vs targets (see module doc)."""
    meter = SegmentationIoU(num_classes, ignore_index)
    meter.update(pred, target)
    return meter.compute()


# ------------------------------------------------------------------- keypoints


def pck_correct(
    pred_xy: torch.Tensor, gt: torch.Tensor, alphas: Sequence[float] = PCK_ALPHAS
) -> tuple[torch.Tensor, int]:
    """Count correct visible keypoints.

    Args:
        pred_xy: (N, K, 2) predicted (x, y) pixels.
        gt: (N, K, 3) ground truth (x, y, visible) pixels.
        alphas: PCK thresholds α.

    Returns:
        (correct (len(alphas),) int64 counts, number of visible keypoints).
    """
    pred_xy, gt = pred_xy.double().cpu(), gt.double().cpu()
    vis = gt[..., 2] > 0  # (N, K)
    xy = gt[..., :2]
    big = torch.finfo(torch.float64).max
    lo = torch.where(vis[..., None], xy, torch.full_like(xy, big)).amin(dim=1)  # (N, 2)
    hi = torch.where(vis[..., None], xy, torch.full_like(xy, -big)).amax(dim=1)
    size = (hi - lo).amax(dim=-1).clamp_min(0.0)  # (N,) max(w, h); 0 if < 2 visible
    size = torch.where(vis.any(dim=1), size, torch.zeros_like(size))
    dist = (pred_xy - xy).norm(dim=-1)  # (N, K)
    correct = torch.stack(
        [((dist <= a * size[:, None]) & vis).sum() for a in alphas]
    ).long()
    return correct, int(vis.sum())


def pck(
    pred_xy: torch.Tensor, gt: torch.Tensor, alphas: Sequence[float] = PCK_ALPHAS
) -> dict[float, float]:
    """{α: fraction of visible keypoints within α·max(h, w)}; NaN if none is visible."""
    correct, n = pck_correct(pred_xy, gt, alphas)
    return {a: (float(c) / n if n else math.nan) for a, c in zip(alphas, correct.tolist())}


# ----------------------------------------------------------------------- depth


def central_crop(x: torch.Tensor) -> torch.Tensor:
    """Middle 50% of the last two dims: (..., H, W) -> (..., H//2, W//2) from (H//4, W//4)."""
    h, w = x.shape[-2:]
    return x[..., h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2]


def depth_errors_per_image(
    pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-image depth errors (see module doc).

    Args:
        pred, gt: float (N, H, W) depth (metres); valid: bool (N, H, W).

    Returns:
        {"nmse", "rmse", "rmse_log"} -> float64 (N,) tensors, NaN where undefined.
    """
    pred, gt, valid = pred.double().cpu(), gt.double().cpu(), valid.bool().cpu()
    m = valid.double()
    err = ((pred - gt) ** 2 * m).flatten(1).sum(1)
    norm = (gt**2 * m).flatten(1).sum(1)
    nmse = torch.where(norm > 0, err / norm.clamp_min(1e-300), torch.full_like(norm, math.nan))

    pc = central_crop(pred).clamp(DEPTH_MIN, DEPTH_MAX)
    gc = central_crop(gt).clamp(DEPTH_MIN, DEPTH_MAX)
    mc = central_crop(valid).double()
    count = mc.flatten(1).sum(1)
    nan = torch.full_like(count, math.nan)
    mse = ((pc - gc) ** 2 * mc).flatten(1).sum(1) / count.clamp_min(1)
    mse_log = ((pc.log() - gc.log()) ** 2 * mc).flatten(1).sum(1) / count.clamp_min(1)
    has = count > 0
    return {
        "nmse": nmse,
        "rmse": torch.where(has, mse.sqrt(), nan),
        "rmse_log": torch.where(has, mse_log.sqrt(), nan),
    }


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """{"mnmse", "rmse", "rmse_log"}: means over images of :func:`depth_errors_per_image`."""
    per = depth_errors_per_image(pred, gt, valid)
    return {
        "mnmse": float(torch.nanmean(per["nmse"])),
        "rmse": float(torch.nanmean(per["rmse"])),
        "rmse_log": float(torch.nanmean(per["rmse_log"])),
    }


# ------------------------------------------------------------------ evaluation


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


@torch.no_grad()
def evaluate_segmenter(
    model: nn.Module,
    data: Dataset | DataLoader,
    task: Task,
    num_classes: int,
    device: torch.device | str = "cpu",
    *,
    batch_size: int = 8,
    ignore_index: int = 255,
    alphas: Sequence[float] = PCK_ALPHAS,
) -> dict:
    """Run ``model`` (in eval mode) over ``data`` and return JSON-ready metrics.

    ``data`` yields items as described in :mod:`labelfoundry.segmenters.batch`.
    Returns, by task (NaN values are written as None so the dict is strict JSON):

    * segmentation: ``{"miou": float, "per_class_iou": [float | None] * num_classes, "fg_iou": float,
      "fgbg_miou": float}`` (foreground = any class but 0, so part segmenters compare with fg/bg ones)
    * keypoints: ``{"pck@0.1": ..., "pck@0.05": ..., "pck@0.02": ..., "num_visible": int}``
    * depth: ``{"mnmse": ..., "rmse": ..., "rmse_log": ...}``

    plus ``"num_images"``. ``num_classes`` is used for segmentation only.
    """
    device = torch.device(device)
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    was_training = model.training
    model.eval()
    seg = SegmentationIoU(num_classes, ignore_index) if task == "segmentation" else None
    fgbg = SegmentationIoU(2, ignore_index) if task == "segmentation" else None
    pck_hits, pck_total, n_images = torch.zeros(len(alphas), dtype=torch.long), 0, 0
    depth_per: dict[str, list[torch.Tensor]] = {"nmse": [], "rmse": [], "rmse_log": []}
    try:
        for batch in loader:
            x, tgt = prepare_batch(batch, task, device)
            out = model(x).float()
            n_images += x.shape[0]
            if task == "segmentation":
                pred, lab = out.argmax(1), tgt["label"]
                seg.update(pred, lab)
                fgbg.update((pred > 0).long(), torch.where(lab == ignore_index, lab, (lab > 0).long()))
            elif task == "keypoints":
                gt = tgt.get("keypoints")
                if gt is None:
                    gt = keypoints_from_heatmaps(tgt["label"])
                hits, n = pck_correct(decode_heatmaps(out), gt, alphas)
                pck_hits += hits
                pck_total += n
            else:
                per = depth_errors_per_image(out[:, 0], tgt["label"], tgt["valid"])
                for k, v in per.items():
                    depth_per[k].append(v)
    finally:
        model.train(was_training)

    result: dict = {"num_images": n_images}
    if task == "segmentation":
        miou, per_class = seg.compute()
        result.update(miou=_json_float(miou), per_class_iou=[_json_float(v) for v in per_class])
        fgbg_miou, (_, fg) = fgbg.compute()
        result.update(fg_iou=_json_float(fg), fgbg_miou=_json_float(fgbg_miou))
    elif task == "keypoints":
        for a, c in zip(alphas, pck_hits.tolist()):
            result[f"pck@{a:g}"] = _json_float(c / pck_total if pck_total else math.nan)
        result["num_visible"] = pck_total
    else:
        for key, name in (("nmse", "mnmse"), ("rmse", "rmse"), ("rmse_log", "rmse_log")):
            vals = torch.cat(depth_per[key]) if depth_per[key] else torch.tensor([math.nan])
            result[name] = _json_float(float(torch.nanmean(vals)))
    return result
