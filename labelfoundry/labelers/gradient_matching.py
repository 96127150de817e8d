"""Learning to annotate with gradient matching (paper 001, §3.2, Alg. 1, Eq. 11, App. B).

An annotator A_ω decodes generator taps into part labels. It is never trained on (features,
label) pairs: it learns to label *random* generated images such that a segmentation network
S_θ trained on them gets the same gradient as it gets from the labeled set D_l, which may be
real photos, renders, another resolution or another look (any ``list[LabeledSample]``).

Per step (Alg. 1):
  1. g_l = ∇_θ f(S_θ(x_l), y_l) on a labeled batch (a constant);
  2. z -> G -> (x_g, h_g); soft labels p = softmax(A_ω(h_g));
  3. g_g = ∇_θ f(S_θ(x_g), p) with create_graph=True, so g_g is a function of ω;
  4. ω <- ω - η_a ∇_ω D(g_l, g_g)  (layer-wise cosine distance, App. B Eq. 12, averaged over layers);
  5. every K steps: θ <- θ - η_s ∇_θ f(S_θ(x_g'), p') on a fresh synthetic batch.

Only S_θ's *head* is matched by default (Table 2: the DeepLabv3 "Head" = everything after the
backbone; Table C.8 for U-Net: the up path ("Up") is within 2 points of "All" while the output conv
alone loses 6). Biases and normalisation parameters are never matched (App. B, following DC).

Annotator (App. B, Fig. B.1, FPN): a 1x1 conv per tap at its native resolution, taps of one
resolution summed, each resolution bilinearly upsampled to a common fusion resolution and added,
a few 3x3 convs, a 1x1 conv to logits, bilinear upsampling of the logits to full resolution.
The concatenated full-resolution hypercolumn is never built.

Uncertainty: per-pixel entropy (nats) of A_ω's softmax, not JS across several heads. The
soft labels p are exactly what S_θ is trained on and what the gradient-matching objective
shapes, so where the labeled gradients cannot pin a class down A_ω keeps p spread out; its
entropy measures that directly. An ensemble of heads would need one double-backward per head
per step (the dominant cost), or heads trained through a shared mean whose disagreement the
objective never constrains (their JS would only reflect initialisation).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..domains.base import LabeledSample
from ..features import TapSpec, generate_with_taps
from ..uncertainty import entropy, image_scores
from .base import FitData, GenBatch, LabelBatch, read_labeler, write_labeler

FORMAT = "labelfoundry-gradient_matching"

SegArch = Literal["tiny_unet", "deeplabv3_resnet50", "deeplabv3_resnet101", "unet"]

# Parameter-name prefixes (inside `Segmenter`) of the part of S_θ that is gradient-matched.
# "head": the paper's Table 2 "Head" (DeepLabv3: the whole DeepLabHead = ASPP + 3x3 conv + classifier)
# or, for U-Nets, the decoder ("Up" in Table C.8) + output conv. "output": the last conv only.
_HEAD_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "tiny_unet": {"head": ("net.dec2.", "net.dec1.", "net.head."), "output": ("net.head.",)},
    "deeplabv3_resnet50": {"head": ("net.classifier.",), "output": ("net.classifier.4.",)},
    "deeplabv3_resnet101": {"head": ("net.classifier.",), "output": ("net.classifier.4.",)},
    "unet": {"head": ("net.decoder.", "net.segmentation_head."), "output": ("net.segmentation_head.",)},
}


class GradientMatchingConfig(BaseModel):
    """Hyper-parameters; defaults from paper 001 App. B unless a description says otherwise."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["gradient_matching"] = "gradient_matching"
    task: Literal["segmentation"] = "segmentation"
    steps: int = Field(
        150_000, ge=1,
        description="T, total annotator updates (App. B: 150,000 at 256² on a GPU). Scale down for "
        "small generators / CPU runs: a 64² toy domain needs a few thousand.",
    )
    batch_size: int = Field(2, ge=1, description="B, labeled and synthetic images per step (App. B: 2)")
    seg_interval: int = Field(1, ge=1, description="K, update S_θ every K annotator steps (§3.2, App. B: K=1)")
    annotator_lr: float = Field(1e-3, gt=0, description="η_a, SGD (App. B: 0.001)")
    segmenter_lr: float = Field(1e-3, gt=0, description="η_s, SGD (App. B: 0.001)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of both optimisers (App. B: 0.9)")
    match: Literal["head", "output", "all"] = Field(
        "head",
        description="which S_θ weights are gradient-matched (§4.3, Table 2 default: Head; for tiny_unet "
        "'head' = dec2 + dec1 + the output 1x1 conv, cf. Table C.8 'Up'); biases/norms are never matched (App. B)",
    )
    segmenter_arch: SegArch = Field(
        "tiny_unet",
        description="S_θ (App. B uses DeepLabv3-ResNet101 / U-Net at 256²; scaled down to tiny_unet by default)",
    )
    segmenter_width: int = Field(16, ge=1, description="tiny_unet base width")
    annotator_width: int = Field(64, ge=4, description="FPN channels (App. B, Fig. B.1; scaled down)")
    annotator_convs: int = Field(2, ge=0, description="3x3 convs after the FPN fusion (Fig. B.1)")
    fuse_resolution: int = Field(
        128, ge=4, description="FPN fusion resolution, capped at the generator's; logits are upsampled to full size"
    )
    block_outputs_only: bool = Field(
        True,
        description="App. B: StyleGAN2 taps = outputs of every synthesis block (the conv1 taps); "
        "False = both convs of every block",
    )
    tap_max_channels: int | None = None
    include_rgb: bool = False
    psi: float = Field(1.0, description="truncation of the synthetic latents sampled while fitting")
    grad_eps: float = Field(1e-12, gt=0, description="floor on per-row gradient norms in the cosine distance")
    label_chunk: int = Field(8, ge=1, description="images per annotator forward in label()")
    seed: int = 0


