"""Generator training speed on this CPU: img/s of `train_step` in fp32 and under bf16 autocast, on 1
and 2 torch threads. One JSON line last.

    python bench/generator_step.py                 # 16 steps per setting (one R1 step among them), 2 reps
    python bench/generator_step.py --steps 32 --reps 3

Setup: the built-in StyleGAN2 (`GeneratorTrainConfig()` defaults: 64², batch 32), fresh networks, the
same `train_step` `labelfoundry train-generator` runs (real renders, D step with lazy R1, G step with
style mixing, EMA). Settings are timed alternately, `--reps` times each after one warm-up step per
setting; the median img/s is reported. bf16 settings are skipped (null) where the CPU lacks native
bf16 (`bf16_autocast_ok`). Compare the ratios (bf16 over fp32, 2 threads over 1): single figures
move with the machine's load.
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

from labelfoundry.generators.train import GeneratorTrainConfig, build_state, train_step  # noqa: E402
from labelfoundry.precision import bf16_autocast_ok  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=16, help="timed steps per setting and rep (R1 runs every 16th)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = p.parse_args(argv)
    dev = torch.device("cpu")
    cfg = GeneratorTrainConfig()
    st = build_state(cfg, dev)
    settings = [(amp, t) for t in a.threads for amp in (False, True) if not amp or bf16_autocast_ok(dev)]
    for amp, t in settings:  # warm-up: first-call allocations and kernel selection
        torch.set_num_threads(t)
        train_step(st, cfg, dev, amp)
    rates: dict[tuple[bool, int], list[float]] = {s: [] for s in settings}
    for _ in range(a.reps):
        for amp, t in settings:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                train_step(st, cfg, dev, amp)
            rates[(amp, t)].append(a.steps * cfg.batch / (time.perf_counter() - t0))
            print(f"# {'bf16' if amp else 'fp32'} threads={t}: {rates[(amp, t)][-1]:.1f} img/s", flush=True)
    out: dict = {"batch": cfg.batch, "resolution": cfg.resolution, "steps": a.steps, "reps": a.reps}
    for t in a.threads:
        for amp in (False, True):
            key = f"{'bf16' if amp else 'fp32'}_{t}t_img_s"
            out[key] = round(statistics.median(rates[(amp, t)]), 1) if (amp, t) in rates else None
    for t in a.threads:
        if out.get(f"bf16_{t}t_img_s"):
            out[f"bf16_over_fp32_{t}t"] = round(out[f"bf16_{t}t_img_s"] / out[f"fp32_{t}t_img_s"], 2)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
