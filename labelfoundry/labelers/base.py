"""The Labeler interface every labeling method meets, and the batches it exchanges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

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
