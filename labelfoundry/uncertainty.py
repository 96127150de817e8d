"""Ensemble disagreement as a per-pixel quality score (HandsOff §3.3).

Discrete labels: Jensen-Shannon divergence across the M members, H(mean p) - mean H(p), in nats.
Continuous labels: variance across members (population variance), averaged over channels.
An image's score is the sum over its pixels (the paper's rule); the mean of its top-10% pixels
is kept beside it because sums favour images with large uncertain regions.
"""

from __future__ import annotations

import torch


def entropy(p: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    return -(p * (p + eps).log()).sum(dim)


def js_divergence(probs: torch.Tensor) -> torch.Tensor:
    """probs (..., M, K) member probabilities -> (...,) generalised JS divergence in nats, >= 0."""
    return (entropy(probs.mean(-2)) - entropy(probs).mean(-1)).clamp(min=0.0)


def member_variance(values: torch.Tensor) -> torch.Tensor:
    """values (..., M, C) member outputs -> (...,) variance across members, averaged over channels."""
    return values.var(dim=-2, unbiased=False).mean(-1)


def image_scores(uncertainty: torch.Tensor, top_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """uncertainty (N, H, W) -> (sum over pixels, mean of the top `top_fraction` pixels), each (N,)."""
    flat = uncertainty.flatten(1).float()
    k = max(1, int(round(flat.shape[1] * top_fraction)))
    return flat.sum(1), flat.topk(k, dim=1).values.mean(1)
