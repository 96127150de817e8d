"""All direct use of zarr: creating the sharded arrays and opening them safely.

Only public zarr v3 API is used (``zarr.create_array``, ``zarr.open_group``,
``Array.with_config``, ``zarr.codecs``) so this works on zarr 3.1 and 3.2+.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Iterator
from typing import Any

import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from .fsio import Root
from .layout import DATA_DIR, FORMAT_VERSION, Layout

# zarr's config is process-wide, and zarr builds an array's codec pipeline from it when the array
# is opened. Opening arrays under a temporary setting (`_zarr_settings`) while another thread opens
# its own would hand that thread the setting, and two overlapping settings can restore each
# other's values and leave one in place for good: every open and create holds this lock.
_CONFIG_LOCK = threading.RLock()


@contextlib.contextmanager
def _zarr_settings(settings: dict[str, Any] | None = None) -> Iterator[None]:
    """Hold the config lock, with ``settings`` applied (none: just the lock)."""
    with _CONFIG_LOCK, (zarr.config.set(settings) if settings else contextlib.nullcontext()):
        yield


def zarr_store(root: Root, relative: str, read_only: bool) -> Any:
    """A zarr v3 store rooted at ``relative`` (LocalStore on disk, FsspecStore otherwise)."""
    from zarr.storage import FsspecStore, LocalStore

    if root.is_local:
        return LocalStore(root.key(relative), read_only=read_only)
    url = root.fs.unstrip_protocol(root.key(relative))
    return FsspecStore.from_url(url, storage_options=root.storage_options or None, read_only=read_only)


def versions() -> dict[str, str]:
    """zarr and numcodecs versions, recorded in dataset.json at creation."""
    import numcodecs

    return {"zarr": zarr.__version__, "numcodecs": numcodecs.__version__}


# write_empty_chunks=True: an all-zero sample (e.g. an all-background label)
# must still be stored, otherwise it is indistinguishable from a missing chunk.
_WRITE_CONFIG = {"write_empty_chunks": True}


def supports_read_missing_chunks() -> bool:
    """True on zarr versions (3.2+) that can raise on missing chunks themselves."""
    try:
        return "read_missing_chunks" in dict(zarr.config.get("array"))
    except Exception:  # pragma: no cover - config layout changed
        return False


def make_compressors(name: str, level: int) -> list[Any] | None:
    """numcodecs-backed zarr v3 codecs for ``compression=name``.

    zstd gets a content checksum so a flipped byte fails to decode instead of
    yielding wrong pixels.
    """
    if name == "zstd":
        return [ZstdCodec(level=level, checksum=True)]
    if name == "blosc":
        return [BloscCodec(cname="zstd", clevel=level, shuffle="shuffle")]
    if name == "none":
        return None
    raise ValueError(f"unknown compression {name!r}; use 'zstd', 'blosc' or 'none'")


def create_arrays(root: Root, layout: Layout) -> None:
    """(Re)create ``data.zarr`` with every array preallocated to ``num_samples``.

    Overwrites existing array metadata; only called before ``dataset.json``
    exists, i.e. before any shard can have been committed.
    """
    with _zarr_settings():
        _create_arrays(root, layout)


def _create_arrays(root: Root, layout: Layout) -> None:
    store = zarr_store(root, DATA_DIR, read_only=False)
    zarr.create_group(store, overwrite=True, attributes={"labelfoundry_format_version": FORMAT_VERSION})
    compressors = make_compressors(layout.compression["name"], layout.compression["level"])
    n, s = layout.num_samples, layout.samples_per_shard
    for name, spec in layout.arrays.items():
        zarr.create_array(
            store,
            name=name,
            shape=(n, *spec.shape),
            dtype=spec.dtype,
            chunks=(1, *spec.shape),
            shards=(s, *spec.shape),
            compressors=compressors,
            fill_value=0,
            chunk_key_encoding={"name": "default", "separator": "/"},
            dimension_names=("sample", *spec.dims),
            config=dict(_WRITE_CONFIG),
            overwrite=True,
        )


def open_arrays(root: Root, layout: Layout, *, writable: bool) -> dict[str, Any]:
    """Open every array of the layout with the right runtime config.

    Writers get ``write_empty_chunks=True``; readers get
    ``read_missing_chunks=False`` where zarr supports it (the reader also
    checks shard files itself, see ``sample_reader``).
    """
    with _zarr_settings():
        return _open_arrays(root, layout, writable)


def _open_arrays(root: Root, layout: Layout, writable: bool, relative: str = DATA_DIR) -> dict[str, Any]:
    store = zarr_store(root, relative, read_only=not writable)
    group = zarr.open_group(store, mode="r+" if writable else "r")
    config: dict[str, Any] = dict(_WRITE_CONFIG) if writable else {}
    if not writable and supports_read_missing_chunks():
        config["read_missing_chunks"] = False
    arrays = {}
    for name in layout.arrays:
        try:
            array = group[name]
        except KeyError as exc:
            raise FileNotFoundError(
                f"{root.describe(relative + '/' + name)} is missing although dataset.json lists it; "
                "the dataset is damaged: regenerate it"
            ) from exc
        arrays[name] = array.with_config(config) if config else array
    return arrays


def read_rows(root: Root, layout: Layout, name: str, sample_ids: Any) -> Any:
    """Array ``name`` at ``sample_ids`` (orthogonal selection), as numpy, for whole-dataset passes.

    Callers pass committed ids only (from the manifest): a missing chunk would read as zeros on
    zarr < 3.2."""
    import numpy as np

    if name not in layout.arrays:
        raise KeyError(f"{root.describe(DATA_DIR)} has no array {name!r} (has {sorted(layout.arrays)})")
    array = open_arrays(root, layout, writable=False)[name]
    return np.asarray(array.oindex[np.asarray(sample_ids, dtype=np.int64)])


ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


def open_arrays_with_pipeline(root: Root, layout: Layout, codec_pipeline: str) -> dict[str, Any]:
    """Read-only arrays decoded by another codec pipeline (e.g. :data:`ZARRS_PIPELINE`).

    zarr builds an array's codec pipeline when the array object is created,
    so the pipeline is set only while opening: the arrays keep it, and every
    other array in the process (writers included) keeps zarr's default.
    """
    with _zarr_settings({"codec_pipeline.path": codec_pipeline}):
        return _open_arrays(root, layout, writable=False)


def open_staging_arrays(root: Root, layout: Layout, staging: str) -> dict[str, Any]:
    """Writable arrays with ``data.zarr``'s metadata under ``staging`` (a private directory of
    the dataset root), encoded by the zarrs codec pipeline.

    zarrs encodes a shard ~5x faster than zarr-python (bench/storage_bench.py) but writes the
    shard file in place, so a reader or a second writer could meet a half-written file. The
    store therefore writes each shard here first and publishes it with an atomic rename into
    ``data.zarr`` (see ``ShardStore.write_shard``): the same guarantee as zarr-python's writes.
    """
    for relative in ["zarr.json", *(f"{name}/zarr.json" for name in layout.arrays)]:
        root.write_atomic(f"{staging}/{relative}", root.read_bytes(f"{DATA_DIR}/{relative}"))
    # zarrs takes these from the global config when its pipeline is built; one thread: chunks land in the
    # shard file in a fixed order (more threads interleave them by timing: the same data, other bytes)
    with _zarr_settings({"codec_pipeline.path": ZARRS_PIPELINE, "array.write_empty_chunks": True, "threading.max_workers": 1}):
        return _open_arrays(root, layout, writable=True, relative=staging)


@contextlib.contextmanager
def zarrs_disk_full_as_oserror() -> Iterator[None]:
    """zarrs reports a full disk as text ("... (os error 28)"), not as an OSError: re-raise it as one,
    so `Root.writing` turns it into the DiskFullError that names the dataset and the fix."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        if "os error 28" in str(exc) or "No space left" in str(exc):
            raise OSError(errno.ENOSPC, str(exc)) from exc
        raise
