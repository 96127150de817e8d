"""Simple opt-in batch augmentation: horizontal flip (with left/right relabelling), colour jitter,
and pixel-level degradations (Gaussian blur, additive noise).

Horizontal flips are *off by default* because they corrupt left/right-sensitive labels
(left eye vs right eye, left wrist vs right wrist). Enable them only together with a
``flip_permutation`` mapping each class id (segmentation) or heatmap channel (keypoints)
to its mirror, or when the label set has no left/right distinction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from labelfoundry.segmenters.models import Task


def _flip_targets(
    targets: dict[str, torch.Tensor], sel: torch.Tensor, task: Task, perm: Sequence[int] | None
) -> None:
    """Mirror the targets of the samples selected by bool ``sel`` (N,), in place."""
    label = targets["label"][sel].flip(-1)
    if perm is not None and task == "segmentation":
        lut = torch.arange(256, device=label.device)
        lut[: len(perm)] = torch.as_tensor(list(perm), device=label.device)
        label = lut[label.clamp(0, 255)]
    elif perm is not None and task == "keypoints":
        label = label[:, list(perm)]
    targets["label"][sel] = label
    if "valid" in targets:
        targets["valid"][sel] = targets["valid"][sel].flip(-1)


def augment_batch(
    x: torch.Tensor,
    targets: dict[str, torch.Tensor],
    task: Task,
    generator: torch.Generator,
    *,
    hflip: bool = False,
    flip_permutation: Sequence[int] | None = None,
    color_jitter: float = 0.0,
    blur_sigma: float = 0.0,
    pixel_noise: float = 0.0,
) -> torch.Tensor:
    """Augment a prepared batch; ``targets`` is modified in place, the new x is returned.

    Args:
        x: float (N, 3, H, W) in [-1, 1].
        targets: as produced by :func:`labelfoundry.segmenters.batch.prepare_batch`.
        generator: CPU generator drawing all random decisions (checkpointed by training).
        hflip: mirror each sample with probability 0.5.
        flip_permutation: mirror map for class ids / heatmap channels (None = identity).
        color_jitter: j >= 0; per-sample contrast factor in [1-j, 1+j] and brightness shift
            in [-j, j] (in [-1, 1] units), result clamped to [-1, 1].
        blur_sigma: s > 0; half the samples get a Gaussian blur of sigma uniform in [min(0.2, s), s] pixels.
        pixel_noise: a > 0; each sample gets i.i.d. Gaussian noise of std uniform in [0, a] ([-1, 1] units).
            The two teach a network (the generator-quality scorer) to look past pixel-level differences
            no viewer sees: trained on clean renders only, its features treat 4/255 of noise as a new domain.
    """
    n = x.shape[0]
    if hflip:
        sel = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        if bool(sel.any()):
            x = x.clone()
            x[sel] = x[sel].flip(-1)
            _flip_targets(targets, sel, task, flip_permutation)
    if color_jitter > 0:
        c = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * color_jitter
        b = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * color_jitter
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * c.to(x.device) + mean + b.to(x.device)).clamp(-1, 1)
    if blur_sigma > 0:
        sel = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        lo = min(0.2, blur_sigma)
        sigma = lo + torch.rand(n, generator=generator) * (blur_sigma - lo)
        if bool(sel.any()):
            from kornia.filters import gaussian_blur2d

            k = 2 * math.ceil(3 * blur_sigma) + 1
            s = sigma.to(x.device, torch.float32)[sel]
            x = x.clone()
            x[sel] = gaussian_blur2d(x[sel], (k, k), torch.stack([s, s], 1), border_type="reflect")
    if pixel_noise > 0:
        std = (torch.rand(n, 1, 1, 1, generator=generator) * pixel_noise).to(x.device, x.dtype)
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        x = (x + std * noise).clamp(-1, 1)
    return x
