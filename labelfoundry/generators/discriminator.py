"""StyleGAN2 residual discriminator (names follow the stylegan2-ada-pytorch layout `b{res}.*`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .ops import bias_act, conv_down2, make_filter
from .stylegan2 import FullyConnected


@dataclass
class DiscriminatorConfig:
    resolution: int = 64
    img_channels: int = 3
    channel_base: int = 2048
    channel_max: int = 128
    mbstd_group_size: int = 4
    mbstd_num_channels: int = 1
    conv_clamp: float | None = None
    channels: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.channels:
            res = [2**i for i in range(2, int(math.log2(self.resolution)) + 1)]
            self.channels = {r: min(self.channel_base // r, self.channel_max) for r in res}
        self.channels = {int(k): int(v) for k, v in self.channels.items()}

    def to_json(self) -> dict:
        d = asdict(self)
        d["channels"] = {str(k): v for k, v in self.channels.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DiscriminatorConfig":
        d = dict(d)
        d["channels"] = {int(k): int(v) for k, v in d.get("channels", {}).items()}
        return cls(**d)


class Conv2dLayer(nn.Module):
    """Equalised-lr conv with optional 2x FIR downsampling."""

    def __init__(self, in_ch, out_ch, k, act="lrelu", down=False, bias=True, conv_clamp=None):
        super().__init__()
        self.act, self.down, self.conv_clamp = act, down, conv_clamp
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, k, k))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_ch * k * k)
        self.register_buffer("resample_filter", make_filter())

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        if self.down:
            x = conv_down2(x, w, self.resample_filter)
        else:
            x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, self.act, gain=gain, clamp=clamp)


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_ch: int, tmp_ch: int, out_ch: int, img_channels: int, conv_clamp=None):
        super().__init__()
        self.in_ch = in_ch
        if in_ch == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_ch, 1, conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp_ch, tmp_ch, 3, conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_ch, out_ch, 3, down=True, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_ch, out_ch, 1, act="linear", down=True, bias=False)

    def forward(self, x, img):
        if self.in_ch == 0:
            x = self.fromrgb(img)
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv0(x)
        x = self.conv1(x, gain=math.sqrt(0.5))
        return y + x


class MinibatchStd(nn.Module):
    def __init__(self, group_size: int, num_channels: int):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        if n % g:
            g = math.gcd(n, g)
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()
        y = y.mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class Epilogue(nn.Module):
    def __init__(self, in_ch: int, cfg: DiscriminatorConfig):
        super().__init__()
        self.mbstd = MinibatchStd(cfg.mbstd_group_size, cfg.mbstd_num_channels)
        self.conv = Conv2dLayer(in_ch + cfg.mbstd_num_channels, in_ch, 3, conv_clamp=cfg.conv_clamp)
        self.fc = FullyConnected(in_ch * 16, in_ch, act="lrelu")
        self.out = FullyConnected(in_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.mbstd(x))
        return self.out(self.fc(x.flatten(1)))


class Discriminator(nn.Module):
    """image (N, 3, R, R) in [-1, 1] -> realness logit (N, 1)."""

    def __init__(self, cfg: DiscriminatorConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg or DiscriminatorConfig(**kwargs)
        self.resolution = self.cfg.resolution
        ch = self.cfg.channels
        self.block_resolutions = [2**i for i in range(int(math.log2(self.resolution)), 2, -1)]
        for res in self.block_resolutions:
            in_ch = 0 if res == self.resolution else ch[res]
            setattr(self, f"b{res}", DiscriminatorBlock(in_ch, ch[res], ch[res // 2], self.cfg.img_channels, self.cfg.conv_clamp))
        self.b4 = Epilogue(ch[4], self.cfg)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = None
        for res in self.block_resolutions:
            x = getattr(self, f"b{res}")(x, img)
        return self.b4(x)
