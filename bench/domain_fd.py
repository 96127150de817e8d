"""Domain Fréchet distance of a generator against real toy-faces renders.

Inception features mean little on toy faces and need downloads, so the feature extractor is our own:
a small part segmenter (TinyUNet) trained on real renders; features are the spatial mean and
max of its bottleneck and of its last decoder block. FD(real, generated) is reported beside
FD(real, real') — two disjoint sets of real renders — which is the scale of "as good as real".

    python bench/domain_fd.py --generator toyfaces-64 [--n 2000] [--train-steps 400]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from labelfoundry.domains import toyfaces
from labelfoundry.evaluation import toyfaces_split
from labelfoundry.generators import load_generator
from labelfoundry.segmenters import SegmenterConfig, TrainConfig, build_segmenter, train_segmenter


def features(model, images: torch.Tensor, batch: int = 128) -> np.ndarray:
    """images (N,3,R,R) in [-1,1] -> (N, D) pooled mid-level segmenter features."""
    net = model.net
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i : i + batch]
            e1 = net.enc1(x)
            e2 = net.enc2(F.max_pool2d(e1, 2))
            m = net.mid(F.max_pool2d(e2, 2))
            d2 = net.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:], mode="nearest"), e2], 1))
            feats.append(torch.cat([m.mean((2, 3)), m.amax((2, 3)), d2.mean((2, 3)), d2.amax((2, 3))], 1))
    return torch.cat(feats).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generator", default="toyfaces-64")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--out", default="runs/domain-fd")
    args = ap.parse_args()
    t0 = time.time()
    G = load_generator(args.generator)
    R = G.resolution
    model = build_segmenter(SegmenterConfig(arch="tiny_unet", num_classes=len(toyfaces.CLASSES), tiny_width=32))
    train_segmenter(model, toyfaces_split("train", 3000, R, offset=700_000), TrainConfig(max_steps=args.train_steps, batch_size=32),
                    task="segmentation", out_dir=args.out)
    model.eval()
    real = to_tensor(toyfaces.render_images(toyfaces.split_seeds("test", args.n), R))
    real2 = to_tensor(toyfaces.render_images(toyfaces.split_seeds("val", args.n, offset=10_000), R))
    with torch.no_grad():
        fake = torch.cat([G(G.z_from_seeds(list(range(i, min(i + 256, args.n))))) for i in range(0, args.n, 256)]).clamp(-1, 1)
    fr, fr2, ff = features(model, real), features(model, real2), features(model, fake)
    print(json.dumps({"generator": args.generator, "kimg": (getattr(G, "extra", {}) or {}).get("kimg"), "n": args.n,
                      "fd_real_generated": frechet(fr, ff), "fd_real_real": frechet(fr, fr2), "seconds": time.time() - t0}))


if __name__ == "__main__":
    main()
