"""Reduced-precision support, checked at run time: one answer for every stage that autocasts."""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_bf16_fast() -> bool:
    """True when this CPU has native bf16 matmul (AVX512-BF16 / AMX), where bf16 beats fp32 several-fold.

    Without it, oneDNN emulates bf16 and autocast only slows things down, so callers keep fp32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


def bf16_autocast_ok(device: torch.device | str) -> bool:
    """Whether bf16 autocast pays on `device`: CUDA with bf16 support, or a CPU with native bf16."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return cpu_bf16_fast()
    return False


def autocast_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype hand-written kernels should compute in: the active autocast dtype on `device`'s
    type (the caller chose reduced precision for the whole stage), else float32."""
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """'fp32' | 'bf16' | 'auto' (bf16 where `bf16_autocast_ok`, else fp32) -> the stage's dtype."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16" or (precision == "auto" and bf16_autocast_ok(device)):
        return torch.bfloat16
    return torch.float32
