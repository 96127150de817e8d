"""ShardStore, the writer: create (or reopen) a dataset, write whole shards, commit them.

It shares nothing with the training-side reader (`storage.dataset`, `storage.reader`) but the
on-disk format: `layout` (dataset.json), `manifest` and `filters` (Parquet parts), `zarr_io`.

Commit protocol: a shard is committed iff ``manifest/shard-XXXXXX.parquet``
exists. ``write_shard`` writes the whole shard region of every array in one
slice assignment, reads it back and checks checksums, and only then publishes
the manifest part atomically. A crash at any point leaves the shard
uncommitted, and resuming simply rewrites it (idempotently).

Shards are encoded by zarrs where it is installed and the dataset is on a local disk (~5x less
CPU per shard than zarr-python, which stays the fallback and the only writer for fsspec URLs):
zarrs writes in place, so it writes into a private staging copy of the arrays and each shard
file is then renamed into ``data.zarr`` atomically. Either way the files are plain Zarr v3.

A rewrite never depends on the previous bytes: zarr merges a write into the
existing shard file, replacing every sample's chunk without decoding one, but
fails on a file whose shard index is damaged (e.g. truncated). ``write_shard``
deletes such a file first. A readable one is kept until zarr atomically
replaces it, so a second process writing the same shard (two runs of one
config) never leaves a committed shard without its files.
``create`` runs under a lock file (``dataset.lock``, local disks) so processes
starting the same dataset at once create it exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import threading
import uuid
import weakref
from typing import Any, Mapping

import numpy as np
import pandas as pd

from . import filters as _filters
from . import manifest as _manifest
from .errors import (
    CorruptShardError,
    LayoutMismatchError,
    ReadOnlyError,
    SampleValidationError,
    ShardCommittedError,
    ShardIndexError,
    UncommittedShardError,
)
from .fsio import Root, resolve
from .hashing import shard_checksums
from .layout import DATA_DIR, DATASET_JSON, MANIFEST_DIR, Layout, build_layout, manifest_part_key, read_layout
from .sample_reader import SampleReader
from .read_backends import fork_safe, installed, mark_started
from .shard_index import shard_file_problem
from .zarr_io import create_arrays, open_arrays, open_staging_arrays, versions, zarrs_disk_full_as_oserror

log = logging.getLogger(__name__)

_MODES = ("r", "r+", "a")
WRITERS = ("auto", "zarr", "zarrs")
# zarrs' private staging directories under the dataset root: <prefix><host>-<pid>-<random>
STAGING_PREFIX = "staging-"
# Lock file of dataset creation, under the dataset root (no leading '.': temp files have that).
CREATE_LOCK = "dataset.lock"


class ShardStore:
    """A sharded image/label dataset at a local path or fsspec URL."""

    #: shard encoder of ``write_shard``: "auto" (zarrs where `resolved_writer` allows, else zarr-python),
    #: "zarr" or "zarrs"; set on an instance (or the class) before its first write
    writer: str = "auto"

    def __init__(self, root: Root, layout: Layout, info: dict[str, Any], mode: str) -> None:
        self._root = root
        self._layout = layout
        self.info = info
        self.mode = mode
        self._write_arrays: dict[str, Any] | None = None
        # zarrs-encoded staging arrays and their directory under the root (see writer)
        self._staged: tuple[str, dict[str, Any]] | None = None
        self._staging_lock = threading.Lock()  # threads sharing this object open one staging copy
        self._reader: SampleReader | None = None
        self._fast_reader: SampleReader | None = None  # read-back of zarrs-written shards

    def resolved_writer(self) -> str:
        """The shard encoder `write_shard` uses: ``writer`` ("auto": zarrs on a local disk where it
        is installed and its thread pool is usable in this process, else zarr-python)."""
        if self.writer not in WRITERS:
            raise ValueError(f"ShardStore.writer must be one of {WRITERS}, got {self.writer!r}")
        fast_ok = self._root.is_local and installed("zarrs") and fork_safe("zarrs")
        if self.writer == "zarrs" and not fast_ok:
            raise ValueError(f"writer 'zarrs' needs the zarrs package and a local dataset (not {self.url}) in a "
                             "process not forked after zarrs started; use writer='auto' or 'zarr'")
        return "zarrs" if self.writer == "zarrs" or (self.writer == "auto" and fast_ok) else "zarr"

    # ------------------------------------------------------------------ open
    @classmethod
    def create(
        cls,
        path: str,
        *,
        num_samples: int,
        image_shape: tuple[int, int],
        label_shape: tuple[int, ...],
        label_dtype: str,
        schema: dict[str, Any],
        samples_per_shard: int = 64,
        with_uncertainty: bool = True,
        w_shape: tuple[int, int] | None = None,
        provenance: dict[str, Any] | None = None,
        compression: str = "zstd",
        level: int = 3,
        storage_options: dict[str, Any] | None = None,
        label_task: str | None = None,
        extra_labels: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    ) -> "ShardStore":
        """Create the dataset, or open it if it already exists with the same layout.

        extra_labels (multi-label datasets): further label arrays, name -> (task, per-sample shape),
        float16 with an uncertainty array each; label_task is then the primary `label`'s task.

        Re-running with identical arguments is a no-op (resume); a different
        layout or provenance raises :class:`LayoutMismatchError`. Call it once
        (in the flow) before fanning out shard-writing tasks.
        """
        root = resolve(path, storage_options)
        layout = build_layout(
            num_samples=num_samples,
            image_shape=image_shape,
            label_shape=label_shape,
            label_dtype=label_dtype,
            schema=schema,
            samples_per_shard=samples_per_shard,
            with_uncertainty=with_uncertainty,
            w_shape=w_shape,
            provenance=provenance,
            compression=compression,
            level=level,
            label_task=label_task,
            extra_labels=extra_labels,
        )
        return cls._create(root, layout)

    @classmethod
    def create_like(cls, source: "ShardStore", path: str, *, provenance: dict[str, Any],
                    storage_options: dict[str, Any] | None = None) -> "ShardStore":
        """A derived dataset (e.g. refined labels): the source's arrays, schema, sharding and
        compression, its own provenance. Resumes like `create`; the source is only read."""
        layout = dataclasses.replace(source.layout, provenance=dict(provenance))
        opts = source.storage_options if storage_options is None else storage_options
        return cls._create(resolve(path, opts), layout)

    @classmethod
    def _create(cls, root: Root, layout: Layout) -> "ShardStore":
        if root.exists(DATASET_JSON):  # the common resume case needs no lock
            return cls._reopen(root, layout)
        with root.lock(CREATE_LOCK):  # check-then-create, once across processes
            if root.exists(DATASET_JSON):  # another process created it while we waited
                return cls._reopen(root, layout)
            if _manifest.committed_indices(root, layout.num_shards):
                raise LayoutMismatchError(
                    f"{root.describe(MANIFEST_DIR)} has committed shards but {root.describe(DATASET_JSON)} "
                    "is missing; refusing to overwrite. Delete the directory to start over"
                )
            with root.writing(DATA_DIR):
                create_arrays(root, layout)
            info = layout.to_dict()
            info["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            info["created_with"] = _versions()
            with root.writing(MANIFEST_DIR):
                root.makedirs(MANIFEST_DIR)
            # dataset.json last: its presence means the arrays exist.
            root.write_atomic(DATASET_JSON, json.dumps(info, indent=2, sort_keys=True).encode())
        return cls(root, layout, info, "a")

    @classmethod
    def _reopen(cls, root: Root, layout: Layout) -> "ShardStore":
        existing, info = read_layout(root)
        _check_same(root, layout, existing)
        return cls(root, existing, info, "a")

    @classmethod
    def open(cls, path: str, mode: str = "r", storage_options: dict[str, Any] | None = None) -> "ShardStore":
        """Open an existing dataset; ``mode='a'`` (or ``'r+'``) allows ``write_shard``."""
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        root = resolve(path, storage_options)
        layout, info = read_layout(root)
        return cls(root, layout, info, mode)

    # ------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        return self._root.url

    @property
    def storage_options(self) -> dict[str, Any]:
        return dict(self._root.storage_options)

    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def num_shards(self) -> int:
        return self._layout.num_shards

    @property
    def samples_per_shard(self) -> int:
        return self._layout.samples_per_shard

    @property
    def num_samples(self) -> int:
        return self._layout.num_samples

    def __repr__(self) -> str:
        return (
            f"ShardStore({self.url!r}, num_samples={self.num_samples}, "
            f"num_shards={self.num_shards}, mode={self.mode!r})"
        )

    def _check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or not 0 <= int(index) < self.num_shards:
            raise ShardIndexError(
                f"shard index {index!r} out of range: {self._root.describe(DATASET_JSON)} "
                f"has {self.num_shards} shards (0..{self.num_shards - 1})"
            )
        return int(index)

    def shard_range(self, index: int) -> range:
        """Global sample ids held by shard ``index``."""
        return self._layout.shard_range(self._check_index(index))

    def shard_file(self, array: str, index: int) -> str:
        """Location of the Zarr shard file of ``array`` for shard ``index``."""
        return self._root.describe(self._layout.shard_file_key(array, self._check_index(index)))

    # ----------------------------------------------------------------- write
    def write_shard(
        self,
        index: int,
        samples: Mapping[str, np.ndarray],
        rows: pd.DataFrame | Mapping[str, Any],
        *,
        overwrite: bool = False,
        verify_readback: bool = True,
    ) -> None:
        """Write and commit one whole shard.

        Idempotent: rewriting an uncommitted shard just replaces it; calling it
        again for a committed shard with identical data is a no-op. Different
        data for a committed shard raises unless ``overwrite=True``.
        """
        if self.mode == "r":
            raise ReadOnlyError(f"{self.url} was opened with mode='r'; use ShardStore.open(path, mode='a') to write")
        index = self._check_index(index)
        rng = self._layout.shard_range(index)
        arrays = self._validate_samples(index, samples, len(rng))
        frame = _manifest.rows_frame(rows, len(rng), self._layout)
        checksums = shard_checksums(arrays, self._layout.checksum_arrays())

        existing = _manifest.read_part(self._root, index)
        if existing is not None:
            if list(existing["checksum"]) == checksums and not overwrite:
                log.info("shard %d of %s already committed with identical data; skipping", index, self.url)
                return
            if not overwrite:
                raise ShardCommittedError(
                    f"shard {index} is already committed ({self._root.describe(manifest_part_key(index))}) "
                    "with different data; pass overwrite=True to replace it, or delete that file first"
                )
            self._root.remove(manifest_part_key(index))  # uncommit before touching data

        self._remove_damaged_files(index)  # zarr would fail merging into them
        # zarrs leaves out a sample whose chunk is all fill value (0), which must be stored (an
        # all-background label would read as a missing chunk): such shards go through zarr-python
        fast = self.resolved_writer() == "zarrs" and not any(
            (a.reshape(len(a), -1) == 0).all(axis=1).any() for a in arrays.values())
        target, staging = self._arrays_for_write(), ""
        if fast:
            try:
                staging, target = self._staged_arrays()
            except Exception as exc:  # noqa: BLE001 - e.g. a zarrs release that does not fit this zarr
                if self.writer == "zarrs":
                    raise
                log.warning("zarrs could not open %s (%s); writing with zarr-python", self.url, exc)
                self.writer, fast = "zarr", False
        for name, data in arrays.items():
            key = self._layout.shard_file_key(name, index)
            with self._root.writing(key), (zarrs_disk_full_as_oserror() if fast else contextlib.nullcontext()):
                target[name][rng.start : rng.stop] = data  # one whole-shard write per array
                if fast:  # zarrs wrote it in place, in the private staging copy: publish it by a rename
                    self._root.publish(staging + key[len(DATA_DIR):], key)

        if verify_readback:
            self._readback(index, checksums, fast)
        part = _manifest.build_part(self._layout, index, frame, checksums, arrays["label"])
        _manifest.write_part(self._root, index, part)

    def _validate_samples(self, index: int, samples: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        expected = set(self._layout.arrays)
        given = set(samples)
        if given != expected:
            raise SampleValidationError(
                f"write_shard({index}) got arrays {sorted(given)} but {self._root.describe(DATASET_JSON)} "
                f"declares {sorted(expected)} (missing: {sorted(expected - given)}, "
                f"unexpected: {sorted(given - expected)})"
            )
        out = {}
        for name, spec in self._layout.arrays.items():
            data = np.asarray(samples[name])
            want = (n, *spec.shape)
            if data.shape != want:
                raise SampleValidationError(
                    f"samples[{name!r}] for shard {index} has shape {data.shape}, expected {want}"
                )
            if data.dtype != np.dtype(spec.dtype):
                raise SampleValidationError(
                    f"samples[{name!r}] has dtype {data.dtype}, expected {spec.dtype}; cast explicitly "
                    f"(e.g. .astype(np.{spec.dtype})) so no silent truncation happens here"
                )
            out[name] = np.ascontiguousarray(data)
        return out

    def _arrays_for_write(self) -> dict[str, Any]:
        if self._write_arrays is None:
            self._write_arrays = open_arrays(self._root, self._layout, writable=True)
        return self._write_arrays

    def _staged_arrays(self) -> tuple[str, dict[str, Any]]:
        """(directory, arrays): zarrs-encoded arrays in a staging directory private to this store
        object, removed with it. Processes (and pickled copies) never share one; threads writing
        through one object share it, each shard its own files. Opened once under a lock: two
        threads racing here would each open a copy and publish from the other's (a lost shard file)."""
        with self._staging_lock:
            if self._staged is None:
                self._remove_stale_staging()
                staging = f"{STAGING_PREFIX}{platform.node()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                weakref.finalize(self, shutil.rmtree, self._root.key(staging), True)
                mark_started("zarrs")
                self._staged = staging, open_staging_arrays(self._root, self._layout, staging)
            return self._staged

    def _remove_stale_staging(self) -> None:
        """Delete staging directories left by processes of this host that died before cleaning up
        (a kill -9); those of live processes, and of other hosts, are left alone."""
        host = platform.node()
        for name in os.listdir(self._root.key("")):
            if not name.startswith(f"{STAGING_PREFIX}{host}-"):
                continue
            try:
                pid = int(name[len(STAGING_PREFIX) + len(host) + 1 :].split("-")[0])
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(self._root.key(name), ignore_errors=True)
            except (ValueError, PermissionError):  # not our naming, or a live process of another user
                continue

    def _readback(self, index: int, checksums: list[str], fast: bool = False) -> None:
        """Decode the shard from disk and compare checksums; zarrs-written shards are read back
        by zarrs too (zarr-python's decode would cost 3x the write; both read the same format)."""
        if fast and self._fast_reader is None:
            self._fast_reader = SampleReader(self._root, self._layout, "zarrs")
        reader = self._fast_reader if fast else self._sample_reader()
        reader._checked.discard(index)
        names = self._layout.checksum_arrays()
        got = shard_checksums(reader.read_shard(index, names), names)
        bad = [i for i, (a, b) in enumerate(zip(got, checksums, strict=True)) if a != b]
        if bad:
            raise CorruptShardError(
                f"read-back of shard {index} ({self.shard_file('image', index)}) does not match what was "
                f"written for {len(bad)} sample(s); not committing. Retry the task"
            )

    def uncommit(self, index: int) -> None:
        """Make shard ``index`` uncommitted and delete its data files (repair of a damaged shard).

        The manifest part goes first, so a crash in between leaves an uncommitted shard, never a
        committed one without data; the next generation rewrites it from scratch."""
        if self.mode == "r":
            raise ReadOnlyError(f"{self.url} was opened with mode='r'; use ShardStore.open(path, mode='a') to repair")
        index = self._check_index(index)
        self._root.remove(manifest_part_key(index))
        self._remove_shard_files(index)

    def _remove_shard_files(self, index: int) -> None:
        for name in self._layout.arrays:
            self._root.remove(self._layout.shard_file_key(name, index))

    def _remove_damaged_files(self, index: int) -> None:
        for name in self._layout.arrays:
            key = self._layout.shard_file_key(name, index)
            if self._root.size(key) is not None and shard_file_problem(self._root, self._layout, key, index):
                log.info("deleting damaged %s before rewriting shard %d", self._root.describe(key), index)
                self._root.remove(key)

    # ------------------------------------------------------------- manifest
    def committed_shards(self) -> list[int]:
        """Shards with a manifest part (run ``verify`` to also check their data)."""
        return _manifest.committed_indices(self._root, self.num_shards)

    def uncommitted_shards(self) -> list[int]:
        """Shards still to be (re)generated."""
        done = set(self.committed_shards())
        return [i for i in range(self.num_shards) if i not in done]

    def is_complete(self) -> bool:
        return not self.uncommitted_shards()

    def manifest(self) -> pd.DataFrame:
        """All committed rows (sorted by sample_id) with filter flags merged in."""
        return _filters.read_manifest(self._root, self.num_shards)

    def filter_names(self) -> list[str]:
        return _filters.filter_names(self._root)

    def write_flags(self, flags: pd.DataFrame, name: str = "default") -> None:
        """Store filter results (sample_id, keep, reasons...) as ``filters/<name>.parquet``.

        Data is never rewritten; the flags are merged by ``manifest()``.
        """
        if self.mode == "r":
            raise ReadOnlyError(f"{self.url} was opened with mode='r'; open with mode='a' to write flags")
        base = _manifest.read_parts(self._root, self.committed_shards())
        others = _filters.read_flags(self._root)
        frame = _filters.validate_flags(flags, name, list(base.columns), base["sample_id"].to_numpy(), others)
        _filters.write_flags(self._root, name, frame)

    # ------------------------------------------------------------------ read
    def _sample_reader(self) -> SampleReader:
        if self._reader is None:
            self._reader = SampleReader(self._root, self._layout)
        return self._reader

    def read_sample(self, sample_id: int, *, allow_uncommitted: bool = False) -> dict[str, np.ndarray]:
        """One sample's arrays; refuses samples of uncommitted shards by default."""
        reader = self._sample_reader()
        index = reader._check_id(int(sample_id))
        if not allow_uncommitted and not self._root.exists(manifest_part_key(index)):
            raise UncommittedShardError(
                f"sample {sample_id} is in shard {index}, which is not committed "
                f"({self._root.describe(manifest_part_key(index))} does not exist); "
                "finish generation or pass allow_uncommitted=True"
            )
        return reader.read(int(sample_id))

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Drop the open zarr handles (they reopen on the next write or read)."""
        self._write_arrays = None
        self._reader = None

    def __enter__(self) -> "ShardStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Zarr handles are per-process: reopen lazily after pickling.
        state = self.__dict__.copy()
        state["_write_arrays"] = None
        state["_reader"] = None
        # the staging copy belongs to this object (its finalizer removes it): a copy opens its own
        state["_staged"] = None
        del state["_staging_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._staging_lock = threading.Lock()


def _check_same(root: Root, requested: Layout, existing: Layout) -> None:
    diff = requested.layout_diff(existing)
    if diff:
        raise LayoutMismatchError(
            f"{root.describe(DATASET_JSON)} exists with a different layout: " + "; ".join(diff)
            + ". Use a new path, or delete the existing dataset to recreate it"
        )
    if requested.provenance != existing.provenance:
        keys = sorted(
            k for k in set(requested.provenance) | set(existing.provenance)
            if requested.provenance.get(k) != existing.provenance.get(k)
        )
        raise LayoutMismatchError(
            f"{root.describe(DATASET_JSON)} was created with different provenance (keys {keys}); resuming "
            "would mix outputs of different generators/configs. Use a new path, or "
            "ShardStore.open(path, mode='a') to deliberately continue"
        )


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), **versions()}


__all__ = ["ShardStore"]
