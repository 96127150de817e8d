"""Unsupervised foreground/background labels from latent directions (paper 002, Melas-Kyriazi et al.).

Step 1 (§3.1, Eq. 1, App. A.1.1): learn a unit direction v in latent space such that shifting a code
by εv changes the brightness of the image centre relative to its border (the brightness term L_c
with the radial "photographer" prior r) while keeping the edges where they were (the Sobel
consistency term L_s):

    L(v) = λ · L_c(v) + L_s(v)
    L_c(v) = -1/(N H W) · Σ_i Σ_c <G(z_i + εv)_c, r>                 (brightness, radial prior)
    L_s(v) =  1/(N H W) · Σ_i ‖S(G(z_i + εv)) - S(G(z_i))‖²           (structure)
    S(x)   = Σ_c (g * x_c)² + (gᵀ * x_c)²,  g the un-normalised Sobel kernel
    r_ij   = 1 - sqrt((i - (H-1)/2)² + (j - (W-1)/2)²) / α,  α = ¼ sqrt((H-1)² + (W-1)²)

r is 1 at the centre and -1 at the corners. Sign convention: the paper prints L_c = +<G, r> but says
that λ > 0 *brightens* the foreground (§3.1.1), and the authors' code minimises the image's
brightness weighted by an outside-positive circle; both say the minimised term is the *negative*
centre brightness, which is what we implement. So λ > 0 gives v_l (foreground lighter) and λ < 0
gives v_d (foreground darker); we optimise both with ±`lam` (λ = ±5, App. A.1.1). Both terms are
means over pixels instead of the paper's sums (the ratio, hence λ, keeps the paper's meaning).

Step 2 (§3.2, Eq. 2): mask M(z) = [gray(G(z + εv_l)) - gray(G(z + εv_d)) > 0]; with one direction,
Eq. 3 compares against G(z).

Refinement (§3.2.1; thresholds from the authors' released data-generation config):
  1. connected components smaller than `min_component_fraction` × the largest one are removed;
  2. samples whose mask covers more than `max_mask_fraction` (or is empty) are rejected;
  3. samples whose shift barely changes the brightness (mean |Δgray| < `min_brightness_change`,
     optionally also the authors' histogram test) are rejected.
A rejected sample keeps its (refined) mask but gets uncertainty 1 everywhere and `rejected=True`
on the returned `LabelBatch` (its image score is then the worst possible; the manifest keeps the flag).

Latent space: the paper used BigBiGAN / BigGAN *z* spaces (D = 120, ε = 2 in z units, App. A.3
Table 8). Our generators are StyleGAN2, whose W space is the better-behaved one, and the factory
hands labelers only `ws`; we default to `space="w"` (one w_dim vector added to every W+ row) and
keep `space="z"` for fidelity (it needs the z latents at labeling time). ε is measured in units of
the latent's per-dimension standard deviation (1 for z; measured from the mapping network for W),
so ε = 2 means the same relative step in both spaces.

Labeling re-synthesises the shifted images with the batch's generator (`GenBatch.G`); a saved
file holds the directions and the fingerprint of the generator they were found in, never G.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Literal

import kornia
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..features import TapSpec
from ..uncertainty import image_scores
from .base import FG_BG_SCHEMA, FitData, GenBatch, LabelBatch, batch_generator, generator_fingerprint, read_labeler, write_labeler

FORMAT = "labelfoundry-latent_direction"
_LUMA = (0.2989, 0.5870, 0.1140)  # ITU-R 601 weights, as in the authors' rgb2gray


class LatentDirectionConfig(BaseModel):
    """Hyper-parameters of the latent-direction labeler; defaults from paper 002 (sections cited)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["latent_direction"] = "latent_direction"
    task: Literal["segmentation"] = "segmentation"
    space: Literal["w", "z"] = Field(
        "w", description="latent space of the directions; the paper used z (BigBiGAN, §4.1), we default to StyleGAN2's W"
    )
    directions: Literal["both", "light", "dark"] = Field(
        "both", description="Eq. 2 (both v_l and v_d, best in Table 6) or Eq. 3 with one direction"
    )
    lam: float = Field(5.0, gt=0, description="|λ| of Eq. 1: +λ for v_l, -λ for v_d (App. A.1.1; Table 7: 5 best)")
    epsilon: float = Field(
        2.0, gt=0, description="shift length ε during optimisation, in per-dimension latent stds (§3, App. A.3 Table 8)"
    )
    label_epsilon: float | None = Field(
        None, gt=0, description="ε when labeling (None = epsilon); the authors' data generation used a longer shift (r = 5)"
    )
    steps: int = Field(1000, ge=1, description="Adam steps per direction (App. A.1.1)")
    lr: float = Field(0.05, gt=0, description="Adam learning rate (App. A.1.1)")
    batch_size: int = Field(32, ge=1, description="latents per optimisation step (authors' optimisation config)")
    psi: float = Field(1.0, description="truncation of the latents sampled while fitting")
    threshold: Literal["zero", "otsu"] = Field(
        "otsu", description="foreground = Δgray above 0 (Eq. 2's sign) or above each image's Otsu threshold. Otsu is our "
        "default: on toy faces the found directions darken the background and leave the face as is, so Δgray's two "
        "modes are 'changed' vs 'unchanged' rather than positive vs negative (fg/bg mIoU 0.55 -> 0.76, bench)"
    )
    min_component_fraction: float = Field(
        0.2, ge=0, le=1, description="§3.2.1 (3): drop components with area <= this x the largest (authors' filter_cc_threshold)"
    )
    max_mask_fraction: float = Field(
        0.5, gt=0, le=1, description="§3.2.1 (1): reject masks covering more than this fraction (authors' filter_size_thresholds)"
    )
    min_mask_fraction: float = Field(0.0, ge=0, lt=1, description="reject masks covering this fraction or less (empty masks always)")
    min_brightness_change: float = Field(
        0.05, ge=0, description="§3.2.1 (2): reject samples whose mean |Δgray| (images in [-1, 1]) is below this"
    )
    histogram_bins: int = Field(
        0, ge=0, description="§3.2.1 (2), authors' variant: keep only bimodal brightness histograms of the light image (12); 0 = off"
    )
    margin_quantile: float = Field(
        0.95, gt=0, le=1, description="uncertainty = 1 - |Δgray| / (this per-image quantile of |Δgray|), clipped to [0, 1]"
    )
    scale_samples: int = Field(2048, ge=2, description="mapping samples used to measure the W per-dimension std")
    seed: int = 0

    @property
    def tap_spec(self) -> TapSpec:
        return TapSpec(layers=())  # labeling re-synthesises; no generator features needed


