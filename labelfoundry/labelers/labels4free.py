"""Labels4Free: unsupervised foreground masks from an alpha network on generator features (paper 004).

The frozen generator G draws a foreground image F = G(w) and its feature taps; an alpha network
reads the taps of *several* layers (App. A.1, Table 2: last-layer-only features do much worse) and
predicts a soft mask α at full resolution; a background generator draws an in-domain background B
(App. A.1, Table 1: out-of-domain backgrounds collapse the scores). The composite

    C = α · F + (1 - α) · B

must fool the GAN's discriminator D. Only the alpha network (and a *copy* of D) learn:

    L_alpha = w_adv · softplus(-D(C))                                   non-saturating adversarial
            + w_bin · mean(min(α, 1 - α))                                binarisation
            + w_area · mean_i(relu(a_min - mean(α_i)) + relu(mean(α_i) - a_max))   coverage hinge
    L_D     = softplus(D(C)) + softplus(-D(F)) + γ/2 · R1(F) every k steps

The appendix states that D is trained together with the alpha network ("we not only train the
alpha network but also the discriminator", App. A.1). We train a deep copy of the GAN's D (`FitData.discriminator`)
(the generator's own D is never modified); "real" images are fresh samples of G, so no dataset is
needed. Defaults follow the authors' released trainer (Adam 2e-4, betas (0, 0.99), batch 16,
mask-regulariser weight 1.2, minimum foreground coverage 0.25, R1 γ = 10 every 16 steps).

Background generator (the cheap variant of the paper's in-domain background generator, as in the
authors' code): the *same* generator with its coarsest features suppressed. At every block of
resolution <= `bg_cut_resolution` (default 4: the 4x4 block) the feature map is zeroed ("zero",
the authors' choice) or replaced by its spatial mean ("mean") before the next layers and toRGB
see it. The object's layout lives in those coarse features, so the finer layers paint
object-free, in-domain texture and colour. By default the background uses the foreground's own
latent (the authors' code does so; its palette then matches the scene); `bg_latent="independent"`
draws a second latent. A fine-tuned background generator can be passed to `fit` instead.

Ours, measured on toy faces (docs/evaluation.md): from PyTorch's initialisation (α ≈ 0.5) the fit
first covers everything (the composite is then the real image) and the coverage hinge then shrinks
it, often into an image-independent shape that D accepts: a lottery by seed. The alpha network
therefore starts near α = `init_coverage` (0.1), so the mask grows where F and B differ; the GAN's D
stays frozen (its trained copy gave worse masks); and `fit` trains `restarts` alpha networks and keeps
the one whose masks best separate where each image differs from its own object-free background
(`object_contrast`): no labels are read.

Labels: α > 0.5 is foreground (1). Uncertainty: u = 1 - |2α - 1| (0 where α is 0 or 1, 1 at 0.5).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..features import TapSpec, generate_with_taps
from ..uncertainty import image_scores
from .base import FG_BG_SCHEMA, FitData, GenBatch, LabelBatch, read_labeler, write_labeler

FORMAT = "labelfoundry-labels4free"
_SELECT_SEED = 1_000_003  # offset of the restarts' comparison images from cfg.seed (restart seeds are cfg.seed + r)


class Labels4FreeConfig(BaseModel):
    """Hyper-parameters of the Labels4Free labeler; defaults from paper 004 and the authors' trainer."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["labels4free"] = "labels4free"
    task: Literal["segmentation"] = "segmentation"
    tap_layers: tuple[int, ...] | None = Field(
        None, description="generator taps the alpha network reads (None = all); multi-layer features matter (App. A.1, Table 2)"
    )
    tap_max_channels: int | None = None
    hidden: int = Field(32, ge=1, description="channels of the per-tap 1x1 projections and the merge convs")
    merge_convs: int = Field(2, ge=0, description="3x3 conv layers after the multi-scale merge")
    steps: int = Field(
        500, ge=1, description="training iterations per restart (authors' trainer: 1000 at batch 16; with the frozen D and "
        "init_coverage 0.1, 500 at batch 8 gave val fg/bg mIoU 0.875-0.919 on 4 of 4 seeds, 1000 at 16 gave 0.766 / 0.895)"
    )
    batch_size: int = Field(8, ge=1, description="authors' trainer: 16 (see steps)")
    lr: float = Field(2e-4, gt=0, description="alpha-network Adam learning rate (authors' trainer)")
    d_lr: float = Field(2e-4, gt=0, description="discriminator Adam learning rate (authors' trainer)")
    betas: tuple[float, float] = (0.0, 0.99)
    adv_weight: float = Field(1.0, ge=0, description="non-saturating adversarial weight (authors' sat_weight)")
    bin_weight: float = Field(1.2, ge=0, description="binarisation min(α, 1-α) weight (authors' loss_multiplier)")
    area_weight: float = Field(1.2, ge=0, description="coverage-hinge weight (authors' loss_multiplier)")
    area_min: float = Field(0.25, ge=0, le=1, description="minimum mean α per image (authors' fg_coverage_value)")
    area_max: float = Field(0.75, ge=0, le=1, description="maximum mean α per image (authors' bg coverage 0.75 -> fg <= 0.75)")
    train_discriminator: bool = Field(
        False, description="train a copy of D with the alpha network, as App. A.1 does. Off by default: measured on toy faces "
        "(500 steps, 4 seeds, init_coverage 0.1), val fg/bg mIoU 0.875-0.919 with the GAN's D frozen, 0.71-0.82 with the copy trained"
    )
    r1_gamma: float = Field(10.0, ge=0, description="R1 penalty on D (authors' trainer)")
    r1_interval: int = Field(16, ge=1, description="lazy R1 every k steps (authors' trainer)")
    bg_mode: Literal["zero", "mean"] = Field("zero", description="how coarse features are suppressed for the background")
    bg_cut_resolution: int = Field(4, ge=4, description="suppress features of blocks at this resolution and below")
    bg_latent: Literal["same", "independent"] = Field("same", description="background from the foreground's latent or a new one")
    psi: float = Field(1.0, description="truncation of the latents sampled while training")
    label_chunk: int = Field(16, ge=1, description="images per alpha-network pass when labeling")
    init_coverage: float | None = Field(
        0.1, gt=0, lt=1, description="the alpha network's output bias set so that α starts near this value, and the mask "
        "grows where F and B differ (ours; None: PyTorch's initialisation, α ≈ 0.5, from which 4 of 8 fits shrank the "
        "all-foreground mask into an image-independent shape and 2 more stopped at 0.75; 0.1 gave val fg/bg mIoU "
        "0.875-0.919 in 4 of 4 seeds)"
    )
    restarts: int = Field(
        2, ge=1, description="independent fits (seeds seed, seed + 1, ...); the one with the highest `object_contrast` "
        "is kept: insurance against a fit that lands on an image-independent shape (docs/evaluation.md)"
    )
    select_samples: int = Field(256, ge=1, description="generated images (fixed seed) on which the restarts are compared")
    seed: int = 0

    @property
    def tap_spec(self) -> TapSpec:
        return TapSpec(self.tap_layers, self.tap_max_channels, False)