# ---------------------------------------------------------------------------- gradient matching


def layerwise_gradient_distance(
    grads_a: list[torch.Tensor], grads_b: list[torch.Tensor], eps: float = 1e-12
) -> torch.Tensor:
    """D(A, B) = (1/L) Σ_l Σ_j (1 - cos(A_lj, B_lj))  (App. B, Eq. 12; layer mean, not DC's sum).

    A_lj is the flattened gradient of output node j of layer l: row j of a weight reshaped to
    (out_features, -1). A 1-D tensor counts as a single node. Row norms are floored at `eps`
    (so all-zero rows give distance 1 and a finite gradient).
    """
    if len(grads_a) != len(grads_b) or not grads_a:
        raise ValueError(f"need the same, non-zero number of layers, got {len(grads_a)} and {len(grads_b)}")
    total = grads_b[0].new_zeros(())
    for a, b in zip(grads_a, grads_b):
        if a.shape != b.shape:
            raise ValueError(f"gradient shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        a2 = a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)
        b2 = b.reshape(1, -1) if b.ndim == 1 else b.reshape(b.shape[0], -1)
        na = (a2 * a2).sum(1).clamp_min(eps * eps).sqrt()
        nb = (b2 * b2).sum(1).clamp_min(eps * eps).sqrt()
        cos = (a2 * b2).sum(1) / (na * nb)
        total = total + (1.0 - cos).sum()
    return total / len(grads_a)


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy against soft targets (N,K,H,W), mean over pixels and images."""
    return -(probs * F.log_softmax(logits, dim=1)).sum(1).mean()


def matched_parameters(seg: nn.Module, arch: str, match: str) -> list[tuple[str, nn.Parameter]]:
    """The weights of S_θ whose gradients are matched: ndim > 1 (no biases / norm scales)."""
    named = [(n, p) for n, p in seg.named_parameters() if p.ndim > 1]
    if match != "all":
        prefixes = _HEAD_PREFIXES[arch][match]
        named = [(n, p) for n, p in named if n.startswith(prefixes)]
    if not named:
        raise ValueError(f"no parameters of {arch} selected by match={match!r}")
    return named


def gradient_matching_loss(
    seg: nn.Module,
    params: list[nn.Parameter],
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    syn_x: torch.Tensor,
    syn_probs: torch.Tensor,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Eq. 11 / App. B: D(∇_θ L_l, ∇_θ L_g(ω)), differentiable w.r.t. `syn_probs` (hence ω).

    S_θ runs in train mode (App. B: BN in train mode during matching); the labeled gradient is a
    constant, the synthetic one keeps its graph (create_graph=True) for the double backward.
    """
    seg.train()
    g_real = torch.autograd.grad(F.cross_entropy(seg(real_x), real_y), params)
    g_real = [g.detach() for g in g_real]
    g_syn = torch.autograd.grad(soft_cross_entropy(seg(syn_x), syn_probs), params, create_graph=True)
    return layerwise_gradient_distance(g_real, list(g_syn), eps)


def annotator_step(
    annotator: nn.Module,
    opt: torch.optim.Optimizer,
    seg: nn.Module,
    params: list[nn.Parameter],
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    syn_x: torch.Tensor,
    syn_taps: list[torch.Tensor],
    eps: float = 1e-12,
) -> torch.Tensor:
    """Alg. 1 lines 2-7: one update of ω on the gradient-matching loss; returns the loss (detached).

    Only ω receives gradients (θ's second-order terms are not accumulated into S_θ).
    """
    probs = annotator(syn_taps).softmax(1)
    gm = gradient_matching_loss(seg, params, real_x, real_y, syn_x, probs, eps)
    weights = [p for p in annotator.parameters() if p.requires_grad]
    for p, g in zip(weights, torch.autograd.grad(gm, weights)):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)
    return gm.detach()


