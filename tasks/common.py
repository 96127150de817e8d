"""What every stage task shares: artifacts passed as (path, hash), cache policy under the run dir,
and a per-process model cache so threads/workers load each checkpoint once."""

from __future__ import annotations

import ast
import contextlib
import errno
import functools
import hashlib
import io
import pickle
import threading
import tokenize
from collections.abc import Iterator
from pathlib import Path

import torch
from prefect.cache_policies import INPUTS, TASK_SOURCE
from pydantic import BaseModel

import labelfoundry


class Artifact(BaseModel):
    """A stage output: where it is and what its content hash is (what downstream cache keys use)."""

    path: str
    hash: str
    companions: dict[str, str] = {}  # other files the stage wrote: path -> hash

    def companion(self, name: str) -> str:
        """The companion file called `name` (e.g. "schema.json"); KeyError naming what exists."""
        for p in self.companions:
            if Path(p).name == name:
                return p
        raise KeyError(f"{self.path}: no companion file {name!r} (has {sorted(Path(p).name for p in self.companions)})")

    def exists_unchanged(self) -> bool:
        files = {self.path: self.hash, **self.companions}
        return all(Path(p).is_file() and file_hash(p) == h for p, h in files.items())


class LabelerArtifact(Artifact):
    """The fit stage's output: the labeler file, and what generation needs to size the store
    without loading the generator or the labeler."""

    method: str  # registry key of the labeler
    task: str  # segmentation | keypoints | depth
    num_outputs: int  # classes, keypoints or 1
    label_schema: dict  # class_names, colors, keypoint_names
    resolution: int  # of the generator, = of every label
    latent_shape: tuple[int, int]  # (num_ws, w_dim) of the generator

    @property
    def label_shape(self) -> tuple[int, ...]:
        R = self.resolution
        return (R, R) if self.task == "segmentation" else (self.num_outputs, R, R)

    @property
    def label_dtype(self) -> str:
        return "uint8" if self.task == "segmentation" else "float16"
# Errors a retry cannot change: bad input or code (the same call fails the same way) and a full,
# over-quota or read-only disk (nothing frees space between retries seconds apart).
PERMANENT_ERRORS = (ValueError, TypeError, LookupError, pickle.UnpicklingError, FileNotFoundError,
                    IsADirectoryError, NotADirectoryError, PermissionError)
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def is_permanent(exc: BaseException) -> bool:
    """True when retrying the same call cannot succeed (see PERMANENT_ERRORS)."""
    if isinstance(exc, PERMANENT_ERRORS):
        return True
    return isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS


def retry_transient(task, task_run, state) -> bool:
    """`retry_condition_fn` for every stage task: retry only errors that a retry could fix."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - result unreadable: keep Prefect's default (retry)
            return True
    return not (isinstance(exc, BaseException) and is_permanent(exc))


def _plural(key: str) -> str:
    return key + ("es" if key.endswith(("ch", "s")) else "s")


def _number(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}" if 1e-3 <= abs(v) < 1e4 else f"{v:.3g}"


def format_progress(d: dict) -> str:
    """A core progress record as a log line: counters with their totals, numbers rounded, time last.
    {"batch": 1, "batches": 2, "step": 101, "steps": 300, "loss": 0.012045, "seconds": 12.34}
    -> "batch 1/2 step 101/300 loss 0.0120 (12.3 s)"; a "phase" value leads the line."""
    parts = [str(d["phase"])] if "phase" in d else []
    totals = {_plural(k) for k in d if _plural(k) in d}
    for k, v in d.items():
        if k in ("phase", "seconds") or k in totals:
            continue
        parts.append(f"{k} {_number(v)}/{_number(d[_plural(k)])}" if _plural(k) in d else f"{k} {_number(v)}")
    if "seconds" in d:
        parts.append(f"({d['seconds']:.1f} s)")
    return " ".join(parts)


def log_progress(log, what: str):
    """A `progress` callback for the core (which never imports prefect) that writes readable lines
    to the run's Prefect logger: "<what> step 101/300 loss 0.0120 (12.3 s)"."""
    return lambda d: log.info("%s %s", what, format_progress(d))


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """Content hash. safetensors headers list their metadata in arbitrary order, so for those the
    header is hashed with sorted keys: identical weights and config give identical hashes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if str(path).endswith(".safetensors"):
            import json

            n = int.from_bytes(f.read(8), "little")
            h.update(json.dumps(json.loads(f.read(n)), sort_keys=True).encode())
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _code_lines(src: bytes) -> list[str]:
    """The source's lines without comments, docstrings and blank lines (trailing spaces dropped).
    Text, not an AST dump, so that Python 3.11 and 3.12 workers give the same code version."""
    tree = ast.parse(src)
    raw = src.splitlines()
    drop: set[int] = set()  # 0-based lines that are wholly a docstring
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            d = node.body[0]
            if isinstance(d, ast.Expr) and isinstance(d.value, ast.Constant) and isinstance(d.value.value, str):
                before = raw[d.lineno - 1][: d.col_offset]
                after = raw[d.end_lineno - 1][d.end_col_offset:].strip()  # AST offsets count UTF-8 bytes
                if not before.strip() and (not after or after.startswith(b"#")):
                    drop.update(range(d.lineno - 1, d.end_lineno))
    lines = [line.decode("utf-8") for line in raw]  # the same split as the AST's and tokenizer's rows
    for tok in tokenize.tokenize(io.BytesIO(src).readline):
        if tok.type == tokenize.COMMENT:  # a comment runs to the end of its line
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return [line.rstrip() for i, line in enumerate(lines) if i not in drop and line.strip()]


def source_fingerprint(root: Path) -> str:
    """A hash of the Python sources under `root` without comments, docstrings and blank lines, so
    editing those keeps every cached stage (a dataset can take hours to regenerate); any other
    change counts. A file that does not parse counts by its bytes."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        try:
            h.update("\n".join(_code_lines(p.read_bytes())).encode())
        except (SyntaxError, tokenize.TokenError, UnicodeDecodeError):
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


