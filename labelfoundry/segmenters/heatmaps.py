"""Keypoint <-> heatmap conversion (HandsOff App. B.6).

Coordinates are in pixel units with pixel centres at integer positions: x is the column
index, y the row index. Keypoints are rows of (x, y, visible).
"""

from __future__ import annotations

import torch

HEATMAP_PEAK = 10.0


def keypoint_heatmaps(keypoints: torch.Tensor, H: int, W: int, sigma: float) -> torch.Tensor:
    """Gaussian heatmaps for K keypoints.

    Args:
        keypoints: (K, 3) float rows of (x, y, visible) in pixels.
        H, W: heatmap size in pixels.
        sigma: Gaussian standard deviation in pixels (the paper's "σ": 5 faces, 25 full body).

    Returns:
        (K, H, W) float32: ``10 * exp(-((u - x)^2 + (v - y)^2) / (2 sigma^2))`` -- the Gaussian
        density rescaled so its peak is 10 (exactly 10 at the pixel when the keypoint lies on
        a pixel centre). Invisible keypoints (visible <= 0) get an all-zero map.
    """
    kp = torch.as_tensor(keypoints, dtype=torch.float32)
    ys = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    d2 = (xs - kp[:, 0].view(-1, 1, 1)) ** 2 + (ys - kp[:, 1].view(-1, 1, 1)) ** 2
    maps = HEATMAP_PEAK * torch.exp(-d2 / (2.0 * sigma**2))
    return maps * (kp[:, 2] > 0).float().view(-1, 1, 1)


def decode_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """Keypoint locations as the argmax of each heatmap.

    Args:
        heatmaps: (N, K, H, W).

    Returns:
        (N, K, 2) float32 (x, y) pixel coordinates; ties resolve to the first maximum in
        row-major order.
    """
    n, k, _h, w = heatmaps.shape
    idx = heatmaps.reshape(n, k, -1).argmax(dim=-1)
    return torch.stack([idx % w, idx // w], dim=-1).float()


def keypoints_from_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """Ground-truth keypoints recovered from target heatmaps: (N, K, H, W) -> (N, K, 3).

    Location is the argmax; a keypoint is visible iff its heatmap has a positive maximum
    (invisible keypoints are encoded as all-zero maps by :func:`keypoint_heatmaps`).
    """
    xy = decode_heatmaps(heatmaps)
    vis = (heatmaps.flatten(2).amax(dim=-1) > 0).float()
    return torch.cat([xy, vis.unsqueeze(-1)], dim=-1)
