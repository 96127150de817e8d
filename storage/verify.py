"""``verify``: re-read every committed shard and compare against its manifest part.

Catches what the commit protocol cannot prevent: files changed, truncated or
deleted after commit (bit rot, a bad copy, a partial sync to object storage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import manifest as _manifest
from .errors import CorruptShardError, MissingChunkError
from .fsio import resolve
from .hashing import shard_checksums
from .layout import manifest_part_key, read_layout
from .sample_reader import SampleReader, regenerate_hint


@dataclass
class BadShard:
    """One committed shard that failed verification."""

    index: int
    file: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"shard {self.index}: {self.problem} [{self.file}] -> fix: {self.fix}"


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`; ``ok`` is True when no committed shard is bad."""

    path: str
    num_shards: int
    checked: list[int] = field(default_factory=list)
    bad: list[BadShard] = field(default_factory=list)
    uncommitted: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    @property
    def bad_shards(self) -> list[int]:
        return sorted({b.index for b in self.bad})

    def __str__(self) -> str:
        head = (
            f"verify {self.path}: {len(self.checked)} committed shard(s) checked, "
            f"{len(self.bad_shards)} bad, {len(self.uncommitted)} uncommitted of {self.num_shards}"
        )
        return "\n".join([head, *(f"  {b}" for b in self.bad)])

    def raise_if_bad(self) -> None:
        if self.bad:
            raise CorruptShardError(str(self))


def verify(path: str, storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Re-read every committed shard and recompute checksums against the manifest."""
    root = resolve(path, storage_options)
    layout, _ = read_layout(root)
    committed = _manifest.committed_indices(root, layout.num_shards)
    report = VerifyReport(
        path=root.url,
        num_shards=layout.num_shards,
        uncommitted=[i for i in range(layout.num_shards) if i not in set(committed)],
    )
    reader = SampleReader(root, layout)
    for index in committed:
        report.checked.append(index)
        report.bad.extend(_verify_shard(root, layout, reader, index))
    return report


def _verify_shard(root: Any, layout: Any, reader: SampleReader, index: int) -> list[BadShard]:
    part_file = root.describe(manifest_part_key(index))
    fix = regenerate_hint(root, index)
    try:
        part = _manifest.read_part(root, index)
    except Exception as exc:  # unreadable parquet = broken commit marker
        return [BadShard(index, part_file, f"manifest part unreadable ({exc})", fix)]
    expected_ids = np.asarray(layout.shard_range(index), dtype=np.int64)
    if part is None or not np.array_equal(part["sample_id"].to_numpy(np.int64), expected_ids):
        return [BadShard(index, part_file, "manifest part sample_ids do not match the shard range", fix)]

    bad: list[BadShard] = []
    for name in layout.arrays:
        key = layout.shard_file_key(name, index)
        size = root.size(key)
        if not size:
            state = "missing" if size is None else "empty"
            bad.append(BadShard(index, root.describe(key), f"shard file {state}", fix))
    if bad:
        return bad
    reader._checked.add(index)  # files checked just above
    data: dict[str, np.ndarray] = {}
    for name in layout.arrays:
        try:
            data.update(reader.read_shard(index, [name]))
        except (CorruptShardError, MissingChunkError) as exc:
            cause = exc.__cause__ or exc
            problem = f"failed to decode ({type(cause).__name__}: {cause})"
            bad.append(BadShard(index, root.describe(layout.shard_file_key(name, index)), problem, fix))
    if bad or "image" not in data:
        return bad
    got = shard_checksums(data, layout.checksum_arrays())
    want = list(part["checksum"])
    mismatched = [int(expected_ids[i]) for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    if mismatched:
        names = layout.checksum_arrays()
        files = ", ".join(root.describe(layout.shard_file_key(n, index)) for n in names)
        more = "..." if len(mismatched) > 8 else ""
        bad.append(BadShard(index, files, f"checksum mismatch for sample(s) {mismatched[:8]}{more}", fix))
    return bad
