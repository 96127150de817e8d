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
    return js_from_logits(probs.clamp_min(1e-30).log(), -2, -1)[0]


def js_from_logits(logits: torch.Tensor, member_dim: int, class_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Member logits -> (JS divergence over the members, mean probabilities), in whatever layout
    the caller computed them: the reductions run along `member_dim` and `class_dim` in place, so a
    pixels-innermost (M, K, P) tile vectorises without a transpose. The members' entropies come
    from log_softmax (exact, one log fewer than log(p + eps))."""
    member_dim, class_dim = member_dim % logits.dim(), class_dim % logits.dim()
    logp = logits.log_softmax(class_dim)
    p = logp.exp()
    neg_h_members = (p * logp).sum(class_dim, keepdim=True).mean(member_dim)  # -mean_m H(p_m)
    mean_p = p.mean(member_dim)
    c = class_dim - (class_dim > member_dim)  # the class dim once the member dim is reduced
    h_mean = -(mean_p * mean_p.clamp_min(1e-30).log()).sum(c)
    return (h_mean + neg_h_members.squeeze(c)).clamp_(min=0.0), mean_p


def member_variance(values: torch.Tensor) -> torch.Tensor:
    """values (..., M, C) member outputs -> (...,) variance across members, averaged over channels."""
    return values.var(dim=-2, unbiased=False).mean(-1)


def image_scores(uncertainty: torch.Tensor, top_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """uncertainty (N, H, W) -> (sum over pixels, mean of the top `top_fraction` pixels), each (N,)."""
    flat = uncertainty.flatten(1).float()
    k = max(1, int(round(flat.shape[1] * top_fraction)))
    return flat.sum(1), flat.topk(k, dim=1).values.mean(1)
