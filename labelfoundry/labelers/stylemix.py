"""Network-free foreground segmentation by style-mix clustering (paper 003, §3-4).

Pixels of one semantic segment change colour together when the image is style-mixed. For a
sample with latents ws (generated, or from an inversion of a real photo: only `batch.ws` is
used, never fresh latents):

1. n style-mixed variants: rows [0, c) of ws (structure) + rows [c, num_ws) of n fixed random
   style latents (§3.1), rendered by the generator;
2. style summary tensor X_s (R, R, 3n): the variants in CIE-LAB (kornia, §4.6 Table 4),
   concatenated per pixel, optionally z-scored per dimension;
3. K-means over the R² pixels with faiss (k clusters, §3.2 Eq. 2) -> raw cluster map Y';
4. foreground clusters by corner minority or a centred-Gaussian saliency prior (§3.2) -> binary
   label (0 background, 1 foreground).

Uncertainty, in [0, 1]: with d1 the distance of a pixel's summary to its own centroid and d2 the
distance to the competing centroid, u = 1 - (d2 - d1) / (d2 + d1) = 2 d1 / (d1 + d2): 0 on a
centroid, 1 halfway between two. By default (`margin="label"`) the competing centroid is the
nearest one of the *other* label (fg vs bg), so a pixel between two background clusters is not
called uncertain; if every cluster has one label the nearest other cluster is used
(`margin="cluster"` always does that).

The n style latents are drawn once in `fit` (seeded) and stored, and every image's K-means uses
the same seed, so an image's label depends only on its ws, not on batching. `label` renders the
variants with the batch's generator (`GenBatch.G`); the file stores only the style latents and
the fingerprint of the generator they were drawn from, and refuses a batch from another one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..features import TapSpec
from ..uncertainty import image_scores
from .base import FG_BG_SCHEMA, FitData, GenBatch, LabelBatch, batch_generator, generator_fingerprint, read_labeler, write_labeler

FORMAT = "labelfoundry-stylemix"
PAPER_NUM_WS, PAPER_CUTOFF = 18, 8  # 1024² StyleGAN2 (18 ws), mixing cutoff c = 8 (§3.1, Fig. 2)


class StyleMixConfig(BaseModel):
    """Hyper-parameters; defaults from paper 003 unless a description says otherwise."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["stylemix"] = "stylemix"
    task: Literal["segmentation"] = "segmentation"
    n_styles: int = Field(50, ge=1, description="n, style-mixed variants per image (§4.1: n = 50)")
    k: int = Field(4, ge=2, description="K-means clusters (§4.6, Table 4: k = 4)")
    cutoff: int | None = Field(
        None,
        description="c, ws rows [0, c) kept from the sample (§3.1). None = the paper's c = 8 of 18 ws "
        "(Fig. 2) mapped proportionally: round(8 * num_ws / 18), clamped to [1, num_ws - 1] "
        "(16²: 3, 32²: 4, 64²: 4, 128²: 5, 256²: 6, 512²: 7, 1024²: 8)",
    )
    color_space: Literal["lab", "rgb"] = Field("lab", description="style-summary colour space (§4.6, Table 4: LAB)")
    normalize: Literal["none", "zscore"] = Field(
        "none", description="per-dimension z-scoring of the summary over an image's pixels (paper: none)"
    )
    niter: int = Field(25, ge=1, description="K-means iterations (faiss default; the paper uses faiss)")
    foreground: Literal["corner", "saliency"] = Field(
        "corner",
        description="§3.2: 'corner' minority (paper: horses, animals) or centred-Gaussian 'saliency' (paper: "
        "faces). Corner is the default: it has no object-size parameter",
    )
    corner_size: float = Field(0.125, gt=0, le=0.5, description="b = round(corner_size * R) (not given in the paper)")
    corner_threshold: float = Field(
        0.5, gt=0, le=1,
        description="θ_corner: a cluster covering >= round(θ b²) pixels of any one corner is background (not given)",
    )
    saliency_sigma: float = Field(0.25, gt=0, description="Gaussian std as a fraction of the side (not given)")
    saliency_threshold: float = Field(0.5, gt=0, lt=1, description="θ_saliency on a cluster's mean saliency (Eq. 3; not given)")
    margin: Literal["label", "cluster"] = Field("label", description="competing centroid of the uncertainty (module doc)")
    style_psi: float = Field(1.0, description="truncation of the style latents (paper: none)")
    render_batch: int = Field(50, ge=1, description="style-mixed images per synthesis call")
    faiss_threads: int = Field(1, ge=0, description="OpenMP threads of faiss's CPU K-means (0 = faiss default)")
    seed: int = Field(0, description="seeds the style latents and every K-means")


