"""Label quality of HandsOff on the built-in domain, where exact labels are known.

Invert N labeled train-pool faces, fit the label generator, then invert held-out val faces and
label their reconstructions; compare with the val ground truth (per-class IoU). Baseline: a
per-pixel MLP trained on the same N images' RGB values alone. Also reports whether the JS
uncertainty is informative (mean JS on mislabeled vs correctly labeled pixels).

    python bench/handsoff_quality.py --labeled 16 --val 64 [--generator toyfaces-64]

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from labelfoundry.domains import toyfaces
from labelfoundry.features import generate_with_taps
from labelfoundry.generators import load_generator
from labelfoundry.inversion.optimize import InversionConfig, invert
from labelfoundry.labelers import FitData, GenBatch
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler
from labelfoundry.segmenters.metrics import segmentation_iou


def rgb_baseline(train_img: np.ndarray, train_mask: np.ndarray, test_img: np.ndarray, k: int, steps: int = 1500) -> torch.Tensor:
    """Per-pixel MLP on RGB only (the 'no generator features' control)."""
    torch.manual_seed(0)
    x = torch.from_numpy(train_img.reshape(-1, 3)).float() / 127.5 - 1
    y = torch.from_numpy(train_mask.reshape(-1)).long()
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, k))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (4096,))
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        xt = torch.from_numpy(test_img.reshape(-1, 3)).float() / 127.5 - 1
        return net(xt).argmax(-1).reshape(test_img.shape[:3])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generator", default="toyfaces-64")
    ap.add_argument("--labeled", type=int, default=16)
    ap.add_argument("--val", type=int, default=64)
    ap.add_argument("--inv-steps", type=int, default=300)
    ap.add_argument("--min-steps", type=int, default=300)
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    G = load_generator(args.generator)
    R, K = G.resolution, len(toyfaces.CLASSES)
    tr = toyfaces.samples("train", args.labeled, R)
    va = toyfaces.samples("val", args.val, R)
    t = {}
    t0 = time.time()
    inv = invert(G, np.stack([s.image for s in tr]), InversionConfig(steps=args.inv_steps))
    t["invert_train_s"] = time.time() - t0
    t0 = time.time()
    lab = HandsOffLabeler.fit(G, FitData.from_samples(tr, toyfaces.SCHEMA.to_json(), latents=inv.ws),
                              HandsOffConfig(members=args.members, min_steps=args.min_steps))
    t["fit_s"] = time.time() - t0
    t0 = time.time()
    invv = invert(G, np.stack([s.image for s in va]), InversionConfig(steps=args.inv_steps))
    t["invert_val_s"] = time.time() - t0
    img, taps = generate_with_taps(G, invv.ws, lab.tap_spec)
    out = lab.label(GenBatch(invv.ws, img, taps))
    gt = torch.from_numpy(np.stack([s.mask for s in va]))
    miou, per = segmentation_iou(out.label.long(), gt, K)
    base = rgb_baseline(np.stack([s.image for s in tr]), np.stack([s.mask for s in tr]), np.stack([s.image for s in va]), K)
    b_miou, b_per = segmentation_iou(base, gt, K)
    wrong = out.label.long() != gt
    res = {
        "generator": args.generator, "kimg": (getattr(G, "extra", {}) or {}).get("kimg"), "labeled": args.labeled, "val": args.val,
        "handsoff_miou": miou, "handsoff_per_class": dict(zip(toyfaces.CLASSES, per)),
        "rgb_baseline_miou": b_miou, "rgb_baseline_per_class": dict(zip(toyfaces.CLASSES, b_per)),
        "js_wrong": out.uncertainty[wrong].mean().item(), "js_right": out.uncertainty[~wrong].mean().item(),
        "pixel_error_rate": wrong.float().mean().item(),
        "recon_mse_train": float(inv.loss.mean()), "recon_mse_val": float(invv.loss.mean()), **t,
    }
    print(json.dumps(res, default=lambda v: None if v != v else v))


if __name__ == "__main__":
    main()
