"""Read single samples from finished shards, refusing to return silent zeros.

Zarr fills a missing shard file with the fill value (0). Because a zero image
looks like valid data, every shard is checked for its files on first touch;
on zarr >= 3.2 ``read_missing_chunks=False`` is enabled as a second guard.
Built lazily so torch workers open their own handles after fork/spawn.
Reads go through one of :mod:`storage.read_backends` (zarr-python by default).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CorruptShardError, MissingChunkError, ShardIndexError
from .fsio import Root
from .layout import Layout, manifest_part_key
from .read_backends import mark_started, open_tensorstore_arrays, resolve_backend
from .zarr_io import ZARRS_PIPELINE, open_arrays, open_arrays_with_pipeline

# zarr backends read a shard-sized run [min id, max id] and drop the rows not
# asked for while the run is at most this many times the rows wanted; sparser
# selections are read sample by sample (one whole-shard read costs about as
# much as 7-9 single-sample reads with zarr-python on the demo layout).
RUN_READ_MAX_WASTE = 8


def regenerate_hint(root: Root, index: int) -> str:
    """The standard fix for a damaged committed shard: uncommit it, then resume."""
    return f"delete {root.describe(manifest_part_key(index))} and re-run generation to regenerate it"


def check_shard_files(root: Root, layout: Layout, index: int) -> None:
    """Raise :class:`MissingChunkError` if any array's shard file is absent or empty."""
    for name in layout.arrays:
        key = layout.shard_file_key(name, index)
        size = root.size(key)
        if not size:
            state = "is missing" if size is None else "is empty"
            raise MissingChunkError(
                f"{root.describe(key)} {state} but shard {index} is committed; reading it would "
                f"return zeros. Fix: {regenerate_hint(root, index)}"
            )


class SampleReader:
    """Reads samples by global id; one instance per process (not picklable state)."""

    def __init__(self, root: Root, layout: Layout, backend: str = "zarr") -> None:
        self.root = root
        self.layout = layout
        self.backend = resolve_backend(backend, root)
        self._arrays: dict[str, Any] | None = None
        self._checked: set[int] = set()

    @property
    def arrays(self) -> dict[str, Any]:
        if self._arrays is None:
            if self.backend == "tensorstore":
                self._arrays = open_tensorstore_arrays(self.root, self.layout)
            elif self.backend == "zarrs":
                mark_started("zarrs")
                self._arrays = open_arrays_with_pipeline(self.root, self.layout, ZARRS_PIPELINE)
            else:
                self._arrays = open_arrays(self.root, self.layout, writable=False)
        return self._arrays

    def _check_id(self, sample_id: int) -> int:
        if not 0 <= sample_id < self.layout.num_samples:
            raise ShardIndexError(
                f"sample_id {sample_id} out of range: {self.root.describe('dataset.json')} "
                f"has {self.layout.num_samples} samples (0..{self.layout.num_samples - 1})"
            )
        return self.layout.shard_of(sample_id)

    def ensure_shard(self, index: int) -> None:
        """Check a shard's files once per reader (cached)."""
        if index not in self._checked:
            check_shard_files(self.root, self.layout, index)
            self._checked.add(index)

    def read(self, sample_id: int) -> dict[str, np.ndarray]:
        """Arrays of one sample (image (H,W,3) uint8, label, uncertainty, w)."""
        sample_id = int(sample_id)
        if self.backend == "tensorstore":  # all arrays in flight at once
            return {n: a[0] for n, a in self.read_many([sample_id]).items()}
        index = self._check_id(sample_id)
        self.ensure_shard(index)
        out = {}
        for name, array in self.arrays.items():
            out[name] = self._get(name, array, index, sample_id)
        return out

    def read_shard(self, index: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Whole-shard arrays in one read per array (used by ``verify``)."""
        self.ensure_shard(index)
        rng = self.layout.shard_range(index)
        sel = slice(rng.start, rng.stop)
        return {n: self._get(n, self.arrays[n], index, sel) for n in (names or list(self.arrays))}

    def read_many(self, sample_ids: Any, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of many samples, stacked ``(n, ...)`` in the order of ``sample_ids``.

        tensorstore reads exactly the ids, in one call per array; the zarr
        backends read one shard-sized run per shard touched (or single samples
        where the ids are sparse in it, see :data:`RUN_READ_MAX_WASTE`).
        """
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        names = names or list(self.arrays)
        if len(ids) == 0:
            return {n: np.empty((0, *self.layout.arrays[n].shape), self.layout.arrays[n].dtype) for n in names}
        self._check_id(int(ids.min()))
        self._check_id(int(ids.max()))
        shards = np.unique(ids // self.layout.samples_per_shard)
        for index in shards.tolist():
            self.ensure_shard(int(index))
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        if self.backend == "tensorstore":
            got = self._read_tensorstore(sorted_ids, shards, names)
        else:
            got = self._read_runs(sorted_ids, names)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {n: got[n][inverse] for n in names}

    def _read_tensorstore(self, sorted_ids: np.ndarray, shards: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        first = int(shards[0])
        try:
            futures = {n: self.arrays[n][sorted_ids].read() for n in names}
            return {n: np.asarray(f.result()) for n, f in futures.items()}
        except Exception as exc:
            where = self.root.describe(self.layout.shard_file_key(names[0], first))
            raise CorruptShardError(
                f"failed to decode shards {shards.tolist()} (first: {where}; {type(exc).__name__}: {exc}). "
                f"Fix: run `labelfoundry verify` on the dataset, then {regenerate_hint(self.root, first)}"
            ) from exc

    def _read_runs(self, sorted_ids: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        shard_of = sorted_ids // self.layout.samples_per_shard
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for group in np.split(sorted_ids, bounds):
            index = int(group[0]) // self.layout.samples_per_shard
            lo, hi = int(group[0]), int(group[-1]) + 1
            for name in names:
                array = self.arrays[name]
                if hi - lo <= RUN_READ_MAX_WASTE * len(group):
                    parts[name].append(self._get(name, array, index, slice(lo, hi))[group - lo])
                else:
                    parts[name].append(np.stack([self._get(name, array, index, int(i)) for i in group]))
        return {n: np.concatenate(p) for n, p in parts.items()}

    def _get(self, name: str, array: Any, index: int, selection: Any) -> np.ndarray:
        key = self.layout.shard_file_key(name, index)
        try:
            if self.backend == "tensorstore":
                return np.asarray(array[selection].read().result())
            return np.asarray(array[selection])
        except MissingChunkError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "ChunkNotFoundError":
                raise MissingChunkError(
                    f"{self.root.describe(key)} is missing a chunk (zarr: {exc}). "
                    f"Fix: {regenerate_hint(self.root, index)}"
                ) from exc
            raise CorruptShardError(
                f"failed to decode {self.root.describe(key)} ({type(exc).__name__}: {exc}). "
                f"Fix: {regenerate_hint(self.root, index)}"
            ) from exc
