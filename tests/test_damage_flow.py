"""A re-run of a finished run re-checks its committed data and regenerates what is damaged or lost;
a fully cached re-run writes nothing to the run directory (so a read-only one works).

End to end through the factory flow on the tiny config (conftest.make_config), downstream off.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


def _run(cfg: Path) -> dict:
    from flows.factory import factory

    state = factory(config=str(cfg), return_state=True)
    assert state.is_completed(), f"factory ended in {state!r}"
    return state.result()


def _dataset_files(ds: Path) -> dict[str, bytes]:
    return {p.relative_to(ds).as_posix(): p.read_bytes() for p in sorted(ds.rglob("*"))
            if p.is_file() and p.relative_to(ds).parts[0] in ("data.zarr", "manifest")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, make_config):
    d = tmp_path_factory.mktemp("damage-flow")
    cfg = make_config(d, d / "run", downstream={"enabled": False})
    summary = _run(cfg)
    return cfg, d / "run", summary


def test_rerun_regenerates_damaged_and_lost_shards_with_the_same_bytes(finished, caplog):
    import storage

    cfg, _, summary = finished
    ds = Path(summary["dataset"])
    before = _dataset_files(ds)
    store = storage.ShardStore.open(str(ds))
    image1 = Path(store.shard_file("image", 1))
    image1.write_bytes(image1.read_bytes()[:100])  # truncated after commit
    (ds / "manifest" / "shard-000002.parquet").unlink()  # a lost commit marker

    with caplog.at_level(logging.INFO):
        again = _run(cfg)

    assert again == summary
    report = storage.verify(str(ds))
    assert report.ok and report.complete, str(report)
    assert _dataset_files(ds) == before  # exactly the undamaged bytes
    assert "found damaged shards [1]" in caplog.text and "image/c/1/0/0" in caplog.text
    assert "regenerated shards [1, 2]" in caplog.text


def test_fully_cached_rerun_writes_nothing_in_the_run_dir(finished, monkeypatch):
    """As if the run dir were read-only (tests run as root, so chmod would not stop a write)."""
    cfg, run_dir, summary = finished
    real_write_text = Path.write_text
    refused: list[Path] = []

    def read_only(self: Path, *args, **kwargs):
        if Path(self).resolve().is_relative_to(run_dir.resolve()):
            refused.append(self)
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    assert _run(cfg) == summary
    assert refused == []


def test_a_run_file_that_must_change_names_the_directory(tmp_path, monkeypatch):
    from flows.factory import write_run_file

    target = tmp_path / "config.yaml"
    write_run_file(target, "a: 1\n")
    mtime = target.stat().st_mtime_ns

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    write_run_file(target, "a: 1\n")  # identical: not rewritten, so no error
    assert target.stat().st_mtime_ns == mtime
    with pytest.raises(PermissionError, match=rf"config.yaml in the run directory {tmp_path}.*writable"):
        write_run_file(target, "a: 2\n")
