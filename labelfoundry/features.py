"""Generator feature taps and the factorized hypercolumn projection.

The papers upsample every style-block output to full resolution, concatenate (C channels per
pixel) and run an MLP per pixel. Its first layer is linear, and bilinear upsampling is linear
and per-channel, so
    W · concat_l(up(f_l)) + b  ==  sum_l up(W_l · f_l) + b.
We apply each W_l (a 1x1 conv, all ensemble members stacked) at the tap's native resolution and
only then upsample the small hidden-width maps, so the full-resolution hypercolumn is never built.

Upsampling is fixed to bilinear with align_corners=False (== F.interpolate's). While fitting, the
taps are sampled (grid_sample) at a random pixel subset and then projected; at labeling time each
resolution is projected on the source rows of one output tile and upsampled exactly by separable
interpolation, so peak memory is bounded by the tile at any resolution. Same function in both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TapSpec:
    """Which taps feed the labeler.

    layers: indices into the generator's tap list (None = all style blocks).
    max_channels: keep only the first N channels of wider taps (HandsOff App. C ablation).
    include_rgb: append the generated image itself (3 channels at full resolution).
    """

    layers: tuple[int, ...] | None = None
    max_channels: int | None = None
    include_rgb: bool = False

    def select(self, taps: list[torch.Tensor], image: torch.Tensor | None = None) -> list[torch.Tensor]:
        idx = range(len(taps)) if self.layers is None else self.layers
        out = [taps[i] if self.max_channels is None else taps[i][:, : self.max_channels] for i in idx]
        if self.include_rgb:
            if image is None:
                raise ValueError("TapSpec.include_rgb needs the generated image")
            out.append(image)
        return out

    def channels(self, tap_channels: list[int]) -> list[int]:
        idx = range(len(tap_channels)) if self.layers is None else self.layers
        ch = [tap_channels[i] if self.max_channels is None else min(tap_channels[i], self.max_channels) for i in idx]
        return ch + ([3] if self.include_rgb else [])


@torch.no_grad()
def generate_with_taps(G, ws: torch.Tensor, spec: TapSpec, noise_mode: str = "const"):
    """Run the generator once: image (N,3,R,R) in [-1,1] and the selected taps (native resolutions)."""
    image, taps = G.synthesis(ws, noise_mode=noise_mode, taps=True)
    return image, spec.select(taps, image)


def pixel_grid(ys: torch.Tensor, xs: torch.Tensor, out_res: int) -> torch.Tensor:
    """Normalised grid_sample coordinates of output pixel centres; ys/xs (..., P) integer pixels."""
    gx = (2.0 * xs.float() + 1.0) / out_res - 1.0
    gy = (2.0 * ys.float() + 1.0) / out_res - 1.0
    return torch.stack([gx, gy], dim=-1)


def sample_bilinear(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear (align_corners=False, border-clamped) samples of x (B,C,h,w) at grid (B,P,2) -> (B,P,C).

    Identical to reading F.interpolate(x, size=R, mode="bilinear") at those pixel centres.
    """
    out = F.grid_sample(x, grid.unsqueeze(1).to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(2).transpose(1, 2)


class FactorizedProjection(nn.Module):
    """First MLP layer of M ensemble members over the (virtual) hypercolumn, applied per tap.

    weight: (M*H, C_total) split into per-tap slices; bias (M*H). Output is the pre-activation
    of the first hidden layer, shaped (N, P, M, H) for the requested pixels.
    """

    def __init__(self, tap_channels: list[int], members: int, hidden: int):
        super().__init__()
        self.tap_channels = list(tap_channels)
        self.members, self.hidden = members, hidden
        c_total = sum(tap_channels)
        self.weight = nn.Parameter(torch.empty(members * hidden, c_total))
        self.bias = nn.Parameter(torch.zeros(members * hidden))
        for m in range(members):  # each member initialised like its own nn.Linear
            nn.init.kaiming_uniform_(self.weight[m * hidden : (m + 1) * hidden], a=5**0.5)
        bound = 1.0 / c_total**0.5
        nn.init.uniform_(self.bias, -bound, bound)

    def tile(
        self, taps: list[torch.Tensor], n: int, y0: int, y1: int, out_res: int,
        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """First-layer pre-activations of output rows [y0, y1) of image n: (M*H, y1-y0, R).

        Each resolution's taps are projected only on the source rows this tile reads, then
        upsampled exactly (bilinear, align_corners=False): vertically by a small interpolation
        matmul, horizontally by 1-D linear interpolation. `weight`/`bias` override the layer's own
        (the labeler passes them with BatchNorm folded in).
        """
        w = self.weight if weight is None else weight
        b = self.bias if bias is None else bias
        if [t.shape[1] for t in taps] != self.tap_channels:
            raise ValueError(f"tap channels {[t.shape[1] for t in taps]} do not match the labeler's {self.tap_channels}")
        t_rows, mh = y1 - y0, w.shape[0]
        out = b.reshape(mh, 1, 1).expand(mh, t_rows, out_res).clone()
        w_taps = w.split(self.tap_channels, dim=1)
        by_res: dict[int, list[int]] = {}
        for i, t in enumerate(taps):
            by_res.setdefault(t.shape[-1], []).append(i)
        small_z, small_a = [], []
        for r, idx in by_res.items():
            w_g = torch.cat([w_taps[i] for i in idx], dim=1) if len(idx) > 1 else w_taps[idx[0]]
            if r == out_res:
                x = torch.cat([taps[i][n, :, y0:y1] for i in idx]) if len(idx) > 1 else taps[idx[0]][n, :, y0:y1]
                out += (w_g @ x.reshape(x.shape[0], -1)).view(mh, t_rows, out_res)
                continue
            i0, i1, lam = _interp_index(out_res, r, w.device)
            lo, hi = int(i0[y0]), int(i1[y1 - 1])
            x = torch.cat([taps[i][n, :, lo : hi + 1] for i in idx]) if len(idx) > 1 else taps[idx[0]][n, :, lo : hi + 1]
            band = (w_g @ x.reshape(x.shape[0], -1)).view(mh, hi - lo + 1, r)
            ay = _interp_matrix(out_res, r, w.device)[y0:y1, lo : hi + 1]
            z = torch.einsum("tb,cbr->ctr", ay, band)  # vertical
            if r <= _SMALL_RES:  # horizontal for all small resolutions at once, below
                small_z.append(z)
                small_a.append(_interp_matrix(out_res, r, w.device))
                continue
            out += F.interpolate(z.reshape(1, mh * t_rows, r), size=out_res, mode="linear", align_corners=False).view(
                mh, t_rows, out_res
            )
        if small_z:  # one (rows, sum r) @ (sum r, R) product writes the output once for all of them
            z = torch.cat(small_z, dim=-1).reshape(mh * t_rows, -1)
            out += (z @ torch.cat(small_a, dim=1).t()).view(mh, t_rows, out_res)
        return out

    def project_features(self, feats: torch.Tensor) -> torch.Tensor:
        """First layer on features already gathered per member: (N, M, P, C_total) -> (N, M, P, H).

        Used while fitting: the taps are constants, so gathering them first (C channels) and
        projecting after avoids back-propagating through the upsampling of M*H channels.
        """
        w = self.weight.reshape(self.members, self.hidden, -1)
        out = torch.einsum("nmpc,mhc->nmph", feats, w.to(feats.dtype))
        return out + self.bias.reshape(1, self.members, 1, self.hidden).to(out.dtype)


def gather_taps(taps: list[torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
    """Hypercolumn features at grid points only: grid (N, P, 2) -> (N, P, C_total)."""
    return torch.cat([sample_bilinear(t, grid) for t in taps], dim=-1)


@functools.lru_cache(maxsize=64)
def _interp_index_cpu(out_size: int, in_size: int):
    x = torch.arange(out_size, dtype=torch.float64)
    src = ((x + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    return i0, (i0 + 1).clamp(max=in_size - 1), (src - i0).float()


_SMALL_RES = 16  # below this, an interpolation matmul beats upsample_linear1d on CPU (measured)


@functools.lru_cache(maxsize=64)
def _interp_matrix_cpu(out_size: int, in_size: int) -> torch.Tensor:
    i0, i1, lam = _interp_index_cpu(out_size, in_size)
    a = torch.zeros(out_size, in_size)
    rows = torch.arange(out_size)
    a.index_put_((rows, i0), 1 - lam, accumulate=True)
    a.index_put_((rows, i1), lam, accumulate=True)
    return a


def _interp_matrix(out_size: int, in_size: int, device) -> torch.Tensor:
    """(out, in) matrix of 1-D bilinear interpolation, align_corners=False (rows sum to 1)."""
    return _interp_matrix_cpu(out_size, in_size).to(device)


def _interp_index(out_size: int, in_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F.interpolate's source indices and weights (bilinear, align_corners=False) along one axis."""
    return tuple(t.to(device) for t in _interp_index_cpu(out_size, in_size))


def naive_hypercolumn(taps: list[torch.Tensor], out_res: int) -> torch.Tensor:
    """The papers' definition: upsample every tap to full resolution and concatenate -> (N, C, R, R)."""
    ups = [F.interpolate(t, size=(out_res, out_res), mode="bilinear", align_corners=False) for t in taps]
    return torch.cat(ups, dim=1)
