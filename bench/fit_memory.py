"""Peak RSS of fitting the label generator on 50 labeled 256x256 images (HandsOff's 50-image setting).

A random StyleGAN2 at 256² with halved config-f channels stands in for a real one: memory depends on
shapes, not weights. Peak RSS is read from the kernel (ru_maxrss) of this process, which does
nothing else; the baseline RSS after building the generator is reported beside it.

    python bench/fit_memory.py [--images 50] [--res 256] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from labelfoundry.generators import Generator
from labelfoundry.labelers import FitData
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cache-mb", type=float, default=1024.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    G = Generator(resolution=args.res, z_dim=512, w_dim=512, map_layers=8, channel_base=16384, channel_max=256).eval()
    with torch.no_grad():
        ws = G.mapping(torch.randn(args.images, 512))
    masks = torch.randint(0, 8, (args.images, args.res, args.res))
    base = rss_mb()
    t0 = time.time()
    cfg = HandsOffConfig(members=10, hidden=(256, 32), min_steps=args.steps, epochs=0.0)
    schema = {"class_names": [f"c{i}" for i in range(8)], "colors": [[0, 0, 0]] * 8, "keypoint_names": []}
    HandsOffLabeler.fit(G, FitData(masks=masks, latents=ws, schema=schema), cfg, tap_cache_mb=args.cache_mb)
    print(json.dumps({
        "images": args.images, "res": args.res, "steps": args.steps, "hypercolumn_channels": sum(G.tap_channels),
        "baseline_rss_mb": base, "peak_rss_mb": rss_mb(), "seconds": time.time() - t0,
        "naive_pixel_matrix_gb": args.images * args.res**2 * sum(G.tap_channels) * 4 / 2**30,
    }))


if __name__ == "__main__":
    main()
