"""Reader throughput as a training job sees it; prints one JSON line last.

- ``read_sps_shuffled``: one epoch of ``open_dataset(...).iterable(shuffle=True)``
  (block-shuffled, shard-run reads) in one process, items as torch tensors.
- ``read_sps_random``: map-style ``dataset[i]`` at random i, one sample per call.
- ``cpu_ms_per_1k_shuffled``: CPU time (all threads) per 1,000 samples of that
  epoch; unlike the rates it does not drop when other jobs share the cores.
- ``read_sps_loader`` (with ``--workers N``): the same stream through a
  DataLoader (batch 64, N spawned persistent workers), second pass timed.
- ``open_s``: the first item of each (importing the backend, opening the arrays),
  kept out of both rates: a training job pays it once.

    python bench/read_throughput.py DATASET [--backend auto|zarr|zarrs|tensorstore] [--compare]
    python bench/read_throughput.py --make DIR [--num-samples 2000]   # demo-size synthetic dataset first

``--compare`` measures every installed backend in the same run, each in a
fresh process (their thread pools would otherwise compete); compare the
ratios, the machine is shared. ``--make`` writes 64² samples with the demo's
array shapes (10 classes, w 10x128, 64 per shard) from bench/storage_bench.py's
smooth-noise generator, then measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import storage  # noqa: E402
from storage.read_backends import installed  # noqa: E402

DEMO_CLASSES = ["background", "skin", "hair", "eyes", "brows", "nose", "mouth", "ears", "glasses", "hat"]


def make_demo_dataset(path: str, num_samples: int = 2000, samples_per_shard: int = 64) -> str:
    """Write (or resume) a synthetic dataset with the demo's layout at ``path``."""
    from storage_bench import H, NUM_WS, W, make_shard

    store = storage.ShardStore.create(
        path, num_samples=num_samples, image_shape=(H, W), label_shape=(H, W), label_dtype="uint8",
        schema={"class_names": DEMO_CLASSES}, samples_per_shard=samples_per_shard, w_shape=(NUM_WS, 128),
        provenance={"generator": "bench/storage_bench.py smooth noise"},
    )
    for index in store.uncommitted_shards():
        samples, rows = make_shard(
            len(store.shard_range(index)), storage.shard_seed(0, index), num_classes=len(DEMO_CLASSES), w_dim=128
        )
        store.write_shard(index, samples, rows, verify_readback=False)
    return path


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read_throughput(
    dataset_path: str, *, backend: str = "auto", random_reads: int = 500, seed: int = 0
) -> dict[str, float]:
    """Samples/s of a shuffled epoch and of random single-sample reads (all committed samples)."""
    opened = storage.open_dataset(dataset_path, filter=None)
    stream = opened.iterable(shuffle=True, seed=seed, backend=backend)
    t0 = time.perf_counter()
    next(iter(stream))  # opens the arrays
    open_s = time.perf_counter() - t0
    stream.set_epoch(1)
    t0, c0 = time.perf_counter(), cpu_seconds()
    count = sum(1 for _ in stream)
    shuffled = count / (time.perf_counter() - t0)
    cpu_ms = 1e6 * (cpu_seconds() - c0) / count

    mapped = opened.dataset(backend=backend)
    t0 = time.perf_counter()
    mapped[0]
    open_s += time.perf_counter() - t0
    picks = np.random.default_rng(seed).integers(0, len(mapped), min(random_reads, len(mapped)))
    t0 = time.perf_counter()
    for i in picks:
        mapped[int(i)]
    random = len(picks) / (time.perf_counter() - t0)
    return {
        "read_sps_shuffled": round(shuffled, 1), "read_sps_random": round(random, 1),
        "cpu_ms_per_1k_shuffled": round(cpu_ms, 1), "open_s": round(open_s, 2),
    }


def loader_throughput(dataset_path: str, workers: int, *, backend: str = "auto", batch_size: int = 64) -> float:
    """Samples/s of a DataLoader over the shuffled stream; the first pass starts the workers."""
    from torch.utils.data import DataLoader

    stream = storage.open_dataset(dataset_path, filter=None).iterable(batch_size=batch_size, backend=backend)
    loader = DataLoader(
        stream, batch_size=batch_size, num_workers=workers, multiprocessing_context="spawn", persistent_workers=True,
    )
    for _ in loader:
        pass
    t0 = time.perf_counter()
    count = sum(len(batch["sample_id"]) for batch in loader)
    return round(count / (time.perf_counter() - t0), 1)


def in_fresh_process(dataset_path: str, backend: str, random_reads: int) -> dict[str, float]:
    """:func:`read_throughput` run by this script in a new interpreter."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), dataset_path, "--backend", backend,
         "--random-reads", str(random_reads)],
        check=True, capture_output=True, text=True,
    ).stdout
    last = json.loads(out.strip().splitlines()[-1])
    return {k: last[k] for k in ("read_sps_shuffled", "read_sps_random", "cpu_ms_per_1k_shuffled", "open_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", help="dataset directory or URL")
    parser.add_argument("--make", metavar="DIR", help="write a demo-size synthetic dataset to DIR and measure it")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--backend", default="auto", choices=list(storage.read_backends.BACKENDS))
    parser.add_argument("--compare", action="store_true", help="also measure every installed backend")
    parser.add_argument("--random-reads", type=int, default=500)
    parser.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers")
    args = parser.parse_args()
    if not (args.dataset or args.make):
        parser.error("give a DATASET, or --make DIR to build one")
    import torch

    torch.set_num_threads(1)
    path = make_demo_dataset(args.make, args.num_samples) if args.make else args.dataset
    result: dict[str, object] = {"dataset": path, "num_samples": len(storage.open_dataset(path, filter=None))}
    if args.compare:
        by_backend = {}
        for name in ("zarr", "zarrs", "tensorstore"):
            if installed(name):
                by_backend[name] = in_fresh_process(path, name, args.random_reads)
                print(json.dumps({"backend": name, **by_backend[name]}), flush=True)
        result["by_backend"] = by_backend
    chosen = storage.read_backends.resolve_backend(args.backend, storage.fsio.resolve(path))
    result.update({"backend": chosen, **read_throughput(path, backend=args.backend, random_reads=args.random_reads)})
    if args.workers:
        result["read_sps_loader"] = loader_throughput(path, args.workers, backend=args.backend)
        result["loader_workers"] = args.workers
    result["cpu_count"] = os.cpu_count()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
