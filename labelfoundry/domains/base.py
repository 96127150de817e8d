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
    """One labeled real image, at the generator's resolution unless a labeler takes any (gradient matching).

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


def resize_labeled(images: np.ndarray, masks: np.ndarray, resolution: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A labeled set (uint8 (N,H,W,3), int (N,H,W)) at `resolution`² for consumers that need the
    generator's size (downstream baselines): images bilinear + antialiased and masks nearest, as the
    gradient-matching labeler resizes them, so ids stay ids. Same arrays back when already that size."""
    if images.shape[1:3] == (resolution, resolution) and masks.shape[1:3] == (resolution, resolution):
        return images, masks
    import torch
    import torch.nn.functional as F

    size = (resolution, resolution)
    out_i, out_m = [], []
    for i in range(0, len(images), chunk):  # bounded float memory at any N
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + chunk])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        out_i.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        m = torch.from_numpy(np.ascontiguousarray(masks[i : i + chunk]))[:, None].float()
        out_m.append(F.interpolate(m, size=size, mode="nearest")[:, 0].numpy().astype(masks.dtype))
    return np.concatenate(out_i), np.concatenate(out_m)