def default_cutoff(num_ws: int) -> int:
    """The paper's cutoff (8 of 18 ws) scaled to `num_ws`, kept inside [1, num_ws - 1]."""
    return int(min(max(round(PAPER_CUTOFF * num_ws / PAPER_NUM_WS), 1), num_ws - 1))


# ---------------------------------------------------------------------------- clustering


def _faiss_gpu() -> bool:
    import faiss

    return torch.cuda.is_available() and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def kmeans_centroids(x: torch.Tensor, k: int, niter: int = 25, seed: int = 0, threads: int = 1) -> torch.Tensor:
    """faiss K-means on points x (P, D) -> centroids (k, D), on x's device. All points train.

    `threads`: OpenMP threads of faiss's CPU K-means for this call (0 = leave faiss's setting).
    faiss-cpu ships its own libgomp; interleaved with torch's, the two runtimes' spinning workers
    starve each other (measured 30x slower on 2 cores), so one thread is the default.
    """
    import faiss

    pts = np.ascontiguousarray(x.detach().float().cpu().numpy())
    km = faiss.Kmeans(
        pts.shape[1], k, niter=niter, seed=seed, gpu=_faiss_gpu(), verbose=False,
        max_points_per_centroid=max(256, math.ceil(pts.shape[0] / k) + 1), min_points_per_centroid=1,
    )
    before = faiss.omp_get_max_threads()
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    try:
        km.train(pts)
    finally:
        faiss.omp_set_num_threads(before)
    return torch.from_numpy(np.asarray(km.centroids).reshape(k, -1).copy()).to(x.device)


def cluster_summary(
    summary: torch.Tensor, k: int, niter: int = 25, seed: int = 0, normalize: str = "none", threads: int = 1
):
    """Cluster the pixels of one style-summary tensor (H, W, D).

    Returns the cluster map (H, W) int64 (nearest centroid) and the distances (H, W, k) of every
    pixel's summary to every centroid.
    """
    h, w, d = summary.shape
    x = summary.reshape(h * w, d).float()
    if normalize == "zscore":
        x = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-6)
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none' or 'zscore', got {normalize!r}")
    cent = kmeans_centroids(x, k, niter, seed, threads)
    dist = torch.cdist(x[None], cent[None])[0]  # (P, k), Euclidean
    return dist.argmin(1).reshape(h, w), dist.reshape(h, w, k)


def corner_background(clusters: torch.Tensor, k: int, size: float = 0.125, threshold: float = 0.5) -> torch.Tensor:
    """Corner minority (§3.2): a cluster with >= round(θ b²) pixels in any b x b corner is background.

    clusters (H, W) -> foreground flags (k,) bool.
    """
    h, w = clusters.shape
    b = max(1, round(size * min(h, w)))
    need = max(1, round(threshold * b * b))
    bg = torch.zeros(k, dtype=torch.bool, device=clusters.device)
    for patch in (clusters[:b, :b], clusters[:b, -b:], clusters[-b:, :b], clusters[-b:, -b:]):
        bg |= torch.bincount(patch.reshape(-1), minlength=k)[:k] >= need
    return ~bg


