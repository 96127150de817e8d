"""Torch datasets over committed samples (the only storage module importing torch).

Datasets hold just the dataset URL and the selected sample ids; every
process (DataLoader worker, DDP rank) opens its own handles lazily, so
nothing unpicklable or fork-unsafe crosses process boundaries. Reads go
through the fastest installed backend (:mod:`storage.read_backends`); the
iterable dataset reads shard-sized runs in the block-shuffled order of
:mod:`storage.shuffle` and resumes mid-epoch from :meth:`state_dict`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .fsio import resolve
from .layout import read_layout
from .sample_reader import SampleReader
from .shuffle import SHUFFLES, epoch_order, partition

Transform = Callable[[dict[str, Any]], dict[str, Any]]


class _LazyReader:
    """A SampleReader created on first use in each process (re-created after fork)."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None, backend: str = "auto") -> None:
        self.path = path
        self.storage_options = dict(storage_options or {})
        self.backend = backend
        self._reader: SampleReader | None = None
        self._pid: int | None = None

    def get(self) -> SampleReader:
        if self._reader is None or self._pid != os.getpid():
            root = resolve(self.path, self.storage_options)
            layout, _ = read_layout(root)
            self._reader = SampleReader(root, layout, self.backend)
            self._pid = os.getpid()
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.path, "storage_options": self.storage_options, "backend": self.backend,
            "_reader": None, "_pid": None,
        }


def to_torch(sample: dict[str, np.ndarray], sample_id: int) -> dict[str, Any]:
    """numpy sample -> tensors: image (3,H,W) uint8; every other array (label, uncertainty, w, and a
    multi-label dataset's keypoints / depth / uncertainty_<type>) as stored."""
    out: dict[str, Any] = {"image": torch.from_numpy(np.ascontiguousarray(sample["image"].transpose(2, 0, 1)))}
    for name, value in sample.items():
        if name != "image":
            out[name] = torch.from_numpy(np.ascontiguousarray(value))
    out["sample_id"] = int(sample_id)
    return out


class InMemoryDataset(Dataset):
    """The selected samples' arrays read once, in whole-dataset passes, then served from memory: the
    same items as :class:`ShardDataset` (same order, same tensors) for sets that fit in RAM, where a
    training job would otherwise re-read every sample from its shard on every epoch."""

    def __init__(self, arrays: dict[str, np.ndarray], sample_ids: Sequence[int] | np.ndarray,
                 transform: Transform | None = None) -> None:
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        bad = {n: len(a) for n, a in arrays.items() if len(a) != len(self.sample_ids)}
        if bad:
            raise ValueError(f"arrays {bad} do not have one row per sample id ({len(self.sample_ids)})")
        self.arrays = arrays
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = to_torch({n: a[i] for n, a in self.arrays.items()}, int(self.sample_ids[i]))
        return self.transform(item) if self.transform else item


