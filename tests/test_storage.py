"""Tests for storage/: layout, commit protocol, verify, readers, filters, errors.

Every backend-dependent test runs on a local directory (written by zarrs where it is installed,
and by zarr-python) and on a unique ``memory://`` URL (the memory filesystem is process-global).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import fsspec
import numpy as np
import pandas as pd
import pytest

import storage
from storage import (
    CorruptShardError,
    FormatVersionError,
    LayoutMismatchError,
    MissingChunkError,
    NotADatasetError,
    ReadOnlyError,
    SampleValidationError,
    ShardCommittedError,
    ShardIndexError,
    ShardStore,
    UncommittedShardError,
    open_dataset,
    sample_checksum,
    shard_seed,
    verify,
)

N, S, H, W = 18, 4, 8, 8  # 5 shards, the last one partial (2 samples)
CLASSES = ["background", "car", "road sign"]
RUN_SEED = 1234


@pytest.fixture(params=["local", "local-zarr", "memory"])
def url(request, tmp_path, monkeypatch):
    if request.param.startswith("local"):
        if request.param == "local-zarr":  # zarr-python's writer on local disk ("local": zarrs where installed)
            monkeypatch.setattr(ShardStore, "writer", "zarr")
        yield str(tmp_path / "ds")
        return
    name = f"memory://lf-storage-test-{uuid.uuid4().hex}"
    yield name
    fs, path = fsspec.core.url_to_fs(name)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _fs(url):
    return fsspec.core.url_to_fs(url)


def _create(url, **overrides):
    kwargs = dict(
        num_samples=N,
        image_shape=(H, W),
        label_shape=(H, W),
        label_dtype="uint8",
        schema={"class_names": CLASSES, "colors": [[0, 0, 0], [255, 0, 0], [0, 0, 255]]},
        samples_per_shard=S,
        w_shape=(2, 4),
        provenance={"generator": "g-abc", "labeler": "l-def", "code_version": "test"},
    )
    kwargs.update(overrides)
    return ShardStore.create(url, **kwargs)


def make_samples(store: ShardStore, index: int, run_seed: int = RUN_SEED):
    """Deterministic fake generator output for one shard (seeded by shard_seed)."""
    n = len(store.shard_range(index))
    rng = np.random.default_rng(shard_seed(run_seed, index))
    samples = {
        "image": rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8),
        "label": rng.integers(0, len(CLASSES), (n, H, W), dtype=np.uint8),
        "uncertainty": rng.random((n, H, W)).astype(np.float16),
        "w": rng.standard_normal((n, 2, 4)).astype(np.float32),
    }
    samples["label"][0] = 0  # an all-background label must still be stored
    rows = pd.DataFrame(
        {
            "seed": rng.integers(0, 2**31, n),
            "score": rng.random(n),
            "score_top10": rng.random(n),
            "truncation_psi": np.full(n, 0.7),
        }
    )
    return samples, rows


def write_all(store: ShardStore) -> dict[int, tuple[dict, pd.DataFrame]]:
    written = {}
    for i in range(store.num_shards):
        written[i] = make_samples(store, i)
        store.write_shard(i, *written[i])
    return written


def shard_bytes(url: str, store: ShardStore, array: str, index: int) -> bytes:
    fs, root = _fs(url)
    return fs.cat_file(f"{root}/{store.layout.shard_file_key(array, index)}")


# ---------------------------------------------------------------- round trip
def test_round_trip(url):
    store = _create(url)
    assert (store.num_shards, store.samples_per_shard, store.num_samples) == (5, S, N)
    assert store.shard_range(4) == range(16, 18)
    written = write_all(store)

    reopened = ShardStore.open(url)
    assert reopened.committed_shards() == [0, 1, 2, 3, 4]
    assert reopened.uncommitted_shards() == []
    assert reopened.info["provenance"]["generator"] == "g-abc"
    assert reopened.info["schema"]["class_names"] == CLASSES

    manifest = reopened.manifest()
    assert manifest["sample_id"].tolist() == list(range(N))
    assert manifest["shard"].tolist() == [i // S for i in range(N)]
    assert {"seed", "score", "score_top10", "checksum", "truncation_psi"} <= set(manifest.columns)
    frac_cols = ["frac_background", "frac_car", "frac_road_sign"]
    assert all(manifest[c].dtype == np.float32 for c in frac_cols)
    np.testing.assert_allclose(manifest[frac_cols].sum(axis=1), 1.0, rtol=1e-6)

    for index, (samples, rows) in written.items():
        for j, sample_id in enumerate(store.shard_range(index)):
            got = reopened.read_sample(sample_id)
            for name, array in samples.items():
                np.testing.assert_array_equal(got[name], array[j])
            row = manifest.iloc[sample_id]
            assert row["seed"] == rows["seed"][j]
            expected = sample_checksum(samples["image"][j], samples["label"][j], samples["uncertainty"][j])
            assert row["checksum"] == expected
            expected_frac = (samples["label"][j] == 1).mean()
            assert row["frac_car"] == pytest.approx(expected_frac)
    assert verify(url).ok


def test_zarrs_writer_stages_and_publishes_shards_atomically(tmp_path):
    pytest.importorskip("zarrs")
    import gc
    import os

    import platform

    url = str(tmp_path / "ds")
    store = _create(url)
    store.writer = "zarrs"
    dead = tmp_path / "ds" / f"staging-{platform.node()}-999999999-deadbeef"  # left by a killed process
    live = tmp_path / "ds" / f"staging-{platform.node()}-1-0123abcd"  # pid 1 is alive: kept
    for d in (dead, live):
        (d / "image" / "c").mkdir(parents=True)
    written = {}
    for i in range(store.num_shards):
        samples, rows = make_samples(store, i)
        if i < 4:  # shard 4 keeps its all-background label: zarrs would leave that chunk out, zarr-python writes it
            samples["label"][0] = 1
        written[i] = samples
        store.write_shard(i, samples, rows)
        if i == 0:  # the same data encoded again: the same bytes (one encoder thread, fixed chunk order)
            again = _create(str(tmp_path / "again"))
            again.writer = "zarrs"
            for _ in range(3):
                again.write_shard(0, samples, rows, overwrite=True)
                assert shard_bytes(str(tmp_path / "again"), again, "image", 0) == shard_bytes(url, store, "image", 0)
    assert not dead.exists() and live.exists()
    live.rename(tmp_path / "kept")
    staging = [p for p in os.listdir(url) if p.startswith("staging-")]
    assert len(staging) == 1  # one private copy of the arrays per store object ...
    left = [f for d, _, fs in os.walk(tmp_path / "ds" / staging[0]) for f in fs if f != "zarr.json"]
    assert left == []  # ... and every shard file was moved out of it into data.zarr
    key = tmp_path / "ds" / store.layout.shard_file_key("image", 1)
    inode = key.stat().st_ino
    samples = written[1]
    store.write_shard(1, {**samples, "image": samples["image"][::-1].copy()}, make_samples(store, 1)[1], overwrite=True)
    assert key.stat().st_ino != inode  # replaced by a rename, never rewritten in place
    # plain zarr-python (the store's reader) reads what zarrs encoded
    reopened = ShardStore.open(url)
    got = [reopened.read_sample(i) for i in store.shard_range(1)]
    np.testing.assert_array_equal(np.stack([g["label"] for g in got]), samples["label"])
    np.testing.assert_array_equal(np.stack([g["image"] for g in got]), samples["image"][::-1])
    assert (reopened.read_sample(store.shard_range(4)[0])["label"] == 0).all()
    assert verify(url).ok
    del store
    gc.collect()
    assert not [p for p in os.listdir(url) if p.startswith("staging-")]  # removed with the store


def test_threads_writing_with_zarrs_leave_zarrs_config_alone(tmp_path):
    """zarr's config is process-wide: stores opening zarrs staging arrays and plain readers on many
    threads at once must neither hand each other their settings nor leave one behind."""
    pytest.importorskip("zarrs")
    import threading

    import zarr

    before = (zarr.config.get("codec_pipeline.path"), zarr.config.get("array.write_empty_chunks"),
              zarr.config.get("threading.max_workers"))
    errors = []

    def body(k: int) -> None:
        try:
            for r in range(3):
                url = str(tmp_path / f"ds-{k}-{r}")
                store = _create(url)
                write_all(store)  # shards with and without all-zero samples: both encoders
                samples, rows = make_samples(store, 1)
                samples["label"][0] = 1
                store.write_shard(1, samples, rows, overwrite=True)
                assert verify(url).ok
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    after = (zarr.config.get("codec_pipeline.path"), zarr.config.get("array.write_empty_chunks"),
             zarr.config.get("threading.max_workers"))
    assert after == before


def test_writer_choice_errors(tmp_path):
    store = _create(f"memory://lf-storage-test-{uuid.uuid4().hex}")
    assert store.resolved_writer() == "zarr"  # fsspec URLs: zarr-python only
    store.writer = "zarrs"
    with pytest.raises(ValueError, match="local dataset"):
        store.write_shard(0, *make_samples(store, 0))
    store.writer = "fast"
    with pytest.raises(ValueError, match="one of"):
        store.resolved_writer()


def test_float16_heatmap_labels_round_trip(tmp_path):
    url = str(tmp_path / "heat")
    store = ShardStore.create(
        url, num_samples=5, image_shape=(H, W), label_shape=(3, H, W), label_dtype="float16",
        schema={"keypoint_names": ["a", "b", "c"]}, samples_per_shard=2, with_uncertainty=False,
    )
    rng = np.random.default_rng(0)
    for i in range(store.num_shards):
        n = len(store.shard_range(i))
        samples = {"image": rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8),
                   "label": rng.random((n, 3, H, W)).astype(np.float16)}
        store.write_shard(i, samples, {"seed": np.arange(n), "score": np.zeros(n), "score_top10": np.zeros(n)})
        np.testing.assert_array_equal(store.read_sample(store.shard_range(i)[0])["label"], samples["label"][0])
    assert not any(c.startswith("frac_") for c in store.manifest().columns)
    assert verify(url).ok


# ----------------------------------------------------------- commit protocol
def test_uncommitted_shard_is_invisible_and_rewrite_is_idempotent(url, monkeypatch):
    store = _create(url)
    store.write_shard(0, *make_samples(store, 0))

    def crash(*args, **kwargs):
        raise RuntimeError("worker killed before commit")

    monkeypatch.setattr(storage.store._manifest, "write_part", crash)
    with pytest.raises(RuntimeError):
        store.write_shard(1, *make_samples(store, 1))
    monkeypatch.undo()

    # data for shard 1 is on disk, but without its manifest part it is not committed
    assert shard_bytes(url, store, "image", 1)
    assert store.committed_shards() == [0]
    assert store.uncommitted_shards() == [1, 2, 3, 4]
    assert store.manifest()["sample_id"].tolist() == list(range(0, S))
    with pytest.raises(UncommittedShardError, match="shard-000001.parquet"):
        store.read_sample(S)
    assert open_dataset(url, filter=None).sample_ids.tolist() == list(range(S))

    # resume: regenerate only uncommitted shards; rewriting gives identical bytes
    before = {a: shard_bytes(url, store, a, 1) for a in store.layout.arrays}
    for index in store.uncommitted_shards():
        store.write_shard(index, *make_samples(store, index))
    assert {a: shard_bytes(url, store, a, 1) for a in store.layout.arrays} == before
    assert store.uncommitted_shards() == []
    manifest = store.manifest()

    # writing a committed shard again with the same data is a no-op ...
    store.write_shard(1, *make_samples(store, 1))
    pd.testing.assert_frame_equal(store.manifest(), manifest)
    # ... different data is refused unless overwrite=True
    with pytest.raises(ShardCommittedError, match="shard-000001.parquet"):
        store.write_shard(1, *make_samples(store, 1, run_seed=99))
    store.write_shard(1, *make_samples(store, 1, run_seed=99), overwrite=True)
    assert verify(url).ok
    assert store.manifest().loc[S, "checksum"] != manifest.loc[S, "checksum"]

    # no temp files left behind by atomic writes
    fs, root = _fs(url)
    assert [p for p in fs.find(root) if "/." in p[len(root):]] == []


def test_concurrent_writers_and_pickling(url):
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    store = _create(url)
    clone = pickle.loads(pickle.dumps(store))  # what a Prefect/Dask task receives

    def write(i: int) -> None:
        samples, rows = make_samples(clone, i)
        if i % 2 == 0:  # no all-background label: encoded by zarrs where it is the writer
            samples["label"][0] = 1
        clone.write_shard(i, samples, rows)

    with ThreadPoolExecutor(3) as pool:  # one writer per shard, several at once, on one store object
        list(pool.map(write, range(store.num_shards)))
    assert store.committed_shards() == list(range(5)) and verify(url).ok
    again = pickle.loads(pickle.dumps(clone))  # after writing: the copy opens its own staging, if any
    assert again._staged is None
    again.write_shard(0, *make_samples(again, 0), overwrite=True)
    assert verify(url).ok
    ds = open_dataset(url).dataset() if _has_torch() else None
    if ds is not None:
        ds[0]
        restored = pickle.loads(pickle.dumps(ds))  # no open zarr handle travels to workers
        assert restored._reader._reader is None
        assert restored[0]["sample_id"] == ds[0]["sample_id"]


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# -------------------------------------------------------------------- verify
def _flip_middle(data: bytes) -> bytes:
    mid = len(data) // 3
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 16]) + data[mid + 16 :]


@pytest.mark.parametrize(
    "array, damage",
    [("image", _flip_middle), ("label", lambda d: d[: len(d) // 2]), ("uncertainty", lambda d: b"")],
    ids=["corrupt-chunk", "truncated", "emptied"],
)
def test_verify_detects_damaged_shard(url, array, damage):
    store = _create(url)
    write_all(store)
    fs, root = _fs(url)
    key = f"{root}/{store.layout.shard_file_key(array, 3)}"
    fs.pipe_file(key, damage(fs.cat_file(key)))

    report = verify(url)
    assert not report.ok
    assert report.bad_shards == [3]
    text = str(report)
    assert f"{array}/c/3/" in text
    assert "manifest/shard-000003.parquet and re-run generation to regenerate it" in text
    with pytest.raises(CorruptShardError):
        report.raise_if_bad()
    # reading the damaged shard raises too, never returns silent garbage/zeros
    with pytest.raises((CorruptShardError, MissingChunkError)):
        for sample_id in store.shard_range(3):
            got = ShardStore.open(url).read_sample(sample_id)
            assert sample_checksum(got["image"], got["label"], got["uncertainty"]) == \
                store.manifest().loc[sample_id, "checksum"]


def test_verify_reports_checksum_mismatch_when_codec_cannot_tell(tmp_path):
    url = str(tmp_path / "raw")
    store = _create(url, compression="none")  # no codec checksum: only sha256 can notice
    write_all(store)
    fs, root = _fs(url)
    key = f"{root}/{store.layout.shard_file_key('image', 1)}"
    data = bytearray(fs.cat_file(key))
    data[10] ^= 0xFF  # inside sample 4's raw pixels
    fs.pipe_file(key, bytes(data))
    report = verify(url)
    assert report.bad_shards == [1]
    assert "checksum mismatch for sample(s) [4]" in str(report)
    assert "image/c/1/0/0/0" in str(report)


def test_missing_chunk_raises_instead_of_zeros(url):
    store = _create(url)
    write_all(store)
    fs, root = _fs(url)
    fs.rm_file(f"{root}/{store.layout.shard_file_key('image', 2)}")

    reader = ShardStore.open(url)
    reader.read_sample(0)  # other shards still readable
    with pytest.raises(MissingChunkError, match=r"image/c/2/0/0/0.*shard-000002.parquet"):
        reader.read_sample(2 * S)
    try:
        import torch  # noqa: F401  (the torch Dataset must fail the same way)
    except ImportError:
        pass
    else:
        with pytest.raises(MissingChunkError):
            open_dataset(url).dataset()[2 * S]
    assert verify(url).bad_shards == [2]


# -------------------------------------------------------------------- reader
def test_partition_covers_every_sample_exactly_once():
    pytest.importorskip("torch")
    from storage.shuffle import epoch_order, partition

    ids = np.arange(3, 40, 3)
    for world in (1, 2, 3):
        for workers in (1, 2, 3):
            for batch in (1, 2):
                order = epoch_order(ids, samples_per_shard=4, shuffle="py1b", seed=7, epoch=1)
                parts = [partition(order, rank=r, world_size=world, worker=w, num_workers=workers,
                                   batch_size=batch, drop_last=False)
                         for r in range(world) for w in range(workers)]
                seen = np.concatenate(parts)
                assert sorted(seen.tolist()) == ids.tolist()
    a = epoch_order(ids, samples_per_shard=4, seed=7, epoch=1)
    assert a.tolist() == epoch_order(ids, samples_per_shard=4, seed=7, epoch=1).tolist()
    assert a.tolist() != epoch_order(ids, samples_per_shard=4, seed=7, epoch=2).tolist()
    even = [len(partition(a, rank=r, world_size=5, worker=0, num_workers=1, drop_last=True)) for r in range(5)]
    assert len(set(even)) == 1


def test_dataloader_ranks_and_workers_see_each_sample_once(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    url = str(tmp_path / "ds")
    store = _create(url)
    write_all(store)
    opened = open_dataset(url, filter="shard != 1")
    selected = opened.sample_ids.tolist()
    assert sorted(selected) == [i for i in range(N) if i // S != 1]  # every sample but shard 1's

    seen = []
    for rank in range(2):
        ds = opened.iterable(shuffle=True, seed=3, rank=rank, world_size=2)
        ds.set_epoch(1)
        # spawn: workers start clean (no inherited threads from a Prefect server in this process) and
        # receive the dataset pickled, which must carry only the path and ids and open the store lazily
        loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
        got = [int(item["sample_id"]) for item in loader]
        assert len(got) == len(ds)
        seen += got
    assert sorted(seen) == selected  # every selected sample exactly once across 2 ranks x 2 workers

    item = opened.dataset()[0]
    sid = item["sample_id"]
    ref = store.read_sample(sid)
    assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.uint8
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), ref["image"])
    np.testing.assert_array_equal(item["label"].numpy(), ref["label"])
    assert item["uncertainty"].dtype == torch.float16 and item["w"].shape == (2, 4)

    batch = next(iter(DataLoader(opened.dataset(), batch_size=4, num_workers=0)))
    assert batch["image"].shape == (4, 3, H, W)


# ------------------------------------------------------------------- filters
def test_filter_flags_select_without_touching_data(url):
    store = _create(url)
    write_all(store)
    before = {a: shard_bytes(url, store, a, 0) for a in store.layout.arrays}
    ids = store.manifest()["sample_id"]
    flags = pd.DataFrame({"sample_id": ids, "keep": ids % 2 == 0, "reason": np.where(ids % 2, "blurry", "")})
    store.write_flags(flags)

    assert open_dataset(url).sample_ids.tolist() == list(range(0, N, 2))
    assert open_dataset(url, filter=None).sample_ids.tolist() == list(range(N))
    assert open_dataset(url, filter="score > 0.5").sample_ids.tolist() == \
        ids[store.manifest()["score"] > 0.5].tolist()
    assert open_dataset(url, filter=lambda m: m["sample_id"] < 3).sample_ids.tolist() == [0, 1, 2]
    manifest = store.manifest()
    assert manifest.loc[1, "reason"] == "blurry" and bool(manifest.loc[1, "keep_default"]) is False

    # a second filter is ANDed into `keep`
    store.write_flags(pd.DataFrame({"sample_id": ids, "keep": ids < 10}), name="dedup")
    assert open_dataset(url).sample_ids.tolist() == [0, 2, 4, 6, 8]

    assert {a: shard_bytes(url, store, a, 0) for a in store.layout.arrays} == before
    assert verify(url).ok
    with pytest.raises(SampleValidationError, match="not in committed shards"):
        store.write_flags(pd.DataFrame({"sample_id": [N + 5], "keep": [True]}))
    with pytest.raises(SampleValidationError, match="clash"):
        store.write_flags(pd.DataFrame({"sample_id": [0], "keep": [True], "score": [1.0]}), name="x")


# -------------------------------------------------------------------- errors
def test_clear_errors(url):
    with pytest.raises(NotADatasetError, match="dataset.json"):
        ShardStore.open(url)
    with pytest.raises(NotADatasetError):
        open_dataset(url)

    store = _create(url)
    store.write_shard(0, *make_samples(store, 0))
    # a folder holding datasets (directly or in datasets/, as a run directory does) names them
    _create(f"{url}-run/datasets/abc")
    with pytest.raises(NotADatasetError, match=r"It holds 1 dataset\(s\): .*-run/datasets/abc; give one of those"):
        ShardStore.open(f"{url}-run")
    with pytest.raises(NotADatasetError, match=r"labelfoundry generate"):
        ShardStore.open(f"{url}-nowhere")
    fs, path = fsspec.core.url_to_fs(f"{url}-run")
    fs.rm(path, recursive=True)
    # identical layout: idempotent, committed shards survive
    assert _create(url).committed_shards() == [0]
    with pytest.raises(LayoutMismatchError, match="samples_per_shard"):
        _create(url, samples_per_shard=8)
    with pytest.raises(LayoutMismatchError, match="num_samples"):
        _create(url, num_samples=N + 1)
    with pytest.raises(LayoutMismatchError, match="provenance"):
        _create(url, provenance={"generator": "other"})

    with pytest.raises(ShardIndexError, match="0..4"):
        store.shard_range(5)
    with pytest.raises(ShardIndexError):
        store.write_shard(-1, *make_samples(store, 0))
    with pytest.raises(ShardIndexError):
        store.read_sample(N)
    samples, rows = make_samples(store, 1)
    bad = dict(samples, label=samples["label"].astype(np.int32))
    with pytest.raises(SampleValidationError, match="dtype int32"):
        store.write_shard(1, bad, rows)
    with pytest.raises(SampleValidationError, match="missing"):
        store.write_shard(1, {k: v for k, v in samples.items() if k != "w"}, rows)
    with pytest.raises(SampleValidationError, match="score_top10"):
        store.write_shard(1, samples, rows.drop(columns=["score_top10"]))
    with pytest.raises(ReadOnlyError):
        ShardStore.open(url, mode="r").write_shard(1, samples, rows)

    fs, root = _fs(url)
    info = json.loads(fs.cat_file(f"{root}/dataset.json"))
    info["format_version"] = 99
    fs.pipe_file(f"{root}/dataset.json", json.dumps(info).encode())
    with pytest.raises(FormatVersionError, match="format_version=99"):
        ShardStore.open(url)


def test_create_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="class_names"):
        _create(str(tmp_path / "a"), schema={})
    with pytest.raises(ValueError, match="label_dtype"):
        _create(str(tmp_path / "b"), label_dtype="int32")
    with pytest.raises(ValueError, match="JSON"):
        _create(str(tmp_path / "c"), provenance={"obj": object()})


# ------------------------------------------------------------- determinism
def test_shard_seed_is_stable_and_distinct():
    assert shard_seed(0, 0) == shard_seed(0, 0)
    assert shard_seed(1234, 5) == 5032700923330019809  # pinned: must never change
    seeds = {shard_seed(1234, i) for i in range(2000)}
    assert len(seeds) == 2000
    assert shard_seed(1, 0) != shard_seed(2, 0)
    assert all(0 <= s < 2**63 for s in seeds)
    cmd = "from storage import shard_seed; print(shard_seed(1234, 5))"
    other = subprocess.run([sys.executable, "-c", cmd], capture_output=True, text=True, check=True)
    assert int(other.stdout) == shard_seed(1234, 5)  # no PYTHONHASHSEED dependence


def test_same_seed_same_bytes(tmp_path):
    a, b = _create(str(tmp_path / "a")), _create(str(tmp_path / "b"))
    for store in (a, b):
        for i in (0, 4):
            store.write_shard(i, *make_samples(store, i))
    for array in a.layout.arrays:
        for i in (0, 4):
            assert shard_bytes(str(tmp_path / "a"), a, array, i) == shard_bytes(str(tmp_path / "b"), b, array, i)
    pd.testing.assert_frame_equal(a.manifest(), b.manifest())


def test_import_storage_does_not_import_torch():
    code = "import sys, storage; storage.ShardStore; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
