"""HandsOff's labeling pass over one whole image, written for torch.compile.

Eager PyTorch runs the labeling pass (`features.TiledProjection` and the head in
`HandsOffLabeler.label`) as a few GEMMs plus memory-bound passes over the (P, M*H1) tile:
upsampling, bias, ReLU, the JS reductions. Here the same math is one function, so the compiler
(inductor: C++/OpenMP on CPU, Triton on CUDA) fuses those passes around the GEMMs. Measured at
64², fp32, one thread (AVX2 CPU), the default 3 x 128 labeler: ~0.75x the eager tiled time for the
same labels (see `bench/throughput.py --compile`). It costs a compilation per process and shape (~15-25 s on CPU,
cached on disk by torch for the next process), so it pays off for long runs only
(`GenerateSection.compile`).

The image is labelled whole: memory ~3 * R² * M*H1 values (64², 3 x 128: ~20 MB fp32), so a
labeler whose R² * M*H1 exceeds `max_values` stays on the tiled path, as does one wider than
`max_width` (measured slower compiled). A machine where compilation fails (no C++ compiler, no
Triton) warns once and labels eagerly: the labels are the same to float rounding either way.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..uncertainty import js_from_logits, member_variance

Groups = tuple[tuple[tuple[int, ...], int], ...]  # per weight slice: (tap indices, their resolution)


def label_image(
    taps: list[torch.Tensor], wts: list[torch.Tensor], bias: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
    w3: torch.Tensor, b3: torch.Tensor, src: list[tuple[torch.Tensor, ...]], groups: Groups, R: int, seg: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's taps (each (C, r, r)) -> (class map uint8 (R, R) | mean output (K, R, R), JS |
    member variance (R, R)). Weights as `HandsOffLabeler._build_plan` folds them: wts[g] (C_g, M*H1),
    bias (M*H1,), w2 (M, H1, H2), b2 (M, H2), w3 (M, K, H2), b3 (M, K, 1); src[g]: the group's
    `features.interp_1d` (i0, i1, weight), empty for the full-resolution group."""
    M, H1 = w2.shape[0], w2.shape[1]
    h = _first_layer(taps, wts, bias, src, groups, R)
    h2 = torch.stack([torch.addmm(b2[m], h[:, m * H1 : (m + 1) * H1], w2[m]) for m in range(M)]).relu()
    out = torch.baddbmm(b3, w3, h2.transpose(1, 2)).float()  # (M, K, P)
    if seg:
        js, mean_p = js_from_logits(out, member_dim=0, class_dim=1)
        return mean_p.argmax(0).view(R, R).to(torch.uint8), js.view(R, R)
    return out.mean(0).view(-1, R, R), member_variance(out.permute(2, 0, 1)).view(R, R)


# bf16: groups whose vertically interpolated (R, r, M*H1) fp32 tensor is at most this many values
# are upsampled in two steps (see _first_layer)
GATHER_MAX_VALUES = 2**20


