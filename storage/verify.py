"""``verify`` and ``repair``: check every shard that dataset.json declares against its manifest part.

Catches what the commit protocol cannot prevent: files changed, truncated or
deleted after commit (bit rot, a bad copy, a partial sync to object storage),
and manifest parts that went missing. A shard is committed iff its manifest
part exists, so a shard without one is *uncommitted*: the dataset is
incomplete (still generating, interrupted, or a part was lost), not damaged;
re-running generation writes exactly those shards. ``repair`` turns every
damaged committed shard into an uncommitted one so the same re-run regenerates it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import manifest as _manifest
from .errors import CorruptShardError, MissingChunkError
from .fsio import Root, resolve
from .hashing import shard_checksums
from .layout import Layout, index_runs, manifest_part_key, read_layout
from .sample_reader import SampleReader, regenerate_hint
from .shard_index import shard_file_problem
from .store import ShardStore

log = logging.getLogger(__name__)

RERUN_FIX = (
    "re-run the same `labelfoundry run`/`labelfoundry generate` command (or the flow) with the same config: "
    "generation skips committed shards and writes these"
)
_MAX_LISTED = 40  # uncommitted shards listed one per line; the rest are summarised


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
    """Outcome of :func:`verify` / :func:`repair`.

    ``ok``: no damaged committed shard is left; ``complete``: every one of dataset.json's
    ``num_shards`` shards is committed. An interrupted or still running generation is ok but
    not complete."""

    path: str
    num_shards: int
    checked: list[int] = field(default_factory=list)
    bad: list[BadShard] = field(default_factory=list)
    uncommitted: list[int] = field(default_factory=list)
    written_uncommitted: list[int] = field(default_factory=list)  # data files present, no manifest part
    repaired: list[int] = field(default_factory=list)  # damaged shards uncommitted by repair()

    @property
    def ok(self) -> bool:
        return set(self.bad_shards) <= set(self.repaired)

    @property
    def complete(self) -> bool:
        return not self.uncommitted

    @property
    def bad_shards(self) -> list[int]:
        return sorted({b.index for b in self.bad})

    @property
    def status(self) -> str:
        if not self.ok:
            return "DAMAGED"
        return "OK" if self.complete else "INCOMPLETE"

    def __str__(self) -> str:
        committed = self.num_shards - len(self.uncommitted)
        counts = (
            f"{len(self.checked)} committed shard(s) checked, {len(self.bad_shards)} bad, "
            f"{len(self.uncommitted)} uncommitted of {self.num_shards}"
        )
        if self.status == "OK":
            head = f"OK: all {self.num_shards} shards committed and intact ({counts})"
        elif self.status == "INCOMPLETE":
            head = f"INCOMPLETE: {committed} of {self.num_shards} shards committed, none damaged ({counts})"
        else:
            head = f"DAMAGED: {len(self.bad_shards)} committed shard(s) bad; {committed} of {self.num_shards} shards committed ({counts})"
        lines = [f"verify {self.path}: {head}", *(f"  {b}" for b in self.bad)]
        if self.repaired:
            lines.append(
                f"  repaired: uncommitted shard(s) {self.repaired} (manifest parts and data files deleted)"
            )
        lines.extend(self._uncommitted_lines())
        if self.bad and not self.repaired:
            lines.append(f"  to fix every bad shard at once: labelfoundry verify --repair {self.path}, then {RERUN_FIX}")
        return "\n".join(lines)

    def _uncommitted_lines(self) -> list[str]:
        if not self.uncommitted:
            return []
        written = set(self.written_uncommitted)
        lines = []
        for index in self.uncommitted[:_MAX_LISTED]:
            part = manifest_part_key(index)
            if index in self.repaired:
                why = "uncommitted by repair"
            elif index in written:
                why = "its data files are present: written but never committed, or the part was lost"
            else:
                why = "no data written yet"
            lines.append(f"  shard {index}: not committed (no {part}; {why})")
        if len(self.uncommitted) > _MAX_LISTED:
            lines.append(f"  ... and {len(self.uncommitted) - _MAX_LISTED} more: shards {index_runs(self.uncommitted[_MAX_LISTED:], most=20)}")
        lines.append(f"  to complete the dataset: {RERUN_FIX}")
        return lines

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise CorruptShardError(str(self))


def verify(path: str, storage_options: dict[str, Any] | None = None, *, deep: bool = True) -> VerifyReport:
    """Check every committed shard and list the uncommitted ones.

    deep=False is the cheap check a re-run does: manifest rows, and each shard file's presence and
    size against its shard index (reads only the index at the file's end). deep=True also decodes
    every shard and recomputes its checksums against the manifest."""
    root = resolve(path, storage_options)
    layout, _ = read_layout(root)
    committed = _manifest.committed_indices(root, layout.num_shards)
    done = set(committed)
    uncommitted = [i for i in range(layout.num_shards) if i not in done]
    report = VerifyReport(
        path=root.url,
        num_shards=layout.num_shards,
        uncommitted=uncommitted,
        written_uncommitted=[i for i in uncommitted if _has_data(root, layout, i)],
    )
    reader = SampleReader(root, layout)
    for index in committed:
        report.checked.append(index)
        report.bad.extend(_verify_shard(root, layout, reader, index, deep))
    return report


def repair(path: str, storage_options: dict[str, Any] | None = None, *, deep: bool = True) -> VerifyReport:
    """Verify, then uncommit every bad shard (manifest part removed, data files deleted), so that
    re-running generation (which skips committed shards) regenerates exactly those. Logs each one."""
    report = verify(path, storage_options, deep=deep)
    if report.bad:
        store = ShardStore.open(path, mode="a", storage_options=storage_options)
        for index in report.bad_shards:
            problems = "; ".join(f"{b.problem} [{b.file}]" for b in report.bad if b.index == index)
            log.warning("shard %d of %s is damaged (%s); uncommitting it for regeneration", index, report.path, problems)
            store.uncommit(index)
        report.repaired = report.bad_shards
        report.uncommitted = sorted(set(report.uncommitted) | set(report.repaired))
    return report


def _has_data(root: Root, layout: Layout, index: int) -> bool:
    return any(root.size(layout.shard_file_key(name, index)) for name in layout.arrays)


def _verify_shard(root: Root, layout: Layout, reader: SampleReader, index: int, deep: bool) -> list[BadShard]:
    part_file = root.describe(manifest_part_key(index))
    fix = regenerate_hint(root, index)
    try:
        part = _manifest.read_part(root, index)
    except Exception as exc:  # unreadable parquet = broken commit marker
        return [BadShard(index, part_file, f"manifest part unreadable ({exc})", fix)]
    expected_ids = np.asarray(layout.shard_range(index), dtype=np.int64)
    if part is None or not np.array_equal(part["sample_id"].to_numpy(np.int64), expected_ids):
        return [BadShard(index, part_file, "manifest part sample_ids do not match the shard range", fix)]
    if part["checksum"].isna().any():
        return [BadShard(index, part_file, "manifest part has rows without a checksum", fix)]

    bad: list[BadShard] = []
    for name in layout.arrays:
        key = layout.shard_file_key(name, index)
        problem = shard_file_problem(root, layout, key, index)
        if problem:
            bad.append(BadShard(index, root.describe(key), problem, fix))
    if bad or not deep:
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
