"""Generator feature taps and the factorized hypercolumn projection.

The papers upsample every style-block output to full resolution, concatenate (C channels per
pixel) and run an MLP per pixel. Its first layer is linear, and bilinear upsampling is linear
and per-channel, so
    W · concat_l(up(f_l)) + b  ==  sum_l up(W_l · f_l) + b.
We apply each W_l (a 1x1 conv, all ensemble members stacked) at the tap's native resolution and
only then upsample the small hidden-width maps, so the full-resolution hypercolumn is never built.

Upsampling is fixed to bilinear with align_corners=False (== F.interpolate's). While fitting, the
taps are sampled (grid_sample) at a random pixel subset and then projected; at labeling time
(`TiledProjection`) every row of each resolution is projected once, a band at a time, and
upsampled exactly by separable interpolation into one output row tile, so peak memory is bounded
by the tile at any resolution. Same function in both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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


def interp_1d(out_size: int, in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F.interpolate's source indices i0, i1 and weight of i1 along one axis (bilinear,
    align_corners=False, border-clamped), float64 weights."""
    x = torch.arange(out_size, dtype=torch.float64)
    src = ((x + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    return i0, (i0 + 1).clamp(max=in_size - 1), src - i0


def interp_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """(out, in) float64 matrix of 1-D bilinear interpolation, align_corners=False (rows sum to 1)."""
    i0, i1, lam = interp_1d(out_size, in_size)
    a = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    a.index_put_((rows, i0), 1 - lam, accumulate=True)
    a.index_put_((rows, i1), lam, accumulate=True)
    return a


@dataclass
class _Group:
    """Taps of one resolution: their stacked weight slice (C_g, MH) and how they are upsampled."""

    idx: list[int]
    res: int
    wt: torch.Tensor  # (C_g, MH), usually a transposed view of the (MH, C_total) weight
    ay: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # per tile: lo, hi, (T, hi-lo+1)
    small: bool = False
    hx: torch.Tensor | None = None  # large groups, fp32 on CPU: (r, f, 3) weights of each output block, see TiledProjection.image
    lerp: tuple[torch.Tensor, ...] = ()  # large groups otherwise: the four lerps' weights
    chunk: int = 1  # low-res rows projected per step of the rolling band
    cap: int = 0  # rows the band holds: the widest tile's source rows - 1 + chunk, at most res (see _roll)
    off: int = 0  # small groups: first column of this group in the stacked vertical buffer
    src: tuple[torch.Tensor, ...] = ()  # low-res groups: interp_1d's i0, i1 (int64) and weight (fp32), for the compiled pass


@dataclass
class Workspace:
    """Buffers of one labeling call, reused for every image and tile of it (allocated once per call,
    freed with it): the output tile, each group's rolling band and where it stands, and the
    vertically interpolated rows (large groups one at a time; the small ones side by side, so one
    batched matmul upsamples them all horizontally)."""

    buf: torch.Tensor  # (T*R, MH)
    bands: list[torch.Tensor]  # per low group (cap, r, MH)
    held: list[list[int]]  # per band: first row held, rows held
    zbuf: torch.Tensor | None  # (T * (max large r + 2) * MH,): a large group's rows with a replicated border column
    zc: torch.Tensor | None  # (T, sum small r, MH)
    xbuf: torch.Tensor  # the largest group's input rows of one GEMM, gathered from its taps in the compute dtype


class TiledProjection:
    """The factorized first layer over whole images, one row tile at a time, as a few large GEMMs.

    Built once per labeling call from the (BN-folded) weight (MH, C_total), bias (MH), the taps'
    channels and native resolutions, in the compute dtype (bf16 where it pays, see
    `labelfoundry.precision`; the GEMMs accumulate in fp32 inside). Per image:
      - full-resolution taps are projected straight into the tile buffer (one addmm, bias fused);
      - each lower resolution keeps a rolling band of projected rows: as the tiles move down the
        image, its next rows are projected a chunk at a time (one GEMM over a few thousand pixels),
        so every low-resolution row is projected exactly once and memory stays bounded;
      - exact separable bilinear upsampling (align_corners=False, the same i0/i1/lambda as
        F.interpolate): vertically one small matmul per group and tile; horizontally, all groups
        of resolution <= small_res in one batched matmul with the (R, sum r) interpolation matrix,
        larger ones by four broadcast lerps over the channels-last tile, or, in fp32 on a CPU, by one
        batched matmul per tile row: each block of f = R / r output columns mixes the same three
        source columns (j-1, j, j+1) with the same (f, 3) weights once the border columns are
        replicated, so the tile is written in one pass instead of four (fp32 labeling 0.91x the time
        at the paper's shape; in bf16 oneDNN's K=3 batched matmul is slower than the lerps, and on
        CUDA a launch per row costs more than it saves: bench/labeling.py).
    The tile is channels-last (P, MH), so the head reads each member's slice as a strided GEMM
    operand without a copy. The same code on CPU and CUDA; only the tile size differs (and the large
    groups' horizontal pass in fp32 on a CPU, above).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor, tap_channels: list[int], tap_resolutions: list[int],
        out_res: int, *, tile_rows: int, dtype: torch.dtype = torch.float32, chunk_px: int = 256, small_res: int = 16,
    ):
        if len(tap_channels) != len(tap_resolutions) or sum(tap_channels) != weight.shape[1]:
            raise ValueError(f"taps {list(zip(tap_channels, tap_resolutions))} do not match a weight of {weight.shape[1]} inputs")
        weight, bias, dev = weight.detach(), bias.detach(), weight.device
        R = out_res
        T = max(1, min(tile_rows, R))
        self.R, self.T, self.dtype, self.mh = R, T, dtype, weight.shape[0]
        self.tap_channels, self.tap_resolutions = list(tap_channels), list(tap_resolutions)
        self.bias = bias.to(dtype)
        w_taps = weight.split(self.tap_channels, dim=1)
        by_res: dict[int, list[int]] = {}
        for i, r in enumerate(self.tap_resolutions):
            by_res.setdefault(r, []).append(i)
        self.full: _Group | None = None
        self.low: list[_Group] = []
        starts = [0]
        for c in self.tap_channels:
            starts.append(starts[-1] + c)
        for r, idx in sorted(by_res.items()):
            if dtype == weight.dtype and idx == list(range(idx[0], idx[-1] + 1)):
                # adjacent taps: a transposed view of the weight's column slice, no copy (fp32 GEMMs
                # run as fast on it as on a contiguous copy; measured)
                wt = weight[:, starts[idx[0]] : starts[idx[-1] + 1]].t()
            else:  # a compact copy: oneDNN's bf16 GEMM is ~1.5x slower on a transposed operand (measured)
                wt = torch.cat([w_taps[i] for i in idx], dim=1).t().to(dtype).contiguous()
            g = _Group(idx, r, wt)
            if r == R:
                self.full = g
                continue
            f = R // r
            if r > R or f * r != R or f % 2:
                raise ValueError(f"tap resolution {r} must divide the output resolution {R} by an even factor")
            i0, i1, lam = interp_1d(R, r)
            g.src = (i0.to(dev), i1.to(dev), lam.to(device=dev, dtype=torch.float32))
            for y0 in range(0, R, T):
                y1 = min(R, y0 + T)
                lo, hi = int(i0[y0]), int(i1[y1 - 1])
                ay = torch.zeros(y1 - y0, hi - lo + 1, dtype=torch.float64)
                rows = torch.arange(y1 - y0)
                ay.index_put_((rows, i0[y0:y1] - lo), 1 - lam[y0:y1], accumulate=True)
                ay.index_put_((rows, i1[y0:y1] - lo), lam[y0:y1], accumulate=True)
                g.ay.append((lo, hi, ay.to(device=dev, dtype=dtype)))
            g.small = r <= small_res
            if not g.small:  # output column f*j + k lerps source columns j-1, j (k < f/2) or j, j+1
                # the weights of every block of f output columns on its source columns j-1, j, j+1:
                # the middle block of three columns upsampled by f
                wx = interp_matrix(3 * f, 3)[f : 2 * f]
                h = f // 2
                if dtype == torch.float32 and dev.type == "cpu":
                    g.hx = wx.to(device=dev, dtype=dtype).expand(r, f, 3)
                else:
                    as_w = lambda x: x.reshape(1, 1, h, 1).to(device=dev, dtype=dtype)  # noqa: E731
                    g.lerp = (as_w(wx[:h, 0]), as_w(wx[:h, 1]), as_w(wx[h:, 1]), as_w(wx[h:, 2]))
            g.chunk = max(1, min(r, chunk_px // r))
            g.cap = min(r, max(hi - lo for lo, hi, _ in g.ay) + g.chunk)
            self.low.append(g)
        small = [g for g in self.low if g.small]
        self.small_cols = 0
        for g in small:
            g.off, self.small_cols = self.small_cols, self.small_cols + g.res
        self.large_res = max((g.res for g in self.low if not g.small), default=0)
        self.ax_small = torch.cat([interp_matrix(R, g.res) for g in small], dim=1).to(device=dev, dtype=dtype) if small else None

    @property
    def groups(self) -> list[_Group]:
        """Every weight slice: the full-resolution group (if any) first, then the lower ones."""
        return ([self.full] if self.full is not None else []) + self.low

    def workspace(self, device: torch.device) -> Workspace:
        """The buffers `image` needs, for one labeling call."""
        T, R, MH, dt = self.T, self.R, self.mh, self.dtype
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dt)  # noqa: E731
        return Workspace(
            buf=new(T * R, MH), bands=[new(g.cap, g.res, MH) for g in self.low], held=[[0, 0] for _ in self.low],
            zbuf=new(T * (self.large_res + 2) * MH) if self.large_res else None,
            zc=new(T, self.small_cols, MH) if self.small_cols else None,
            xbuf=new(max(g.wt.shape[0] * (T * R if g is self.full else g.cap * g.res) for g in self.groups)),
        )

    @torch.no_grad()
    def image(self, taps: list[torch.Tensor], n: int, work: Workspace | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """First-layer pre-activations of image n, tile by tile: yields (y0, y1, h) with h
        ((y1-y0)*R, MH) for output rows [y0, y1). h is a reused buffer: valid until the next tile.
        `work`: buffers from `workspace`, to reuse across the images of one call (else fresh ones)."""
        got = [(t.shape[1], t.shape[-1]) for t in taps]
        if got != list(zip(self.tap_channels, self.tap_resolutions)):
            raise ValueError(f"taps (channels, resolution) {got} do not match the labeler's "
                             f"{list(zip(self.tap_channels, self.tap_resolutions))}; was it fitted on this generator?")
        R, T, MH, dt = self.R, self.T, self.mh, self.dtype
        dev = taps[0].device

        def rows(g: _Group, a: int, b: int) -> torch.Tensor:  # rows [a, b) of image n: (pixels, C_g), a transposed view
            xs = [taps[i][n, :, a:b].reshape(taps[i].shape[1], -1) for i in g.idx]
            if len(xs) == 1 and xs[0].dtype == dt:
                return xs[0].t()
            x = work.xbuf[: g.wt.shape[0] * xs[0].shape[1]].view(g.wt.shape[0], -1)
            c = 0
            for xi in xs:  # one pass per tap: the copy converts the dtype too
                x[c : c + xi.shape[0]].copy_(xi)
                c += xi.shape[0]
            return x.t()

        work = work or self.workspace(dev)
        for st in work.held:  # a new image: nothing held yet
            st[0] = st[1] = 0
        for ti, y0 in enumerate(range(0, R, T)):
            y1 = min(R, y0 + T)
            t_rows, P = y1 - y0, (y1 - y0) * R
            out = work.buf[:P]
            if self.full is not None:
                torch.addmm(self.bias, rows(self.full, y0, y1), self.full.wt, out=out)
            else:
                out.copy_(self.bias.expand(P, -1))
            out3 = out.view(t_rows, R, MH)
            for g, band, st in zip(self.low, work.bands, work.held):
                lo, hi, ay = g.ay[ti]
                proj = self._roll(g, rows, band, st, lo, hi)
                # vertical: the small groups' rows side by side in zc (mm writes a strided slice in place)
                if g.small:
                    zdst = work.zc[:t_rows, g.off : g.off + g.res]
                else:  # source columns 1..r of r + 2; 0 and r + 1 repeat the border (both neighbours clamp to it)
                    zp = work.zbuf[: t_rows * (g.res + 2) * MH].view(t_rows, g.res + 2, MH)
                    zdst = zp[:, 1:-1]
                torch.mm(ay, proj.reshape(proj.shape[0], -1), out=zdst.view(t_rows, -1))
                if g.small:
                    continue
                out4 = out.view(t_rows, g.res, R // g.res, MH)
                if g.hx is not None:
                    zp[:, 0].copy_(zp[:, 1])
                    zp[:, -1].copy_(zp[:, -2])
                    # overlapping windows of three source columns, one per block of output columns
                    win = zp.as_strided((t_rows, g.res, 3, MH), (zp.stride(0), MH, MH, 1))
                    for y in range(t_rows):
                        out4[y].baddbmm_(g.hx, win[y])
                    continue
                z, h = zdst, R // g.res // 2
                wm, wcl, wch, wp = g.lerp
                zl, zr = z[:, :-1, None], z[:, 1:, None]  # columns j, j+1 for j < r-1
                out4[:, 1:, :h].addcmul_(zl, wm).addcmul_(zr, wcl)
                out4[:, :-1, h:].addcmul_(zl, wch).addcmul_(zr, wp)
                out4[:, 0, :h] += z[:, 0, None]  # image border: both neighbours clamp to one column
                out4[:, -1, h:] += z[:, -1, None]
            if self.small_cols:  # all small resolutions at once: (R, sum r) @ (sum r, MH) per row
                out3.baddbmm_(self.ax_small.expand(t_rows, -1, -1), work.zc[:t_rows])
            yield y0, y1, out

    @staticmethod
    def _roll(g: _Group, rows: Callable, band: torch.Tensor, st: list[int], lo: int, hi: int) -> torch.Tensor:
        """Projected rows lo..hi of group g, (hi-lo+1, r, MH), projecting new rows a chunk at a time."""
        a, cnt = st
        if lo < a or lo > a + cnt:  # first tile of the image: start afresh
            a, cnt = lo, 0
        if hi >= a + cnt:
            start = a + cnt
            end = min(g.res, max(hi + 1, start + g.chunk))
            if end - a > g.cap:  # move the rows still needed to the front of the buffer
                for j in range(start - lo):  # row by row, front first: each source row is read before it is overwritten
                    band[j].copy_(band[lo - a + j])
                a = lo
            dst = band[start - a : end - a].view(-1, band.shape[-1])
            torch.mm(rows(g, start, end), g.wt, out=dst)
            cnt = end - a
        st[0], st[1] = a, cnt
        return band[lo - a : hi - a + 1]

def naive_hypercolumn(taps: list[torch.Tensor], out_res: int) -> torch.Tensor:
    """The papers' definition: upsample every tap to full resolution and concatenate -> (N, C, R, R)."""
    ups = [F.interpolate(t, size=(out_res, out_res), mode="bilinear", align_corners=False) for t in taps]
    return torch.cat(ups, dim=1)
