"""Downstream training step time on CPU: fp32 vs bf16 autocast, threads vs processes side by side.

Times `train_segmenter` (the loop the evaluate stage runs) on real toy faces, tiny U-Net, batch 32,
64². Every setting runs in its own spawned process with its own thread count; "side by side" runs
two such processes at once and reports the time per step of each (so 2 processes x 1 thread is
compared with 1 process x 2 threads on the same two cores). On a shared machine compare the ratios
printed at the end, all measured in this one run.

    python bench/segmenter_step.py --steps 20 --repeats 2
    python bench/segmenter_step.py --layouts     # channels-last vs contiguous (NCHW), at the CPU's precision

The last line of stdout is one JSON object {setting: seconds per step}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time


def _time_steps(threads: int, amp: str, steps: int, batch: int, resolution: int, start, out, channels_last: bool = True) -> None:
    """In a fresh process: warm up, wait for `start`, then time `steps` training steps."""
    import torch

    torch.set_num_threads(threads)
    from labelfoundry.evaluation import toyfaces_split
    from labelfoundry.segmenters import SegmenterConfig, TrainConfig, build_segmenter, train_segmenter

    data = toyfaces_split("train", 4 * batch, resolution)
    model = build_segmenter(SegmenterConfig(num_classes=data.masks.max() + 1), seed=0)
    with tempfile.TemporaryDirectory() as d:
        def run(n: int, sub: str) -> float:
            cfg = TrainConfig(batch_size=batch, max_steps=n, amp=amp, checkpoint_every=10**6, log_every=10**6,
                              channels_last=channels_last)
            t0 = time.perf_counter()
            train_segmenter(model, data, cfg, task="segmentation", out_dir=f"{d}/{sub}", device="cpu", resume=False)
            return time.perf_counter() - t0

        run(2, "warm")
        start.wait()
        out.put(run(steps, "timed") / steps)


def measure(settings: list[tuple], steps: int, batch: int, resolution: int) -> list[float]:
    """Seconds per step of each (threads, amp[, channels_last]) setting, all running at the same time."""
    ctx = mp.get_context("spawn")
    start, outs = ctx.Barrier(len(settings)), [ctx.Queue() for _ in settings]
    procs = [ctx.Process(target=_time_steps, args=(st[0], st[1], steps, batch, resolution, start, q, *st[2:]))
             for st, q in zip(settings, outs)]
    for p in procs:
        p.start()
    res = [q.get() for q in outs]
    for p in procs:
        p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the median is reported")
    ap.add_argument("--layouts", action="store_true", help="compare channels-last with contiguous (NCHW) training")
    args = ap.parse_args()
    from labelfoundry.precision import cpu_bf16_fast

    print(f"CPU native bf16: {cpu_bf16_fast()}", flush=True)
    if args.layouts:
        layouts(args)
        return
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, settings in (("fp32 1 thread", [(1, "none")]), ("bf16 1 thread", [(1, "bf16")]),
                               ("bf16 2 threads", [(2, "bf16")]), ("bf16 2 processes x 1 thread", [(1, "bf16"), (1, "bf16")])):
            t = measure(settings, args.steps, args.batch, args.resolution)
            runs.setdefault(name, []).append(max(t))  # side by side: the slower of the two
            print(f"{name}: {', '.join(f'{v:.3f}' for v in t)} s/step", flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    one = med["bf16 1 thread"]
    print(f"bf16 / fp32 (1 thread): {one / med['fp32 1 thread']:.2f}x the step time")
    print(f"2 threads / 1 thread (bf16): {med['bf16 2 threads'] / one:.2f}x the step time")
    # two methods' trainings: side by side on 1 thread each vs one after another (on 1 or 2 threads)
    side = med["bf16 2 processes x 1 thread"]
    print(f"two methods side by side vs one after another on 1 thread: {side / (2 * one):.2f}x the wall time")
    print(f"two methods side by side vs one after another on 2 threads: {side / (2 * med['bf16 2 threads']):.2f}x the wall time")
    print(json.dumps(med))


def layouts(args) -> None:
    """Channels-last vs contiguous, each alone on 1 thread and as 2 processes side by side, interleaved."""
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for cl in (False, True):
            name = "channels_last" if cl else "contiguous"
            for label, settings in ((f"{name} 1 thread", [(1, "bf16", cl)]), (f"{name} 2 processes x 1 thread", [(1, "bf16", cl)] * 2)):
                t = measure(settings, args.steps, args.batch, args.resolution)
                runs.setdefault(label, []).append(max(t))
                print(f"{label}: {', '.join(f'{v:.3f}' for v in t)} s/step", flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    for mode in ("1 thread", "2 processes x 1 thread"):
        print(f"channels_last / contiguous ({mode}): {med[f'channels_last {mode}'] / med[f'contiguous {mode}']:.2f}x the step time")
    print(json.dumps(med))


if __name__ == "__main__":
    main()
