"""Damage, repair and concurrency of the shard store: lost manifest parts, truncated or corrupt
shard files, two processes creating one dataset, a full disk.

Each test reproduces a failure a user met (issue 14) and checks the store's answer to it.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

import storage
from storage import ShardStore, verify

from .test_storage import N, S, _create, make_samples, write_all


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for k in range(len(data) // 3, len(data) // 3 + 16):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def _file(url: str, store: ShardStore, array: str, index: int) -> Path:
    return Path(url) / store.layout.shard_file_key(array, index)


def _part(url: str, index: int) -> Path:
    return Path(url) / "manifest" / f"shard-{index:06d}.parquet"


def _all_files(root: Path) -> dict[str, bytes]:
    """Every data and manifest file of a dataset (not dataset.json: it holds the creation time)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and (rel.startswith("data.zarr/") or rel.startswith("manifest/")):
            out[rel] = p.read_bytes()
    return out


# ------------------------------------------------------------------ 1. lost manifest parts
def test_verify_reports_a_lost_manifest_part_by_index_as_incomplete(tmp_path):
    url = str(tmp_path / "ds")
    store = _create(url)
    write_all(store)
    _part(url, 2).unlink()

    report = verify(url)
    assert report.bad == [] and report.ok  # nothing committed is damaged ...
    assert not report.complete and report.uncommitted == [2]  # ... but one of dataset.json's N is missing
    text = str(report)
    assert text.startswith(f"verify {url}: INCOMPLETE")
    assert "4 of 5 shards committed" in text
    assert "shard 2: not committed (no manifest/shard-000002.parquet; its data files are present" in text
    assert "re-run the same `labelfoundry run`/`labelfoundry generate` command" in text


def test_verify_calls_an_in_progress_dataset_incomplete_not_damaged(tmp_path):
    url = str(tmp_path / "ds")
    store = _create(url)
    store.write_shard(0, *make_samples(store, 0))
    report = verify(url)
    assert report.ok and not report.complete and report.uncommitted == [1, 2, 3, 4]
    assert "INCOMPLETE" in str(report) and "DAMAGED" not in str(report)
    assert "shard 3: not committed (no manifest/shard-000003.parquet; no data written yet)" in str(report)


def test_verify_of_a_complete_intact_dataset_says_ok(tmp_path):
    url = str(tmp_path / "ds")
    write_all(_create(url))
    report = verify(url)
    assert report.ok and report.complete
    assert str(report).startswith(f"verify {url}: OK: all 5 shards committed and intact")


# ------------------------------------------------------------------ 2. rewrite and repair
@pytest.mark.parametrize("index", [1, 4], ids=["full-shard", "last-partial-shard"])
@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "corrupt"])
def test_the_fix_verify_prints_works_rewriting_never_reads_the_old_shard(tmp_path, index, damage):
    url = str(tmp_path / "ds")
    store = _create(url)
    written = write_all(store)
    damage(_file(url, store, "image", index))
    assert verify(url).bad_shards == [index]

    _part(url, index).unlink()  # the printed fix: delete the manifest part, re-run generation
    ShardStore.open(url, mode="a").write_shard(index, *written[index])

    report = verify(url)
    assert report.ok and report.complete, str(report)


def test_a_second_writer_of_a_shard_never_deletes_its_readable_files(tmp_path, monkeypatch):
    """Two runs of one config may write the same shard: the second must not delete the files the
    first just committed (only a damaged file is deleted before a rewrite)."""
    import storage.fsio as fsio

    url = str(tmp_path / "ds")
    store = _create(url)
    samples = make_samples(store, 1)
    store.write_shard(1, *samples)
    _part(url, 1).unlink()  # as seen by a writer that checked before the first one committed
    removed: list[str] = []
    real_remove = fsio.Root.remove
    monkeypatch.setattr(fsio.Root, "remove", lambda self, rel: (removed.append(rel), real_remove(self, rel)))
    ShardStore.open(url, mode="a").write_shard(1, *samples)
    assert [r for r in removed if r.startswith("data.zarr/")] == []
    assert verify(url).ok and verify(url).checked == [1]


def test_quick_check_catches_truncation_without_decoding(tmp_path):
    url = str(tmp_path / "ds")
    store = _create(url)
    write_all(store)
    _truncate(_file(url, store, "label", 3))
    _file(url, store, "w", 1).unlink()
    report = verify(url, deep=False)
    assert report.bad_shards == [1, 3]
    assert "label/c/3/0/0" in str(report) and "truncated" in str(report)


