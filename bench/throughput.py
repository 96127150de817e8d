"""Factory throughput at 64² on this machine: generator, labeling, commit, read. One JSON line last.

    python bench/throughput.py                        # 2 workers x 1 torch thread (the demo's runner)
    python bench/throughput.py --workers 1 --torch-threads 2 --batch 64
    python bench/throughput.py --precision fp32       # default: auto (bf16 where the CPU runs it natively)
    python bench/throughput.py --writer zarr          # commit through zarr-python (default: zarrs where installed)
    python bench/throughput.py --compile              # label with the torch.compile'd pass (compiled in the warm-up)
    python bench/throughput.py --device cuda --workers 1 --batch 64 --n 4096 [--res 256]

Setup: the shipped toy-faces generator (toyfaces-64; at --res other than 64 a randomly initialised
StyleGAN2 of that resolution with channel_base 16384, channel_max 256, as bench/labeling.py) and a
HandsOff labeler of HandsOffConfig's default shape (or --members / --hidden), 10 classes, randomly
initialised: weights do not change the work done. On CUDA each phase ends with a device sync.
Each phase runs `workers` Python threads, each with its own share of the samples, and
torch.set_num_threads(torch_threads) (the factory's thread runner does the same), after a
one-batch warm-up; samples/s is total samples / wall time of the phase. Generator and labeler run
at the same precision.

  gen_sps     generator alone: seeds -> z -> mapping -> synthesis with taps (what labeling needs).
  label_sps   generation.generate_samples: generator + labels + uncertainty + the numpy arrays.
  commit_sps  generation.generate_shards into a fresh ShardStore (labelfoundry's commit protocol:
              compression, checksums, read-back, manifest parts), each worker owning whole shards,
              each store write overlapping its worker's next shard.
  read_sps_shuffled / read_sps_random   bench/read_throughput.py's `read_throughput` on the dataset
              just committed, when that file exists; null otherwise.

Targets (issue 12): label_sps >= 0.5 * gen_sps, commit_sps >= 50, read_sps_shuffled >= 5000.
The machine is shared: compare figures measured in one run; run it twice before believing one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import storage  # noqa: E402
from labelfoundry.domains.toyfaces import CLASSES  # noqa: E402
from labelfoundry.features import generate_with_taps  # noqa: E402
from labelfoundry.generation import generate_samples, generate_shards, sample_seed  # noqa: E402
from labelfoundry.generators import load_generator  # noqa: E402
from labelfoundry.generators.stylegan2 import Generator, StyleGAN2Config  # noqa: E402
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler  # noqa: E402
from labelfoundry.labelers.handsoff_compiled import COMPILED  # noqa: E402
from labelfoundry.precision import resolve_precision  # noqa: E402

TARGETS = {"label_over_gen_min": 0.5, "commit_sps_min": 50.0, "read_sps_shuffled_min": 5000.0}


def run_workers(workers: int, fn: Callable[[int], None]) -> float:
    """fn(worker) on `workers` threads at once; wall seconds until the last one ends."""
    errors: list[BaseException] = []

    def body(k: int) -> None:
        try:
            fn(k)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def split(ids: list[int], workers: int) -> list[list[int]]:
    return [ids[k::workers] for k in range(workers)]


def bench_generator(res: int, device: torch.device) -> torch.nn.Module:
    """The shipped 64² model, or a random StyleGAN2 of another resolution (same work per image)."""
    if res == 64:
        return load_generator("toyfaces-64", device)
    torch.manual_seed(0)
    return Generator(StyleGAN2Config(resolution=res, channel_base=16384, channel_max=256)).to(device).eval()


def measure(n: int, batch: int, workers: int, torch_threads: int, precision: str, samples_per_shard: int,
            out_dir: str, read: bool = True, log=print, device: str = "cpu", res: int = 64,
            labeler: HandsOffConfig | None = None, writer: str = "auto", compile_labels: bool = False) -> dict:
    torch.set_num_threads(torch_threads)
    dev = torch.device(device)
    G = bench_generator(res, dev)
    cfg = labeler or HandsOffConfig()
    torch.manual_seed(0)
    lab = HandsOffLabeler(cfg, cfg.tap_spec.channels(G.tap_channels), G.resolution, len(CLASSES)).to(dev).eval()
    dtype = resolve_precision(precision, dev)
    amp = dtype == torch.bfloat16
    prec = "bf16" if amp else "fp32"

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    @torch.no_grad()
    def gen_only(ids: list[int]) -> None:
        for i in range(0, len(ids), batch):
            z = G.z_from_seeds([sample_seed(0, s) for s in ids[i : i + batch]], dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                generate_with_taps(G, G.mapping(z), lab.tap_spec)
        sync()

    def label(ids: list[int]) -> None:
        generate_samples(G, lab, ids, 0, batch=batch, precision=prec, device=dev, compile_labels=compile_labels)

    ids = list(range(n))
    out: dict = {"device": str(dev), "res": G.resolution, "n": n, "batch": batch, "workers": workers, "torch_threads": torch_threads,
                 "threads": workers * torch_threads, "precision": prec, "samples_per_shard": samples_per_shard,
                 "labeler": {"members": cfg.members, "hidden": list(cfg.hidden)}, "compile": compile_labels}
    for name, fn in (("gen_sps", gen_only), ("label_sps", label)):
        run_workers(workers, lambda k: fn(list(range(batch))))  # warm-up: one batch per worker
        wall = run_workers(workers, lambda k, fn=fn: fn(split(ids, workers)[k]))
        out[name] = round(n / wall, 1)
        log(f"# {name:10s} {out[name]:8.1f} samples/s ({n} samples, {wall:.1f} s)")

    path = os.path.join(out_dir, "throughput-ds")
    num_shards = -(-n // samples_per_shard)
    store = storage.ShardStore.create(
        path, num_samples=num_shards * samples_per_shard, image_shape=(G.resolution, G.resolution),
        label_shape=(G.resolution, G.resolution), label_dtype="uint8", schema={"class_names": list(CLASSES)},
        samples_per_shard=samples_per_shard, w_shape=(G.num_ws, G.w_dim), provenance={"bench": "throughput"},
    )
    store.writer = writer
    out["writer"] = store.resolved_writer()
    wall = run_workers(workers, lambda k: generate_shards(
        G, lab, store, split(list(range(num_shards)), workers)[k], 0, batch=batch, precision=prec, device=dev,
        compile_labels=compile_labels))
    out["commit_sps"] = round(store.num_samples / wall, 1)
    log(f"# commit_sps {out['commit_sps']:8.1f} samples/s ({store.num_samples} samples, {wall:.1f} s)")
    out["read_sps_shuffled"] = out["read_sps_random"] = None
    reader = os.path.join(ROOT, "bench", "read_throughput.py")
    if read and os.path.exists(reader):
        spec = importlib.util.spec_from_file_location("read_throughput", reader)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        r = mod.read_throughput(path)
        out["read_sps_shuffled"], out["read_sps_random"] = r.get("read_sps_shuffled"), r.get("read_sps_random")
        log(f"# read       shuffled {out['read_sps_shuffled']} random {out['read_sps_random']} samples/s")
    if compile_labels:  # where compilation failed, the labels came from the eager path: say so
        out["compile_failed"] = COMPILED.failed
    out["label_over_gen"] = round(out["label_sps"] / out["gen_sps"], 3)
    out["targets"] = TARGETS
    out["targets_met"] = {
        "label_over_gen": out["label_over_gen"] >= TARGETS["label_over_gen_min"],
        "commit_sps": out["commit_sps"] >= TARGETS["commit_sps_min"],
        "read_sps_shuffled": None if out["read_sps_shuffled"] is None
        else out["read_sps_shuffled"] >= TARGETS["read_sps_shuffled_min"],
    }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=512, help="samples per phase")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--no-read", action="store_true", help="skip the reader phase")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:k]")
    p.add_argument("--res", type=int, default=64, help="64: the shipped model; else a random StyleGAN2 of this size")
    p.add_argument("--members", type=int, default=None, help="labeler ensemble size (default: HandsOffConfig's)")
    p.add_argument("--hidden", default=None, help="labeler hidden widths, e.g. 128,32 (default: HandsOffConfig's)")
    p.add_argument("--compile", action="store_true", help="label with the compiled pass (GenerateSection.compile)")
    p.add_argument("--writer", choices=("auto", "zarr", "zarrs"), default="auto", help="the store's shard encoder (ShardStore.writer)")
    a = p.parse_args(argv)
    shape: dict = {}
    if a.members is not None:
        shape["members"] = a.members
    if a.hidden:
        shape["hidden"] = tuple(int(x) for x in a.hidden.split(","))
    with tempfile.TemporaryDirectory(prefix="lf-throughput-") as tmp:
        out = measure(a.n, a.batch, a.workers, a.torch_threads, a.precision, a.samples_per_shard, tmp,
                      read=not a.no_read, log=lambda s: print(s, flush=True), device=a.device, res=a.res,
                      labeler=HandsOffConfig(**shape), writer=a.writer, compile_labels=a.compile)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
