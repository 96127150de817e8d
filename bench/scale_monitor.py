"""Watch a long `labelfoundry generate` run: committed samples, the process tree's RSS and the dataset's
disk use over time, one CSV row per interval; `--summarise` turns the CSV into the per-block table of
docs/scale.md. Runs beside the job (it only lists files and reads /proc: no torch, no zarr decoding).

    labelfoundry generate configs/scale.yaml --run-dir runs/scale &          # the job (resumable)
    python bench/scale_monitor.py runs/scale --pid $! --out runs/scale/monitor.csv
    python bench/scale_monitor.py runs/scale --summarise runs/scale/monitor.csv --block 50000

Samples are counted from committed shards (manifest parts) times `samples_per_shard` from
dataset.json (the last shard may be short: the count is exact to one shard). RSS is the sum over the
watched process and its descendants (the Prefect server the CLI starts is one of them). A restarted
job appends to the same CSV; the summary measures rates only within a job's own rows (a gap longer
than 3 intervals starts a new segment), so the time between jobs never counts as slow generation.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from storage.fsio import resolve  # noqa: E402
from storage.manifest import committed_indices  # noqa: E402

FIELDS = ["time", "shards", "samples", "rss_mb", "disk_mb"]


def newest_dataset(run_dir: Path) -> Path | None:
    """The dataset the job is writing: the most recently created directory under datasets/."""
    found = sorted((p for p in (run_dir / "datasets").glob("*/dataset.json")), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def committed(ds: Path) -> tuple[int, int]:
    """(committed shards, samples in them to one shard's precision)."""
    meta = json.loads((ds / "dataset.json").read_text())
    shards = len(committed_indices(resolve(ds), int(meta["num_shards"])))
    return shards, min(shards * int(meta["samples_per_shard"]), int(meta["num_samples"]))


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and every descendant, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            pages = int(Path(entry.path, "statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(entry.name))
        rss[int(entry.name)] = pages
    todo, total = [pid], 0
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def disk_mb(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total / 2**20


def watch(run_dir: Path, pid: int, out: Path, interval: float) -> None:
    new = not out.exists()
    with out.open("a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(FIELDS)
        while Path(f"/proc/{pid}").exists():
            ds = newest_dataset(run_dir)
            if ds is not None and (ds / "manifest").is_dir():
                shards, samples = committed(ds)
                w.writerow([round(time.time(), 1), shards, samples, round(tree_rss_mb(pid), 1), round(disk_mb(ds), 1)])
                fh.flush()
            time.sleep(interval)


def summarise(path: Path, block: int) -> dict:
    rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(path.open())]
    if len(rows) < 2:
        raise SystemExit(f"{path}: fewer than two rows; let the monitor run longer")
    step = min(b["time"] - a["time"] for a, b in zip(rows, rows[1:]) if b["time"] > a["time"])
    blocks: dict[int, dict[str, float]] = {}
    for a, b in zip(rows, rows[1:]):
        if b["time"] - a["time"] > 3 * step or b["samples"] < a["samples"]:
            continue  # between two jobs (or a new dataset): not generation time
        k = int(a["samples"] // block)
        agg = blocks.setdefault(k, {"samples": 0.0, "seconds": 0.0, "rss_max_mb": 0.0})
        agg["samples"] += b["samples"] - a["samples"]
        agg["seconds"] += b["time"] - a["time"]
        agg["rss_max_mb"] = max(agg["rss_max_mb"], a["rss_mb"], b["rss_mb"])
    table = [{"block": f"{k * block:,}-{(k + 1) * block:,}", "samples_per_s": round(v["samples"] / v["seconds"], 2),
              "rss_max_mb": v["rss_max_mb"]} for k, v in sorted(blocks.items()) if v["seconds"] > 0]
    last = rows[-1]
    return {"samples": int(last["samples"]), "disk_mb": last["disk_mb"],
            "disk_mb_per_1k": round(last["disk_mb"] / max(last["samples"], 1) * 1000, 2),
            "rss_max_mb": max(r["rss_mb"] for r in rows), "blocks": table}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--pid", type=int, help="the generate job's process id (watch until it exits)")
    p.add_argument("--out", type=Path, help="CSV to append to")
    p.add_argument("--interval", type=float, default=60.0)
    p.add_argument("--summarise", type=Path, help="a monitor CSV: print the per-block table as JSON")
    p.add_argument("--block", type=int, default=50_000)
    a = p.parse_args(argv)
    if a.summarise:
        print(json.dumps(summarise(a.summarise, a.block)))
        return 0
    if a.pid is None or a.out is None:
        p.error("watching needs --pid and --out")
    watch(a.run_dir, a.pid, a.out, a.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