def _first_layer(taps: list[torch.Tensor], wts: list[torch.Tensor], bias: torch.Tensor,
                 src: list[tuple[torch.Tensor, ...]], groups: Groups, R: int) -> torch.Tensor:
    """relu(first layer): (R*R, M*H1) in the compute dtype. Each group is projected at its own
    resolution, upsampled and summed; inductor fuses the upsampling, the sum, bias and ReLU.

    The upsampling has two forms, chosen by measurement. F.interpolate's, which inductor inlines as
    4-tap index math per output value, is the faster in fp32. Under bf16, a group whose vertical
    pass is small enough to stay in cache is interpolated vertically first (an (R, r, M*H1) fp32
    tensor) and then horizontally by gathers fused into the fp32 sum: two loads per output value
    instead of four. Measured (AVX512-BF16, 3 x 128, bf16): at 64², one thread, 0.87x the labeling
    time of the interpolated form (176-194 vs 199-220 ms per 32 toy faces); at 256², two threads,
    every group gathered took ~1.25x (the larger groups' vertical tensors leave the cache), and with
    this size limit the time is the interpolated form's (184-185 vs 183-201 ms per image, best of 5)."""
    MH = bias.shape[0]
    bf16 = bias.dtype == torch.bfloat16
    h = bias.float().expand(R * R, MH) if bf16 else bias.expand(R * R, MH)
    for (idx, r), wt, s in zip(groups, wts, src):
        x = torch.cat([taps[i] for i in idx]) if len(idx) > 1 else taps[idx[0]]
        p = torch.mm(x.reshape(x.shape[0], r * r).t().to(wt.dtype), wt)  # (r*r, MH): projected at the tap's resolution
        if r != R and bf16 and R * r * MH <= GATHER_MAX_VALUES:
            i0, i1, lam = s
            q = p.view(r, r, MH).float()
            ly, lx = lam.view(R, 1, 1), lam.view(1, R, 1)
            q = q[i0] * (1 - ly) + q[i1] * ly  # (R, r, MH)
            p = (q[:, i0] * (1 - lx) + q[:, i1] * lx).view(R * R, MH)
        elif r != R:
            p = F.interpolate(p.t().reshape(1, MH, r, r), size=(R, R), mode="bilinear", align_corners=False)
            p = p.reshape(MH, R * R).t()
        h = h + (p.float() if bf16 else p)
    return h.relu().to(bias.dtype)


class CompiledLabeling:
    """The process's compiled `label_image`: compiled lazily, first call per shape under a lock (two
    generation threads must not compile the same graph at once), eager for good after a failure."""

    max_values = 2**25  # R² * M*H1 of the largest image labelled whole (fp32: 128 MiB per copy of h)
    # widest first layer (M*H1) it is used for: at 64², one thread, 3 x 128 (384) labels in ~0.75x the
    # eager tiled time, but 10 x 256 (2,560) took 1.1x (3.50 vs 3.19 s per 32 images; through the
    # factory 15.2 vs 17.7 samples/s): there the eager tile's separable upsampling wins
    max_width = 512

    def __init__(self) -> None:
        self._fns: dict[str, Callable] = {}  # per device type
        self._lock = threading.Lock()
        self._warm: set = set()
        self.failed: str | None = None

    def applies(self, pixels: int, width: int) -> bool:
        """Whether an image of `pixels` with a first layer `width` (M*H1) wide is labelled compiled."""
        return width <= self.max_width and pixels * width <= self.max_values

    def __call__(self, taps: list[torch.Tensor], *weights_and_meta) -> tuple[torch.Tensor, torch.Tensor] | None:
        """label_image's result, or None where compilation is unavailable (the caller labels eagerly)."""
        if self.failed is not None:
            return None
        key = (tuple((t.shape, t.dtype, t.device) for t in taps), weights_and_meta[-3:], torch.is_autocast_enabled(taps[0].device.type))
        dev = taps[0].device.type
        if key in self._warm:
            return self._fns[dev](taps, *weights_and_meta)
        with self._lock:
            try:
                if dev not in self._fns:
                    # CPU: a C++ wrapper around the whole graph, which releases the GIL; with Python's
                    # wrapper each fused kernel holds it, and two generation threads took turns
                    # (measured: twice the work on 2 threads took 1.6-1.75x one thread's time with
                    # Python's wrapper, 1.3-1.45x with the C++ one; eager 1.1-1.3x)
                    self._fns[dev] = torch.compile(label_image, dynamic=False, options={"cpp_wrapper": dev == "cpu"})
                out = self._fns[dev](taps, *weights_and_meta)
            except Exception as e:  # noqa: BLE001 - any compiler failure: label eagerly instead
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"compiled labeling unavailable ({self.failed}); labeling eagerly", RuntimeWarning, stacklevel=3)
                return None
            self._warm.add(key)
            return out


COMPILED = CompiledLabeling()
