"""bench/scale_monitor.py: counts committed shards from the manifest parts, sums a process tree's RSS,
and its per-block rates leave out the time between two jobs."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mon():
    spec = importlib.util.spec_from_file_location("bench_scale_monitor", ROOT / "bench" / "scale_monitor.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_committed_counts_manifest_parts_only(tmp_path, mon):
    ds = tmp_path / "datasets" / "abc"
    (ds / "manifest").mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps({"num_samples": 300, "num_shards": 3, "samples_per_shard": 128}))
    for i in (0, 2):
        (ds / "manifest" / f"shard-{i:06d}.parquet").write_bytes(b"x")
    (ds / "manifest" / "shard-000001.parquet.tmp-123").write_bytes(b"x")  # an uncommitted temp file
    assert mon.newest_dataset(tmp_path) == ds
    assert mon.committed(ds) == (2, 256)
    (ds / "manifest" / "shard-000001.parquet").write_bytes(b"x")
    assert mon.committed(ds) == (3, 300)  # the short last shard: never more than num_samples


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc (Linux)")
def test_tree_rss_includes_this_process(mon):
    assert mon.tree_rss_mb(os.getpid()) > 10  # a Python process with pytest loaded


def test_summary_rates_per_block_skip_the_gap_between_jobs(tmp_path, mon):
    csv = tmp_path / "m.csv"
    rows = [(0, 0, 0, 100, 0), (60, 10, 600, 120, 6), (120, 20, 1200, 125, 12),  # job 1: 10 samples/s
            (5000, 20, 1200, 50, 12), (5060, 40, 2400, 130, 24)]  # restarted: 20 samples/s
    csv.write_text("time,shards,samples,rss_mb,disk_mb\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    s = mon.summarise(csv, block=1000)
    assert [b["samples_per_s"] for b in s["blocks"]] == [10.0, 20.0]  # the 4,880 s gap counts nowhere
    assert s["samples"] == 2400 and s["rss_max_mb"] == 130 and s["disk_mb_per_1k"] == 10.0
