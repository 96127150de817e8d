"""Generator feature taps and the factorized hypercolumn projection.

The papers upsample every style-block output to full resolution, concatenate (C channels per
pixel) and run an MLP per pixel. Its first layer is linear, and bilinear upsampling is linear
and per-channel, so
    W · concat_l(up(f_l)) + b  ==  sum_l up(W_l · f_l) + b.
We apply each W_l (a 1x1 conv, all ensemble members stacked) at the tap's native resolution and
only then upsample the small hidden-width maps, so the full-resolution hypercolumn is never built.

Upsampling is fixed to bilinear with align_corners=False (== F.interpolate's), evaluated with
grid_sample at exactly the pixels needed: a random pixel subset while fitting, a spatial tile at
labeling time. Same function in both, peak memory bounded by the tile.
"""

from __future__ import annotations

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

    def project_taps(self, taps: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Apply each W_l at its tap's native resolution; taps of equal resolution are summed first
        (one upsampling per resolution). Returns {resolution: (N, M*H, r, r)}."""
        if [t.shape[1] for t in taps] != self.tap_channels:
            raise ValueError(f"tap channels {[t.shape[1] for t in taps]} do not match the labeler's {self.tap_channels}")
        per_res: dict[int, torch.Tensor] = {}
        for w_l, t in zip(self.weight.split(self.tap_channels, dim=1), taps):
            p = torch.einsum("oc,nchw->nohw", w_l.to(t.dtype), t)
            r = t.shape[-1]
            per_res[r] = per_res[r] + p if r in per_res else p
        return per_res

    def gather(self, projected: dict[int, torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
        """Sum of upsampled projections at grid points: grid (N, P, 2) -> (N, P, M, H)."""
        out = None
        for p in projected.values():
            s = sample_bilinear(p, grid)
            out = s if out is None else out + s
        out = out + self.bias.to(out.dtype)
        return out.reshape(*out.shape[:2], self.members, self.hidden)

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


def naive_hypercolumn(taps: list[torch.Tensor], out_res: int) -> torch.Tensor:
    """The papers' definition: upsample every tap to full resolution and concatenate -> (N, C, R, R)."""
    ups = [F.interpolate(t, size=(out_res, out_res), mode="bilinear", align_corners=False) for t in taps]
    return torch.cat(ups, dim=1)
