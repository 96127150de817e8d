"""Downstream segmenters (DeepLabV3 / U-Net) trained on generated shards, and their metrics.

Public API::

    build_segmenter(SegmenterConfig) -> Segmenter
    train_segmenter(model, data, TrainConfig, task=..., out_dir=...) -> TrainResult
    evaluate_segmenter(model, data, task, num_classes, device) -> dict
"""

from labelfoundry.segmenters.heatmaps import decode_heatmaps, keypoint_heatmaps
from labelfoundry.segmenters.metrics import (
    PCK_ALPHAS,
    depth_metrics,
    evaluate_segmenter,
    pck,
    segmentation_iou,
)
from labelfoundry.segmenters.models import Segmenter, SegmenterConfig, Task, build_segmenter
from labelfoundry.segmenters.train import TrainConfig, TrainResult, train_segmenter

__all__ = [
    "PCK_ALPHAS",
    "Segmenter",
    "SegmenterConfig",
    "Task",
    "TrainConfig",
    "TrainResult",
    "build_segmenter",
    "decode_heatmaps",
    "depth_metrics",
    "evaluate_segmenter",
    "keypoint_heatmaps",
    "pck",
    "segmentation_iou",
    "train_segmenter",
]