@functools.cache
def code_version() -> str:
    """Package version + the core sources' fingerprint: a code change invalidates cached stages."""
    return f"{labelfoundry.__version__}+{source_fingerprint(Path(labelfoundry.__file__).parent)}"


def cached(task, run_dir: str | Path, refresh: bool = False, **options):
    """The task with our cache policy: its inputs (config section, upstream hashes, code version)
    plus its source, with cache records and results kept under the run directory."""
    run_dir = Path(run_dir).resolve()
    policy = (INPUTS + TASK_SOURCE).configure(key_storage=str(run_dir / ".prefect" / "cache"))
    return task.with_options(
        cache_policy=policy,
        result_storage=run_dir / ".prefect" / "results",
        persist_result=True,
        refresh_cache=refresh,
        **options,
    )


_MODELS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def load_networks_cached(name: str, device: str):
    """The checkpoint's (G, D, extra), loaded once per process and device."""
    from labelfoundry.generators import load_networks

    key = ("nets", name, device)
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_networks(name, device=device)
        return _MODELS[key]


def load_generator_cached(name: str, device: str):
    return load_networks_cached(name, device).G


def load_labeler_cached(path: str, hash_: str, device: str):
    from labelfoundry.labelers import load_labeler

    key = ("L", path, hash_, device)
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_labeler(path, device=device)
        return _MODELS[key]


def generator_hash(name: str) -> str:
    """Content hash of the generator checkpoint (built-in names resolve to the shipped file)."""
    from labelfoundry.generators.loaders import resolve_generator_path

    return file_hash(resolve_generator_path(name))


def set_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield
    finally:
        set_threads(before)


def run_side_by_side(jobs: list[tuple], workers: int) -> list:
    """Run (task, parameters) jobs and return their results in order: one after another in this
    process (workers 1), or side by side in `workers` spawned processes (Prefect's process-pool
    runner). A CPU trains fastest as one single-threaded process per core; several intra-op threads
    in one process collapsed under contention here (docs/evaluation.md)."""
    workers = min(workers, len(jobs))
    if workers <= 1:
        return [t(**p) for t, p in jobs]
    import os

    from prefect.client.orchestration import get_client
    from prefect.task_runners import ProcessPoolTaskRunner

    # the workers must report to this run's API: an embedded server is known to this process's settings only
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = str(get_client().api_url).rstrip("/")
    try:
        with ProcessPoolTaskRunner(max_workers=workers) as runner:
            futures = [runner.submit(t, p) for t, p in jobs]
            return [f.result() for f in futures]
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL")
        else:
            os.environ["PREFECT_API_URL"] = before
