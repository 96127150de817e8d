"""``open_dataset``, the reader: pick committed samples by filter, hand out torch datasets.

It meets the writer (`storage.store`) only through the on-disk format (`layout`, `manifest`,
`filters`, `zarr_io`). Selecting samples needs pandas only; torch is imported when a dataset is
requested (`storage.reader`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .filters import FilterSpec, apply_filter, read_manifest
from .fsio import Root, resolve
from .layout import Layout, read_layout
from .zarr_io import read_rows


@dataclass
class OpenedDataset:
    """A committed dataset plus the rows a filter selected."""

    root: Root
    layout: Layout
    manifest: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.root.url

    @property
    def storage_options(self) -> dict[str, Any]:
        return dict(self.root.storage_options)

    @property
    def sample_ids(self) -> np.ndarray:
        return self.manifest["sample_id"].to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.manifest)

    def read_array(self, name: str, sample_ids: np.ndarray | None = None) -> np.ndarray:
        """Array `name` of the given (default: the selected) samples, (n, *shape) in id order given.

        For whole-dataset passes (de-duplication, statistics); training reads through `dataset()`."""
        ids = self.sample_ids if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
        return read_rows(self.root, self.layout, name, ids)

    def dataset(self, **kwargs: Any) -> Any:
        """Map-style :class:`storage.reader.ShardDataset` (kwargs: transform)."""
        from .reader import ShardDataset

        return ShardDataset(self.path, self.sample_ids, storage_options=self.storage_options, **kwargs)

    def nbytes(self, arrays: list[str] | None = None) -> int:
        """Bytes the selected samples' arrays take decoded (all arrays by default), from the layout:
        no sample is read."""
        specs = [self.layout.arrays[n] for n in (arrays or list(self.layout.arrays))]
        return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs) * len(self)

    def in_memory(self, arrays: list[str] | None = None, **kwargs: Any) -> Any:
        """:class:`storage.reader.InMemoryDataset` of the selected samples (kwargs: transform): each
        array read once, whole shards at a time; for sets that fit in RAM (check with `nbytes`)."""
        from .reader import InMemoryDataset
        from .sample_reader import SampleReader

        rows = SampleReader(self.root, self.layout, "auto").read_many(self.sample_ids, arrays or list(self.layout.arrays))
        return InMemoryDataset(rows, self.sample_ids, **kwargs)

    def iterable(self, shuffle: bool = True, seed: int = 0, **kwargs: Any) -> Any:
        """:class:`storage.reader.ShardIterableDataset` split over DDP ranks and workers.

        kwargs: rank, world_size, drop_last, transform.
        """
        from .reader import ShardIterableDataset

        return ShardIterableDataset(
            self.path, self.sample_ids, shuffle=shuffle, seed=seed,
            storage_options=self.storage_options, **kwargs,
        )


def open_dataset(
    path: str, filter: FilterSpec = "keep", storage_options: dict[str, Any] | None = None
) -> OpenedDataset:
    """Open a dataset for training: committed rows only, filtered.

    ``filter``: ``"keep"`` (rows flagged keep, or all if no flags), ``None``
    (all committed rows), a ``DataFrame.query`` string, or a callable mask.
    """
    root = resolve(path, storage_options)
    layout, info = read_layout(root)
    selected = apply_filter(read_manifest(root, layout.num_shards), filter).reset_index(drop=True)
    return OpenedDataset(root=root, layout=layout, manifest=selected, info=info)


def manifest_hash(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """Content hash of the committed samples (their checksums in id order): what a downstream
    stage's cache key uses, so any regenerated shard invalidates it."""
    m = open_dataset(path, filter=None, storage_options=storage_options).manifest
    return hashlib.sha256("".join(m.sort_values("sample_id")["checksum"]).encode()).hexdigest()


def flags_hash(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """Hash of the filter flags on disk (every keep column by sample id): what training reads."""
    m = open_dataset(path, filter=None, storage_options=storage_options).manifest
    cols = [c for c in m.columns if c == "keep" or c.startswith("keep_")]
    return hashlib.sha256(m[["sample_id", *cols]].to_csv(index=False).encode()).hexdigest()
