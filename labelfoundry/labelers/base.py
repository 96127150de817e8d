"""The one contract every labeling method meets, and the values it exchanges.

A labeler is fitted by `fit(G, data, cfg)` from one `FitData` and labels a `GenBatch` that carries
the generator itself, so no labeler ever stores a copy of G: a saved labeler names the generator it
was fitted on by `generator_fingerprint`, and refuses a batch from another one.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..features import TapSpec

FG_BG_SCHEMA: dict = {"class_names": ["background", "foreground"], "colors": [[0, 0, 0], [255, 255, 255]], "keypoint_names": []}


@dataclass
class FitData:
    """What a labeler learns from; each method reads the fields it needs and names a missing one.

    images: uint8 (N,H,W,3) at their own resolution (any look); masks: int (N,H,W) class ids;
    keypoints: float (N,K,3) (x, y, visible); depth: float (N,H,W) with depth_valid (N,H,W);
    latents: W+ (N, num_ws, w_dim) of the images inverted into G (HandsOff), else None;
    schema: {class_names, colors, keypoint_names} of the labels (fg/bg for unsupervised methods);
    discriminator: the GAN's D, for methods that train against it (Labels4Free).
    """

    images: np.ndarray | None = None
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    depth: np.ndarray | None = None
    depth_valid: np.ndarray | None = None
    ids: list[str] = field(default_factory=list)
    latents: torch.Tensor | None = None
    schema: dict = field(default_factory=lambda: dict(FG_BG_SCHEMA))
    discriminator: torch.nn.Module | None = None

    @classmethod
    def from_samples(cls, samples: list, schema: dict, **fields) -> "FitData":
        """FitData of `LabeledSample`s (images and whichever labels all of them have)."""

        def stacked(name: str):
            vals = [getattr(s, name) for s in samples]
            return np.stack(vals) if vals and all(v is not None for v in vals) else None

        return cls(images=stacked("image"), masks=stacked("mask"), keypoints=stacked("keypoints"), depth=stacked("depth"),
                   depth_valid=stacked("depth_valid"), ids=[str(s.sample_id) for s in samples], schema=schema, **fields)

    @property
    def num_classes(self) -> int:
        return len(self.schema["class_names"])

    def require(self, name: str, method: str) -> Any:
        """The field `name`, or a clear error saying which labeler needs it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"the {method} labeler needs FitData.{name}, which is None")
        return value

    def samples(self) -> list:
        """The labeled images as `LabeledSample`s (image + mask), for methods that read them so."""
        from ..domains.base import LabeledSample

        images, masks = self.images, self.masks
        if images is None or masks is None:
            raise ValueError("FitData.samples() needs images and masks; this FitData lacks one of them")
        ids = self.ids or [str(i) for i in range(len(images))]
        return [LabeledSample(str(i), images[j], masks[j]) for j, i in enumerate(ids)]

    def subset(self, keep: np.ndarray) -> "FitData":
        """The images where `keep` (bool (N,)) is True, every per-image field cut alike."""
        idx = np.flatnonzero(keep)

        def cut(a):
            return None if a is None else a[torch.as_tensor(idx)] if isinstance(a, torch.Tensor) else a[idx]

        return FitData(
            images=cut(self.images), masks=cut(self.masks), keypoints=cut(self.keypoints), depth=cut(self.depth),
            depth_valid=cut(self.depth_valid), ids=[self.ids[i] for i in idx] if self.ids else [],
            latents=cut(self.latents), schema=self.schema, discriminator=self.discriminator,
        )


@dataclass
class GenBatch:
    """One generated batch: ws (N, num_ws, w_dim), image (N,3,R,R) in [-1,1], taps at native
    resolutions; G: the generator that made it (labelers that re-synthesise use it); z (N, z_dim)
    when known."""

    ws: torch.Tensor
    image: torch.Tensor
    taps: list[torch.Tensor]
    G: Any = None
    z: torch.Tensor | None = None


@dataclass
class LabelBatch:
    """label: uint8 (N,R,R) class ids, or float (N,K,R,R) heatmaps / (N,1,R,R) depth.
    uncertainty: float (N,R,R) or None. score / score_top10: (N,) image-level uncertainty.
    rejected: bool (N,) for labelers that refuse samples (paper 002's refinement), else None."""

    label: torch.Tensor
    uncertainty: torch.Tensor | None
    score: torch.Tensor
    score_top10: torch.Tensor
    rejected: torch.Tensor | None = None


class Labeler(Protocol):
    """What the factory needs of a labeler; `labelers.registry` lists the ones that exist."""

    name: ClassVar[str]
    cfg: Any  # its pydantic config (has .method and .task)
    num_outputs: int  # classes, keypoints, or 1 (depth)

    @property
    def tap_spec(self) -> TapSpec: ...

    @property
    def schema(self) -> dict: ...

    @classmethod
    def fit(
        cls, G, data: FitData, cfg, *, device: str | torch.device = "cpu", progress: Callable[[dict], None] | None = None
    ) -> "Labeler": ...

    def label(self, batch: GenBatch) -> LabelBatch: ...

    def save(self, path: str | os.PathLike) -> None: ...

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Labeler": ...


# ---------------------------------------------------------------------------- generator identity
_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def generator_fingerprint(G) -> str:
    """sha256 of G's mapping + synthesis tensors (names, shapes, dtypes, bytes), cached per object.

    A labeler file stores it instead of G's weights, and checks it when handed a generator."""
    if G in _FINGERPRINTS:
        return _FINGERPRINTS[G]
    h = hashlib.sha256()
    for k, v in sorted(G.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    _FINGERPRINTS[G] = fp = h.hexdigest()
    return fp


def batch_generator(batch: GenBatch, fingerprint: str | None, method: str):
    """The batch's generator, checked against the one the labeler was fitted on."""
    G = batch.G
    if G is None:
        raise ValueError(f"the {method} labeler re-synthesises images: build the GenBatch with G=<the generator>")
    if fingerprint and generator_fingerprint(G) != fingerprint:
        raise ValueError(
            f"the {method} labeler was fitted on generator {fingerprint[:12]}, but the batch comes from "
            f"{generator_fingerprint(G)[:12]}; refit the labeler on this generator"
        )
    return G


# ---------------------------------------------------------------------------- files
def write_labeler(path: str | os.PathLike, module: torch.nn.Module, fmt: str, meta: dict[str, str]) -> None:
    """A labeler's state_dict as safetensors with string metadata (format, version added), written
    atomically: a crash mid-write never leaves a half file under `path`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": fmt, "version": "1", **meta})


def read_labeler(path: str | os.PathLike, fmt: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, state) of a file written by `write_labeler`, refusing files of another format."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != fmt:
            raise ValueError(f"{path}: not a {fmt} file (format={meta.get('format')!r}); was it saved by another labeler?")
        return meta, {k: f.get_tensor(k) for k in f.keys()}


def labeler_format(path: str | os.PathLike) -> str:
    """The `format` recorded in a labeler file's header ('' when none)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no labeler file here; run the fit stage first")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return (f.metadata() or {}).get("format") or ""
