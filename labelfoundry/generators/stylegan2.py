"""StyleGAN2 generator (config-f architecture, "skip" toRGB), written to read like the paper's figure.

Parameter and buffer names follow the public stylegan2-ada-pytorch layout
(`mapping.fc{i}`, `synthesis.b{res}.{conv0,conv1,torgb}`), so NVIDIA checkpoints load by name.
Weights are stored raw and scaled at run time (equalised learning rate).

W+ rows: row 0 -> the 4x4 conv, row 1 -> the 4x4 toRGB; at resolution r > 4 with
j = 1 + 2*(log2 r - 3): conv0 (upsampling) <- row j, conv1 <- row j+1, toRGB <- row j+2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .ops import bias_act, make_filter, modulated_conv2d, normalize_2nd_moment, upsample2d


@dataclass
class StyleGAN2Config:
    """Architecture of one generator; serialised as the JSON config of our own checkpoint format."""

    resolution: int = 64
    z_dim: int = 128
    w_dim: int = 128
    img_channels: int = 3
    map_layers: int = 4
    mapping_lr_mult: float = 0.01
    channel_base: int = 2048
    channel_max: int = 128
    num_fp16_res: int = 0
    conv_clamp: float | None = None
    w_avg_beta: float = 0.995
    channels: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        log2 = math.log2(self.resolution)
        if self.resolution < 4 or log2 != int(log2):
            raise ValueError(f"resolution must be a power of two >= 4, got {self.resolution}")
        if not self.channels:
            self.channels = {r: min(self.channel_base // r, self.channel_max) for r in self.block_resolutions}
        self.channels = {int(k): int(v) for k, v in self.channels.items()}

    @property
    def block_resolutions(self) -> list[int]:
        return [2**i for i in range(2, int(math.log2(self.resolution)) + 1)]

    @property
    def num_ws(self) -> int:
        return 2 * int(math.log2(self.resolution)) - 2

    def to_json(self) -> dict:
        d = asdict(self)
        d["channels"] = {str(k): v for k, v in self.channels.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StyleGAN2Config":
        d = dict(d)
        d["channels"] = {int(k): int(v) for k, v in d.get("channels", {}).items()}
        return cls(**d)


class FullyConnected(nn.Module):
    """Equalised-lr linear layer; `lr_mult` slows the mapping network as in the paper."""

    def __init__(self, in_f: int, out_f: int, act: str = "linear", lr_mult: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.act = act
        self.weight = nn.Parameter(torch.randn(out_f, in_f) / lr_mult)
        self.bias = nn.Parameter(torch.full([out_f], float(bias_init)))
        self.weight_gain = lr_mult / math.sqrt(in_f)
        self.bias_gain = lr_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain
        if self.act == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, self.act)


class MappingNetwork(nn.Module):
    """z (N, z_dim) -> w (N, num_ws, w_dim), with truncation around the tracked w_avg."""

    def __init__(self, cfg: StyleGAN2Config):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws = cfg.z_dim, cfg.w_dim, cfg.num_ws
        self.num_layers = cfg.map_layers
        self.w_avg_beta = cfg.w_avg_beta
        feats = [cfg.z_dim] + [cfg.w_dim] * cfg.map_layers
        for i in range(cfg.map_layers):
            setattr(self, f"fc{i}", FullyConnected(feats[i], feats[i + 1], act="lrelu", lr_mult=cfg.mapping_lr_mult))
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: torch.Tensor, psi: float = 1.0, update_w_avg: bool = False) -> torch.Tensor:
        assert z.ndim == 2 and z.shape[1] == self.z_dim, f"z must be (N, {self.z_dim}), got {tuple(z.shape)}"
        x = normalize_2nd_moment(z.to(torch.float32))
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_w_avg:
            self.w_avg.copy_(x.detach().float().mean(0).lerp(self.w_avg, self.w_avg_beta))
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if psi != 1.0:
            x = self.w_avg.lerp(x.float(), psi)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x upsampling) + noise + bias + lrelu (+ clamp)."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, up: bool = False, conv_clamp=None):
        super().__init__()
        self.up, self.resolution, self.conv_clamp = up, resolution, conv_clamp
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("resample_filter", make_filter())

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const", gain: float = 1.0) -> torch.Tensor:
        styles = self.affine(w)
        noise = None
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device) * self.noise_strength
        elif noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        elif noise_mode != "none":
            raise ValueError(f"noise_mode must be const, random or none, got {noise_mode!r}")
        x = modulated_conv2d(x, self.weight, styles, up=self.up, noise=noise, resample_filter=self.resample_filter)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, "lrelu", gain=gain, clamp=clamp)


class ToRGB(nn.Module):
    """Modulated 1x1 conv without demodulation, to image channels."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, conv_clamp=None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.weight_gain = 1.0 / math.sqrt(in_ch)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias, "linear", clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: [const | conv0 (up)] -> conv1 -> toRGB added to the upsampled skip image."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, img_channels: int, use_fp16: bool, conv_clamp):
        super().__init__()
        self.in_ch, self.resolution, self.use_fp16 = in_ch, resolution, use_fp16
        if in_ch == 0:
            self.const = nn.Parameter(torch.randn(out_ch, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_ch, out_ch, w_dim, resolution, up=True, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(out_ch, out_ch, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGB(out_ch, img_channels, w_dim, conv_clamp=conv_clamp)
        self.register_buffer("resample_filter", make_filter())
        self.num_conv = 1 if in_ch == 0 else 2

    def forward(self, x, img, ws: torch.Tensor, noise_mode: str, force_fp32: bool, taps: list | None, hook=None):
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and ws.device.type == "cuda") else torch.float32
        w_iter = iter(ws.unbind(1))
        if self.in_ch == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
        else:
            x = self.conv0(x.to(dtype), next(w_iter), noise_mode)
            if taps is not None:
                taps.append(x)
        x = self.conv1(x.to(dtype), next(w_iter), noise_mode)
        if taps is not None:
            taps.append(x)
        if hook is not None:  # may replace the block's features before toRGB and the next block see them
            x = hook(self.resolution, x)
        y = self.torgb(x, next(w_iter)).to(torch.float32)
        img = y if img is None else upsample2d(img, self.resample_filter) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws (N, num_ws, w_dim) -> image (N, 3, R, R) in roughly [-1, 1]."""

    def __init__(self, cfg: StyleGAN2Config):
        super().__init__()
        self.resolution, self.num_ws, self.w_dim = cfg.resolution, cfg.num_ws, cfg.w_dim
        self.block_resolutions = cfg.block_resolutions
        fp16_res = max(2 ** (int(math.log2(cfg.resolution)) + 1 - cfg.num_fp16_res), 8)
        for res in self.block_resolutions:
            in_ch = cfg.channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(
                in_ch, cfg.channels[res], cfg.w_dim, res, cfg.img_channels,
                use_fp16=res >= fp16_res, conv_clamp=cfg.conv_clamp,
            )
            setattr(self, f"b{res}", block)
        self.tap_channels = []
        for res in self.block_resolutions:
            n = 1 if res == 4 else 2
            self.tap_channels += [cfg.channels[res]] * n
        self.tap_resolutions = [4] + [r for r in self.block_resolutions[1:] for _ in range(2)]

    def forward(
        self,
        ws: torch.Tensor,  # (N, num_ws, w_dim) latents, one row per layer
        noise_mode: str = "const",  # "const" (fixed noise buffers), "random" or "none"
        taps: bool = False,  # also return every style block's output at its native resolution
        force_fp32: bool = False,  # no fp16 blocks even on CUDA
        hook=None,  # hook(resolution, x) -> x after each block's last conv: edits the features (Labels4Free)
    ):
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), (
            f"ws must be (N, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}"
        )
        ws = ws.to(torch.float32)
        tap_list: list | None = [] if taps else None
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            x, img = block(x, img, ws[:, w_idx : w_idx + block.num_conv + 1], noise_mode, force_fp32, tap_list, hook)
            w_idx += block.num_conv
        if taps:
            return img, [t.to(torch.float32) for t in tap_list]
        return img


class Generator(nn.Module):
    """The Generator interface of labelfoundry: mapping + synthesis, style mixing by slicing ws."""

    def __init__(self, cfg: StyleGAN2Config | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg or StyleGAN2Config(**kwargs)
        self.mapping = MappingNetwork(self.cfg)
        self.synthesis = SynthesisNetwork(self.cfg)

    z_dim = property(lambda self: self.cfg.z_dim)
    w_dim = property(lambda self: self.cfg.w_dim)
    num_ws = property(lambda self: self.cfg.num_ws)
    resolution = property(lambda self: self.cfg.resolution)
    img_channels = property(lambda self: self.cfg.img_channels)
    tap_channels = property(lambda self: list(self.synthesis.tap_channels))
    tap_resolutions = property(lambda self: list(self.synthesis.tap_resolutions))

    @property
    def w_avg(self) -> torch.Tensor:
        return self.mapping.w_avg

    def forward(self, z: torch.Tensor, psi: float = 1.0, noise_mode: str = "const") -> torch.Tensor:
        return self.synthesis(self.mapping(z, psi=psi), noise_mode=noise_mode)

    def z_from_seeds(self, seeds: list[int], device=None) -> torch.Tensor:
        """Latents that depend only on the seed (not on batch composition or device)."""
        zs = [torch.randn(self.z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(zs).to(device or self.w_avg.device)

    def mix(self, ws_a: torch.Tensor, ws_b: torch.Tensor, cutoff: int) -> torch.Tensor:
        """Style mixing: rows [0, cutoff) from ws_a, the rest from ws_b."""
        return torch.cat([ws_a[:, :cutoff], ws_b[:, cutoff:]], dim=1)
