"""Filesystem access through fsspec: path resolution and atomic writes.

A dataset root is a local directory or any fsspec URL (``memory://x``,
``s3://bucket/prefix``). Commit markers (manifest parts, flags, dataset.json)
must appear all-or-nothing, so every such file goes through
:func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from labelfoundry.atomic import atomic_write_bytes

from .errors import DatasetLockError, DiskFullError

# A full disk or an exhausted quota: nothing a retry seconds later can fix.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass
class Root:
    """A resolved dataset root: fsspec filesystem + path inside it."""

    url: str
    fs: fsspec.AbstractFileSystem
    path: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def key(self, relative: str) -> str:
        """Filesystem path of ``relative`` under the root."""
        return posixpath.join(self.path, relative) if relative else self.path

    def describe(self, relative: str) -> str:
        """User-facing location of ``relative`` (used in error messages)."""
        return self.url.rstrip("/") + "/" + relative

    def fresh(self, relative: str) -> str:
        """Key of ``relative`` with any cached listing dropped.

        Object-store filesystems (s3fs, gcsfs) cache directory listings; other
        processes commit shards concurrently, so commit checks must not be stale.
        """
        key = self.key(relative)
        self.fs.invalidate_cache(key)
        return key

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self.fresh(relative)))

    def size(self, relative: str) -> int | None:
        """Size in bytes, or None when the file does not exist."""
        self.fresh(relative)
        try:
            return int(self.fs.size(self.key(relative)))
        except FileNotFoundError:
            return None

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.key(relative))

    def read_range(self, relative: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file (one ranged GET on object stores)."""
        return self.fs.cat_file(self.key(relative), start=start, end=end)

    def read_many(self, relatives: list[str]) -> dict[str, bytes]:
        """Read several files (concurrently on async filesystems such as s3)."""
        if not relatives:
            return {}
        keys = [self.key(r) for r in relatives]
        data = self.fs.cat(keys, on_error="raise")
        if len(keys) == 1 and not isinstance(data, dict):
            data = {keys[0]: data}
        return {r: data[k] for r, k in zip(relatives, keys, strict=True)}

    def list_names(self, relative_dir: str) -> list[str]:
        """File names directly under ``relative_dir`` (empty if it does not exist)."""
        try:
            entries = self.fs.ls(self.fresh(relative_dir), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    def remove(self, relative: str) -> None:
        try:
            self.fs.rm_file(self.key(relative))
        except FileNotFoundError:
            pass

    def makedirs(self, relative: str) -> None:
        self.fs.makedirs(self.key(relative), exist_ok=True)

    def publish(self, source: str, relative: str) -> None:
        """Move the local file ``source`` (under the root) to ``relative`` in one atomic rename:
        readers see the old file or the new one, never a partial one."""
        if not self.is_local:
            raise ValueError(f"publish() renames local files; {self.url} is not local")
        target = self.key(relative)
        os.makedirs(posixpath.dirname(target), exist_ok=True)
        os.replace(self.key(source), target)

    def write_atomic(self, relative: str, data: bytes) -> None:
        with self.writing(relative):
            atomic_write(self.fs, self.key(relative), data)

    @contextlib.contextmanager
    def writing(self, relative: str) -> Iterator[None]:
        """Turn a full disk while writing ``relative`` into a :class:`DiskFullError` that names the
        dataset and the file: the bare ``OSError: [Errno 28]`` names neither."""
        try:
            yield
        except DiskFullError:
            raise
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            where = self.describe(relative)
            if exc.filename and os.fspath(exc.filename) != self.key(relative):
                where += f" (at {exc.filename})"
            raise DiskFullError(
                exc.errno,
                f"{os.strerror(exc.errno)} while writing {where} of dataset {self.url}: free space on that "
                "disk (or point run_dir at one with room) and re-run the same command: committed shards "
                "are kept and only the rest is generated",
            ) from exc

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 600.0) -> Iterator[None]:
        """Hold an exclusive cross-process lock (file ``name`` under the root) on local disks.

        Other filesystems get no lock: fsspec offers none, and their writes stay safe through
        atomic publishing of dataset.json and manifest parts."""
        if not self.is_local:
            yield
            return
        from filelock import FileLock, Timeout

        self.makedirs("")
        try:
            with FileLock(self.key(name), timeout=timeout):
                yield
        except Timeout as exc:
            raise DatasetLockError(
                f"{self.describe(name)} stayed locked by another process for {timeout:.0f} s; if no other "
                "labelfoundry process is creating this dataset, delete that file and retry"
            ) from exc


def resolve(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Root:
    """Resolve a local path or fsspec URL into a :class:`Root`."""
    options = dict(storage_options or {})
    text = os.fspath(path)
    fs, inner = fsspec.core.url_to_fs(text, **options)
    if isinstance(fs, LocalFileSystem):
        inner = os.path.abspath(inner)
        url = inner
    else:
        inner = inner.rstrip("/")
        url = text.rstrip("/")
    return Root(url=url, fs=fs, path=inner, storage_options=options)


def atomic_write(fs: fsspec.AbstractFileSystem, key: str, data: bytes) -> None:
    """Write ``data`` to ``key`` so readers see either nothing or the whole file.

    Local disk: `labelfoundry.atomic` (temp file in the same directory, fsync,
    ``os.replace``). Other fsspec stores: write a temp key then ``fs.mv`` it into place;
    object stores (s3, gcs, az) publish an object atomically per PUT/copy, so the
    final key never holds a partial file even though ``mv`` is copy+delete.
    Temp names start with '.' and never match the manifest-part pattern.
    """
    if isinstance(fs, LocalFileSystem):
        atomic_write_bytes(key, data, fsync=True)
        return
    parent, name = posixpath.split(key)
    tmp = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    fs.makedirs(parent, exist_ok=True)
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, key)
    finally:
        try:
            if fs.exists(tmp):
                fs.rm_file(tmp)
        except OSError:
            pass
