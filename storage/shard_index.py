"""A cheap check of one Zarr shard file from its size and shard index alone (no decoding).

Used by ``verify(deep=False)`` (the re-check of a re-run) and by ``write_shard``, which deletes a
file zarr could not merge into. Zarr v3 sharding, zarr's default codec as
`zarr_io.create_arrays` makes it: each shard file ends with its index, one little-endian uint64
(offset, nbytes) pair per inner chunk (one sample), then a crc32c of those pairs.
"""

from __future__ import annotations

import google_crc32c
import numpy as np

from .fsio import Root
from .layout import Layout

_INDEX_ENTRY_BYTES = 16
_CRC_BYTES = 4
_EMPTY = np.uint64(2**64 - 1)


def shard_file_problem(root: Root, layout: Layout, key: str, index: int) -> str | None:
    """What is wrong with one shard file judged by its size and shard index alone, or None.

    Reads only the index at the file's end: a truncated file loses it (crc32c mismatch), and every
    sample of the shard must have a chunk (arrays are written with write_empty_chunks=True) lying
    inside the file."""
    size = root.size(key)
    if not size:
        return "shard file missing" if size is None else "shard file empty"
    index_bytes = layout.samples_per_shard * _INDEX_ENTRY_BYTES + _CRC_BYTES
    if size < index_bytes:
        return f"shard file truncated: {size} bytes, less than its {index_bytes}-byte shard index"
    tail = root.read_range(key, size - index_bytes, size)
    if google_crc32c.value(tail[:-_CRC_BYTES]) != int.from_bytes(tail[-_CRC_BYTES:], "little"):
        return f"shard file truncated or corrupt: its shard index (last {index_bytes} bytes) fails its crc32c"
    pairs = np.frombuffer(tail[:-_CRC_BYTES], dtype="<u8").reshape(-1, 2)[: len(layout.shard_range(index))]
    absent = np.flatnonzero(pairs[:, 0] == _EMPTY)
    if len(absent):
        return f"shard file lacks the chunks of {len(absent)} sample(s) (shard positions {absent[:8].tolist()})"
    ends = pairs[:, 0].astype(np.int64) + pairs[:, 1].astype(np.int64)
    if int(ends.max()) > size - index_bytes:
        return f"shard file truncated: its index points past the data ({int(ends.max())} > {size - index_bytes} bytes)"
    return None
