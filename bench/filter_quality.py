"""Does the uncertainty filter remove the wrong labels? Scores and cut fractions against a reference.

Generated images have no ground truth, so a converged oracle segmenter (trained on 5,000 exactly
labeled renders, 0.86 parts mIoU on real test faces at 1,000 steps) stands in for it: its
prediction on each generated image is the reference, and a label's quality is its agreement with
that reference. For every per-image score and drop fraction q this prints the pooled parts mIoU of
the kept samples' labels against the reference (the filter helps when it is above the unfiltered
set's), and how each score ranks the images' own disagreement (Spearman r).

    python bench/filter_quality.py runs/demo/datasets/<key> --cache runs/filter-quality

Scores (higher = dropped first):
  score        the stored one: sum of the pixels' JS divergence (HandsOff; grows with the head's area)
  score_top10  the stored mean over the image's 10% most uncertain pixels
  js_fg_mean   the mean JS over the pixels the label calls foreground (area-normalised)
  reference    the image's own disagreement with the oracle (an upper bound no filter can see)
Then per-pixel gates (`--pixel-fractions`): the most uncertain pixels ignored, over the whole dataset
or per labelled class (see `pixel_cuts`), with the kept pixels' mIoU and each class's share dropped.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import storage  # noqa: E402
from labelfoundry.config import DownstreamSection  # noqa: E402
from labelfoundry.evaluation import predict, toyfaces_split, train_and_evaluate  # noqa: E402
from labelfoundry.filtering import uncertainty_flags  # noqa: E402
from labelfoundry.segmenters import SegmenterConfig, TrainConfig, build_segmenter  # noqa: E402
from labelfoundry.segmenters.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from labelfoundry.segmenters.metrics import segmentation_iou  # noqa: E402


def oracle_model(cache: Path, steps: int, classes: int, resolution: int, threads: int) -> torch.nn.Module:
    """The oracle segmenter, trained once into `cache` (resumable) with the downstream defaults."""
    ds = DownstreamSection()
    out = cache / f"oracle-{steps}"
    ckpt = latest_checkpoint(out)
    if ckpt is None or load_checkpoint(ckpt)["step"] < steps:
        torch.set_num_threads(threads)
        train = toyfaces_split("train", ds.oracle_images, resolution, offset=500_000)
        test = toyfaces_split("test", 1000, resolution)
        cfg = TrainConfig(lr=ds.lr, batch_size=ds.batch_size, epochs=ds.epochs, max_steps=steps, seed=0,
                          checkpoint_every=max(100, steps // 4), log_every=100)
        m = train_and_evaluate(train, test, arch=ds.arch, num_outputs=classes, out_dir=out, train_cfg=cfg,
                               progress=lambda d: print(f"# oracle step {d.get('step')} loss {d.get('loss', 0):.3f}", flush=True))
        (cache / f"oracle-{steps}.json").write_text(json.dumps({k: m[k] for k in ("miou", "per_class_iou") if k in m}))
    model = build_segmenter(SegmenterConfig(arch=ds.arch, num_classes=classes))
    model.load_state_dict(load_checkpoint(latest_checkpoint(out))["model"])
    return model.eval()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(pd.Series(a).corr(pd.Series(b), method="spearman"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="a generated segmentation dataset (store path)")
    p.add_argument("--cache", default="runs/filter-quality", help="where the oracle is trained once")
    p.add_argument("--oracle-steps", type=int, default=1000)
    p.add_argument("--fractions", default="0.05,0.1,0.2")
    p.add_argument("--pixel-fractions", default="0.02,0.05,0.1,0.2",
                   help="per-pixel cuts: the dataset's most uncertain pixels ignored (fractions of all pixels)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    opened = storage.open_dataset(a.dataset, filter=None)
    man = opened.manifest.sort_values("sample_id").reset_index(drop=True)
    ids = man["sample_id"].to_numpy()
    images = opened.read_array("image", ids)  # (n, H, W, 3) uint8
    labels = opened.read_array("label", ids)
    unc = opened.read_array("uncertainty", ids).astype(np.float32)
    n, R = labels.shape[0], labels.shape[1]
    classes = len(opened.layout.schema["class_names"])
    model = oracle_model(Path(a.cache), a.oracle_steps, classes, R, a.threads)
    ref = np.concatenate([predict(model, [{"image": torch.from_numpy(im).permute(2, 0, 1).contiguous()} for im in images[i : i + 256]])
                          for i in range(0, n, 256)])
    labels_t, ref_t = torch.from_numpy(labels), torch.from_numpy(ref)

    def agreement(keep: np.ndarray) -> float:  # the kept labels' parts mIoU against the reference, pooled
        return segmentation_iou(labels_t[torch.from_numpy(keep)], ref_t[torch.from_numpy(keep)], classes)[0]

    disagree = (labels != ref).reshape(n, -1).mean(1)
    fg = labels > 0
    scores = {
        "score": man["score"].to_numpy(), "score_top10": man["score_top10"].to_numpy(),
        "js_fg_mean": (unc * fg).reshape(n, -1).sum(1) / np.maximum(fg.reshape(n, -1).sum(1), 1),
        "reference": disagree,
    }
    area = fg.reshape(n, -1).mean(1)
    out: dict = {"dataset": a.dataset, "n": n, "all_miou": round(agreement(np.ones(n, bool)), 4),
                 "spearman_vs_disagreement": {}, "spearman_vs_fg_area": {}, "kept_miou": {}}
    print(f"# {n} samples; labels vs oracle, all kept: parts mIoU {out['all_miou']:.4f}")
    for name, s in scores.items():
        out["spearman_vs_disagreement"][name] = round(spearman(s, disagree), 3)
        out["spearman_vs_fg_area"][name] = round(spearman(s, area), 3)
        row = {}
        frame = pd.DataFrame({"sample_id": ids, name: s})
        for q in (float(x) for x in a.fractions.split(",")):
            keep = ~uncertainty_flags(frame, q, score=name).to_numpy()  # the filter stage's own rule
            row[str(q)] = round(agreement(keep), 4)
        out["kept_miou"][name] = row
        print(f"# {name:12s} r(disagree) {out['spearman_vs_disagreement'][name]:+.3f}  r(fg area) "
              f"{out['spearman_vs_fg_area'][name]:+.3f}  kept mIoU " + "  ".join(f"q={q}: {v:.4f}" for q, v in row.items()))
    out["pixels"] = pixel_cuts(labels_t, ref_t, torch.from_numpy(unc), classes, [float(x) for x in a.pixel_fractions.split(",")])
    print(json.dumps(out))
    return 0


def pixel_cuts(labels: torch.Tensor, ref: torch.Tensor, unc: torch.Tensor, classes: int, fractions: list[float]) -> dict:
    """Per-pixel quality gates, each pixel ignored or kept, the kept ones scored against the reference:
      global     the dataset's most uncertain pixels (one JS threshold for all)
      per_class  each labelled class's most uncertain pixels (a threshold per class)
    with how much of each labelled class a cut removes: a gate that erases the small parts teaches
    a segmenter that they barely exist."""
    base = segmentation_iou(labels, ref, classes)
    res: dict = {"none": {"kept_miou": round(base[0], 4), "per_class_iou": [round(v, 3) for v in base[1]]}}
    label_counts = torch.bincount(labels.flatten().long(), minlength=classes).double()

    def top(values: torch.Tensor, q: float) -> float:  # the k-th largest value, k = q * n
        k = max(1, int(round(q * values.numel())))
        return float(values.kthvalue(values.numel() - k + 1).values)

    for rule in ("global", "per_class"):
        for q in fractions:
            if rule == "global":
                dropped = unc >= top(unc.flatten(), q)
            else:
                dropped = torch.zeros_like(labels, dtype=torch.bool)
                for c in range(classes):
                    m = labels == c
                    if m.any():
                        dropped |= m & (unc >= top(unc[m], q))
            masked = torch.where(dropped, torch.full_like(ref, 255), ref)
            miou, per = segmentation_iou(labels, masked, classes)
            lost = torch.bincount(labels[dropped].long(), minlength=classes).double() / label_counts.clamp_min(1)
            res[f"{rule} {q}"] = {"kept_miou": round(miou, 4), "per_class_iou": [round(v, 3) for v in per],
                                  "class_pixels_dropped": [round(v, 3) for v in lost.tolist()]}
            print(f"# pixels, {rule}: drop top {q:.0%}: kept mIoU {miou:.4f}; share of each labelled class dropped "
                  + " ".join(f"{v:.2f}" for v in lost.tolist()))
    return res


if __name__ == "__main__":
    sys.exit(main())
