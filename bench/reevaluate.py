"""Re-score a finished run's downstream segmenters on real test images, with today's metrics.

Loads the latest checkpoint of every `<run_dir>/evaluate/<method>-<key>/` (weights only, no
training) and evaluates it on the toy-faces test split: useful when a metric was added after the
run (e.g. foreground IoU of a part segmenter, to compare with fg/bg labelers).

    python bench/reevaluate.py runs/full --test-images 1000

The last line of stdout is one JSON object {method: metrics}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from labelfoundry.evaluation import toyfaces_split
from labelfoundry.generators import load_generator
from labelfoundry.segmenters import SegmenterConfig, build_segmenter, evaluate_segmenter
from labelfoundry.segmenters.checkpoint import latest_checkpoint, load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--test-images", type=int, default=None, help="default: the run's downstream.test_images")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    k = len(metrics["class_names"])
    R = load_generator(cfg["generator"]["name"]).resolution
    test = toyfaces_split("test", args.test_images or cfg["downstream"]["test_images"], R)
    if k == 2:  # a fg/bg run: score against foreground = any part
        test.masks = (test.masks > 0).astype(test.masks.dtype)
    out = {}
    for d in sorted((run / "evaluate").iterdir()):
        ckpt = latest_checkpoint(d / "finetune") or latest_checkpoint(d)
        if ckpt is None:
            continue
        method = d.name.rsplit("-", 1)[0]
        model = build_segmenter(SegmenterConfig(arch=cfg["downstream"]["arch"], num_classes=k, pretrained_backbone=False))
        model.load_state_dict(load_checkpoint(ckpt)["model"])
        out[method] = evaluate_segmenter(model, test, "segmentation", k)
        out[method]["checkpoint"] = str(ckpt)
        print(method, {m: out[method][m] for m in ("miou", "fg_iou", "fgbg_miou")}, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