class ShardDataset(Dataset):
    """Map-style dataset over ``sample_ids`` (use with any sampler / DistributedSampler)."""

    def __init__(
        self,
        path: str,
        sample_ids: Sequence[int] | np.ndarray,
        *,
        storage_options: dict[str, Any] | None = None,
        transform: Transform | None = None,
        backend: str = "auto",
    ) -> None:
        self.path = str(path)
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.transform = transform
        self._reader = _LazyReader(self.path, storage_options, backend)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample_id = int(self.sample_ids[i])
        item = to_torch(self._reader.get().read(sample_id), sample_id)
        return self.transform(item) if self.transform else item

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A DataLoader batch in one read (torch calls this instead of ``__getitem__``)."""
        ids = self.sample_ids[np.asarray(indices, dtype=np.int64)]
        rows = self._reader.get().read_many(ids)
        items = [to_torch({n: a[k] for n, a in rows.items()}, int(sid)) for k, sid in enumerate(ids)]
        return [self.transform(item) for item in items] if self.transform else items


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


def _ids_digest(sample_ids: np.ndarray) -> str:
    """Short hash of the selected ids: a resume must select the same samples."""
    return hashlib.sha256(np.sort(np.asarray(sample_ids, dtype=np.int64)).tobytes()).hexdigest()[:16]


class ShardIterableDataset(IterableDataset):
    """Iterable dataset in block-shuffled order, split across DDP ranks and DataLoader workers.

    The order is fixed by (seed, epoch) alone (:func:`storage.shuffle.epoch_order`);
    call :meth:`set_epoch` each epoch (as with DistributedSampler; with
    ``persistent_workers=True`` the workers keep the epoch and resume state they
    were started with).
    Each process reads its samples as shard-sized runs, a buffer of shards at a time.

    ``batch_size`` must equal the DataLoader's: samples are dealt to ranks
    and workers in whole batches, so the samples a job has seen are always a
    prefix of the epoch order and :meth:`state_dict` needs only their count.
    """

    def __init__(
        self,
        path: str,
        sample_ids: Sequence[int] | np.ndarray,
        *,
        shuffle: bool | str = True,
        seed: int = 0,
        block_size: int | None = None,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        storage_options: dict[str, Any] | None = None,
        transform: Transform | None = None,
        backend: str = "auto",
    ) -> None:
        algorithm = ("py1b" if shuffle else "none") if isinstance(shuffle, bool) else shuffle
        if algorithm not in SHUFFLES:
            raise ValueError(f"shuffle must be True, False or one of {SHUFFLES}, got {shuffle!r}")
        if int(batch_size) < 1 or (block_size is not None and int(block_size) < 1):
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
        self.path = str(path)
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.shuffle = str(algorithm)
        self.seed = int(seed)
        self.block_size = None if block_size is None else int(block_size)
        self.batch_size = int(batch_size)
        self.epoch = 0
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.drop_last = drop_last
        self.transform = transform
        self._reader = _LazyReader(self.path, storage_options, backend)
        self._resume: tuple[int, int] | None = None  # (epoch, samples seen before this run)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ----------------------------------------------------------- resume
    def _start(self) -> int:
        """Samples of the current epoch already seen before this run (0 unless resumed)."""
        return self._resume[1] if self._resume and self._resume[0] == self.epoch else 0

    def state_dict(self, samples_seen: int) -> dict[str, Any]:
        """State to resume this epoch after ``samples_seen`` samples.

        ``samples_seen``: samples consumed in this epoch by all ranks together,
        counted from the epoch's start (across earlier resumes), i.e.
        ``sum over steps of batch_size * world_size``. Plain ints and strings:
        it goes into any checkpoint.
        """
        n = int(samples_seen)
        if not 0 <= n <= len(self.sample_ids):
            raise ValueError(f"samples_seen must be in [0, {len(self.sample_ids)}] (this epoch's samples), got {n}")
        return {
            "epoch": self.epoch, "samples_seen": n, "seed": self.seed, "shuffle": self.shuffle,
            "block_size": self.block_size, "num_samples": len(self.sample_ids),
            "ids_digest": _ids_digest(self.sample_ids),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch where it stopped; ranks, workers and batch size may differ."""
        mine = self.state_dict(0)
        differ = [k for k in ("seed", "shuffle", "block_size", "num_samples", "ids_digest") if state.get(k) != mine[k]]
        if differ:
            raise ValueError(
                "cannot resume: the saved reader state differs in "
                + ", ".join(f"{k} (saved {state.get(k)!r}, now {mine[k]!r})" for k in differ)
                + "; open the dataset with the same filter, seed, shuffle and block_size as the saved run"
            )
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["samples_seen"]))

    # ------------------------------------------------------------ order
    def __len__(self) -> int:
        """Samples this rank yields in the rest of this epoch (summed over its workers)."""
        n = len(self.sample_ids) - self._start()
        rnd = self.world_size * self.batch_size
        if self.drop_last:
            n -= n % rnd
        rem = n % rnd
        return (n // rnd) * self.batch_size + min(max(rem - self.rank * self.batch_size, 0), self.batch_size)

    def worker_ids(self) -> np.ndarray:
        """Ids the calling process (this rank's current worker) will yield, in order."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = epoch_order(
            self.sample_ids, samples_per_shard=self._reader.get().layout.samples_per_shard,
            seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, block_size=self.block_size,
        )
        return partition(
            order[self._start():], rank=self.rank, world_size=self.world_size, worker=worker,
            num_workers=num_workers, batch_size=self.batch_size, drop_last=self.drop_last,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader = self._reader.get()
        for sample_id, row in buffered_rows(reader, self.worker_ids(), self.block_size):
            item = to_torch(row, sample_id)
            yield self.transform(item) if self.transform else item


def buffered_rows(
    reader: SampleReader, ids: np.ndarray, lookahead: int | None = None
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(id, arrays)`` for ``ids`` in order, reading a buffer of shards at a time.

    On a miss, every shard met in the next ``lookahead`` ids (default 8
    shards' worth) is read in one :meth:`SampleReader.read_many` call, for all
    of *these* ids in it (a whole shard when this process reads all of it);
    rows wait in the buffer until their turn and are dropped once yielded.
    """
    spp = reader.layout.samples_per_shard
    ids = np.asarray(ids, dtype=np.int64)
    shard = ids // spp
    ahead = int(lookahead or 8 * spp)
    order = np.argsort(shard, kind="stable")
    bounds = np.flatnonzero(np.diff(shard[order])) + 1
    pending = {int(g[0]) // spp: g for g in np.split(ids[order], bounds)} if len(ids) else {}
    buffer: dict[int, tuple[dict[str, np.ndarray], int]] = {}
    for p, sample_id in enumerate(ids.tolist()):
        if sample_id not in buffer:
            wanted = [pending.pop(s) for s in dict.fromkeys(shard[p : p + ahead].tolist()) if s in pending]
            load = np.concatenate(wanted)
            rows = reader.read_many(load)
            buffer.update((int(sid), (rows, k)) for k, sid in enumerate(load.tolist()))
        rows, k = buffer.pop(sample_id)
        yield sample_id, {n: a[k] for n, a in rows.items()}
