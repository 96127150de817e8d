"""Downstream verdict: train the same network on different label sources, score it on real test images.

Every function here takes the label task ("segmentation", "keypoints" or "depth") with the label
array it applies to, so a stage can loop over the label types a dataset holds. Methods: the generated dataset (kept by the filter, or unfiltered; optionally oversampling rare
classes), the few labeled images alone (labeled_only), and, on the built-in domain, an oracle trained
on K exactly labeled real images. `longtail_metrics` gives HandsOff Fig. 4's long-tail numbers.
gap_closed = (ours - labeled_only) / (oracle - labeled_only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .segmenters import SegmenterConfig, TrainConfig, build_segmenter, evaluate_segmenter, train_segmenter
from .segmenters.heatmaps import keypoint_heatmaps
from .segmenters.models import Task


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


class DepthArrayDataset(Dataset):
    """In-memory depth: image uint8 (N,H,W,3) + depth float (N,H,W) in metres (+ valid bool (N,H,W),
    default all pixels) -> depth items ({image, label float32 (H,W), valid})."""

    def __init__(self, images: np.ndarray, depth: np.ndarray, valid: np.ndarray | None = None):
        if len(images) != len(depth) or (valid is not None and len(valid) != len(depth)):
            raise ValueError(f"{len(images)} images but {len(depth)} depth maps" + ("" if valid is None else f" and {len(valid)} valid masks"))
        self.images, self.depth = images, depth
        self.valid = np.ones(depth.shape, dtype=bool) if valid is None else valid.astype(bool)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1),
            "label": torch.from_numpy(self.depth[i].astype(np.float32)),
            "valid": torch.from_numpy(self.valid[i]),
        }


class KeypointArrayDataset(Dataset):
    """In-memory keypoints: image uint8 (N,H,W,3) + keypoints float (N,K,3) rows of (x, y, visible)
    in pixels. Items carry the training target, Gaussian heatmaps (K,H,W) of std `sigma` pixels (the
    labeler's, so every method regresses the same representation), rendered per item rather than held
    for the whole set, and the exact keypoints, which PCK scores against."""

    def __init__(self, images: np.ndarray, keypoints: np.ndarray, sigma: float):
        if len(images) != len(keypoints):
            raise ValueError(f"{len(images)} images but {len(keypoints)} keypoint sets")
        self.images, self.keypoints, self.sigma = images, keypoints.astype(np.float32), float(sigma)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        h, w = self.images.shape[1:3]
        kp = torch.from_numpy(self.keypoints[i])
        return {
            "image": torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1),
            "label": keypoint_heatmaps(kp, h, w, self.sigma),
            "keypoints": kp,
        }


def task_dataset(task: Task, images: np.ndarray, labels: Mapping[str, np.ndarray], sigma: float = 2.0) -> Dataset:
    """Real labeled images as the dataset of one task, from the arrays a labeled set holds
    (`mask`; `keypoints`; `depth` + optional `depth_valid`, as toy faces and invert/labeled.npz name them)."""
    need = {"segmentation": "mask", "keypoints": "keypoints", "depth": "depth"}[task]
    if need not in labels:
        raise ValueError(f"the labeled set has no {need!r} array for task {task!r}; it has {sorted(labels)}")
    if task == "segmentation":
        return ArrayDataset(images, np.asarray(labels["mask"]).astype(np.uint8))
    if task == "keypoints":
        return KeypointArrayDataset(images, np.asarray(labels["keypoints"]), sigma)
    return DepthArrayDataset(images, np.asarray(labels["depth"]), labels.get("depth_valid"))


def toyfaces_split(split: str, n: int, resolution: int, offset: int = 0, task: Task = "segmentation",
                   sigma: float = 2.0) -> Dataset:
    """Real labeled toy faces (rendered in chunks) as the dataset of `task` (see `task_dataset`;
    `sigma`: keypoint heatmap std in pixels)."""
    from .domains import toyfaces

    parts: dict[str, list[np.ndarray]] = {"image": [], "mask": [], "keypoints": [], "depth": []}
    seeds = toyfaces.split_seeds(split, n, offset)
    for i in range(0, n, 1000):
        r = toyfaces.render(seeds[i : i + 1000], resolution)
        for k in parts:
            parts[k].append(r[k])
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return task_dataset(task, arrays.pop("image"), arrays, sigma)


def generated_item(item: dict, array: str = "label") -> dict:
    """A generated sample as a downstream item: its image, and its label array `array` ("label" in a
    single-type dataset) as `label`, depth's (1,H,W) as (H,W). Every other array is dropped: a
    multi-label sample's `keypoints` heatmaps (K,H,W) must not pass for the exact keypoints (K,3)
    that real items carry. Use as the reader's transform (`functools.partial` for another array)."""
    label = item[array]
    if label.ndim == 3 and label.shape[0] == 1:
        label = label[0]
    return {"image": item["image"], "label": label}


def train_and_evaluate(
    train_data: Dataset,
    test_data: Dataset,
    *,
    task: Task = "segmentation",
    arch: str,
    num_outputs: int,
    out_dir: str | Path,
    train_cfg: TrainConfig,
    device: str = "cpu",
    finetune_data: Dataset | None = None,
    sample_weights=None,
    examples: int = 0,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train a fresh network for `task` (resumable from out_dir) and return its test metrics (see
    `evaluate_segmenter`). num_outputs: classes (segmentation) or keypoints; unused for depth.
    Deterministic: initialisation, data order and augmentation all follow `train_cfg.seed` (on CPU,
    with a fixed torch thread count, the same call gives the same metrics bit for bit).
    sample_weights: optional per-item draw weights (targeted oversampling; see labelfoundry.sampling).
    examples: also save the predictions on the first `examples` test images to `<out_dir>/examples.npy`
    (see `predict`), named in the metrics as "examples", for the report.
    progress: training progress (see train_segmenter); fine-tuning's carries "phase": "fine-tune"."""
    heads = {"segmentation": {"num_classes": num_outputs}, "keypoints": {"num_keypoints": num_outputs},
             "depth": depth_affine(train_data) if task == "depth" else {}}[task]
    # initialised from the run's seed: the same weights whatever the process did before
    model = build_segmenter(SegmenterConfig(arch=arch, task=task, **heads), seed=train_cfg.seed)
    res = train_segmenter(model, train_data, train_cfg, task=task, out_dir=out_dir, device=device,
                          sample_weights=sample_weights, progress=progress)
    if finetune_data is not None:
        ft = train_cfg.model_copy(update={"max_steps": max(50, (train_cfg.max_steps or 500) // 5)})
        train_segmenter(model, finetune_data, ft, task=task, out_dir=Path(out_dir) / "finetune", device=device,
                        progress=progress and (lambda d: progress({"phase": "fine-tune", **d})))
    metrics = evaluate_segmenter(model, test_data, task, num_outputs, device)
    metrics["train_steps"] = res.step
    metrics["final_loss"] = float(np.mean(res.losses[-20:])) if res.losses else None
    metrics["train_samples"] = len(train_data)
    if examples:
        path = Path(out_dir) / "examples.npy"
        np.save(path, predict(model, [test_data[i] for i in range(min(examples, len(test_data)))], task, device))
        metrics["examples"] = str(path)
    return metrics


def depth_affine(data: Dataset, max_items: int = 256) -> dict[str, float]:
    """The depth head's output affine from the training set alone: mean and std (metres) of the valid
    depths of up to `max_items` evenly spaced items. Without it a fresh head predicts ~0 against
    ~10 m targets and 300 steps do not close the offset (measured: oracle RMSE 4.06 m)."""
    idx = np.linspace(0, len(data) - 1, min(max_items, len(data))).round().astype(int)
    vals = []
    for i in np.unique(idx):
        item = data[int(i)]
        label = torch.as_tensor(item["label"]).float().reshape(-1)
        valid = torch.as_tensor(item["valid"]).reshape(-1) if "valid" in item else torch.ones_like(label, dtype=torch.bool)
        vals.append(label[valid & torch.isfinite(label)].double())
    v = torch.cat(vals)
    if v.numel() == 0:
        raise ValueError("the depth training set has no valid pixel")
    return {"depth_shift": float(v.mean()), "depth_scale": max(float(v.std()) if v.numel() > 1 else 1.0, 1e-3)}


@torch.no_grad()
def predict(model: torch.nn.Module, items: list[dict], task: Task = "segmentation", device: str = "cpu") -> np.ndarray:
    """Predictions of a network for dataset items (image uint8 (3,H,W)): arg-max labels uint8 (n,H,W)
    (segmentation), the heatmaps' peaks as (x, y) pixels float32 (n,K,2) (keypoints, decoded as the
    PCK metric decodes them), or depth float32 (n,H,W) (depth)."""
    from .segmenters.batch import images_to_input
    from .segmenters.heatmaps import decode_heatmaps

    was = model.training
    model.eval()
    try:
        out = model(images_to_input(torch.stack([it["image"] for it in items]).to(device))).float()
    finally:
        model.train(was)
    if task == "segmentation":
        return out.argmax(1).to(torch.uint8).cpu().numpy()
    if task == "keypoints":
        return decode_heatmaps(out).cpu().numpy().astype(np.float32)
    return out[:, 0].cpu().numpy().astype(np.float32)


def gap_closed(ours: float, labeled_only: float, oracle: float) -> float | None:
    """Fraction of the labeled-only -> oracle gap that `ours` closes. None when there is no gap to
    close (labeled-only already reaches the oracle, e.g. a short oracle schedule vs 50 labels)."""
    gap = oracle - labeled_only
    return None if gap < 1e-6 else (ours - labeled_only) / gap


SUMMARY_KEYS = ("miou", "fg_iou", "fgbg_miou", "pck@0.1", "pck@0.05", "pck@0.02", "mnmse", "rmse", "rmse_log")
# Per task: the metrics a report shows (HandsOff Table 2), the headline one, and whether higher is better.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": ("miou", "fg_iou"),
    "keypoints": ("pck@0.1", "pck@0.05", "pck@0.02"),
    "depth": ("mnmse", "rmse", "rmse_log"),
}
HEADLINE: dict[str, tuple[str, bool]] = {"segmentation": ("miou", True), "keypoints": ("pck@0.05", True),
                                         "depth": ("rmse", False)}
DECIMALS = 4  # reported numbers: run-to-run noise is far above 1e-4


def _mean_std(values: list) -> tuple[float | None, float | None]:
    """(mean, sample std) over the defined values; std is None with fewer than two."""
    ok = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not ok:
        return None, None
    mean = round(float(np.mean(ok)), DECIMALS)
    return mean, (round(float(np.std(ok, ddof=1)), DECIMALS) if len(ok) > 1 else None)


def summarize_seeds(runs: list[dict]) -> dict:
    """One method's metrics over its seeds (one `train_and_evaluate` result each): mean and sample
    std of every metric of `SUMMARY_KEYS` the runs have (mIoU, fg IoU, fg/bg mIoU and each class's
    IoU; PCK@α; mNMSE, RMSE, RMSE-log), rounded to 4 decimals, std None for one seed, plus the first
    seed's other fields (train_samples, examples, ...) and every run under "seeds". The means keep
    the single-run keys, so readers of one run read the mean the same way."""
    if not runs:
        raise ValueError("summarize_seeds needs at least one run")
    out = {**runs[0], "num_seeds": len(runs), "seeds": runs}
    for key in SUMMARY_KEYS:
        if key in runs[0]:
            out[key], out[f"{key}_std"] = _mean_std([r.get(key) for r in runs])
    if "per_class_iou" in runs[0]:
        per_class = [_mean_std(list(vals)) for vals in zip(*(r["per_class_iou"] for r in runs))]
        out["per_class_iou"] = [m for m, _ in per_class]
        out["per_class_iou_std"] = [s for _, s in per_class]
    return out


def gap_closed_summary(ours: dict, labeled_only: dict, oracle: dict, task: Task = "segmentation") -> dict:
    """gap_closed of the mean headline metric (`HEADLINE`: mIoU, PCK@0.05 or RMSE, negated where
    lower is better), its spread over seeds (std of the per-seed values, seed i of each method
    paired), and when undefined a note that says why instead of a bare None."""
    key, higher = HEADLINE[task]
    sign = 1.0 if higher else -1.0

    def gap(o: dict, lo: dict, orc: dict) -> float | None:
        if None in (o.get(key), lo.get(key), orc.get(key)):
            return None
        return gap_closed(sign * o[key], sign * lo[key], sign * orc[key])

    value = gap(ours, labeled_only, oracle)
    per_seed = [gap(o, lo, orc) for o, lo, orc in zip(ours["seeds"], labeled_only["seeds"], oracle["seeds"])]
    _, std = _mean_std(per_seed)
    note = None
    if value is None:
        note = (f"undefined: labeled-only ({labeled_only[key]:.3f}) already reaches the oracle "
                f"({oracle[key]:.3f}) in {key}, so there is no gap to close"
                if labeled_only.get(key) is not None and oracle.get(key) is not None else f"undefined: {key} is undefined")
    elif None in per_seed:
        note = "spread over the seeds where labeled-only stays below the oracle"
    return {"gap_closed": None if value is None else round(value, DECIMALS), "gap_closed_std": std,
            "gap_closed_note": note, "gap_closed_metric": key}


def mean_std_text(mean: float | None, std: float | None, undefined: str = "—") -> str:
    """'0.412 ± 0.013' for a report (3 decimals); the mean alone for one seed; `undefined` for None."""
    if mean is None:
        return undefined
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


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


def plateau_step(scores: Sequence[float | None], min_delta: float = 0.005, patience: int = 8) -> int | None:
    """The schedule rule (docs/evaluation.md): index of the evaluation where a held-out score (mIoU on
    held-out *generated* samples, so no real label beyond the few is used) stops improving: the last
    gain of more than `min_delta` that `patience` further evaluations do not beat. None when the
    curve is still rising at its end (train longer). Undefined scores (None / NaN) count as no gain.
    Patience 8 (800 steps at 100-step evaluations) sees a slow climb: with 3, the rule stopped the
    refined labels' curves at 800-1,000 steps, 0.014 below where they level off (~2,000)."""
    best, best_i = -math.inf, None
    for i, v in enumerate(scores):
        if v is not None and not math.isnan(v) and v > best + min_delta:
            best, best_i = v, i
        elif best_i is not None and i - best_i >= patience:
            return best_i
    return None
