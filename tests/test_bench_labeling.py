"""bench/labeling.py on a tiny generator: naive == ours (fp32), ours_bf16 within its bar, and the
JSON line has its keys."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_labeling", ROOT / "bench" / "labeling.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster and immune to OpenMP stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(bench, **kw):
    base = dict(
        res=32, batch=2, channel_base=512, channel_max=32, z_dim=32, w_dim=32, map_layers=2,
        members=2, hidden=(32, 8), classes=5, warmup=0, reps=1, seed=3, threads=1,
    )
    return bench.BenchConfig(**{**base, **kw})


@pytest.mark.parametrize("tile_pixels,flip_bn", [(300, False), (32, False), (1024, False), (300, True)])
def test_naive_and_ours_same_labels(bench, tile_pixels, flip_bn):
    """flip_bn: some first-layer BN scales negative, so ours cannot move the scale past the ReLU into
    the second layer and folds it into a copy of the first layer's weight instead."""
    cfg = tiny_cfg(bench, tile_pixels=tile_pixels)
    G, labeler, ws = bench.setup(cfg)
    if flip_bn:
        with torch.no_grad():
            labeler.net.bn1.weight[::3] *= -1
    batch = bench.generate(G, labeler, ws)
    label_n, js_n = bench.naive_label(bench.naive_members(labeler), batch.taps, cfg.res)
    ours = labeler.label(batch)
    assert label_n.shape == ours.label.shape == (2, 32, 32)
    # a real label map (several classes), not one class everywhere
    assert torch.bincount(label_n.flatten().long(), minlength=cfg.classes).gt(20).sum() >= 2
    assert (label_n == ours.label).float().mean() >= 0.999
    assert torch.allclose(js_n, ours.uncertainty, atol=1e-5)
    assert js_n.max() > 1e-3  # the members disagree somewhere


def test_run_all_json_keys(bench):
    cfg = tiny_cfg(bench, warm_libraries=False)
    summary = bench.run_all(cfg, in_process=True, log=lambda s: None)
    line = json.dumps(summary)  # serialisable as the final stdout line
    out = json.loads(line)
    for k in (
        "gen_ms", "naive_ms", "ours_ms", "naive_peak_mb", "ours_peak_mb", "res", "batch", "channels",
        "hypercolumn_C", "members", "hidden", "speedup", "mem_ratio", "ours_minus_gen_over_gen",
        "threads", "device", "ours_bf16_ms", "speedup_bf16", "gen_bf16_ms", "ours_bf16_over_gen_bf16",
        "targets_met", "gflop_per_image",
    ):
        assert k in out, k
    assert out["hypercolumn_C"] == sum(bench.tap_info(cfg)[0])
    assert out["agreement_failures"] == []
    assert out["agree_ours_vs_naive"] >= 0.999 and out["agree_ours_bf16_vs_naive"] >= 0.99
    assert all(out[k] > 0 for k in ("gen_ms", "naive_ms", "ours_ms", "ours_bf16_ms"))


def test_cli_last_line_is_json(bench, capsys):
    rc = bench.main([
        "--quick", "--in-process", "--res", "16", "--channel-base", "256", "--channel-max", "16",
        "--members", "2", "--classes", "3", "--phases", "ours,naive", "--threads", "1",
    ])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    out = json.loads(last)
    assert out["res"] == 16 and out["batch"] == 1 and out["members"] == 2
    assert {"gen_ms", "naive_ms", "ours_ms", "naive_peak_mb", "ours_peak_mb", "speedup"} <= out.keys()