# ---------------------------------------------------------------------------- annotator


def _groups(ch: int) -> int:
    return math.gcd(8, ch)


class FPNAnnotator(nn.Module):
    """A_ω: taps (native resolutions) -> logits (N, K, R, R), FPN-style (App. B, Fig. B.1)."""

    def __init__(self, tap_channels: list[int], num_classes: int, out_res: int, width: int, convs: int, fuse_res: int):
        super().__init__()
        self.tap_channels = list(tap_channels)
        self.out_res, self.fuse_res = out_res, min(fuse_res, out_res)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in tap_channels)
        self.fuse_norm = nn.GroupNorm(_groups(width), width)
        layers: list[nn.Module] = []
        for _ in range(convs):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(_groups(width), width), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        if [t.shape[1] for t in taps] != self.tap_channels:
            raise ValueError(f"tap channels {[t.shape[1] for t in taps]} do not match the annotator's {self.tap_channels}")
        per_res: dict[int, torch.Tensor] = {}
        for conv, t in zip(self.lateral, taps):  # 1x1 conv at native resolution; sum per resolution
            y = conv(t)
            r = t.shape[-1]
            per_res[r] = per_res[r] + y if r in per_res else y
        fused = None
        for r, y in per_res.items():  # one resampling per resolution
            if r != self.fuse_res:
                y = F.interpolate(y, size=(self.fuse_res, self.fuse_res), mode="bilinear", align_corners=False)
            fused = y if fused is None else fused + y
        x = self.convs(F.relu(self.fuse_norm(fused)))
        logits = self.classifier(x)
        if self.fuse_res != self.out_res:
            logits = F.interpolate(logits, size=(self.out_res, self.out_res), mode="bilinear", align_corners=False)
        return logits


# ---------------------------------------------------------------------------- labeled data