def test_repair_uncommits_bad_shards_and_deletes_their_files(tmp_path):
    url = str(tmp_path / "ds")
    store = _create(url)
    written = write_all(store)
    before = _all_files(Path(url))
    _truncate(_file(url, store, "image", 1))
    _flip(_file(url, store, "uncertainty", 3))

    report = storage.repair(url)
    assert report.repaired == [1, 3]
    assert not _part(url, 1).exists() and not _part(url, 3).exists()
    for name in store.layout.arrays:  # damaged chunk files gone: nothing left to read first
        assert not _file(url, store, name, 1).exists() and not _file(url, store, name, 3).exists()
    assert "uncommitted shard(s) [1, 3]" in str(report)
    after = verify(url)
    assert after.ok and after.uncommitted == [1, 3]

    reopened = ShardStore.open(url, mode="a")
    for i in reopened.uncommitted_shards():
        reopened.write_shard(i, *written[i])
    assert verify(url).complete and _all_files(Path(url)) == before


@pytest.fixture(scope="module")
def models():
    import torch

    from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler

    from .conftest import tiny_G

    G = tiny_G(16)
    torch.manual_seed(0)
    cfg = HandsOffConfig(members=2, hidden=(8, 4))
    lab = HandsOffLabeler(cfg, cfg.tap_spec.channels(G.tap_channels), 16, 3).eval()
    return G, lab


def _generated(path: Path, G, lab) -> ShardStore:
    from labelfoundry.generation import generate_shards

    store = ShardStore.create(
        str(path), num_samples=10, image_shape=(16, 16), label_shape=(16, 16), label_dtype="uint8",
        schema={"class_names": ["bg", "a", "b"]}, samples_per_shard=4, w_shape=(G.num_ws, G.w_dim),
    )
    generate_shards(G, lab, store, store.uncommitted_shards(), run_seed=3, batch=4)
    return store


def test_repaired_dataset_regenerates_the_same_bytes_as_an_undamaged_run(tmp_path, models):
    """verify --repair, then the generation skipping committed shards: same bytes as never damaged."""
    from labelfoundry.generation import generate_shards

    G, lab = models
    _generated(tmp_path / "ref", G, lab)
    reference = _all_files(tmp_path / "ref")
    store = _generated(tmp_path / "ds", G, lab)
    url = str(tmp_path / "ds")
    _truncate(_file(url, store, "image", 0))  # the full shards and the last partial one
    _flip(_file(url, store, "label", 2))
    _part(url, 1).unlink()  # and a lost part

    assert storage.repair(url).repaired == [0, 2]
    store = ShardStore.open(url, mode="a")
    assert store.uncommitted_shards() == [0, 1, 2]
    generate_shards(G, lab, store, store.uncommitted_shards(), run_seed=3, batch=4)
    assert verify(url).complete and verify(url).ok
    assert _all_files(tmp_path / "ds") == reference


def test_recheck_uncommits_what_is_bad_and_names_it(tmp_path, caplog):
    """What a re-run of a finished run does before generation: a cheap check, bad shards uncommitted."""
    url = str(tmp_path / "ds")
    store = _create(url)
    write_all(store)
    _truncate(_file(url, store, "image", 2))
    with caplog.at_level("WARNING", logger="storage.verify"):
        report = storage.repair(url, deep=False)
    assert report.repaired == [2] and ShardStore.open(url).uncommitted_shards() == [2]
    assert "shard 2" in caplog.text and "image/c/2/0/0/0" in caplog.text


# ------------------------------------------------------------------ 3. concurrent creation
def _create_and_write(args: tuple[str, int]) -> str:
    url, index = args
    _BARRIER.wait(timeout=60)  # both processes call create at the same moment
    try:
        store = _create(url)
        store.write_shard(index, *make_samples(store, index))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as text
        return f"{type(exc).__name__}: {exc}"
    return "ok"


_BARRIER = None


