"""Tests for the training-job reader: block shuffle, elastic mid-epoch resume, read backends."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from storage import open_dataset  # noqa: E402
from storage.fsio import resolve  # noqa: E402
from storage.read_backends import installed, resolve_backend  # noqa: E402
from storage.reader import buffered_rows  # noqa: E402
from storage.sample_reader import SampleReader  # noqa: E402
from storage.shuffle import epoch_order, partition  # noqa: E402

from .test_storage import S, _create, write_all  # noqa: E402

NUM = 48  # 12 shards of S=4
FAST = [b for b in ("zarrs", "tensorstore") if installed(b)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("reader") / "ds")
    write_all(_create(url, num_samples=NUM))
    return url


# ------------------------------------------------------------ block shuffle
@pytest.mark.parametrize("algorithm", ["py1b", "py1e"])
def test_block_shuffle_is_deterministic_and_covers_every_sample(algorithm):
    ids = np.array([i for i in range(200) if i % 7 != 3])  # a filtered selection, 25 shards of 8
    order = epoch_order(ids, samples_per_shard=8, seed=5, epoch=2, shuffle=algorithm, block_size=24)
    assert sorted(order.tolist()) == ids.tolist()  # a permutation: every sample exactly once
    assert order.tolist() == epoch_order(ids, samples_per_shard=8, seed=5, epoch=2, shuffle=algorithm,
                                         block_size=24).tolist()
    for other in ({"seed": 6, "epoch": 2}, {"seed": 5, "epoch": 3}):
        assert order.tolist() != epoch_order(ids, samples_per_shard=8, shuffle=algorithm, block_size=24,
                                             **other).tolist()
    assert order.tolist() != sorted(order.tolist())
    # shards are visited in a shuffled order, not ascending
    first_seen = list(dict.fromkeys((order // 8).tolist()))
    assert first_seen != sorted(first_seen)
    if algorithm == "py1b":
        # a block of 24 samples draws from at most 5 shards (each holds >= 6 selected samples here)
        for start in range(0, len(order), 24):
            assert len(set((order[start : start + 24] // 8).tolist())) <= 5
    else:
        # py1e moves no sample further than half a block from its shard-ordered position
        from storage.shuffle import shard_major

        rng = np.random.default_rng([5, 2])
        seq = shard_major(ids, 8, rng)
        moved = np.abs(np.argsort(order) - np.argsort(seq))
        assert moved.max() <= 24


def test_order_does_not_depend_on_world_and_is_dealt_in_batches():
    ids = np.arange(50)
    order = epoch_order(ids, samples_per_shard=4, seed=1, epoch=0)
    # after every rank took k batches, exactly order[:k * batch * world] was seen
    batch, world, workers, k = 3, 2, 2, 3
    streams = {(r, w): partition(order, rank=r, world_size=world, worker=w, num_workers=workers, batch_size=batch)
               for r in range(world) for w in range(workers)}
    seen = []
    for r in range(world):
        for j in range(k):  # the DataLoader takes batch j from worker j % workers
            stream = streams[(r, j % workers)]
            seen += stream[(j // workers) * batch : (j // workers + 1) * batch].tolist()
    assert sorted(seen) == sorted(order[: k * batch * world].tolist())


# ------------------------------------------------------------- resume
def _take(opened, state, *, rank, world, batch, workers, steps=None, **kw):
    """Ids one rank's DataLoader yields, ``steps`` batches (None: to the end)."""
    from torch.utils.data import DataLoader

    ds = opened.iterable(shuffle=True, seed=11, block_size=12, batch_size=batch, rank=rank, world_size=world, **kw)
    ds.set_epoch(3)
    if state is not None:
        ds.load_state_dict(state)
    context = "spawn" if workers else None
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, multiprocessing_context=context)
    got = []
    for j, b in enumerate(loader):
        if steps is not None and j == steps:
            break
        got += b["sample_id"].tolist()
    if steps is None:
        assert len(got) == len(ds)
    return got, ds


def test_elastic_resume_sees_every_sample_exactly_once(dataset):
    opened = open_dataset(dataset, filter="sample_id != 5")  # 47 samples: nothing divides evenly
    selected = opened.sample_ids.tolist()
    order = epoch_order(opened.sample_ids, samples_per_shard=S, seed=11, epoch=3, block_size=12).tolist()

    # half an epoch on 2 ranks x 2 workers (batch 3): 4 steps x 3 x 2 = 24 samples
    first = []
    for rank in range(2):
        got, ds = _take(opened, None, rank=rank, world=2, batch=3, workers=2, steps=4)
        first += got
    state = ds.state_dict(samples_seen=24)
    assert sorted(first) == sorted(order[:24])  # what was seen is the order's prefix

    # resume on 3 ranks x 1 worker with batch 2 for 2 steps (12 more), save again
    second = []
    for rank in range(3):
        got, ds = _take(opened, state, rank=rank, world=3, batch=2, workers=0, steps=2)
        second += got
    state = ds.state_dict(samples_seen=24 + 12)
    assert state["epoch"] == 3

    # finish on a single process with batch 5
    third, ds = _take(opened, state, rank=0, world=1, batch=5, workers=0)
    everything = first + second + third
    assert len(everything) == len(selected)
    assert sorted(everything) == selected  # every sample exactly once across three worlds
    assert sorted(second) == sorted(order[24:36])  # the resumed world continued the same order

    # the next epoch starts from the beginning again
    ds.set_epoch(4)
    assert len(ds) == len(selected)


