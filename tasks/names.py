"""Task run names: what the Prefect UI lists for each stage, from the task's own parameters (its
method, shard range, seed or image count), so a run list reads "generate-shards[0-3] handsoff"
rather than "generate-shards-946". Names are display only: they are not part of any cache key.

Each function is a Prefect `task_run_name` callable (it receives the task's bound parameters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.layout import index_runs


def shard_span(indices: list[int]) -> str:
    """[0-3] for a contiguous range, [5] for one shard, [0,2,7] or [0-2,5] otherwise."""
    return f"[{index_runs(indices, sep=',')}]"


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """A field of a pydantic section or of its dict dump (parameters may arrive as either)."""
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def invert(parameters: dict[str, Any]) -> str:
    lab = parameters["labeled_cfg"]
    what = f"{_get(lab, 'num_images')} images" if _get(lab, "source") == "toyfaces" else f"folder {Path(_get(lab, 'path') or '?').name}"
    return f"invert {what}" + (" (read only)" if parameters.get("inversion_cfg") is None else "")


def fit(parameters: dict[str, Any]) -> str:
    cfg = parameters["labeler_cfg"]
    return f"fit {_get(cfg, 'method')}/{_get(cfg, 'task')}"


def generate_shards(parameters: dict[str, Any]) -> str:
    return f"generate-shards{shard_span(parameters['shard_indices'])} {_get(parameters['labeler'], 'method')}"


def filter_(parameters: dict[str, Any]) -> str:
    cfg = parameters["filter_cfg"]
    return f"filter {Path(parameters['store_path']).name} drop_top {_get(cfg, 'drop_top')}"


def report(parameters: dict[str, Any]) -> str:
    return f"report {Path(parameters['store_path']).name}"


def train_evaluate(parameters: dict[str, Any]) -> str:
    """The stage names its variants itself (evaluate_stage: "finetuned", "no_oversample")."""
    return f"train-evaluate {parameters['method']} seed {parameters['seed']}"


def refine_member(parameters: dict[str, Any]) -> str:
    return f"refine-member seed {parameters['seed']}"


def refine_shards(parameters: dict[str, Any]) -> str:
    return f"refine-shards{shard_span(parameters['shard_indices'])}"
