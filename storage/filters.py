"""Filter flags: per-sample keep/drop decisions stored beside the data.

Filtering never rewrites shards; each filter writes ``filters/<name>.parquet``
(sample_id, keep, reason columns) atomically, and ``manifest()`` merges them.
Merged columns: ``keep_<name>`` per filter and ``keep`` = all filters say keep
(a sample a filter has not evaluated counts as not kept).
"""

from __future__ import annotations

import posixpath
from typing import Callable, Union

import numpy as np
import pandas as pd

from .errors import SampleValidationError
from .fsio import Root
from .layout import FILTERS_DIR, filter_key
from .manifest import committed_indices, part_from_bytes, part_to_bytes, read_parts

FilterSpec = Union[str, Callable[[pd.DataFrame], "pd.Series | np.ndarray"], None]


def filter_names(root: Root) -> list[str]:
    """Names of the filters written so far."""
    return [
        posixpath.splitext(n)[0]
        for n in root.list_names(FILTERS_DIR)
        if n.endswith(".parquet") and not n.startswith(".")
    ]


def read_flags(root: Root) -> dict[str, pd.DataFrame]:
    """Every filter's flags table, keyed by filter name."""
    names = filter_names(root)
    blobs = root.read_many([filter_key(n) for n in names])
    return {n: part_from_bytes(blobs[filter_key(n)]) for n in names}


def validate_flags(
    flags: pd.DataFrame,
    name: str,
    manifest_columns: list[str],
    committed_ids: np.ndarray,
    others: dict[str, pd.DataFrame],
) -> pd.DataFrame:
    """Check a flags table before it is written; returns a clean copy."""
    where = f"flags for filter {name!r} ({filter_key(name)})"
    if "sample_id" not in flags.columns or "keep" not in flags.columns:
        raise SampleValidationError(f"{where} need columns 'sample_id' and 'keep', got {list(flags.columns)}")
    frame = flags.reset_index(drop=True).copy()
    frame["sample_id"] = frame["sample_id"].astype(np.int64)
    if frame["sample_id"].duplicated().any():
        dup = frame.loc[frame["sample_id"].duplicated(), "sample_id"].head(5).tolist()
        raise SampleValidationError(f"{where} repeat sample_id(s) {dup}; give one row per sample")
    keep = frame["keep"]
    if keep.isna().any() or not (pd.api.types.is_bool_dtype(keep) or set(pd.unique(keep)) <= {0, 1}):
        raise SampleValidationError(f"{where}: 'keep' must be boolean with no missing values")
    frame["keep"] = keep.astype(bool)
    unknown = np.setdiff1d(frame["sample_id"].to_numpy(), committed_ids)
    if unknown.size:
        raise SampleValidationError(
            f"{where} mention sample_id(s) {unknown[:5].tolist()} that are not in committed shards; "
            "flag only rows of manifest()"
        )
    taken = set(manifest_columns)
    for other_name, other in others.items():
        if other_name != name:
            taken |= set(other.columns) - {"sample_id", "keep"}
    clash = sorted((set(frame.columns) - {"sample_id", "keep"}) & taken)
    if clash or any(str(c).startswith("keep_") for c in frame.columns):
        raise SampleValidationError(
            f"{where} have column(s) {clash or [c for c in frame.columns if str(c).startswith('keep_')]} "
            "that clash with the manifest or another filter; rename them (e.g. prefix with the filter name)"
        )
    return frame


def write_flags(root: Root, name: str, frame: pd.DataFrame) -> None:
    """Atomically publish a validated flags table."""
    root.write_atomic(filter_key(name), part_to_bytes(frame))


def merge_flags(manifest: pd.DataFrame, flags: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Add ``keep_<name>``, reason columns and the combined ``keep`` to the manifest."""
    if not flags:
        return manifest
    merged = manifest
    keep_columns = []
    for name in sorted(flags):
        table = flags[name].rename(columns={"keep": f"keep_{name}"})
        merged = merged.merge(table, on="sample_id", how="left")
        merged[f"keep_{name}"] = merged[f"keep_{name}"].astype("boolean")
        keep_columns.append(f"keep_{name}")
    merged["keep"] = np.logical_and.reduce([merged[c].fillna(False).to_numpy(dtype=bool) for c in keep_columns])
    return merged


def apply_filter(manifest: pd.DataFrame, spec: FilterSpec) -> pd.DataFrame:
    """Rows of ``manifest`` selected by ``spec``.

    ``"keep"``: rows whose ``keep`` flag is True (all rows if no flags exist);
    ``None``: all rows; other str: a ``DataFrame.query`` expression;
    callable: ``f(manifest) -> bool mask``.
    """
    if spec is None:
        return manifest
    if isinstance(spec, str) and spec == "keep":
        return manifest[manifest["keep"].to_numpy(dtype=bool)] if "keep" in manifest.columns else manifest
    if isinstance(spec, str):
        try:
            return manifest.query(spec)
        except Exception as exc:
            raise ValueError(
                f"filter query {spec!r} failed on the manifest (columns: {list(manifest.columns)}): {exc}"
            ) from exc
    if callable(spec):
        mask = np.asarray(spec(manifest))
        if mask.dtype != bool or mask.shape != (len(manifest),):
            raise ValueError(
                f"filter callable must return a boolean mask of length {len(manifest)}, "
                f"got dtype {mask.dtype} shape {mask.shape}"
            )
        return manifest[mask]
    raise TypeError(f"filter must be 'keep', None, a query string or a callable, got {type(spec).__name__}")


def read_manifest(root: Root, num_shards: int) -> pd.DataFrame:
    """Every committed row (sorted by sample_id) with the filter flags merged in: what writer and
    reader both call "the manifest"."""
    frame = read_parts(root, committed_indices(root, num_shards))
    return merge_flags(frame, read_flags(root))
