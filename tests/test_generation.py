"""Mass generation: the pipelined shard loop commits the same bytes as shard-by-shard generation,
surfaces a failed write, and the bf16 precision keeps the arrays' contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import storage
from labelfoundry.generation import generate_samples, generate_shards
from labelfoundry.generators import Generator
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler

CLASSES = ["bg", "a", "b"]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    G = Generator(resolution=16, channel_base=128, channel_max=16, z_dim=16, w_dim=16, map_layers=2).eval()
    cfg = HandsOffConfig(members=2, hidden=(8, 4))
    lab = HandsOffLabeler(cfg, cfg.tap_spec.channels(G.tap_channels), 16, len(CLASSES)).eval()
    return G, lab


def _store(path, G, n=12, per_shard=4):
    return storage.ShardStore.create(
        str(path), num_samples=n, image_shape=(16, 16), label_shape=(16, 16), label_dtype="uint8",
        schema={"class_names": CLASSES}, samples_per_shard=per_shard, w_shape=(G.num_ws, G.w_dim),
    )


def test_pipelined_shards_equal_shard_by_shard_generation(tmp_path, models):
    G, lab = models
    store = _store(tmp_path / "ds", G)
    seen = []
    done = generate_shards(G, lab, store, [2, 0, 1], run_seed=7, batch=3, on_commit=lambda i, n: seen.append((i, n)))
    assert done == [2, 0, 1] and seen == [(2, 4), (0, 4), (1, 4)]
    assert sorted(store.committed_shards()) == [0, 1, 2]
    for idx in range(3):
        arrays, cols = generate_samples(G, lab, list(store.shard_range(idx)), 7, batch=3)
        got = store.read_sample(idx * 4 + 1)
        for name in ("image", "label", "uncertainty", "w"):
            np.testing.assert_array_equal(got[name], arrays[name][1])
    m = store.manifest()
    assert list(m["sample_id"]) == list(range(12))


class _FailingSink:
    """Accepts shard 0, fails on shard 1: the error must reach the caller, later shards not be committed."""

    def __init__(self):
        self.written = []

    def shard_range(self, index):
        return range(index * 2, index * 2 + 2)

    def write_shard(self, index, samples, rows):
        if index == 1:
            raise OSError("disk full")
        self.written.append(index)


def test_a_failed_write_raises_and_stops(models):
    G, lab = models
    sink = _FailingSink()
    with pytest.raises(OSError, match="disk full"):
        generate_shards(G, lab, sink, [0, 1, 2, 3], run_seed=0, batch=2)
    assert sink.written == [0]  # shard 2 may be generated while 1 is written, never committed


def test_bf16_precision_keeps_the_array_contract(models):
    G, lab = models
    fp32, c32 = generate_samples(G, lab, list(range(4)), 1, precision="fp32")
    bf16, c16 = generate_samples(G, lab, list(range(4)), 1, precision="bf16")
    for name in fp32:
        assert bf16[name].dtype == fp32[name].dtype and bf16[name].shape == fp32[name].shape
    np.testing.assert_array_equal(bf16["w"], fp32["w"])  # latents are fp32 either way
    assert np.abs(bf16["image"].astype(int) - fp32["image"].astype(int)).mean() < 2.0
    assert np.isfinite(bf16["uncertainty"]).all() and np.isfinite(c16["score"]).all()
    with pytest.raises(ValueError, match="precision"):
        generate_samples(G, lab, [0], 1, precision="fp16")
