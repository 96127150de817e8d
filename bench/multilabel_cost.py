"""What labeling three label types costs in one generation pass against three separate passes. One
JSON line last.

    python bench/multilabel_cost.py                 # 256 samples, batch 32, 1 torch thread, fp32
    python bench/multilabel_cost.py --precision auto --n 512

Setup: the shipped toy-faces generator (toyfaces-64) and three HandsOff labelers of the demo's shape
(10 members, hidden (256, 32)): segmentation (10 classes), keypoints (5 heatmaps), depth (1 map),
randomly initialised (their weights do not change the work done).
  one_pass_s     generation.generate_samples with all three labelers: the generator runs once per
                 batch and every labeler reads its taps from that pass (what `extra_labelers` does).
  three_pass_s   three generate_samples calls, one labeler each (three single-type runs).
Both are timed alternately, `--reps` times each after a warm-up; the medians are reported, and the
ratio three_pass_s / one_pass_s (a ratio holds on a noisy machine; single figures do not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from labelfoundry.domains.toyfaces import CLASSES, KEYPOINTS  # noqa: E402
from labelfoundry.generation import generate_samples  # noqa: E402
from labelfoundry.generators import load_generator  # noqa: E402
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    G = load_generator("toyfaces-64")
    torch.manual_seed(0)
    labelers = {}
    for array, task, k in (("label", "segmentation", len(CLASSES)), ("keypoints", "keypoints", len(KEYPOINTS)), ("depth", "depth", 1)):
        cfg = HandsOffConfig(task=task)
        labelers[array] = HandsOffLabeler(cfg, cfg.tap_spec.channels(G.tap_channels), G.resolution, k).eval()
    ids = list(range(a.n))

    def one() -> None:
        generate_samples(G, labelers, ids, 0, batch=a.batch, precision=a.precision)

    def three() -> None:
        for lab in labelers.values():
            generate_samples(G, lab, ids, 0, batch=a.batch, precision=a.precision)

    generate_samples(G, labelers, ids[: a.batch], 0, batch=a.batch, precision=a.precision)  # warm-up
    times: dict[str, list[float]] = {"one_pass_s": [], "three_pass_s": []}
    for _ in range(a.reps):
        for name, fn in (("one_pass_s", one), ("three_pass_s", three)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(f"# {name} {times[name][-1]:.2f} s", flush=True)
    out = {"n": a.n, "batch": a.batch, "threads": a.threads, "precision": a.precision, "reps": a.reps,
           **{k: round(statistics.median(v), 2) for k, v in times.items()}}
    out["one_pass_sps"] = round(a.n / out["one_pass_s"], 1)
    out["three_pass_sps"] = round(a.n / out["three_pass_s"], 1)
    out["three_over_one"] = round(out["three_pass_s"] / out["one_pass_s"], 3)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