def gaussian_saliency(h: int, w: int, sigma: float = 0.25, device=None) -> torch.Tensor:
    """A Gaussian heat map peaked at the image centre, (H, W) in (0, 1]; sigma is a fraction of the side."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h - 0.5
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w - 0.5
    r2 = ys[:, None] ** 2 + xs[None, :] ** 2
    return torch.exp(-r2 / (2 * sigma**2))


def saliency_foreground(clusters: torch.Tensor, k: int, sigma: float = 0.25, threshold: float = 0.5) -> torch.Tensor:
    """Eq. 3: cluster m is foreground if the mean saliency of its pixels exceeds θ_saliency."""
    s = gaussian_saliency(*clusters.shape, sigma=sigma, device=clusters.device).reshape(-1)
    c = clusters.reshape(-1)
    total = torch.zeros(k, device=s.device).index_add_(0, c, s)
    count = torch.bincount(c, minlength=k)[:k].float()
    return (total / count.clamp_min(1)) > threshold


def margin_uncertainty(dist: torch.Tensor, fg: torch.Tensor, mode: str = "label") -> torch.Tensor:
    """u = 2 d1 / (d1 + d2) in [0, 1] from centroid distances (H, W, k) and foreground flags (k,)."""
    d_sorted = dist.sort(-1).values
    d1, d2 = d_sorted[..., 0], d_sorted[..., 1]
    if mode == "label" and fg.any() and not fg.all():
        own_fg = fg[dist.argmin(-1)]
        inf = torch.tensor(float("inf"), device=dist.device)
        d_fg = torch.where(fg, dist, inf).min(-1).values
        d_bg = torch.where(~fg, dist, inf).min(-1).values
        d2 = torch.where(own_fg, d_bg, d_fg)
    elif mode not in ("label", "cluster"):
        raise ValueError(f"margin must be 'label' or 'cluster', got {mode!r}")
    den = d1 + d2
    return torch.where(den > 0, 2 * d1 / den.clamp_min(1e-30), torch.ones_like(den)).clamp(0.0, 1.0)


@dataclass
class StyleMixClusters:
    """Raw clustering of a batch: clusters (N,R,R) int64, distances (N,R,R,k), foreground (N,k) bool."""

    clusters: torch.Tensor
    distances: torch.Tensor
    foreground: torch.Tensor


# ---------------------------------------------------------------------------- labeler


class StyleMixLabeler(nn.Module):
    """Binary foreground labels from style-mix clustering; needs no labeled data."""

    name = "stylemix"
    num_outputs = 2

    def __init__(self, cfg: StyleMixConfig, style_ws: torch.Tensor, resolution: int, meta: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("style_ws", style_ws.detach().float().clone())  # (n, num_ws, w_dim)
        self.resolution = int(resolution)
        self.num_ws = int(style_ws.shape[1])
        self.cutoff = int(cfg.cutoff) if cfg.cutoff is not None else default_cutoff(self.num_ws)
        if not 1 <= self.cutoff < self.num_ws:
            raise ValueError(f"cutoff must be in [1, {self.num_ws - 1}] for {self.num_ws} ws, got {self.cutoff}")
        if style_ws.ndim != 3 or style_ws.shape[0] != cfg.n_styles:
            raise ValueError(f"style_ws must be ({cfg.n_styles}, num_ws, w_dim), got {tuple(style_ws.shape)}")
        self.meta = dict(meta or {})
        self.meta.setdefault("cutoff", self.cutoff)
        self.meta.setdefault("class_names", ["background", "foreground"])

    @property
    def tap_spec(self) -> TapSpec:
        """No generator features are needed: only batch.ws (an empty tap selection)."""
        return TapSpec(layers=())

    @property
    def schema(self) -> dict:
        return self.meta.get("schema", FG_BG_SCHEMA)

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        G,
        data: FitData,
        cfg: StyleMixConfig,
        *,
        device: str | torch.device = "cpu",
        progress: Callable[[dict], None] | None = None,
    ) -> "StyleMixLabeler":
        """No training: resolve the cutoff and draw the n style latents (seeded). `data` is unused
        (unsupervised); the labeler records G's fingerprint, not its weights."""
        del data
        dev = torch.device(device)
        G = G.to(dev).eval()
        z = torch.randn(cfg.n_styles, G.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
        with torch.no_grad():
            style_ws = G.mapping(z, psi=cfg.style_psi)
        self = cls(cfg, style_ws, G.resolution, {"generator": generator_fingerprint(G)}).to(dev).eval()
        self.meta["schema"] = FG_BG_SCHEMA
        if progress is not None:
            progress({"step": 1, "steps": 1, "cutoff": self.cutoff})
        return self

    # ---------------------------------------------------------------- clustering
    @torch.no_grad()
    def summaries(self, G, ws: torch.Tensor) -> torch.Tensor:
        """Style summary tensors (N, R, R, 3n) of latents ws (N, num_ws, w_dim), rendered by G."""
        import kornia

        dev = self.style_ws.device
        ws = ws.to(dev, torch.float32)
        n, c, R = self.cfg.n_styles, self.cutoff, self.resolution
        if ws.ndim != 3 or ws.shape[1:] != self.style_ws.shape[1:]:
            raise ValueError(f"ws must be (N, {self.num_ws}, {self.style_ws.shape[-1]}), got {tuple(ws.shape)}")
        mixed = torch.cat([ws[:, None, :c].expand(-1, n, -1, -1), self.style_ws[None, :, c:].expand(ws.shape[0], -1, -1, -1)], 2)
        mixed = mixed.reshape(-1, self.num_ws, ws.shape[-1])  # image-major: (N*n, num_ws, w_dim)
        out = []
        for i in range(0, mixed.shape[0], self.cfg.render_batch):
            img = (G.synthesis(mixed[i : i + self.cfg.render_batch], noise_mode="const").float().clamp(-1, 1) + 1) / 2
            out.append(kornia.color.rgb_to_lab(img) if self.cfg.color_space == "lab" else img)
        x = torch.cat(out).reshape(ws.shape[0], n, 3, R, R)
        return x.permute(0, 3, 4, 1, 2).reshape(ws.shape[0], R, R, 3 * n)

    def _select(self, clusters: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.foreground == "corner":
            return corner_background(clusters, cfg.k, cfg.corner_size, cfg.corner_threshold)
        return saliency_foreground(clusters, cfg.k, cfg.saliency_sigma, cfg.saliency_threshold)

    @torch.no_grad()
    def cluster(self, G, ws: torch.Tensor) -> StyleMixClusters:
        """Raw K-means cluster maps, centroid distances and foreground flags (for inspection)."""
        per = max(1, self.cfg.render_batch // self.cfg.n_styles)  # images per summary chunk
        cl, di, fg = [], [], []
        for i in range(0, ws.shape[0], per):
            for s in self.summaries(G, ws[i : i + per]):
                c, d = cluster_summary(s, self.cfg.k, self.cfg.niter, self.cfg.seed, self.cfg.normalize, self.cfg.faiss_threads)
                cl.append(c)
                di.append(d)
                fg.append(self._select(c))
        return StyleMixClusters(torch.stack(cl), torch.stack(di), torch.stack(fg))

    @torch.no_grad()
    def label(self, batch: GenBatch) -> LabelBatch:
        """Binary fg/bg labels (uint8, 1 = foreground) from batch.ws; uncertainty in [0, 1]."""
        res = self.cluster(batch_generator(batch, self.meta.get("generator"), self.name), batch.ws)
        label = torch.gather(res.foreground, 1, res.clusters.flatten(1)).reshape(res.clusters.shape).to(torch.uint8)
        unc = torch.stack([margin_uncertainty(d, f, self.cfg.margin) for d, f in zip(res.distances, res.foreground)])
        unc = unc.float()
        score, top10 = image_scores(unc)
        return LabelBatch(label=label, uncertainty=unc, score=score, score_top10=top10)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """safetensors (the style latents only; G is named by its fingerprint in meta) + JSON config."""
        write_labeler(path, self, FORMAT, { "config": self.cfg.model_dump_json(), "resolution": str(self.resolution),
            "num_outputs": str(self.num_outputs), "meta": json.dumps(self.meta),
        })

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "StyleMixLabeler":
        meta, state = read_labeler(path, FORMAT)
        self = cls(StyleMixConfig.model_validate_json(meta["config"]), state["style_ws"], int(meta["resolution"]),
                   json.loads(meta["meta"]))
        self.load_state_dict(state)
        return self.to(device).eval()
