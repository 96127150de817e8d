"""One way to write a local file atomically: readers see the old file or the whole new one.

Plain standard library (no torch), so `storage` can use it for local disks as well.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a rename on POSIX filesystems (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; on a clean exit it replaces `path` (os.replace), on an
    error it is removed. The temp name starts with '.' so no glob of final names matches it.

    fsync: flush the file and its directory to disk (the storage commit protocol needs it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
