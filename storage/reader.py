"""Torch datasets over committed samples (the only storage module importing torch).

Datasets hold just the dataset URL and the selected sample ids; every
process (DataLoader worker, DDP rank) opens its own Zarr handles lazily, so
nothing unpicklable or fork-unsafe crosses process boundaries.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .fsio import resolve
from .layout import read_layout
from .sample_reader import SampleReader

Transform = Callable[[dict[str, Any]], dict[str, Any]]


class _LazyReader:
    """A SampleReader created on first use in each process (re-created after fork)."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None) -> None:
        self.path = path
        self.storage_options = dict(storage_options or {})
        self._reader: SampleReader | None = None
        self._pid: int | None = None

    def get(self) -> SampleReader:
        if self._reader is None or self._pid != os.getpid():
            root = resolve(self.path, self.storage_options)
            layout, _ = read_layout(root)
            self._reader = SampleReader(root, layout)
            self._pid = os.getpid()
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "storage_options": self.storage_options, "_reader": None, "_pid": None}


def to_torch(sample: dict[str, np.ndarray], sample_id: int) -> dict[str, Any]:
    """numpy sample -> tensors: image (3,H,W) uint8, label/uncertainty/w as stored."""
    out: dict[str, Any] = {"image": torch.from_numpy(np.ascontiguousarray(sample["image"].transpose(2, 0, 1)))}
    for name in ("label", "uncertainty", "w"):
        if name in sample:
            out[name] = torch.from_numpy(np.ascontiguousarray(sample[name]))
    out["sample_id"] = int(sample_id)
    return out


class ShardDataset(Dataset):
    """Map-style dataset over ``sample_ids`` (use with any sampler / DistributedSampler)."""

    def __init__(
        self,
        path: str,
        sample_ids: Sequence[int] | np.ndarray,
        *,
        storage_options: dict[str, Any] | None = None,
        transform: Transform | None = None,
    ) -> None:
        self.path = str(path)
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.transform = transform
        self._reader = _LazyReader(self.path, storage_options)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample_id = int(self.sample_ids[i])
        item = to_torch(self._reader.get().read(sample_id), sample_id)
        return self.transform(item) if self.transform else item


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; else torch.distributed if initialised; else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return int(rank), int(world_size)


def epoch_order(sample_ids: np.ndarray, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Global order of ids for one epoch; identical on every rank and worker."""
    ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
    if not shuffle:
        return ids
    return ids[np.random.default_rng([int(seed), int(epoch)]).permutation(len(ids))]


def partition(
    order: np.ndarray, *, rank: int, world_size: int, worker: int, num_workers: int, drop_last: bool
) -> np.ndarray:
    """Ids for one (rank, worker): split by rank first, then by DataLoader worker.

    Every id lands in exactly one (rank, worker). ``drop_last`` trims the tail so
    all ranks get the same count (needed when DDP steps must stay in lockstep).
    """
    if drop_last:
        order = order[: len(order) - len(order) % world_size]
    return order[rank::world_size][worker::num_workers]


class ShardIterableDataset(IterableDataset):
    """Iterable dataset split across DDP ranks and DataLoader workers.

    Shuffled deterministically by (seed, epoch); call :meth:`set_epoch` each
    epoch (as with DistributedSampler; with ``persistent_workers=True`` the
    workers keep the epoch they were started with).
    """

    def __init__(
        self,
        path: str,
        sample_ids: Sequence[int] | np.ndarray,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        storage_options: dict[str, Any] | None = None,
        transform: Transform | None = None,
    ) -> None:
        self.path = str(path)
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.drop_last = drop_last
        self.transform = transform
        self._reader = _LazyReader(self.path, storage_options)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (summed over its workers)."""
        n = len(self.sample_ids)
        if self.drop_last:
            n -= n % self.world_size
        return len(range(self.rank, n, self.world_size))

    def worker_ids(self) -> np.ndarray:
        """Ids the calling process (this rank's current worker) will yield this epoch."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = epoch_order(self.sample_ids, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
        return partition(
            order, rank=self.rank, world_size=self.world_size, worker=worker,
            num_workers=num_workers, drop_last=self.drop_last,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader = self._reader.get()
        for sample_id in self.worker_ids():
            item = to_torch(reader.read(int(sample_id)), int(sample_id))
            yield self.transform(item) if self.transform else item
