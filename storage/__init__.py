"""Sharded Zarr v3 storage for labelfoundry datasets.

Layout: ``data.zarr/`` (sharded arrays), ``manifest/shard-XXXXXX.parquet``
(one commit marker per shard), ``dataset.json`` (layout + provenance),
``filters/<name>.parquet`` (keep flags). The writer (`store.ShardStore`) and the
reader (`dataset.open_dataset`) meet only through that format. Torch datasets live in
:mod:`storage.reader` and are imported lazily so ``import storage`` does
not import torch.
"""

from __future__ import annotations

from typing import Any

from .dataset import OpenedDataset, flags_hash, manifest_hash, open_dataset
from .errors import (
    CorruptShardError,
    DatasetLockError,
    DiskFullError,
    FormatVersionError,
    LayoutMismatchError,
    MissingChunkError,
    NotADatasetError,
    ReadOnlyError,
    SampleValidationError,
    ShardCommittedError,
    ShardIndexError,
    StorageError,
    UncommittedShardError,
)
from .hashing import sample_checksum, shard_seed
from .layout import FORMAT_VERSION, score_column, uncertainty_array
from .store import ShardStore
from .verify import BadShard, VerifyReport, repair, verify

_LAZY = {"InMemoryDataset", "ShardDataset", "ShardIterableDataset"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'storage' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "BadShard",
    "CorruptShardError",
    "DatasetLockError",
    "DiskFullError",
    "FormatVersionError",
    "InMemoryDataset",
    "LayoutMismatchError",
    "MissingChunkError",
    "NotADatasetError",
    "OpenedDataset",
    "ReadOnlyError",
    "SampleValidationError",
    "ShardCommittedError",
    "ShardDataset",
    "ShardIndexError",
    "ShardIterableDataset",
    "ShardStore",
    "StorageError",
    "UncommittedShardError",
    "VerifyReport",
    "flags_hash",
    "manifest_hash",
    "open_dataset",
    "repair",
    "sample_checksum",
    "score_column",
    "shard_seed",
    "uncertainty_array",
    "verify",
]
