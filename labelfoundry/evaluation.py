"""Downstream verdict: train the same segmenter on different label sources, score it on real test images.

Methods: the generated dataset (kept by the filter, or unfiltered; optionally oversampling rare
classes), the few labeled images alone (labeled_only), and, on the built-in domain, an oracle trained
on K exactly labeled real images. `longtail_metrics` gives HandsOff Fig. 4's long-tail numbers.
gap_closed = (ours - labeled_only) / (oracle - labeled_only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train a fresh segmenter (resumable from out_dir) and return its test metrics. Deterministic:
    initialisation, data order and augmentation all follow `train_cfg.seed` (on CPU, with a fixed
    torch thread count, the same call gives the same metrics bit for bit).
    sample_weights: optional per-item draw weights (targeted oversampling; see labelfoundry.sampling).
    examples: also save the predicted labels of the first `examples` test images to
    `<out_dir>/examples.npy` (uint8 (n,H,W)), named in the metrics as "examples", for the report.
    progress: training progress (see train_segmenter); fine-tuning's carries "phase": "fine-tune"."""
    # initialised from the run's seed: the same weights whatever the process did before
    model = build_segmenter(SegmenterConfig(arch=arch, task="segmentation", num_classes=num_classes), seed=train_cfg.seed)
    res = train_segmenter(model, train_data, train_cfg, task="segmentation", out_dir=out_dir, device=device,
                          sample_weights=sample_weights, progress=progress)
    if finetune_data is not None:
        ft = train_cfg.model_copy(update={"max_steps": max(50, (train_cfg.max_steps or 500) // 5)})
        train_segmenter(model, finetune_data, ft, task="segmentation", out_dir=Path(out_dir) / "finetune", device=device,
                        progress=progress and (lambda d: progress({"phase": "fine-tune", **d})))
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


SUMMARY_KEYS = ("miou", "fg_iou", "fgbg_miou")
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
    std of mIoU, fg IoU, fg/bg mIoU and each class's IoU (rounded to 4 decimals; std None for one
    seed), plus the first seed's other fields (train_samples, examples, ...) and every run under
    "seeds". The means keep the single-run keys, so readers of one run read the mean the same way."""
    if not runs:
        raise ValueError("summarize_seeds needs at least one run")
    out = {**runs[0], "num_seeds": len(runs), "seeds": runs}
    for key in SUMMARY_KEYS:
        out[key], out[f"{key}_std"] = _mean_std([r.get(key) for r in runs])
    per_class = [_mean_std(list(vals)) for vals in zip(*(r["per_class_iou"] for r in runs))]
    out["per_class_iou"] = [m for m, _ in per_class]
    out["per_class_iou_std"] = [s for _, s in per_class]
    return out


def gap_closed_summary(ours: dict, labeled_only: dict, oracle: dict) -> dict:
    """gap_closed of the mean mIoUs, its spread over seeds (std of the per-seed values, seed i of
    each method paired), and when undefined a note that says why instead of a bare None."""
    value = gap_closed(ours["miou"], labeled_only["miou"], oracle["miou"])
    per_seed = [gap_closed(o["miou"], lo["miou"], orc["miou"])
                for o, lo, orc in zip(ours["seeds"], labeled_only["seeds"], oracle["seeds"])]
    _, std = _mean_std(per_seed)
    note = None
    if value is None:
        note = (f"undefined: labeled-only ({labeled_only['miou']:.3f}) already reaches the oracle "
                f"({oracle['miou']:.3f}), so there is no gap to close")
    elif None in per_seed:
        note = "spread over the seeds where labeled-only stays below the oracle"
    return {"gap_closed": None if value is None else round(value, DECIMALS), "gap_closed_std": std,
            "gap_closed_note": note}


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


def plateau_step(scores: Sequence[float | None], min_delta: float = 0.005, patience: int = 3) -> int | None:
    """The schedule rule (docs/schedules.md): index of the evaluation where a held-out score (mIoU on
    held-out *generated* samples, so no real label beyond the few is used) stops improving: the last
    gain of more than `min_delta` that `patience` further evaluations do not beat. None when the
    curve is still rising at its end (train longer). Undefined scores (None / NaN) count as no gain."""
    best, best_i = -math.inf, None
    for i, v in enumerate(scores):
        if v is not None and not math.isnan(v) and v > best + min_delta:
            best, best_i = v, i
        elif best_i is not None and i - best_i >= patience:
            return best_i
    return None
