"""``open_dataset``: pick committed samples by filter, hand out torch datasets.

Kept separate from :mod:`storage.reader` so selecting samples (pandas only)
does not import torch; torch is imported when a dataset is requested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .filters import FilterSpec, apply_filter
from .store import ShardStore


@dataclass
class OpenedDataset:
    """A committed dataset plus the rows a filter selected."""

    store: ShardStore
    manifest: pd.DataFrame

    @property
    def path(self) -> str:
        return self.store.url

    @property
    def sample_ids(self) -> np.ndarray:
        return self.manifest["sample_id"].to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.manifest)

    def dataset(self, **kwargs: Any) -> Any:
        """Map-style :class:`storage.reader.ShardDataset` (kwargs: transform)."""
        from .reader import ShardDataset

        return ShardDataset(self.path, self.sample_ids, storage_options=self.store.storage_options, **kwargs)

    def iterable(self, shuffle: bool = True, seed: int = 0, **kwargs: Any) -> Any:
        """:class:`storage.reader.ShardIterableDataset` split over DDP ranks and workers.

        kwargs: rank, world_size, drop_last, transform.
        """
        from .reader import ShardIterableDataset

        return ShardIterableDataset(
            self.path, self.sample_ids, shuffle=shuffle, seed=seed,
            storage_options=self.store.storage_options, **kwargs,
        )


def open_dataset(
    path: str, filter: FilterSpec = "keep", storage_options: dict[str, Any] | None = None
) -> OpenedDataset:
    """Open a dataset for training: committed rows only, filtered.

    ``filter``: ``"keep"`` (rows flagged keep, or all if no flags), ``None``
    (all committed rows), a ``DataFrame.query`` string, or a callable mask.
    """
    store = ShardStore.open(path, mode="r", storage_options=storage_options)
    selected = apply_filter(store.manifest(), filter).reset_index(drop=True)
    return OpenedDataset(store=store, manifest=selected)
