"""Resampling and modulation primitives of StyleGAN2, in plain PyTorch (no custom CUDA ops).

All functions are differentiable and dtype-preserving, so the same code runs on CPU, on CUDA,
and in fp16 blocks. Shapes are NCHW.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SQRT2 = math.sqrt(2.0)


def make_filter(taps: tuple[float, ...] = (1.0, 3.0, 3.0, 1.0)) -> torch.Tensor:
    """Separable low-pass FIR filter as a 2-D kernel normalised to unit sum."""
    f = torch.tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor,
    up: int = 1,
    down: int = 1,
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample by zero insertion, pad (x0, x1, y0, y1), convolve with `f`, then decimate.

    This is the standard "upfirdn" of signal processing; StyleGAN2 uses it with the
    [1,3,3,1] filter for every up/downsampling step.
    """
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    px0, px1, py0, py1 = pad
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]
    kernel = (f * gain).to(x.dtype).flip([0, 1])
    kernel = kernel[None, None].repeat(c, 1, 1, 1)
    x = F.conv2d(x, kernel, groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x FIR upsampling that keeps the signal's DC gain (used on the skip RGB path)."""
    fw = f.shape[-1]
    p0, p1 = (fw + 1) // 2, (fw - 2) // 2
    return upfirdn2d(x, f, up=2, pad=(p0, p1, p0, p1), gain=4.0)


def downsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x FIR downsampling (low-pass, then decimate)."""
    fw = f.shape[-1]
    p0, p1 = (fw - 1) // 2, (fw - 2) // 2
    return upfirdn2d(x, f, down=2, pad=(p0, p1, p0, p1))


def conv_up2(x: torch.Tensor, weight: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """3x3 convolution at twice the input resolution: strided transposed conv, then FIR blur.

    Equivalent to upsample-by-zero-insertion -> blur -> conv, at a quarter of the cost.
    """
    kh = weight.shape[-1]
    x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
    fw = f.shape[-1]
    p0 = kh // 2 + (fw + 1) // 2 - (kh - 1)
    p1 = kh // 2 + (fw - 2) // 2 - (kh - 2)
    return upfirdn2d(x, f, pad=(p0, p1, p0, p1), gain=4.0)


def conv_down2(x: torch.Tensor, weight: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Convolution at half the input resolution: FIR blur, then strided conv."""
    kh = weight.shape[-1]
    fw = f.shape[-1]
    p0 = (fw - 2 + 1) // 2 + kh // 2
    p1 = (fw - 2) // 2 + kh // 2
    if kh == 1:
        x = upfirdn2d(x, f, down=2, pad=(p0, p1, p0, p1))
        return F.conv2d(x, weight)
    x = upfirdn2d(x, f, pad=(p0, p1, p0, p1))
    return F.conv2d(x, weight, stride=2)


def bias_act(
    x: torch.Tensor, bias: torch.Tensor | None, act: str = "linear", gain: float = 1.0, clamp: float | None = None
) -> torch.Tensor:
    """Add a per-channel bias, apply the activation (lrelu uses slope 0.2 and gain sqrt(2)), clamp."""
    if bias is not None:
        shape = [1, -1] + [1] * (x.ndim - 2)
        x = x + bias.to(x.dtype).reshape(shape)
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2) * (SQRT2 * gain)
    elif act == "linear":
        if gain != 1.0:
            x = x * gain
    else:
        raise ValueError(f"unknown activation {act!r}")
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    *,
    demodulate: bool = True,
    up: bool = False,
    noise: torch.Tensor | None = None,
    resample_filter: torch.Tensor | None = None,
) -> torch.Tensor:
    """StyleGAN2's modulated convolution, executed as scale -> shared conv -> rescale.

    Scaling the activations instead of building per-sample weights gives the same result as
    the grouped-conv formulation but runs as one large convolution, which is faster on CPU.
    x: (N, I, H, W); weight: (O, I, k, k); styles: (N, I). Noise (N|1, 1, H', W') is added
    after demodulation, before the bias.
    """
    n = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    if x.dtype == torch.float16 and demodulate:
        # Pre-normalise so fp16 activations cannot overflow; cancels out under demodulation.
        weight = weight * (1 / math.sqrt(in_ch * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    dcoefs = None
    if demodulate:
        # sum_{i,k} (w_oik * s_i)^2 = sum_i s_i^2 * sum_k w_oik^2: a small matmul, no (N,O,I,k,k) tensor.
        dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()  # (N, O)
    x = x * styles.to(x.dtype).reshape(n, -1, 1, 1)
    w_ = weight.to(x.dtype)
    if up:
        x = conv_up2(x, w_, resample_filter)
    else:
        x = F.conv2d(x, w_, padding=kh // 2)
    if dcoefs is not None:
        x = x * dcoefs.to(x.dtype).reshape(n, -1, 1, 1)
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()
