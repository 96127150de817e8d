"""The one shape labeled data takes inside labelfoundry, whatever its source."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LabelSchema:
    """Names and display colours of the segmentation classes and keypoints of a domain."""

    class_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    keypoint_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.colors):
            raise ValueError(
                f"LabelSchema: {len(self.class_names)} class names but {len(self.colors)} colours"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict:
        return {
            "class_names": list(self.class_names),
            "colors": [list(c) for c in self.colors],
            "keypoint_names": list(self.keypoint_names),
        }

    @classmethod
    def from_json(cls, d: dict) -> "LabelSchema":
        return cls(
            tuple(d["class_names"]),
            tuple(tuple(c) for c in d["colors"]),
            tuple(d.get("keypoint_names", ())),
        )


@dataclass
class LabeledSample:
    """One labeled real image at the generator's resolution.

    image:     uint8 (H, W, 3) RGB.
    mask:      int64 (H, W) class ids in [0, num_classes), or None.
    keypoints: float32 (K, 3) rows of (x, y, visible) in pixel units of `image`, or None.
    depth:     float32 (H, W), or None; `depth_valid` bool (H, W) marks usable pixels.
    """

    sample_id: str
    image: np.ndarray
    mask: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    depth: np.ndarray | None = None
    depth_valid: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