def test_resume_refuses_another_selection_or_seed(dataset):
    state = open_dataset(dataset, filter=None).iterable(seed=1).state_dict(samples_seen=8)
    with pytest.raises(ValueError, match="num_samples.*ids_digest|ids_digest"):
        open_dataset(dataset, filter="sample_id > 3").iterable(seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed \(saved 1, now 2\)"):
        open_dataset(dataset, filter=None).iterable(seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="samples_seen"):
        open_dataset(dataset, filter=None).iterable().state_dict(samples_seen=NUM + 1)


# -------------------------------------------------------------- reading
class _CountingReader(SampleReader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[np.ndarray] = []

    def read_many(self, sample_ids, names=None):
        self.calls.append(np.asarray(sample_ids))
        return super().read_many(sample_ids, names)


@pytest.mark.parametrize("backend", ["zarr", *FAST])
def test_buffered_reads_load_each_shard_once_as_a_whole(dataset, backend):
    from storage.store import read_layout

    root = resolve(dataset)
    reader = _CountingReader(root, read_layout(root)[0], backend)
    ids = epoch_order(np.arange(NUM), samples_per_shard=S, seed=0, epoch=0, block_size=8)
    rows = list(buffered_rows(reader, ids, lookahead=8))
    assert [sid for sid, _ in rows] == ids.tolist()
    loaded = np.concatenate(reader.calls)
    assert sorted(loaded.tolist()) == list(range(NUM))  # no sample read twice
    for call in reader.calls:  # whole shards, a few at a time
        shards = set((call // S).tolist())
        assert len(call) == S * len(shards) and len(shards) <= 4
    plain = SampleReader(root, read_layout(root)[0], "zarr")
    for sid, row in rows[::7]:
        for name, value in plain.read(sid).items():
            np.testing.assert_array_equal(row[name], value)


@pytest.mark.parametrize("backend", FAST or [pytest.param("fast", marks=pytest.mark.skip("no fast backend"))])
def test_fast_backend_reads_byte_identical_arrays(dataset, backend):
    from storage.store import read_layout

    root = resolve(dataset)
    layout = read_layout(root)[0]
    plain, fast = SampleReader(root, layout, "zarr"), SampleReader(root, layout, backend)
    ids = np.random.default_rng(0).permutation(NUM)[:20]
    a, b = plain.read_many(ids), fast.read_many(ids)
    for name in layout.arrays:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes()
        assert plain.read_shard(3)[name].tobytes() == fast.read_shard(3)[name].tobytes()
        assert plain.read(17)[name].tobytes() == fast.read(17)[name].tobytes()

    # the torch datasets yield the same items with either backend
    opened = open_dataset(dataset, filter=None)
    x = list(opened.iterable(seed=2, backend="zarr"))
    y = list(opened.iterable(seed=2, backend=backend))
    assert [i["sample_id"] for i in x] == [i["sample_id"] for i in y]
    assert all(torch.equal(p["image"], q["image"]) and torch.equal(p["uncertainty"], q["uncertainty"])
               for p, q in zip(x, y))
    mapped = opened.dataset(backend=backend)
    batch = mapped.__getitems__([5, 0, 9, 5])  # samplers with replacement repeat ids (oversampling)
    assert [i["sample_id"] for i in batch] == [5, 0, 9, 5]
    assert torch.equal(batch[0]["label"], mapped[5]["label"]) and torch.equal(batch[3]["image"], batch[0]["image"])


def test_in_memory_dataset_gives_the_shard_datasets_items(dataset):
    """A filtered selection read into memory: same ids, same tensors, same transform, as read from shards."""
    opened = open_dataset(dataset, filter=lambda m: m["sample_id"] % 3 != 0)
    names = ["image", "label"]
    mem = opened.in_memory(names, transform=lambda item: {**item, "seen": True})
    shards = opened.dataset()
    assert len(mem) == len(shards) == NUM - NUM // 3
    assert opened.nbytes(names) == sum(mem.arrays[n].nbytes for n in names)
    for i in (0, 7, len(mem) - 1):
        a, b = mem[i], shards[i]
        assert a["seen"] and a["sample_id"] == b["sample_id"] and a["sample_id"] % 3 != 0
        assert set(a) == {*names, "sample_id", "seen"}
        assert all(torch.equal(a[n], b[n]) for n in names)


def test_backend_choice_and_errors(tmp_path):
    memory = resolve("memory://lf-reader-backend")
    assert resolve_backend("auto", memory) == "zarr"  # fast backends read local disk only
    best = "tensorstore" if installed("tensorstore") else "zarrs" if installed("zarrs") else "zarr"
    assert resolve_backend("auto", resolve(str(tmp_path))) == best
    with pytest.raises(ValueError, match="unknown read backend"):
        resolve_backend("fastest", memory)
    for name in FAST:
        with pytest.raises(ValueError, match="local directories only.*backend='zarr'"):
            resolve_backend(name, memory)


def test_forked_process_falls_back_from_a_backend_started_before_fork(tmp_path, monkeypatch):
    """tensorstore aborts and zarrs hangs in a child forked after they ran: such children read with zarr."""
    import os

    from storage import read_backends

    local = resolve(str(tmp_path))
    for name in FAST:  # as if the parent process had used every fast backend before forking us
        monkeypatch.setitem(read_backends._STARTED_IN, name, os.getpid() + 1)
    assert resolve_backend("auto", local) == "zarr"
    for name in FAST:
        with pytest.raises(RuntimeError, match="multiprocessing_context='spawn'"):
            resolve_backend(name, local)


def test_read_throughput_bench_reports_both_rates(dataset):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "read_throughput.py"
    spec = importlib.util.spec_from_file_location("bench_read_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.read_throughput(dataset, backend="zarr", random_reads=5)
    assert result["read_sps_shuffled"] > 0 and result["read_sps_random"] > 0
    assert result["cpu_ms_per_1k_shuffled"] > 0