class AlphaNetwork(nn.Module):
    """Taps at native resolutions -> soft mask α (N, 1, R, R) in (0, 1).

    A 1x1 conv per tap at its own resolution; projections of equal resolution are summed, each sum
    is upsampled (bilinear, align_corners=False) to R and the results summed; then
    [LeakyReLU, 3x3 conv] x merge_convs, LeakyReLU, 1x1 conv to one channel, sigmoid.
    """

    def __init__(self, tap_channels: list[int], resolution: int, hidden: int = 32, merge_convs: int = 2,
                 init_coverage: float | None = None):
        super().__init__()
        self.tap_channels, self.resolution = list(tap_channels), resolution
        self.proj = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in tap_channels)
        layers: list[nn.Module] = []
        for _ in range(merge_convs):
            layers += [nn.LeakyReLU(0.2), nn.Conv2d(hidden, hidden, 3, padding=1)]
        layers += [nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1)]
        self.head = nn.Sequential(*layers)
        if init_coverage is not None:  # start from α ≈ init_coverage everywhere: the mask grows where F and B differ
            with torch.no_grad():
                layers[-1].bias.fill_(torch.logit(torch.tensor(init_coverage)).item())

    def logits(self, taps: list[torch.Tensor]) -> torch.Tensor:
        if [t.shape[1] for t in taps] != self.tap_channels:
            raise ValueError(f"tap channels {[t.shape[1] for t in taps]} do not match the alpha network's {self.tap_channels}")
        per_res: dict[int, torch.Tensor] = {}
        for conv, t in zip(self.proj, taps):
            p = conv(t.float())
            r = t.shape[-1]
            per_res[r] = per_res[r] + p if r in per_res else p
        R = self.resolution
        h = None
        for r, p in per_res.items():
            up = p if r == R else F.interpolate(p, size=(R, R), mode="bilinear", align_corners=False)
            h = up if h is None else h + up
        return self.head(h)

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(self.logits(taps))


