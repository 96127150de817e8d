"""What a user watches while the factory runs: the stage it is in and, during generation, the shards
committed so far.

The store is the one source of truth: a watcher thread polls its committed shards, so progress moves
per committed shard whatever runs the tasks (threads, Dask or Ray processes). The factory publishes
each change to a progress artifact on its own flow run (the run the CLI and the UI show), and to any
in-process listener (the CLI's progress display).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationProgress:
    """Shards and samples committed so far, of a store's totals."""

    shards: int
    total_shards: int
    samples: int
    total_samples: int

    @property
    def percent(self) -> float:
        return 100.0 * self.shards / max(1, self.total_shards)

    def describe(self) -> str:
        """"37 / 64 shards, 2,368 / 4,096 samples" (the artifact's description, the CLI's line)."""
        return f"{self.shards:,} / {self.total_shards:,} shards, {self.samples:,} / {self.total_samples:,} samples"


@dataclass(frozen=True)
class ProgressEvent:
    """A stage starting (generation None) or generation moving (generation set)."""

    stage: str
    generation: GenerationProgress | None = None
    link: str | None = None  # where the UI shows this run's progress, when a UI serves the API


Listener = Callable[[ProgressEvent], None]
_LISTENERS: list[Listener] = []


def add_listener(fn: Listener) -> None:
    """Receive every ProgressEvent of flows run in this process (the CLI's display)."""
    _LISTENERS.append(fn)


def remove_listener(fn: Listener) -> None:
    if fn in _LISTENERS:
        _LISTENERS.remove(fn)


def emit(event: ProgressEvent) -> None:
    """Tell the listeners; a listener's error never breaks the run."""
    for fn in list(_LISTENERS):
        try:
            fn(event)
        except Exception:  # noqa: BLE001 - display only
            pass


def committed(store_path: str) -> GenerationProgress:
    """What the store at `store_path` holds now (its manifest parts, as `ShardStore.committed_shards`)."""
    import storage

    store = storage.ShardStore.open(store_path)
    done = store.committed_shards()
    samples = sum(len(store.shard_range(i)) for i in done)
    return GenerationProgress(len(done), store.num_shards, samples, store.num_samples)


class StoreWatcher:
    """A daemon thread calling `on_change(GenerationProgress)` each time the store's committed count
    changes (checked every `interval` seconds), and once more on `stop()` with the final count."""

    def __init__(self, store_path: str, on_change: Callable[[GenerationProgress], None], interval: float = 1.0) -> None:
        self.store_path, self.on_change, self.interval = store_path, on_change, interval
        self._stop = threading.Event()
        self._last: GenerationProgress | None = None
        self._thread = threading.Thread(target=self._run, name="store-watcher", daemon=True)

    def __enter__(self) -> "StoreWatcher":
        self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def _poll(self) -> None:
        try:
            now = committed(self.store_path)
        except Exception:  # noqa: BLE001 - a half-written manifest part is read on the next poll
            return
        if now != self._last:
            self._last = now
            self.on_change(now)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

