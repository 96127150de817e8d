"""A generator's quality on the built-in domain, in the eyes of a part segmenter trained on real renders.

    python bench/generator_quality.py --generator toyfaces-64 [--n 2000]
    python bench/generator_quality.py --snapshots training/toyfaces-64   # every generator-*k.safetensors

Prints one JSON line per generator, the last one for the last generator: fd, fd_real (real vs disjoint
real), precision and recall (k-NN manifolds, k = 3) with precision_real / recall_real (real vs
disjoint real: the metric's ceiling at this n), rare_rate and domain_rate per rare class,
head_size_std_ratio, kimg, rare_recall (per rare class: the share of real faces with it that the
generated manifold covers; rare_recall_real its real-vs-real ceiling), and calibration (the same
figures for real images with 4/255 of noise, a 0.5-px blur, or half the hair styles dropped: the
scale to read them on). The scorer is trained once per spec and cached under --cache, so a model
always gets the same numbers. Definitions: labelfoundry/generator_quality.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from labelfoundry.generator_quality import ScorerSpec, generator_quality, train_scorer
from labelfoundry.generators import load_networks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", action="append", default=[], help="built-in name or file (repeatable)")
    ap.add_argument("--snapshots", type=Path, help="score every generator-*k.safetensors in this training dir")
    ap.add_argument("--n", type=int, default=2000, help="images per set (>= 2,000 for the published figures)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--scorer-steps", type=int, default=1500)
    ap.add_argument("--clean-scorer", action="store_true",
                    help="the scorer trained on clean renders only (the figures before 2026-12-04's robust scorer)")
    ap.add_argument("--cache", type=Path, default=Path("runs/generator-quality"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gens = list(args.generator)
    if args.snapshots:
        gens += [str(p) for p in sorted(args.snapshots.glob("generator-*k.safetensors"))]
    if not gens:
        gens = ["toyfaces-64"]
    t0 = time.time()
    first = load_networks(gens[0]).G
    spec = ScorerSpec(resolution=first.resolution, steps=args.scorer_steps)
    if args.clean_scorer:
        spec = dataclasses.replace(spec, blur_sigma=0.0, pixel_noise=0.0)
    scorer = train_scorer(spec, args.cache)
    for name in gens:
        t = time.time()
        nets = load_networks(name)
        q = generator_quality(nets.G, scorer, n=args.n, k=args.k, kimg=(nets.extra or {}).get("kimg"))
        print(json.dumps({"generator": name, **q, "seconds": round(time.time() - t, 1),
                          "total_seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