@torch.no_grad()
def suppressed_background(G, ws: torch.Tensor, cut_resolution: int = 4, mode: str = "zero") -> torch.Tensor:
    """Synthesis of ws (N, num_ws, w_dim) with the features of blocks at resolution <= cut_resolution
    zeroed ("zero") or replaced by their per-channel spatial mean ("mean") -> image (N, 3, R, R).

    The suppression happens after each such block's last conv, before its toRGB and the next block
    (the synthesis network's `hook`); float32 throughout.
    """

    def suppress(res: int, x: torch.Tensor) -> torch.Tensor:
        if res > cut_resolution:
            return x
        return torch.zeros_like(x) if mode == "zero" else x.mean((2, 3), keepdim=True).expand_as(x).contiguous()

    return G.synthesis(ws.to(torch.float32), noise_mode="const", force_fp32=True, hook=suppress)


def object_contrast(alpha: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Per image: mean |F - B| (channels averaged) inside the mask α > 0.5 minus outside it -> (N,).

    The background generator removes the object and keeps the scene's colours, so the object is
    where F and B differ. A mask on the object scores high; an image-independent shape, which can
    still fool the discriminator, scores low. No labels are read: this ranks restarts (on 15 fits
    it separated the val fg/bg mIoU's tiers, though not the fits within one: docs/evaluation.md)."""
    d = (fg.float() - bg.float()).abs().mean(1)
    m = (alpha.reshape(d.shape) > 0.5).float()
    inside = (d * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)
    outside = (d * (1 - m)).flatten(1).sum(1) / (1 - m).flatten(1).sum(1).clamp(min=1)
    return inside - outside


def alpha_losses(alpha: torch.Tensor, fake_logits: torch.Tensor, cfg: Labels4FreeConfig) -> dict[str, torch.Tensor]:
    """The alpha network's loss terms (unweighted) and their weighted total."""
    adv = F.softplus(-fake_logits).mean()
    binar = torch.minimum(alpha, 1 - alpha).mean()
    area = alpha.mean((1, 2, 3))
    cover = (F.relu(cfg.area_min - area) + F.relu(area - cfg.area_max)).mean()
    total = cfg.adv_weight * adv + cfg.bin_weight * binar + cfg.area_weight * cover
    return {"loss": total, "adv": adv, "bin": binar, "area": cover}


class Labels4FreeLabeler(nn.Module):
    """Trained alpha network; `label()` turns a generated batch's taps into fg/bg masks + uncertainty."""

    name = "labels4free"
    num_outputs = 2

    def __init__(self, cfg: Labels4FreeConfig, tap_channels: list[int], resolution: int, meta: dict | None = None):
        super().__init__()
        self.cfg, self.resolution = cfg, resolution
        self.tap_channels = list(tap_channels)
        self.meta = {"num_classes": 2, **dict(meta or {})}
        self.net = AlphaNetwork(self.tap_channels, resolution, cfg.hidden, cfg.merge_convs, cfg.init_coverage)
        self.history: list[dict] = []

    @property
    def tap_spec(self) -> TapSpec:
        return self.cfg.tap_spec

    @property
    def schema(self) -> dict:
        return self.meta.get("schema", FG_BG_SCHEMA)

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        G,
        data: FitData,
        cfg: Labels4FreeConfig,
        *,
        device: str | torch.device = "cpu",
        progress: Callable[[dict], None] | None = None,
        background_generator=None,
    ) -> "Labels4FreeLabeler":
        """Train `cfg.restarts` alpha networks against (copies of) the GAN's discriminator
        `data.discriminator` and keep the one with the highest `object_contrast`; no labels are read.
        `background_generator`: an optional fine-tuned generator whose plain synthesis gives
        backgrounds (default: G with suppressed coarse features)."""
        D0 = data.discriminator
        if D0 is None:
            raise ValueError(
                "Labels4Free needs the GAN's discriminator, but none came with this generator (FitData.discriminator is None). "
                "Use a checkpoint that holds D as well (labelfoundry's own format saved with D, or an NVIDIA "
                "network pickle with 'D'), or pick an unsupervised labeler that needs no D (latent_direction)."
            )
        dev = torch.device(device)
        G = G.to(dev).eval()
        channels = cfg.tap_spec.channels(G.tap_channels)

        def background(ws: torch.Tensor) -> torch.Tensor:
            if background_generator is not None:
                return background_generator.synthesis(ws, noise_mode="const")
            return suppressed_background(G, ws, cfg.bg_cut_resolution, cfg.bg_mode)

        t0 = time.time()
        best, contrasts = None, []
        for r in range(cfg.restarts):
            seed = cfg.seed + r
            with torch.random.fork_rng(devices=[]):  # the alpha network's initialisation follows the seed too
                torch.manual_seed(seed)
                lab = cls(cfg, channels, G.resolution).to(dev)
            report = progress
            if progress is not None and cfg.restarts > 1:
                report = lambda d, r=r: progress({"restart": r + 1, "restarts": cfg.restarts, **d})  # noqa: E731
            lab._train(G, copy.deepcopy(D0).to(dev).eval().requires_grad_(False), background, seed, report)
            contrasts.append(lab._mean_object_contrast(G, background))
            if best is None or contrasts[-1] > contrasts[best_r]:
                best, best_r = lab, r
            del lab
        best.meta.update({
            "steps": cfg.steps, "final": best.history[-1], "seconds": time.time() - t0, "schema": FG_BG_SCHEMA,
            "restart_seeds": [cfg.seed + r for r in range(cfg.restarts)], "object_contrast": contrasts, "chosen_restart": best_r,
        })
        return best.eval()

    def _train(self, G, D: nn.Module, background: Callable[[torch.Tensor], torch.Tensor], seed: int,
               progress: Callable[[dict], None] | None) -> None:
        """One fit of the alpha network (and of D, a copy owned by this fit, when `train_discriminator`)."""
        cfg, dev = self.cfg, next(self.parameters()).device
        self.train()
        opt_a = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=cfg.betas)
        opt_d = torch.optim.Adam(D.parameters(), lr=cfg.d_lr, betas=cfg.betas) if cfg.train_discriminator else None
        gen = torch.Generator().manual_seed(seed)
        spec = cfg.tap_spec
        t0 = time.time()
        for step in range(cfg.steps):
            with torch.no_grad():
                z = torch.randn(cfg.batch_size, G.z_dim, generator=gen).to(dev)
                ws = G.mapping(z, psi=cfg.psi)
                fg, taps = generate_with_taps(G, ws, spec)
                if cfg.bg_latent == "independent":
                    ws = G.mapping(torch.randn(cfg.batch_size, G.z_dim, generator=gen).to(dev), psi=cfg.psi)
                bg = background(ws)
            d_loss = None
            if opt_d is not None:  # discriminator step: real = G's samples, fake = composites
                D.requires_grad_(True)
                with torch.no_grad():
                    a = self.net(taps)
                comp = a * fg + (1 - a) * bg
                d_loss = F.softplus(D(comp)).mean() + F.softplus(-D(fg)).mean()
                if cfg.r1_gamma > 0 and step % cfg.r1_interval == 0:
                    real = fg.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(D(real).sum(), real, create_graph=True)
                    d_loss = d_loss + cfg.r1_gamma / 2 * grad.square().sum((1, 2, 3)).mean() * cfg.r1_interval
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                D.requires_grad_(False)
            alpha = self.net(taps)
            comp = alpha * fg + (1 - alpha) * bg
            losses = alpha_losses(alpha, D(comp), cfg)
            opt_a.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt_a.step()
            rec = {k: v.item() for k, v in losses.items()}
            if d_loss is not None:  # only when D trains: a frozen D has no loss to report
                rec["d_loss"] = d_loss.item()
            rec["coverage"] = alpha.detach().mean().item()
            self.history.append(rec)
            if progress is not None and (step % 50 == 0 or step == cfg.steps - 1):
                progress({"step": step + 1, "steps": cfg.steps, **rec, "seconds": time.time() - t0})

    @torch.no_grad()
    def _mean_object_contrast(self, G, background: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """`object_contrast` of this fit's masks, averaged over `select_samples` generated images drawn
        from one fixed seed (the same images for every restart); the background from each image's own latent."""
        cfg, dev = self.cfg, next(self.parameters()).device
        self.eval()
        z = torch.randn(cfg.select_samples, G.z_dim, generator=torch.Generator().manual_seed(cfg.seed + _SELECT_SEED))
        out = []
        for i in range(0, cfg.select_samples, cfg.label_chunk):
            ws = G.mapping(z[i : i + cfg.label_chunk].to(dev), psi=cfg.psi)
            fg, taps = generate_with_taps(G, ws, cfg.tap_spec)
            out.append(object_contrast(self.net(taps), fg, background(ws)))
        return torch.cat(out).mean().item()

    # ---------------------------------------------------------------- labeling
    @torch.no_grad()
    def alpha(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """α (N, R, R) for selected taps, `label_chunk` images at a time."""
        n = taps[0].shape[0]
        step = self.cfg.label_chunk
        return torch.cat([self.net([t[i : i + step] for t in taps])[:, 0] for i in range(0, n, step)])

    @torch.no_grad()
    def label(self, batch: GenBatch) -> LabelBatch:
        self.eval()
        a = self.alpha(batch.taps)
        unc = (1.0 - (2.0 * a - 1.0).abs()).float()
        score, top10 = image_scores(unc)
        return LabelBatch(label=(a > 0.5).to(torch.uint8), uncertainty=unc, score=score, score_top10=top10)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """safetensors weights of the alpha network + JSON config; written atomically."""
        write_labeler(path, self, FORMAT, { "config": self.cfg.model_dump_json(),
            "tap_channels": json.dumps(self.tap_channels), "resolution": str(self.resolution),
            "num_outputs": str(self.num_outputs), "meta": json.dumps(self.meta),
        })

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Labels4FreeLabeler":
        meta, state = read_labeler(path, FORMAT)
        self = cls(
            Labels4FreeConfig.model_validate_json(meta["config"]), json.loads(meta["tap_channels"]),
            int(meta["resolution"]), json.loads(meta["meta"]),
        )
        self.load_state_dict(state)
        return self.to(device).eval()