def prepare_labeled(labeled: list[LabeledSample], resolution: int, num_classes: int | None):
    """Images float (N,3,R,R) in [-1,1] (bilinear, antialiased) and masks int64 (N,R,R) (nearest)."""
    if not labeled:
        raise ValueError("gradient matching needs at least one labeled image")
    images, masks = [], []
    for s in labeled:
        if s.mask is None:
            raise ValueError(f"labeled sample {s.sample_id!r} has no mask (segmentation task)")
        img = torch.as_tensor(np.asarray(s.image))
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"labeled sample {s.sample_id!r}: image must be (H, W, 3), got {tuple(img.shape)}")
        m = torch.as_tensor(np.asarray(s.mask)).long()
        if m.shape != img.shape[:2]:
            raise ValueError(f"labeled sample {s.sample_id!r}: mask {tuple(m.shape)} vs image {tuple(img.shape[:2])}")
        x = img.permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1.0
        if x.shape[-2:] != (resolution, resolution):
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
            m = F.interpolate(m[None, None].float(), size=(resolution, resolution), mode="nearest")[0, 0].long()
        images.append(x[0].clamp(-1, 1))
        masks.append(m)
    x, y = torch.stack(images), torch.stack(masks)
    if num_classes is None:
        num_classes = int(y.max()) + 1
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"mask ids outside [0, {num_classes}): min {int(y.min())}, max {int(y.max())}")
    return x, y, num_classes


def block_output_layers(num_taps: int) -> tuple[int, ...]:
    """Tap indices of the synthesis-block outputs: tap 0 (4x4 conv1), then every conv1 (2, 4, ...)."""
    return tuple(range(0, num_taps, 2))


# ---------------------------------------------------------------------------- labeler


