"""Exceptions raised by :mod:`storage`.

Every error message names the offending file (or key) and says how to fix it,
because these errors are usually read in a Prefect log far from the code.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class for all dataset-storage errors."""


class NotADatasetError(StorageError, FileNotFoundError):
    """The path has no ``dataset.json``: it was never created or is the wrong path."""


class FormatVersionError(StorageError):
    """``dataset.json`` was written by an incompatible version of this package."""


class LayoutMismatchError(StorageError):
    """``create`` was called on an existing dataset with a different layout."""


class ShardIndexError(StorageError, IndexError):
    """A shard index or sample id outside the dataset."""


class SampleValidationError(StorageError, ValueError):
    """Arrays or manifest rows passed to ``write_shard`` do not match the layout."""


class ShardCommittedError(StorageError):
    """Refused to overwrite a committed shard with different data."""


class UncommittedShardError(StorageError):
    """A read touched a shard that has no manifest part (it is not finished)."""


class MissingChunkError(StorageError):
    """A committed shard's data file is missing: reading it would return zeros."""


class CorruptShardError(StorageError):
    """A shard's data failed to decode or does not match its manifest checksums."""


class DiskFullError(StorageError, OSError):
    """No space left (or quota exceeded) while writing a dataset; ``errno`` stays ENOSPC/EDQUOT so
    task retries treat it as permanent (`tasks.common.is_permanent`)."""

    def __str__(self) -> str:
        return f"[Errno {self.errno}] {self.strerror}"


class DatasetLockError(StorageError, TimeoutError):
    """Another process held the dataset's creation lock for too long."""


class ReadOnlyError(StorageError, PermissionError):
    """A write was attempted on a dataset opened with ``mode='r'``."""
