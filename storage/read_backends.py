"""Which library decodes the shards when reading: zarr-python, zarrs, or tensorstore.

The on-disk format is plain Zarr v3 either way; the backends differ only in
decode speed. Measured on the demo layout (64², 64 samples per shard,
``python bench/read_throughput.py --compare``): a block-shuffled epoch costs
~6x less CPU per sample with the zarrs codec pipeline and ~8x less with
tensorstore than with zarr-python; single samples read ~5-10x faster with
tensorstore. zarr-python stays the fallback reader (fsspec URLs, nothing
extra installed); the writer's encoder is chosen in ``storage.store``.

- ``zarr``: zarr-python's own codec pipeline (always available).
- ``zarrs``: zarr-python with the Rust ``zarrs`` codec pipeline (local disk).
- ``tensorstore``: Google's tensorstore ``zarr3`` driver (local disk); it also
  reads arbitrary id lists in one call, so scattered reads stay cheap.
- ``auto``: the fastest one installed that can read this root.

tensorstore and zarrs run their own thread pools, which a forked child does
not inherit: tensorstore aborts the child, zarrs hangs it. A process forked
after either was used (a DataLoader worker started with ``fork`` after the
main process read samples) therefore gets plain zarr from ``auto`` and a
clear error from an explicit request; ``multiprocessing_context="spawn"``
keeps the fast backend in workers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from .fsio import Root
from .layout import DATA_DIR, Layout

BACKENDS = ("auto", "zarr", "zarrs", "tensorstore")
# Tried in this order by "auto"; every entry but "zarr" needs a local root.
_FAST_FIRST = ("tensorstore", "zarrs")
_INSTALL_HINT = "pip install 'labelfoundry[fast]' (or pip install tensorstore zarrs)"
# backend -> pid of the process that started its thread pool (inherited by forks)
_STARTED_IN: dict[str, int] = {}

log = logging.getLogger(__name__)


def mark_started(backend: str) -> None:
    """Record that ``backend``'s thread pool runs in this process (called when arrays are opened)."""
    if backend in _FAST_FIRST:
        _STARTED_IN.setdefault(backend, os.getpid())


def fork_safe(backend: str) -> bool:
    """False in a process forked after ``backend`` was used: its threads are gone here."""
    return _STARTED_IN.get(backend, os.getpid()) == os.getpid()


def installed(backend: str) -> bool:
    """True if ``backend``'s package can be imported (``zarr`` always)."""
    if backend == "zarr":
        return True
    return importlib.util.find_spec(backend) is not None


def resolve_backend(backend: str, root: Root) -> str:
    """The concrete backend for ``backend`` (maybe ``auto``) on ``root``; clear errors otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown read backend {backend!r}; use one of {BACKENDS}")
    if backend == "auto":
        if root.is_local:
            for name in _FAST_FIRST:
                if installed(name) and fork_safe(name):
                    return name
                if installed(name):
                    log.warning(
                        "%s was used before this process was forked (pid %d); reading with zarr here. "
                        "Start DataLoader workers with multiprocessing_context='spawn' to keep it", name, os.getpid(),
                    )
        return "zarr"
    if backend != "zarr":
        if installed(backend) and not fork_safe(backend):
            raise RuntimeError(
                f"read backend {backend!r} was used before this process was forked, and its threads do not "
                "survive fork(); start DataLoader workers with multiprocessing_context='spawn', or use "
                "backend='auto' (falls back to zarr in such workers)"
            )
        if not installed(backend):
            raise ImportError(f"read backend {backend!r} is not installed: {_INSTALL_HINT}, or use backend='zarr'")
        if not root.is_local:
            raise ValueError(
                f"read backend {backend!r} reads local directories only, but the dataset is {root.url}; "
                "use backend='zarr' (or 'auto') for fsspec URLs"
            )
    return backend


def open_tensorstore_arrays(root: Root, layout: Layout) -> dict[str, Any]:
    """Open every array of the layout read-only with tensorstore's ``zarr3`` driver."""
    import tensorstore as ts

    mark_started("tensorstore")
    context = ts.Context()
    arrays = {}
    for name in layout.arrays:
        path = root.key(f"{DATA_DIR}/{name}")
        try:
            arrays[name] = ts.open(
                {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}},
                read=True, context=context,
            ).result()
        except Exception as exc:
            raise FileNotFoundError(
                f"tensorstore cannot open {root.describe(DATA_DIR + '/' + name)} ({exc}); the dataset is "
                "damaged (regenerate it) or read it with backend='zarr' to see zarr's error"
            ) from exc
    return arrays
