"""Storage write/read throughput and on-disk size; prints one JSON line.

Workload: 64x64 uint8 RGB image + uint8 label (5 classes) + float16
uncertainty + float32 w (10x64) per sample, random but spatially smooth
(low-pass filtered noise), written as whole shards of 64 with zstd level 3.

    python bench/storage_bench.py [--num-samples 1024] [--path DIR]

Writes go through each shard encoder the store has here (ShardStore.writer: zarr-python, and
zarrs where installed), alternating shard by shard so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from storage import ShardStore, shard_seed, verify  # noqa: E402
from storage.read_backends import installed  # noqa: E402

H = W = 64
NUM_WS, W_DIM = 10, 64
CLASSES = ["bg", "skin", "hair", "eye", "mouth"]


def smooth(rng: np.random.Generator, shape: tuple[int, ...], cutoff: float = 4.0) -> np.ndarray:
    """Noise low-passed over axes 1,2 (H, W) with a Gaussian in frequency; ~unit range."""
    noise = rng.standard_normal(shape).astype(np.float32)
    fy = np.fft.fftfreq(shape[1])[:, None] * shape[1]
    fx = np.fft.rfftfreq(shape[2])[None, :] * shape[2]
    mask = np.exp(-(fy**2 + fx**2) / (2 * cutoff**2)).astype(np.float32)
    mask = mask.reshape((1, *mask.shape) + (1,) * (len(shape) - 3))
    out = np.fft.irfft2(np.fft.rfft2(noise, axes=(1, 2)) * mask, s=shape[1:3], axes=(1, 2))
    return out / (out.std(axis=(1, 2), keepdims=True) + 1e-6)


def make_shard(
    n: int, seed: int, *, num_classes: int = len(CLASSES), w_dim: int = W_DIM
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One shard of synthetic samples at 64² (bench/read_throughput.py uses the demo's sizes)."""
    rng = np.random.default_rng(seed)
    image = np.clip(128 + 50 * smooth(rng, (n, H, W, 3)), 0, 255).astype(np.uint8)
    label = smooth(rng, (n, H, W, num_classes)).argmax(-1).astype(np.uint8)
    uncertainty = (1 / (1 + np.exp(-2 * smooth(rng, (n, H, W, 1))[..., 0]))).astype(np.float16)
    # StyleGAN2 w+ without style mixing: one w vector broadcast over num_ws.
    w = np.repeat(rng.standard_normal((n, 1, w_dim)).astype(np.float32), NUM_WS, axis=1)
    rows = {"seed": rng.integers(0, 2**31, n), "score": rng.random(n), "score_top10": rng.random(n)}
    return {"image": image, "label": label, "uncertainty": uncertainty, "w": w}, rows


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(path: str, num_samples: int, spp: int, readback: bool, shards: list, writer: str = "auto") -> dict[str, float]:
    return run_writers({writer: path}, num_samples, spp, readback, shards)[writer]


def run_writers(paths: dict[str, str], num_samples: int, spp: int, readback: bool, shards: list) -> dict[str, dict]:
    """One dataset per writer (name -> path), written shard by shard in turn; seconds per writer."""
    stores = {}
    for writer, path in paths.items():
        stores[writer] = ShardStore.create(
            path, num_samples=num_samples, image_shape=(H, W), label_shape=(H, W), label_dtype="uint8",
            schema={"class_names": CLASSES}, samples_per_shard=spp, w_shape=(NUM_WS, W_DIM),
        )
        stores[writer].writer = writer
    seconds = dict.fromkeys(paths, 0.0)
    for index, (samples, rows) in enumerate(shards):
        for writer, store in stores.items():
            t0 = time.perf_counter()
            store.write_shard(index, samples, rows, verify_readback=readback)
            seconds[writer] += time.perf_counter() - t0
    return {w: {"seconds": seconds[w], "store": stores[w]} for w in paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--path", default=None, help="scratch directory (default: a temp dir, removed)")
    args = parser.parse_args()
    n, spp = args.num_samples, args.samples_per_shard
    scratch = args.path or tempfile.mkdtemp(prefix="lf-storage-bench-")
    try:
        shards = []
        for index in range(-(-n // spp)):
            count = min(spp, n - index * spp)
            shards.append(make_shard(count, shard_seed(0, index)))
        raw = sum(a.nbytes for s, _ in shards for a in s.values())

        plain = run(os.path.join(scratch, "no_readback"), n, spp, False, shards)
        checked = run(os.path.join(scratch, "readback"), n, spp, True, shards)
        writers = ["zarr"] + (["zarrs"] if installed("zarrs") else [])
        by_writer = run_writers({w: os.path.join(scratch, f"writer-{w}") for w in writers}, n, spp, True, shards)
        root = os.path.join(scratch, "readback")
        data_bytes = dir_size(os.path.join(root, "data.zarr"))
        manifest_bytes = dir_size(os.path.join(root, "manifest"))

        reader = ShardStore.open(root)
        ids = np.random.default_rng(1).permutation(n)[: min(n, 512)]
        t0 = time.perf_counter()
        for sample_id in ids:
            reader.read_sample(int(sample_id))
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert verify(root).ok
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert verify(root, deep=False).ok  # the re-check a re-run does: manifest + shard indexes
        recheck_s = time.perf_counter() - t0

        print(json.dumps({
            "num_samples": n,
            "samples_per_shard": spp,
            "compression": "zstd-3 (+zstd checksum), sharded, 1 sample/chunk",
            "content": "low-pass noise (Gaussian, sigma=4 cycles/64px); w broadcast over num_ws",
            "write_samples_per_s": round(n / checked["seconds"], 1),
            "write_samples_per_s_no_readback": round(n / plain["seconds"], 1),
            "writer": checked["store"].resolved_writer(),
            "write_samples_per_s_by_writer": {w: round(n / r["seconds"], 1) for w, r in by_writer.items()},
            "bytes_per_1000_samples": round(1000 * (data_bytes + manifest_bytes) / n),
            "data_bytes_per_1000_samples": round(1000 * data_bytes / n),
            "manifest_bytes_per_1000_samples": round(1000 * manifest_bytes / n),
            "raw_bytes_per_1000_samples": round(1000 * raw / n),
            "compression_ratio": round(raw / data_bytes, 2),
            "random_read_samples_per_s": round(len(ids) / read_s, 1),
            "verify_samples_per_s": round(n / verify_s, 1),
            "recheck_samples_per_s": round(n / recheck_s, 1),
            "verify_over_recheck_time": round(verify_s / recheck_s, 1),
            "cpu_count": os.cpu_count(),
        }))
    finally:
        if args.path is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