class GradientMatchingLabeler(nn.Module):
    """A fitted annotator A_ω; `label()` turns a generated batch into class ids + entropy."""

    name = "gradient_matching"

    def __init__(
        self,
        cfg: GradientMatchingConfig,
        tap_channels: list[int],
        tap_layers: tuple[int, ...] | None,
        resolution: int,
        num_outputs: int,
        meta: dict | None = None,
    ):
        super().__init__()
        self.cfg, self.resolution, self.num_outputs = cfg, resolution, num_outputs
        self.tap_channels = list(tap_channels)
        self.tap_layers = None if tap_layers is None else tuple(int(i) for i in tap_layers)
        self.meta = dict(meta or {})
        self.annotator = FPNAnnotator(
            self.tap_channels, num_outputs, resolution, cfg.annotator_width, cfg.annotator_convs, cfg.fuse_resolution
        )

    @property
    def tap_spec(self) -> TapSpec:
        return TapSpec(self.tap_layers, self.cfg.tap_max_channels, self.cfg.include_rgb)

    @property
    def schema(self) -> dict:
        return self.meta["schema"]

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        G,
        data: FitData,
        cfg: GradientMatchingConfig,
        *,
        device: str | torch.device = "cpu",
        progress: Callable[[dict], None] | None = None,
    ) -> "GradientMatchingLabeler":
        """Alg. 1: alternate annotator (gradient matching) and segmenter (synthetic data) updates.

        data.images/masks may have any resolution (resized here to the generator's) and any look;
        the classes are data.schema's. Deterministic for a fixed `cfg.seed` and device.
        """
        from ..segmenters import SegmenterConfig, build_segmenter

        if data.images is None or data.masks is None:
            raise ValueError("gradient matching needs labeled images and masks (FitData.images / .masks are None)")
        dev = torch.device(device)
        R = G.resolution
        real_x, real_y, K = prepare_labeled(data.samples(), R, data.num_classes)
        real_x, real_y = real_x.to(dev), real_y.to(dev)
        n = real_x.shape[0]
        tap_layers = block_output_layers(len(G.tap_channels)) if cfg.block_outputs_only else None
        spec = TapSpec(tap_layers, cfg.tap_max_channels, cfg.include_rgb)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            self = cls(cfg, spec.channels(G.tap_channels), tap_layers, R, K, meta={"num_classes": K})
            seg = build_segmenter(
                SegmenterConfig(arch=cfg.segmenter_arch, num_classes=K, tiny_width=cfg.segmenter_width)
            )
        self.to(dev).train()
        seg.to(dev).train()
        G = G.to(dev).eval()
        params = [p for _, p in matched_parameters(seg, cfg.segmenter_arch, cfg.match)]
        opt_a = torch.optim.SGD(self.annotator.parameters(), lr=cfg.annotator_lr, momentum=cfg.momentum)
        opt_s = torch.optim.SGD(seg.parameters(), lr=cfg.segmenter_lr, momentum=cfg.momentum)
        gen = torch.Generator().manual_seed(cfg.seed)
        B = cfg.batch_size

        def synthetic():
            z = torch.randn(B, G.z_dim, generator=gen).to(dev)
            with torch.no_grad():
                img, taps = generate_with_taps(G, G.mapping(z, psi=cfg.psi), spec)
            return img.clamp(-1, 1), taps

        t0 = time.time()
        gm = seg_loss = torch.zeros(())
        for step in range(cfg.steps):
            idx = (torch.randperm(n, generator=gen)[:B] if n >= B else torch.randint(n, (B,), generator=gen)).to(dev)
            # annotator update: match S_θ's gradients on labeled vs A_ω-labeled synthetic data
            x_g, taps = synthetic()
            gm = annotator_step(self.annotator, opt_a, seg, params, real_x[idx], real_y[idx], x_g, taps, cfg.grad_eps)
            # segmenter update on a fresh synthetic batch, every K steps
            if (step + 1) % cfg.seg_interval == 0:
                x_g, taps = synthetic()
                with torch.no_grad():
                    probs = self.annotator(taps).softmax(1)
                seg_loss = soft_cross_entropy(seg(x_g), probs)
                opt_s.zero_grad(set_to_none=True)
                seg_loss.backward()
                opt_s.step()
                opt_s.zero_grad(set_to_none=True)
            if progress is not None and (step % 50 == 0 or step == cfg.steps - 1):
                progress({"step": step + 1, "steps": cfg.steps, "loss": gm.item(), "seg_loss": seg_loss.item(),
                          "seconds": time.time() - t0})
        self.meta.update({"steps": cfg.steps, "final_loss": gm.item(), "num_images": n,
                          "matched_layers": len(params), "seconds": time.time() - t0, "schema": data.schema})
        return self.eval()

    # ---------------------------------------------------------------- labeling
    @torch.no_grad()
    def predict_proba(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """A_ω's class probabilities (N, K, R, R), `cfg.label_chunk` images at a time."""
        self.eval()
        n, c = taps[0].shape[0], self.cfg.label_chunk
        return torch.cat([self.annotator([t[i : i + c] for t in taps]).softmax(1) for i in range(0, n, c)])

    @torch.no_grad()
    def label(self, batch: GenBatch) -> LabelBatch:
        """Class ids = argmax of A_ω's softmax; uncertainty = its entropy in nats, in [0, log K]."""
        probs = self.predict_proba(batch.taps)
        label = probs.argmax(1).to(torch.uint8)
        unc = entropy(probs, dim=1).clamp(min=0.0).float()
        score, top10 = image_scores(unc)
        return LabelBatch(label=label, uncertainty=unc, score=score, score_top10=top10)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """safetensors weights + JSON config; written atomically (temp file + os.replace)."""
        write_labeler(path, self, FORMAT, { "config": self.cfg.model_dump_json(),
            "tap_channels": json.dumps(self.tap_channels), "tap_layers": json.dumps(self.tap_layers),
            "resolution": str(self.resolution), "num_outputs": str(self.num_outputs), "meta": json.dumps(self.meta),
        })

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "GradientMatchingLabeler":
        meta, state = read_labeler(path, FORMAT)
        layers = json.loads(meta["tap_layers"])
        self = cls(
            GradientMatchingConfig.model_validate_json(meta["config"]), json.loads(meta["tap_channels"]),
            None if layers is None else tuple(layers), int(meta["resolution"]), int(meta["num_outputs"]),
            json.loads(meta["meta"]),
        )
        self.load_state_dict(state)
        return self.to(device).eval()