def _init(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def test_two_processes_creating_one_dataset_at_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    tries = 8
    with ctx.Pool(2, initializer=_init, initargs=(barrier,)) as pool:
        for t in range(tries):
            url = str(tmp_path / f"ds{t}")
            results = pool.map(_create_and_write, [(url, 0), (url, 1)], chunksize=1)
            assert results == ["ok", "ok"], f"try {t}: {results}"
            assert ShardStore.open(url).committed_shards() == [0, 1], f"try {t}"
            assert verify(url).ok


def test_create_never_overwrites_arrays_with_committed_shards(tmp_path):
    url = str(tmp_path / "ds")
    store = _create(url)
    store.write_shard(0, *make_samples(store, 0))
    (Path(url) / "dataset.json").unlink()  # as if another process had not finished creating it
    with pytest.raises(storage.LayoutMismatchError, match="committed shards"):
        _create(url)
    assert _file(url, store, "image", 0).is_file()


# ------------------------------------------------------------------ 4. disk full
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_writing_data_names_the_dataset_and_is_permanent(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    from tasks.common import is_permanent

    url = str(tmp_path / "ds")
    store = _create(url)
    monkeypatch.setattr(LocalStore, "set", _disk_full)
    with pytest.raises(OSError) as info:
        store.write_shard(1, *make_samples(store, 1))
    exc = info.value
    assert exc.errno == errno.ENOSPC and isinstance(exc, storage.DiskFullError) and is_permanent(exc)
    assert url in str(exc) and "image/c/1/0/0/0" in str(exc) and "free space" in str(exc)
    assert store.committed_shards() == []


def test_disk_full_in_the_zarrs_encoder_is_a_disk_full_error(tmp_path):
    """zarrs reports ENOSPC as text ("... (os error 28)"): it must still become DiskFullError."""
    pytest.importorskip("zarrs")
    url = str(tmp_path / "ds")
    store = _create(url)
    store.writer = "zarrs"
    samples, rows = make_samples(store, 1)
    samples["label"][0] = 1  # no all-zero chunk: this shard goes through zarrs

    class Full:
        def __setitem__(self, key, value):
            raise RuntimeError("failed to store chunk: No space left on device (os error 28)")

    staging, arrays = store._staged_arrays()
    store._staged = staging, dict.fromkeys(arrays, Full())
    with pytest.raises(storage.DiskFullError, match=r"image/c/1/0/0/0.*free space"):
        store.write_shard(1, samples, rows)
    assert store.committed_shards() == []


def test_disk_full_writing_the_manifest_part_names_the_file(tmp_path, monkeypatch):
    import storage.fsio as fsio

    url = str(tmp_path / "ds")
    store = _create(url)
    monkeypatch.setattr(fsio, "atomic_write_bytes", _disk_full)
    with pytest.raises(storage.DiskFullError, match=r"manifest/shard-000002\.parquet.*free space"):
        store.write_shard(2, *make_samples(store, 2))
    assert store.committed_shards() == []


@pytest.mark.prefect
def test_disk_full_in_the_writer_thread_stops_the_task_without_retry(tmp_path, monkeypatch, models):
    """ENOSPC raised on generation's writer thread reaches retry_transient as a permanent error."""
    from prefect import flow, task
    from zarr.storage import LocalStore

    from labelfoundry.generation import generate_shards
    from tasks.common import retry_transient

    G, lab = models
    store = ShardStore.create(
        str(tmp_path / "ds"), num_samples=8, image_shape=(16, 16), label_shape=(16, 16), label_dtype="uint8",
        schema={"class_names": ["bg", "a", "b"]}, samples_per_shard=4, w_shape=(G.num_ws, G.w_dim),
    )
    monkeypatch.setattr(LocalStore, "set", _disk_full)
    monkeypatch.setattr(ShardStore, "writer", "zarr")  # the patched LocalStore is zarr-python's
    calls = {"n": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def gen() -> None:
        calls["n"] += 1
        generate_shards(G, lab, store, [0, 1], run_seed=0, batch=4)

    @flow
    def f() -> None:
        gen()

    with pytest.raises(storage.DiskFullError, match=str(tmp_path / "ds")):
        f()
    assert calls["n"] == 1


# ------------------------------------------------------------------ CLI
def _invoke(*args):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_verify_exit_codes_and_repair(tmp_path):
    url = str(tmp_path / "ds")
    store = _create(url)
    written = write_all(store)
    assert _invoke("verify", url).exit_code == 0

    _part(url, 4).unlink()
    res = _invoke("verify", url)
    assert res.exit_code == 2, res.output  # incomplete, nothing damaged
    assert "shard 4: not committed" in " ".join(res.output.split())

    ShardStore.open(url, mode="a").write_shard(4, *written[4])
    _truncate(_file(url, store, "label", 0))
    assert _invoke("verify", url).exit_code == 1  # damaged
    res = _invoke("verify", url, "--repair")
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output  # repaired: now incomplete, to be regenerated
    assert "uncommitted shard(s) [0]" in out and "re-run the same" in out
    assert not _part(url, 0).exists() and np.all(verify(url).uncommitted == [0])
    assert len(ShardStore.open(url).manifest()) == N - S


def test_many_uncommitted_shards_are_summarised_as_runs():
    """A large dataset stopped early: the shards past the listed ones read as runs, not thousands of numbers."""
    from storage.layout import index_runs

    assert index_runs([9, 5, 6, 7, 12, 20, 21]) == "5-7, 9, 12, 20-21"
    assert index_runs(list(range(824, 3907))) == "824-3906"
    assert index_runs(list(range(0, 100, 2)), most=3) == "0, 2, 4, and 47 more runs"
