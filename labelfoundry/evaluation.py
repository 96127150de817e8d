"""Downstream verdict: train the same segmenter on different label sources, score it on real test images.

Methods: the generated dataset (kept by the filter, or unfiltered; optionally oversampling rare
classes), the few labeled images alone (labeled_only), and, on the built-in domain, an oracle trained
on K exactly labeled real images. `longtail_metrics` gives HandsOff Fig. 4's long-tail numbers.
gap_closed = (ours - labeled_only) / (oracle - labeled_only).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .segmenters import SegmenterConfig, TrainConfig, build_segmenter, evaluate_segmenter, train_segmenter


class ArrayDataset(Dataset):
    """In-memory labeled images: image uint8 (N,H,W,3) + mask (N,H,W) -> segmenter items."""

    def __init__(self, images: np.ndarray, masks: np.ndarray):
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1),
            "label": torch.from_numpy(self.masks[i].astype(np.int64)),
        }


def toyfaces_split(split: str, n: int, resolution: int, offset: int = 0) -> ArrayDataset:
    """Real labeled toy faces (rendered in chunks) as a dataset."""
    from .domains import toyfaces

    imgs, masks = [], []
    seeds = toyfaces.split_seeds(split, n, offset)
    for i in range(0, n, 1000):
        r = toyfaces.render(seeds[i : i + 1000], resolution)
        imgs.append(r["image"])
        masks.append(r["mask"].astype(np.uint8))
    return ArrayDataset(np.concatenate(imgs), np.concatenate(masks))


def train_and_evaluate(
    train_data: Dataset,
    test_data: Dataset,
    *,
    arch: str,
    num_classes: int,
    out_dir: str | Path,
    train_cfg: TrainConfig,
    device: str = "cpu",
    finetune_data: Dataset | None = None,
    sample_weights=None,
    examples: int = 0,
) -> dict:
    """Train a fresh segmenter (resumable from out_dir) and return its test metrics.
    sample_weights: optional per-item draw weights (targeted oversampling; see labelfoundry.sampling).
    examples: also save the predicted labels of the first `examples` test images to
    `<out_dir>/examples.npy` (uint8 (n,H,W)), named in the metrics as "examples", for the report."""
    model = build_segmenter(SegmenterConfig(arch=arch, task="segmentation", num_classes=num_classes))
    res = train_segmenter(model, train_data, train_cfg, task="segmentation", out_dir=out_dir, device=device,
                          sample_weights=sample_weights)
    if finetune_data is not None:
        ft = train_cfg.model_copy(update={"max_steps": max(50, (train_cfg.max_steps or 500) // 5)})
        train_segmenter(model, finetune_data, ft, task="segmentation", out_dir=Path(out_dir) / "finetune", device=device)
    metrics = evaluate_segmenter(model, test_data, "segmentation", num_classes, device)
    metrics["train_steps"] = res.step
    metrics["final_loss"] = float(np.mean(res.losses[-20:])) if res.losses else None
    metrics["train_samples"] = len(train_data)
    if examples:
        path = Path(out_dir) / "examples.npy"
        np.save(path, predict_labels(model, [test_data[i] for i in range(min(examples, len(test_data)))], device))
        metrics["examples"] = str(path)
    return metrics


@torch.no_grad()
def predict_labels(model: torch.nn.Module, items: list[dict], device: str = "cpu") -> np.ndarray:
    """Arg-max labels uint8 (n,H,W) of a segmenter for dataset items (image uint8 (3,H,W))."""
    from .segmenters.batch import images_to_input

    was = model.training
    model.eval()
    try:
        x = images_to_input(torch.stack([it["image"] for it in items]).to(device))
        return model(x).argmax(1).to(torch.uint8).cpu().numpy()
    finally:
        model.train(was)


def gap_closed(ours: float, labeled_only: float, oracle: float) -> float | None:
    """Fraction of the labeled-only -> oracle gap that `ours` closes. None when there is no gap to
    close (labeled-only already reaches the oracle, e.g. a short oracle schedule vs 50 labels)."""
    gap = oracle - labeled_only
    return None if gap < 1e-6 else (ours - labeled_only) / gap


def _mean_defined(values: list) -> float | None:
    """Mean over the values that are numbers (None / NaN mean: class absent from test and prediction)."""
    ok = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(ok) / len(ok) if ok else None


def longtail_metrics(
    per_class_iou: list, class_names: list[str], longtail: list[str], ignore: list[str] | tuple = ()
) -> dict:
    """HandsOff Fig. 4's three numbers from one method's per-class IoU: the long-tail IoU (mean over
    `longtail`, one class in a substitution sweep), the non-long-tail mIoU (mean over every class not
    in `longtail` or `ignore`, e.g. the domain's other rare classes) and the overall mIoU (all classes).
    Undefined IoUs (None / NaN) are left out of every mean; a mean over nothing is None."""
    if len(per_class_iou) != len(class_names):
        raise ValueError(f"{len(per_class_iou)} IoUs for {len(class_names)} classes")
    unknown = [c for c in [*longtail, *ignore] if c not in class_names]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; valid classes: {list(class_names)}")
    iou = dict(zip(class_names, per_class_iou))
    rest = [c for c in class_names if c not in longtail and c not in ignore]
    return {
        "long_tail_iou": _mean_defined([iou[c] for c in longtail]),
        "non_long_tail_miou": _mean_defined([iou[c] for c in rest]),
        "miou": _mean_defined(list(per_class_iou)),
    }
