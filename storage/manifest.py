"""Manifest parts: one parquet file per committed shard.

A part is the commit marker of its shard, so it is built from the data that
was actually written (checksums, class fractions) and written last.
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import SampleValidationError
from .fsio import Root
from .layout import MANIFEST_DIR, Layout, manifest_part_key, parse_manifest_part_name

REQUIRED_ROW_COLUMNS = ("seed", "score", "score_top10")
COMPUTED_COLUMNS = ("sample_id", "shard", "checksum")
FLAG_COLUMNS = ("keep",)


def class_fractions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, num_classes) float32 pixel fraction of each class per label map.

    Values >= num_classes (e.g. an ignore index of 255) count toward no class.
    """
    n = labels.shape[0]
    flat = labels.reshape(n, -1).astype(np.int64)
    pixels = flat.shape[1]
    offsets = (np.arange(n, dtype=np.int64) * 256)[:, None]
    counts = np.bincount((flat + offsets).ravel(), minlength=n * 256).reshape(n, 256)
    return (counts[:, :num_classes] / float(pixels)).astype(np.float32)


def rows_frame(rows: pd.DataFrame | Mapping[str, Any], n: int, layout: Layout) -> pd.DataFrame:
    """Validate the caller's per-sample columns for a shard of ``n`` samples."""
    frame = rows.reset_index(drop=True).copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(dict(rows))
    if len(frame) != n:
        raise SampleValidationError(f"rows has {len(frame)} entries but the shard holds {n} samples")
    missing = [c for c in REQUIRED_ROW_COLUMNS if c not in frame.columns]
    if missing:
        raise SampleValidationError(
            f"rows is missing required column(s) {missing}; pass seed, score, score_top10 per sample"
        )
    reserved = set(COMPUTED_COLUMNS) | set(layout.fraction_columns()) | set(FLAG_COLUMNS)
    clash = sorted(c for c in frame.columns if c in reserved or str(c).startswith("keep_"))
    if clash:
        raise SampleValidationError(
            f"rows must not contain {clash}: write_shard computes sample_id/shard/checksum/frac_* "
            "itself and filter flags go through write_flags"
        )
    seeds = np.asarray(frame["seed"])
    if not np.issubdtype(seeds.dtype, np.integer):
        raise SampleValidationError(f"rows['seed'] must be integers, got dtype {seeds.dtype}")
    if len(seeds) and (seeds.min() < 0 or int(seeds.max()) > np.iinfo(np.int64).max):
        raise SampleValidationError("rows['seed'] must be in [0, 2**63) to fit the int64 manifest column")
    return frame


def build_part(
    layout: Layout,
    index: int,
    rows: pd.DataFrame,
    checksums: list[str],
    labels: np.ndarray,
) -> pd.DataFrame:
    """The manifest part of shard ``index`` in canonical column order and dtypes."""
    ids = np.asarray(layout.shard_range(index), dtype=np.int64)
    part = pd.DataFrame(
        {
            "sample_id": ids,
            "shard": np.full(len(ids), index, dtype=np.int64),
            "seed": np.asarray(rows["seed"]).astype(np.int64),
            "score": np.asarray(rows["score"], dtype=np.float64),
            "score_top10": np.asarray(rows["score_top10"], dtype=np.float64),
        }
    )
    if layout.is_segmentation:
        fractions = class_fractions(labels, len(layout.class_names))
        for k, column in enumerate(layout.fraction_columns()):
            part[column] = fractions[:, k]
    part["checksum"] = pd.Series(checksums, dtype=object)
    for column in rows.columns:
        if column not in REQUIRED_ROW_COLUMNS:
            part[column] = rows[column].to_numpy()
    return part


def part_to_bytes(part: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(part, preserve_index=False), buf)
    return buf.getvalue()


def part_from_bytes(data: bytes) -> pd.DataFrame:
    return pq.read_table(pa.BufferReader(data)).to_pandas()


def write_part(root: Root, index: int, part: pd.DataFrame) -> None:
    """Commit shard ``index``: atomically publish its manifest part."""
    root.write_atomic(manifest_part_key(index), part_to_bytes(part))


def read_part(root: Root, index: int) -> pd.DataFrame | None:
    """Shard ``index``'s manifest part, or None if the shard is not committed."""
    try:
        return part_from_bytes(root.read_bytes(manifest_part_key(index)))
    except FileNotFoundError:
        return None


def committed_indices(root: Root, num_shards: int) -> list[int]:
    """Indices of shards whose manifest part exists (temp files are ignored)."""
    found = (parse_manifest_part_name(name) for name in root.list_names(MANIFEST_DIR))
    return sorted(i for i in found if i is not None and i < num_shards)


def read_parts(root: Root, indices: list[int]) -> pd.DataFrame:
    """Concatenation of the given shards' manifest parts, sorted by sample_id."""
    keys = [manifest_part_key(i) for i in indices]
    blobs = root.read_many(keys)
    frames = [part_from_bytes(blobs[k]) for k in keys]
    if not frames:
        return pd.DataFrame({"sample_id": pd.Series([], dtype=np.int64), "shard": pd.Series([], dtype=np.int64)})
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values("sample_id", kind="stable").reset_index(drop=True)