# ---------------------------------------------------------------------------- loss terms (Eq. 1)
def brightness(img: torch.Tensor) -> torch.Tensor:
    """Luma of an RGB image (N, 3, H, W) in [-1, 1] -> (N, H, W)."""
    w = img.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (img * w).sum(1)


def radial_prior(height: int, width: int, device=None) -> torch.Tensor:
    """The paper's radial prior r (H, W): 1 at the centre, -1 at the corners, linear in distance."""
    i = torch.arange(height, dtype=torch.float32, device=device) - (height - 1) / 2
    j = torch.arange(width, dtype=torch.float32, device=device) - (width - 1) / 2
    alpha = 0.25 * math.sqrt((height - 1) ** 2 + (width - 1) ** 2)
    return 1.0 - torch.sqrt(i[:, None] ** 2 + j[None, :] ** 2) / alpha


def sobel_structure(img: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """S(x) = Σ_c (g*x_c)² + (gᵀ*x_c)² with the un-normalised Sobel kernel (replicate border) -> (N, H, W)."""
    mag = kornia.filters.sobel(img, normalized=False, eps=eps)  # sqrt(gx² + gy² + eps) per channel
    return (mag.square() - eps).sum(1)


def sobel_consistency_loss(img: torch.Tensor, img_shifted: torch.Tensor) -> torch.Tensor:
    """L_s: mean over images and pixels of (S(x') - S(x))²; 0 for identical edges."""
    return (sobel_structure(img_shifted) - sobel_structure(img)).square().mean()


def brightness_loss(img_shifted: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """L_c: minus the prior-weighted brightness, Σ_c <x'_c, r> averaged over images and pixels.

    Lower when the centre is bright and the border dark (see the module docstring for the sign).
    """
    if prior is None:
        prior = radial_prior(*img_shifted.shape[-2:], device=img_shifted.device)
    return -(img_shifted.sum(1) * prior).mean()


def direction_loss(img: torch.Tensor, img_shifted: torch.Tensor, lam: float, prior: torch.Tensor | None = None):
    """Eq. 1: (λ·L_c + L_s, L_c, L_s) for a batch of original and shifted images."""
    lc = brightness_loss(img_shifted, prior)
    ls = sobel_consistency_loss(img, img_shifted)
    return lam * lc + ls, lc, ls


# ---------------------------------------------------------------------------- refinement (§3.2.1)
def connected_components(mask: torch.Tensor, check_every: int = 4) -> torch.Tensor:
    """8-connected component labels of a boolean mask (N, H, W) -> int64 (N, H, W), 0 = background.

    Label propagation by 3x3 max-pooling (the algorithm of kornia.contrib.connected_components),
    run to convergence instead of for a fixed number of iterations. Ids are arbitrary positives.
    """
    n, h, w = mask.shape
    m = mask.float().unsqueeze(1)
    ids = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, 1, h, w)
    lab = ids * m
    while True:
        prev = lab
        for _ in range(check_every):
            lab = F.max_pool2d(lab, 3, stride=1, padding=1) * m
        if torch.equal(lab, prev):
            break
    return lab.squeeze(1).long()


def remove_small_components(mask: torch.Tensor, min_fraction: float) -> torch.Tensor:
    """Keep components whose area > min_fraction x the image's largest component (authors' rule)."""
    if min_fraction <= 0 or not mask.any():
        return mask.clone()
    n, h, w = mask.shape
    lab = connected_components(mask).flatten(1)  # (N, HW), ids in [0, HW]
    areas = torch.zeros(n, h * w + 1, device=mask.device)
    areas.scatter_add_(1, lab, torch.ones_like(lab, dtype=torch.float32))
    areas[:, 0] = 0
    largest = areas.max(1, keepdim=True).values
    keep = areas > min_fraction * largest
    keep[:, 0] = False
    return torch.gather(keep, 1, lab).view(n, h, w)


def bimodal_histogram(img: torch.Tensor, bins: int, smooth: int = 3) -> torch.Tensor:
    """Authors' brightness test: the smoothed value histogram of each image has >= 2 local maxima -> (N,) bool."""
    out = []
    kernel = torch.ones(1, 1, smooth, device=img.device)
    for x in img:
        hist = torch.histc(x.float(), bins, -1.0, 1.0).view(1, 1, -1)
        s = F.conv1d(hist, kernel, padding=smooth // 2).view(-1)
        left = torch.cat([s.new_ones(1, dtype=torch.bool), s[1:] >= s[:-1]])
        right = torch.cat([s[:-1] >= s[1:], s.new_ones(1, dtype=torch.bool)])
        out.append(int((left & right).sum()) >= 2)
    return torch.tensor(out, device=img.device)


def refine(diff: torch.Tensor, cfg: LatentDirectionConfig, light_image: torch.Tensor | None = None):
    """Masks, uncertainty and rejection from a brightness difference (N, H, W) (light minus dark),
    foreground above the per-image threshold (`cfg.threshold`).

    Returns (mask bool (N,H,W), uncertainty float32 (N,H,W) in [0,1], rejected bool (N,)).
    Uncertainty is 1 - margin / q where margin = |diff| and q its per-image `margin_quantile`,
    clipped to [0, 1]: pixels where the two shifted images barely differ are unreliable. Pixels
    whose sign the component filter overrode, and every pixel of a rejected sample, get 1.
    """
    if cfg.threshold == "otsu":  # per image; a constant image thresholds at its value (all background)
        _, t = kornia.filters.otsu_threshold(diff.float().unsqueeze(1), nbins=64)
        t = t.view(-1, 1, 1).to(diff.dtype)
    else:
        t = torch.zeros((), dtype=diff.dtype, device=diff.device)
    raw = diff > t
    mask = remove_small_components(raw, cfg.min_component_fraction)
    margin = (diff - t).abs().float()
    q = torch.quantile(margin.flatten(1), cfg.margin_quantile, dim=1).clamp(min=1e-8).view(-1, 1, 1)
    unc = (1.0 - margin / q).clamp(0.0, 1.0)
    unc = torch.where(raw != mask, torch.ones_like(unc), unc)
    frac = mask.flatten(1).float().mean(1)
    rejected = (frac > cfg.max_mask_fraction) | (frac <= cfg.min_mask_fraction)
    rejected |= margin.flatten(1).mean(1) < cfg.min_brightness_change
    if cfg.histogram_bins > 0 and light_image is not None:
        rejected |= ~bimodal_histogram(light_image, cfg.histogram_bins)
    unc = torch.where(rejected.view(-1, 1, 1), torch.ones_like(unc), unc)
    return mask, unc, rejected


# ---------------------------------------------------------------------------- the labeler
@contextmanager
def _frozen(G):
    """G in eval mode with no parameter gradients while the directions are fitted; the caller's
    requires_grad flags come back afterwards."""
    flags = [p.requires_grad for p in G.parameters()]
    try:
        yield G.eval().requires_grad_(False)
    finally:
        for p, f in zip(G.parameters(), flags):
            p.requires_grad_(f)


class LatentDirectionLabeler(nn.Module):
    """Foreground (1) / background (0) masks from a pair of learned latent directions of one generator."""

    name = "latent_direction"
    num_outputs = 2

    def __init__(self, cfg: LatentDirectionConfig, dim: int, resolution: int, meta: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("v_light", torch.zeros(dim))  # unit direction, z_dim (space z) or w_dim (space w)
        self.register_buffer("v_dark", torch.zeros(dim))
        self.register_buffer("latent_scale", torch.ones(()))  # per-dimension std of the latent space
        self.resolution = int(resolution)
        self.meta = {"num_classes": 2, **dict(meta or {})}

    @property
    def tap_spec(self) -> TapSpec:
        return self.cfg.tap_spec

    @property
    def schema(self) -> dict:
        return self.meta.get("schema", FG_BG_SCHEMA)

    # ---------------------------------------------------------------- shifting
    def shifted_images(self, G, latents: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
        """G(latent + ε·scale·v): latents are ws (N, num_ws, w_dim) for space "w", z (N, z_dim) for "z"."""
        step = eps * self.latent_scale * v
        if self.cfg.space == "w":
            ws = latents + step.view(1, 1, -1)  # the same shift on every W+ row
        else:
            ws = G.mapping(latents + step.view(1, -1), psi=self.cfg.psi)
        return G.synthesis(ws, noise_mode="const")

    def original_images(self, G, latents: torch.Tensor) -> torch.Tensor:
        ws = latents if self.cfg.space == "w" else G.mapping(latents, psi=self.cfg.psi)
        return G.synthesis(ws, noise_mode="const")

    def sample_latents(self, G, n: int, gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, G.z_dim, generator=gen).to(self.latent_scale.device)
        if self.cfg.space == "z":
            return z
        with torch.no_grad():
            return G.mapping(z, psi=self.cfg.psi)

    # ---------------------------------------------------------------- fitting
    def optimize_direction(
        self,
        G,
        sign: float,
        steps: int,
        gen: torch.Generator,
        latents: torch.Tensor | None = None,
        progress: Callable[[dict], None] | None = None,
        tag: str = "",
    ) -> tuple[torch.Tensor, list[float]]:
        """Minimise Eq. 1 with λ = sign·lam over a unit direction; returns (v, loss per step).

        latents: a fixed pool to draw from (None = fresh latents every step, as in the paper).
        """
        cfg = self.cfg
        dim = self.v_light.numel()
        p = torch.randn(dim, generator=gen).to(self.latent_scale.device)
        p = nn.Parameter(p / p.norm())
        opt = torch.optim.Adam([p], lr=cfg.lr)
        prior = radial_prior(self.resolution, self.resolution, device=p.device)
        lam = sign * cfg.lam
        history = []
        t0 = time.time()
        for step in range(steps):
            if latents is None:
                lat = self.sample_latents(G, cfg.batch_size, gen)
            else:
                idx = torch.randperm(len(latents), generator=gen)[: cfg.batch_size].to(latents.device)
                lat = latents[idx]
            with torch.no_grad():
                img = self.original_images(G, lat)
            img_s = self.shifted_images(G, lat, p / p.norm(), cfg.epsilon)
            loss, lc, ls = direction_loss(img, img_s, lam, prior)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                p /= p.norm()  # projection back to the unit sphere (authors' code)
            history.append(loss.item())
            if progress is not None and (step % 50 == 0 or step == steps - 1):
                progress({"direction": tag, "step": step + 1, "steps": steps, "loss": loss.item(),
                          "brightness": lc.item(), "sobel": ls.item(), "seconds": time.time() - t0})
        return p.detach() / p.detach().norm(), history

    @torch.no_grad()
    def measure_latent_scale(self, G, gen: torch.Generator) -> float:
        """Per-dimension std of the latent space: 1 for z; sqrt(mean_d Var[w_d]) of mapped samples for W."""
        if self.cfg.space == "z":
            return 1.0
        z = torch.randn(self.cfg.scale_samples, G.z_dim, generator=gen).to(self.latent_scale.device)
        w = G.mapping(z, psi=self.cfg.psi)[:, 0]
        return float(w.var(0).mean().sqrt())

    @classmethod
    def fit(
        cls,
        G,
        data: FitData,
        cfg: LatentDirectionConfig,
        *,
        device: str | torch.device = "cpu",
        progress: Callable[[dict], None] | None = None,
    ) -> "LatentDirectionLabeler":
        """Find v_l (λ > 0) and/or v_d (λ < 0) for generator G. Unsupervised: `data` is unused."""
        del data
        dev = torch.device(device)
        G = G.to(dev)
        self = cls(cfg, G.z_dim if cfg.space == "z" else G.w_dim, G.resolution, {"generator": generator_fingerprint(G)})
        self.to(dev).eval()
        with _frozen(G):
            self._fit_directions(G, progress)
        return self

    def _fit_directions(self, G, progress: Callable[[dict], None] | None = None) -> None:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        self.latent_scale.fill_(self.measure_latent_scale(G, gen))
        t0 = time.time()
        if cfg.directions in ("both", "light"):
            v, hist = self.optimize_direction(G, +1.0, cfg.steps, gen, progress=progress, tag="light")
            self.v_light.copy_(v)
            self.meta["final_loss_light"] = hist[-1]
        if cfg.directions in ("both", "dark"):
            v, hist = self.optimize_direction(G, -1.0, cfg.steps, gen, progress=progress, tag="dark")
            self.v_dark.copy_(v)
            self.meta["final_loss_dark"] = hist[-1]
        if cfg.directions == "both":
            self.meta["cos_light_dark"] = float(self.v_light @ self.v_dark)  # App. A.3: close to -1
        self.meta.update({"steps": cfg.steps, "latent_scale": float(self.latent_scale), "seconds": time.time() - t0,
                          "schema": FG_BG_SCHEMA})

    # ---------------------------------------------------------------- labeling
    @torch.no_grad()
    def label_latents(self, G, latents: torch.Tensor, image: torch.Tensor | None = None) -> LabelBatch:
        """Label from latents (ws for space "w", z for "z") with G; `image` = G(latents) if already made."""
        cfg = self.cfg
        dev = self.latent_scale.device
        lat = latents.to(dev, torch.float32)
        eps = cfg.label_epsilon or cfg.epsilon
        light = dark = None
        if cfg.directions in ("both", "light"):
            light = self.shifted_images(G, lat, self.v_light, eps)
        if cfg.directions in ("both", "dark"):
            dark = self.shifted_images(G, lat, self.v_dark, eps)
        if light is None or dark is None:
            orig = image.to(dev, torch.float32) if image is not None else self.original_images(G, lat)
            light = orig if light is None else light
            dark = orig if dark is None else dark
        diff = brightness(light) - brightness(dark)
        mask, unc, rejected = refine(diff, cfg, light_image=light)
        score, top10 = image_scores(unc)
        out_dev = latents.device
        return LabelBatch(
            label=mask.to(torch.uint8).to(out_dev), uncertainty=unc.float().to(out_dev),
            score=score.to(out_dev), score_top10=top10.to(out_dev), rejected=rejected.to(out_dev),
        )

    @torch.no_grad()
    def label(self, batch: GenBatch) -> LabelBatch:
        """Label a generated batch by re-synthesising its latents shifted by ±εv with batch.G
        (ws for space "w"; space "z" needs batch.z)."""
        self.eval()
        G = batch_generator(batch, self.meta.get("generator"), self.name)
        if self.cfg.space == "z":
            if batch.z is None:
                raise ValueError(
                    "this latent-direction labeler works in z space but the batch carries only ws; "
                    "refit with space='w', or build the GenBatch with z=<its z latents>"
                )
            return self.label_latents(G, batch.z, batch.image)
        return self.label_latents(G, batch.ws, batch.image)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """safetensors (the directions; G is named by its fingerprint in meta) + JSON config."""
        write_labeler(path, self, FORMAT, { "config": self.cfg.model_dump_json(), "resolution": str(self.resolution),
            "num_outputs": str(self.num_outputs), "meta": json.dumps(self.meta),
        })

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "LatentDirectionLabeler":
        meta, state = read_labeler(path, FORMAT)
        self = cls(LatentDirectionConfig.model_validate_json(meta["config"]), state["v_light"].numel(),
                   int(meta["resolution"]), json.loads(meta["meta"]))
        self.load_state_dict(state)
        return self.to(device).eval()
