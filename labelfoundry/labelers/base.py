"""The Labeler interface every labeling method meets, and the batches it exchanges."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..features import TapSpec


@dataclass
class GenBatch:
    """One generated batch: ws (N, num_ws, w_dim), image (N,3,R,R) in [-1,1], taps at native resolutions."""

    ws: torch.Tensor
    image: torch.Tensor
    taps: list[torch.Tensor]


@dataclass
class LabelBatch:
    """label: uint8 (N,R,R) class ids, or float (N,K,R,R) heatmaps / (N,1,R,R) depth.
    uncertainty: float (N,R,R) or None. score / score_top10: (N,) image-level uncertainty."""

    label: torch.Tensor
    uncertainty: torch.Tensor | None
    score: torch.Tensor
    score_top10: torch.Tensor


class Labeler(Protocol):
    name: str
    tap_spec: TapSpec

    def label(self, batch: GenBatch) -> LabelBatch: ...

    def save(self, path: str) -> None: ...


def write_labeler(path: str | os.PathLike, module: torch.nn.Module, fmt: str, meta: dict[str, str]) -> None:
    """A labeler's state_dict as safetensors with string metadata (format, version added), written
    atomically: a crash mid-write never leaves a half file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"format": fmt, "version": "1", **meta})
    os.replace(tmp, path)


def read_labeler(path: str | os.PathLike, fmt: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, state) of a file written by `write_labeler`, refusing files of another format."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != fmt:
            raise ValueError(f"{path}: not a {fmt} file (format={meta.get('format')!r}); was it saved by another labeler?")
        return meta, {k: f.get_tensor(k) for k in f.keys()}
