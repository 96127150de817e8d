"""Read single samples from finished shards, refusing to return silent zeros.

Zarr fills a missing shard file with the fill value (0). Because a zero image
looks like valid data, every shard is checked for its files on first touch;
on zarr >= 3.2 ``read_missing_chunks=False`` is enabled as a second guard.
Built lazily so torch workers open their own handles after fork/spawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CorruptShardError, MissingChunkError, ShardIndexError
from .fsio import Root
from .layout import Layout, manifest_part_key
from .zarr_io import open_arrays


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

    def __init__(self, root: Root, layout: Layout) -> None:
        self.root = root
        self.layout = layout
        self._arrays: dict[str, Any] | None = None
        self._checked: set[int] = set()

    @property
    def arrays(self) -> dict[str, Any]:
        if self._arrays is None:
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

    def _get(self, name: str, array: Any, index: int, selection: Any) -> np.ndarray:
        key = self.layout.shard_file_key(name, index)
        try:
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
