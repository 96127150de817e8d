"""Downstream dense-prediction networks: DeepLabV3 (ResNet-50/101), smp U-Net, a tiny U-Net.

Every model built here is wrapped in :class:`Segmenter`, whose contract is:

* input:  float images (N, 3, H, W) in [-1, 1] (``uint8 / 127.5 - 1``), any H, W;
* output: (N, C, H, W) at the input resolution, raw (no activation), where C is
  ``num_classes`` logits (segmentation), ``num_keypoints`` heatmaps (keypoints) or 1 (depth).

The wrapper re-normalises [-1, 1] inputs to ImageNet mean/std for the ResNet-based
architectures (whether or not pretrained weights were found) and pads the input
(replicate) to the multiple of the network's total stride, cropping the output back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from pydantic import BaseModel, Field, model_validator
from torch import nn

from labelfoundry.segmenters.hub import load_local_state_dict, local_checkpoint
from labelfoundry.segmenters.tiny_unet import TinyUNet

log = logging.getLogger(__name__)

Task = Literal["segmentation", "keypoints", "depth"]
Arch = Literal["deeplabv3_resnet50", "deeplabv3_resnet101", "unet", "tiny_unet"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_TORCHVISION_RESNETS = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}


class SegmenterConfig(BaseModel):
    """Which downstream network to build and what it predicts."""

    arch: Arch = "tiny_unet"
    task: Task = "segmentation"
    num_classes: int = Field(2, ge=1, description="segmentation classes (task=segmentation)")
    num_keypoints: int = Field(0, ge=0, description="heatmap channels (task=keypoints)")
    pretrained_backbone: bool = Field(
        True, description="use ImageNet backbone weights if present in the local torch hub cache"
    )
    unet_encoder: str = Field("resnet18", description="smp encoder name for arch=unet")
    unet_decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 8)
    tiny_width: int = Field(16, ge=1, description="base width of tiny_unet")
    depth_shift: float = Field(0.0, description="task=depth: depth = raw * depth_scale + depth_shift (metres)")
    depth_scale: float = Field(1.0, gt=0, description="task=depth: set both from the training depths' mean and "
                               "std, so a fresh head starts at the data's scale and bf16 outputs keep their precision")

    @model_validator(mode="after")
    def _check_heads(self) -> "SegmenterConfig":
        if self.task == "keypoints" and self.num_keypoints < 1:
            raise ValueError("task='keypoints' needs num_keypoints >= 1")
        return self

    @property
    def out_channels(self) -> int:
        """Channels of the output head: classes, keypoint heatmaps, or 1 for depth."""
        return {"segmentation": self.num_classes, "keypoints": self.num_keypoints, "depth": 1}[
            self.task
        ]


class Segmenter(nn.Module):
    """Wraps a dense network: [-1,1] input -> (optional ImageNet norm, pad) -> net -> crop."""

    def __init__(
        self, net: nn.Module, cfg: SegmenterConfig, *, imagenet_norm: bool, pad_multiple: int
    ) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.pad_multiple = pad_multiple
        self.imagenet_norm = imagenet_norm
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float in [-1, 1] -> (N, C, H, W) raw outputs."""
        h, w = x.shape[-2:]
        if self.imagenet_norm:
            x = ((x + 1.0) * 0.5 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        m = self.pad_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        y = self.net(x)
        if isinstance(y, dict):  # torchvision segmentation models return {"out": ...}
            y = y["out"]
        if y.shape[-2:] != (h + ph, w + pw):
            y = F.interpolate(y, size=(h + ph, w + pw), mode="bilinear", align_corners=False)
        y = y[..., :h, :w]
        if self.cfg.task == "depth" and (self.cfg.depth_shift, self.cfg.depth_scale) != (0.0, 1.0):
            y = y.float() * self.cfg.depth_scale + self.cfg.depth_shift  # in fp32: bf16 steps are 0.06 m at 10 m
        return y


def _resnet_url(resnet_name: str) -> str:
    return getattr(torchvision.models, f"ResNet{resnet_name.removeprefix('resnet')}_Weights").IMAGENET1K_V1.url


def imagenet_weights_file(arch: str, unet_encoder: str = "resnet18") -> tuple[Path | None, Path]:
    """(local file or None, where it is expected) of the ImageNet backbone weights of `arch`:
    lets a caller skip an ImageNet-transfer baseline up front, naming the file to place."""
    if arch.startswith("deeplabv3_"):
        resnet = arch.removeprefix("deeplabv3_")
    elif arch == "unet" and unet_encoder in _TORCHVISION_RESNETS:
        resnet = unet_encoder
    else:
        raise ValueError(f"{arch!r} has no ImageNet backbone; use deeplabv3_resnet50/101 or unet with a resnet encoder")
    filename = _resnet_url(resnet).rsplit("/", 1)[-1]
    return local_checkpoint(filename), Path(torch.hub.get_dir()) / "checkpoints" / filename


def _load_resnet_weights(module: nn.Module, resnet_name: str, what: str) -> None:
    """Load torchvision's ImageNet ``resnet_name`` weights (local cache only) into ``module``."""
    state = load_local_state_dict(_resnet_url(resnet_name), what)
    if state is None:
        return
    # Checked by hand: smp's encoders override load_state_dict (dropping fc.*) and return nothing.
    missing = sorted(set(module.state_dict()) - set(state))
    module.load_state_dict(state, strict=False)  # fc.* is unexpected
    if missing:
        raise RuntimeError(f"{what}: pretrained file lacks keys {missing[:5]}...")


def _deeplab(cfg: SegmenterConfig) -> nn.Module:
    builder = getattr(torchvision.models.segmentation, cfg.arch)
    net = builder(
        weights=None, weights_backbone=None, num_classes=cfg.out_channels, aux_loss=False
    )
    resnet = cfg.arch.removeprefix("deeplabv3_")
    if cfg.pretrained_backbone:
        _load_resnet_weights(net.backbone, resnet, f"{cfg.arch} backbone ({resnet})")
    else:
        log.info("%s: pretrained_backbone=False, random initialisation", cfg.arch)
    return net


def _smp_unet(cfg: SegmenterConfig) -> nn.Module:
    import segmentation_models_pytorch as smp

    net = smp.Unet(
        encoder_name=cfg.unet_encoder,
        encoder_weights=None,  # never let smp download; we load local files ourselves
        decoder_channels=cfg.unet_decoder_channels,
        in_channels=3,
        classes=cfg.out_channels,
    )
    if not cfg.pretrained_backbone:
        log.info("unet(%s): pretrained_backbone=False, random initialisation", cfg.unet_encoder)
    elif cfg.unet_encoder in _TORCHVISION_RESNETS:
        _load_resnet_weights(net.encoder, cfg.unet_encoder, f"unet encoder ({cfg.unet_encoder})")
    else:
        log.warning(
            "unet encoder %r: local pretrained weights are only supported for %s; "
            "using RANDOM initialisation",
            cfg.unet_encoder,
            sorted(_TORCHVISION_RESNETS),
        )
    return net


def build_segmenter(cfg: SegmenterConfig, seed: int | None = None) -> Segmenter:
    """Build the network described by ``cfg``, wrapped in :class:`Segmenter`.

    Pretrained ImageNet backbone weights are used only if torchvision's file is already in
    ``<torch.hub.get_dir()>/checkpoints``; otherwise a warning names the file and the
    backbone stays randomly initialised. Heads are always randomly initialised: from ``seed``
    when given (the same weights whatever ran before; the global RNG is left untouched),
    else from the global RNG.
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _build(cfg)
    return _build(cfg)


def _build(cfg: SegmenterConfig) -> Segmenter:
    if cfg.arch.startswith("deeplabv3_"):
        return Segmenter(_deeplab(cfg), cfg, imagenet_norm=True, pad_multiple=8)
    if cfg.arch == "unet":
        return Segmenter(_smp_unet(cfg), cfg, imagenet_norm=True, pad_multiple=32)
    if cfg.arch == "tiny_unet":
        net = TinyUNet(3, cfg.out_channels, width=cfg.tiny_width)
        return Segmenter(net, cfg, imagenet_norm=False, pad_multiple=4)
    raise ValueError(f"unknown arch {cfg.arch!r}")
