"""HandsOff label generator: an ensemble of M pixel MLPs over generator features (paper 000, §3).

All M members run as one batched op. The first layer is the factorized projection of
`labelfoundry.features` (never a full-resolution hypercolumn); the rest of each member
(BN + ReLU, H1 -> H2, BN + ReLU, H2 -> K) runs on the pixels of one spatial tile at a time, with
the uncertainty computed from the same tile.
Training samples pixels on the fly from features regenerated from the cached ws; each member
draws its own pixels, which keeps the members diverse (their disagreement is the uncertainty).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..features import FactorizedProjection, TapSpec, TiledProjection, gather_taps, generate_with_taps, pixel_grid
from ..precision import autocast_dtype
from ..uncertainty import image_scores, js_from_logits, member_variance
from .base import FitData, GenBatch, LabelBatch, read_labeler, write_labeler
from .handsoff_compiled import COMPILED

Task = Literal["segmentation", "keypoints", "depth"]
_GPU_TILE_PIXELS = 65536  # on CUDA, whole images up to 256^2 per tile: fewer, larger kernels
_CPU_TILE_PIXELS = 1024  # fp32 on CPU: at or near the fastest tile measured at 64² and 256² (larger tiles gain nothing reliably)
_BF16_TILE_VALUES = 2**21  # bf16 on CPU: first-layer values per tile; bf16 GEMMs are ~3x faster, so
# small tiles leave the per-op overhead in charge (64², 3 x 128: a whole image per tile labels 0.80x the time of 1024 px)


class HandsOffConfig(BaseModel):
    """Label-generator hyper-parameters. HandsOff's App. B.3/B.5 use 10 members of (256, 32) on 512
    labeled pixels per image. On the toy faces, 3 members of (128, 32) fitted on 2,048 labeled pixels
    per image per step, drawn with class weights frequency^-0.3, label held-out faces better (parts
    mIoU 0.548 ± 0.000 vs 0.512 ± 0.002: thin parts such as brows 0.07 -> 0.34) for a sixth of the
    labeling work per pixel (docs/evaluation.md), so those are the defaults."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["handsoff"] = "handsoff"
    task: Task = "segmentation"
    members: int = Field(3, ge=1)
    hidden: tuple[int, int] = (128, 32)
    lr: float = 1e-3
    epochs: float = Field(4.0, description="passes over all labeled pixels, per member")
    min_steps: int = 300
    images_per_step: int = 4
    pixels_per_image: int = 2048
    class_balanced: bool | float = Field(0.3, description="labeled pixels drawn with weight frequency^-p per class: "
                                         "False (p = 0, as labeled), True (p = 1, every class equally often) or p in (0, 1]; "
                                         "0.5 (inverse square root) lifts thin parts without starving the large ones")
    keypoint_sigma: float = Field(2.0, description="heatmap std in pixels at the generator's resolution")
    tap_layers: tuple[int, ...] | None = None
    tap_max_channels: int | None = None
    include_rgb: bool = False
    tile_pixels: int | None = Field(None, ge=1, description="output pixels per labeling tile on CPU (at least 64k on "
                                    "CUDA); peak memory is ~3*M*H1*bytes per pixel. None: chosen per precision (measured "
                                    "at 64² and 256²): 1024 in fp32, in bf16 enough pixels for ~2M first-layer values "
                                    "(a 64² image whole at the shipped 3 x 128), never under 1024")
    seed: int = 0

    @field_validator("class_balanced")
    @classmethod
    def _balance_exponent(cls, v: bool | float) -> bool | float:
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"class_balanced must be true/false or an exponent in [0, 1], got {v}")
        return v

    @property
    def tap_spec(self) -> TapSpec:
        return TapSpec(self.tap_layers, self.tap_max_channels, self.include_rgb)


class EnsembleMLP(nn.Module):
    """M members of Linear(C,H1)-BN-ReLU-Linear(H1,H2)-BN-ReLU-Linear(H2,K), the first factorized."""

    def __init__(self, tap_channels: list[int], members: int, hidden: tuple[int, int], out: int):
        super().__init__()
        h1, h2 = hidden
        self.members, self.h1, self.h2, self.out = members, h1, h2, out
        self.proj = FactorizedProjection(tap_channels, members, h1)
        self.bn1 = nn.BatchNorm1d(members * h1)
        self.w2 = nn.Parameter(torch.empty(members, h2, h1))
        self.b2 = nn.Parameter(torch.empty(members, h2))
        self.bn2 = nn.BatchNorm1d(members * h2)
        self.w3 = nn.Parameter(torch.empty(members, out, h2))
        self.b3 = nn.Parameter(torch.empty(members, out))
        for w, b, fan_in in ((self.w2, self.b2, h1), (self.w3, self.b3, h2)):
            for m in range(members):
                nn.init.kaiming_uniform_(w[m], a=5**0.5)
            nn.init.uniform_(b, -1 / fan_in**0.5, 1 / fan_in**0.5)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """First-layer pre-activations (P, M, H1) -> outputs (P, M, K)."""
        p = h.shape[0]
        h = F.relu(self.bn1(h.reshape(p, -1))).reshape(p, self.members, self.h1)
        h = torch.einsum("pmi,moi->pmo", h, self.w2) + self.b2
        h = F.relu(self.bn2(h.reshape(p, -1))).reshape(p, self.members, self.h2)
        return torch.einsum("pmi,moi->pmo", h, self.w3) + self.b3


def _targets(task: Task, masks=None, keypoints=None, depth=None, depth_valid=None, num_classes=None, sigma=2.0, res=None):
    """Dense per-pixel targets (N, C, R, R) and a weight map (N, R, R) (0 = ignore)."""
    if task == "segmentation":
        m = torch.as_tensor(masks).long()
        return m.unsqueeze(1).float(), torch.ones(m.shape, dtype=torch.float32)
    if task == "keypoints":
        from ..segmenters.heatmaps import keypoint_heatmaps

        kp = torch.as_tensor(keypoints, dtype=torch.float32)
        hm = torch.stack([keypoint_heatmaps(k, res, res, sigma) for k in kp])
        return hm, torch.ones(hm.shape[0], res, res)
    d = torch.as_tensor(depth, dtype=torch.float32)
    valid = torch.ones_like(d) if depth_valid is None else torch.as_tensor(depth_valid).float()
    return d.unsqueeze(1), valid


def _fit_targets(cfg: HandsOffConfig, data: FitData, R: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(targets (N,C,R,R), pixel weights (N,R,R), outputs K) for the configured task, checked."""
    num_classes = None
    if cfg.task == "segmentation":
        masks, num_classes = data.require("masks", "handsoff (segmentation)"), data.num_classes
        out = num_classes
    elif cfg.task == "keypoints":
        out = int(torch.as_tensor(data.require("keypoints", "handsoff (keypoints)")).shape[1])
    else:
        data.require("depth", "handsoff (depth)")
        out = 1
    target, weight = _targets(cfg.task, data.masks, data.keypoints, data.depth, data.depth_valid, num_classes,
                              cfg.keypoint_sigma, R)
    if target.shape[-2:] != (R, R):
        raise ValueError(f"labels are {tuple(target.shape[-2:])} but the generator makes {R}x{R} images")
    if cfg.task == "segmentation":
        bad = (target < 0) | (target >= num_classes)
        if bad.any():
            raise ValueError(f"mask ids outside [0, {num_classes}): {sorted(set(target[bad].long().tolist()))[:10]}")
        power = float(cfg.class_balanced)  # checked in [0, 1] by the config
        if power > 0:
            counts = torch.bincount(target.long().flatten(), minlength=num_classes).float()
            inv = counts.clamp(min=1.0).pow(-power)
            weight = inv[target.long().squeeze(1)] * weight
    return target, weight, out


def _tap_cache(G, ws: torch.Tensor, spec: TapSpec, budget_mb: float) -> list[torch.Tensor] | None:
    """Every labeled image's taps, computed once, when they fit in `budget_mb`; else None."""
    n = ws.shape[0]
    tap_floats = sum(t[0].numel() for t in generate_with_taps(G, ws[:1], spec)[1])
    if n * tap_floats * 4 / 2**20 > budget_mb:
        return None
    chunks = [generate_with_taps(G, ws[i : i + 8], spec)[1] for i in range(0, n, 8)]
    return [torch.cat([c[j] for c in chunks]) for j in range(len(chunks[0]))]


class HandsOffLabeler(nn.Module):
    """Fitted label generator; `label()` turns a generated batch into labels + uncertainty."""

    name = "handsoff"

    def __init__(self, cfg: HandsOffConfig, tap_channels: list[int], resolution: int, num_outputs: int, meta: dict | None = None):
        super().__init__()
        self.cfg, self.resolution, self.num_outputs = cfg, resolution, num_outputs
        self.tap_channels = list(tap_channels)
        self.meta = dict(meta or {})
        self.net = EnsembleMLP(self.tap_channels, cfg.members, cfg.hidden, num_outputs)

    @property
    def tap_spec(self) -> TapSpec:
        return self.cfg.tap_spec

    @property
    def schema(self) -> dict:
        return self.meta["schema"]

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        G,
        data: FitData,
        cfg: HandsOffConfig,
        *,
        device: str | torch.device = "cpu",
        progress: Callable[[dict], None] | None = None,
        tap_cache_mb: float = 1024.0,
    ) -> "HandsOffLabeler":
        """Fit on the inverted latents `data.latents` (N, num_ws, w_dim) and their labels at the
        generator's resolution: data.masks (segmentation, classes from data.schema), data.keypoints
        (N,K,3), or data.depth + data.depth_valid. Taps are regenerated from ws per step unless all
        of them fit in `tap_cache_mb`, in which case they are computed once."""
        dev = torch.device(device)
        R = G.resolution
        ws = data.require("latents", "handsoff")
        n = ws.shape[0]
        if n == 0:
            raise ValueError("HandsOff needs at least one labeled image")
        spec = cfg.tap_spec
        tap_ch = spec.channels(G.tap_channels)
        target, weight, out = _fit_targets(cfg, data, R)
        num_classes = data.num_classes if cfg.task == "segmentation" else None
        meta = {"num_classes": num_classes}
        if cfg.task == "depth":  # members regress standardised depth; labeling maps it back (see _output_affine)
            valid = target[:, 0][weight > 0]
            meta.update(target_shift=float(valid.mean()), target_scale=float(valid.std().clamp(min=1e-3)) if valid.numel() > 1 else 1.0)
            target = (target - meta["target_shift"]) / meta["target_scale"]
        with torch.random.fork_rng(devices=[]):  # same config -> same initial members
            torch.manual_seed(cfg.seed)
            self = cls(cfg, tap_ch, R, out, meta=meta)
        self.to(dev).train()
        G = G.to(dev).eval()
        ws = ws.to(dev)
        cache = _tap_cache(G, ws, spec, tap_cache_mb)
        steps, loss = self._train(G, ws, spec, cache, target.to(dev), weight, progress)
        self.meta.update({"steps": steps, "final_loss": loss, "num_images": n, "schema": data.schema})
        return self.eval()

    def _train(self, G, ws, spec: TapSpec, cache, target, weight, progress) -> tuple[int, float]:
        """The fitting loop: each step draws images, then each member its own pixels, and takes one
        Adam step on their cross-entropy (segmentation) or MSE. Returns (steps, final loss)."""
        cfg, n, R, out = self.cfg, ws.shape[0], self.resolution, self.num_outputs
        dev = ws.device
        total_px = float(weight.gt(0).sum())
        px_per_step = cfg.images_per_step * cfg.pixels_per_image
        steps = max(cfg.min_steps, math.ceil(cfg.epochs * total_px / px_per_step))
        opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        M, P = cfg.members, cfg.pixels_per_image
        t0 = time.time()
        for step in range(steps):
            b = min(cfg.images_per_step, n)
            idx_cpu = torch.randperm(n, generator=gen)[:b]
            idx = idx_cpu.to(dev)
            taps = [t[idx] for t in cache] if cache is not None else generate_with_taps(G, ws[idx], spec)[1]
            # Each member draws its own pixels (weighted: class balance / valid depth), on the CPU RNG.
            wmap = weight[idx_cpu].flatten(1).repeat_interleave(M, 0)  # (b*M, R*R)
            flat = torch.multinomial(wmap, P, replacement=True, generator=gen).reshape(b, M, P).to(dev)
            ys, xs = flat // R, flat % R
            grid = pixel_grid(ys, xs, R).reshape(b, M * P, 2)
            feats = gather_taps(taps, grid).reshape(b, M, P, -1)  # hypercolumns of the sampled pixels only
            h = self.net.proj.project_features(feats)  # (b, M, P, H1)
            h = h.permute(0, 2, 1, 3).reshape(b * P, M, -1)
            pred = self.net.head(h).reshape(b, P, M, out).permute(0, 2, 1, 3)  # (b, M, P, K)
            tgt = torch.gather(target[idx].flatten(2), 2, flat.reshape(b, 1, M * P).expand(-1, target.shape[1], -1))
            tgt = tgt.reshape(b, -1, M, P).permute(0, 2, 3, 1)  # (b, M, P, C)
            if cfg.task == "segmentation":
                loss = F.cross_entropy(pred.reshape(-1, out), tgt.reshape(-1).long(), reduction="mean") * M
            else:
                loss = F.mse_loss(pred, tgt, reduction="mean") * M
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None and (step % 50 == 0 or step == steps - 1):
                progress({"step": step + 1, "steps": steps, "loss": loss.item() / M, "seconds": time.time() - t0})
        return steps, loss.item() / M

    # ---------------------------------------------------------------- labeling
    def _output_affine(self) -> tuple[float, float]:
        """(shift, scale) from the members' outputs to label units. Depth is fitted standardised by
        the training depths' mean and std: fresh members start near 0, and raw depth (~10 at 64²)
        would leave an offset that a short fit does not close (fit loss 46.5 before this). Other
        tasks, and labelers saved before, have (0, 1)."""
        return float(self.meta.get("target_shift", 0.0)), float(self.meta.get("target_scale", 1.0))

    @torch.no_grad()
    def _labeling_plan(self, taps: list[torch.Tensor], dtype: torch.dtype) -> tuple[TiledProjection, dict[str, torch.Tensor]]:
        """The plan of `_build_plan`, kept across calls: rebuilt only when the dtype, the tile size,
        the taps' shapes or the device change, or any weight or BN statistic was written since
        (tensor version counters), so mass generation folds the weights once, not once per batch."""
        key = (dtype, self._tile_pixels(taps[0].device, dtype), taps[0].device, tuple((t.shape[1], t.shape[-1]) for t in taps), self._output_affine(),
               tuple(t._version for t in (*self.net.parameters(), *self.net.buffers())))
        cached = getattr(self, "_plan", None)
        if cached is None or cached[0] != key:
            self._plan = cached = (key, self._build_plan(taps, dtype))
        return cached[1]

    def _tile_pixels(self, dev: torch.device, dtype: torch.dtype) -> int:
        """Output pixels per labeling tile: `cfg.tile_pixels` when set, else the measured choice for
        this device and precision (see `HandsOffConfig.tile_pixels`)."""
        tile = self.cfg.tile_pixels
        if dev.type != "cpu":
            return max(tile or 0, _GPU_TILE_PIXELS)
        if tile is None:
            tile = _CPU_TILE_PIXELS
            if dtype == torch.bfloat16:
                tile = max(tile, _BF16_TILE_VALUES // (self.net.members * self.net.h1))
        return tile

    @torch.no_grad()
    def _build_plan(self, taps: list[torch.Tensor], dtype: torch.dtype) -> tuple[TiledProjection, dict[str, torch.Tensor]]:
        """Eval-mode BatchNorms folded into the layers (two passes fewer per tile), the
        first layer planned over the taps' resolutions, the head's weights laid out for (M, P, .)
        batched GEMMs, all in the compute dtype."""
        net = self.net
        M = net.members
        s1 = net.bn1.weight / torch.sqrt(net.bn1.running_var + net.bn1.eps)
        s2 = (net.bn2.weight / torch.sqrt(net.bn2.running_var + net.bn2.eps)).view(M, net.h2)
        b1 = (net.proj.bias - net.bn1.running_mean) * s1 + net.bn1.bias
        w2 = net.w2 * s2[..., None]  # (M, H2, H1)
        if bool((s1 > 0).all()):
            # relu(s1*x + b1) = s1 * relu(x + b1/s1) where s1 > 0: the BN scale moves into the second
            # layer, and the first layer runs on its parameter itself (in fp32 a view: no copy of the
            # largest weight, 26 MiB at 256², resident beside the labeler)
            w1, b1 = net.proj.weight, b1 / s1
            w2 = w2 * s1.view(M, 1, net.h1)
        else:
            w1 = net.proj.weight * s1[:, None]
        R, dev = self.resolution, taps[0].device
        shift, scale = self._output_affine()
        tile_px = self._tile_pixels(dev, dtype)
        proj = TiledProjection(w1, b1, [t.shape[1] for t in taps], [t.shape[-1] for t in taps], R,
                               tile_rows=max(1, tile_px // R), dtype=dtype)
        head = {
            "w2": w2.transpose(1, 2).to(dtype).contiguous(),  # (M, H1, H2)
            "b2": ((net.b2 - net.bn2.running_mean.view(M, net.h2)) * s2 + net.bn2.bias.view(M, net.h2)).to(dtype),  # (M, H2)
            # the output affine folded in: labels and their variance come out in label units
            "w3": (net.w3 * scale).to(dtype).contiguous(),  # (M, K, H2)
            "b3": (net.b3 * scale + shift).unsqueeze(-1).to(dtype),  # (M, K, 1)
        }
        return proj, head

    can_compile: ClassVar[bool] = True  # label(batch, compiled=True) is supported

    @torch.no_grad()
    def label(self, batch: GenBatch, *, compiled: bool = False) -> LabelBatch:
        """Label a generated batch one image and one row tile at a time; peak memory is bounded by
        the tile size (`cfg.tile_pixels`; M*H1 values per pixel), whatever the resolution or batch size.

        Under bf16 autocast (the generation stage's precision) the three layers run in bf16 with
        fp32 accumulation; softmax, the class average and the uncertainty are always fp32.
        compiled: label each image whole with the torch.compile'd pass of `handsoff_compiled`
        (faster on long runs; the same labels to float rounding; labelers outside its `applies`, and
        machines where compilation fails, stay on the tiled path).
        """
        self.eval()
        taps = batch.taps
        n, R, dev = taps[0].shape[0], self.resolution, taps[0].device
        K, M, H1 = self.num_outputs, self.net.members, self.net.h1
        seg = self.cfg.task == "segmentation"
        label = torch.empty((n, R, R) if seg else (n, K, R, R), dtype=torch.uint8 if seg else torch.float32, device=dev)
        unc = torch.empty(n, R, R, device=dev)
        proj, w = self._labeling_plan(taps, autocast_dtype(dev))
        if compiled and COMPILED.applies(R * R, M * H1) and self._label_compiled(taps, proj, w, seg, label, unc):
            score, top10 = image_scores(unc)
            return LabelBatch(label=label, uncertainty=unc, score=score, score_top10=top10)
        h2_buf = torch.empty(M, proj.T * R, self.net.h2, device=dev, dtype=proj.dtype)
        work = proj.workspace(dev)  # one set of tile buffers for all n images
        for i in range(n):
            for y0, y1, h in proj.image(taps, i, work):
                h = h.relu_()
                P = h.shape[0]
                h2 = h2_buf[:, :P]
                for m in range(M):  # member m's columns are a plain strided GEMM operand (a batched GEMM copies them)
                    torch.addmm(w["b2"][m], h[:, m * H1 : (m + 1) * H1], w["w2"][m], out=h2[m])
                h2.relu_()  # (M, P, H2)
                # (M, K, P): pixels innermost, so softmax and the member/class reductions vectorise
                out = torch.baddbmm(w["b3"], w["w3"], h2.transpose(1, 2)).float()
                if seg:
                    js, mean_p = js_from_logits(out, member_dim=0, class_dim=1)
                    label[i, y0:y1] = mean_p.max(0).indices.view(y1 - y0, R).to(torch.uint8)  # ~10x faster than argmax(0) here
                    unc[i, y0:y1] = js.view(y1 - y0, R)
                else:
                    label[i, :, y0:y1] = out.mean(0).view(K, y1 - y0, R)
                    unc[i, y0:y1] = member_variance(out.permute(2, 0, 1)).view(y1 - y0, R)
        score, top10 = image_scores(unc)
        return LabelBatch(label=label, uncertainty=unc, score=score, score_top10=top10)

    @staticmethod
    def _label_compiled(taps: list[torch.Tensor], proj: TiledProjection, w: dict[str, torch.Tensor], seg: bool,
                        label: torch.Tensor, unc: torch.Tensor) -> bool:
        """Fill label/unc image by image with the compiled pass; False where it is unavailable (what
        it wrote before failing is then overwritten by the tiled pass)."""
        groups = proj.groups
        meta = (tuple((tuple(g.idx), g.res) for g in groups), proj.R, seg)
        weights = ([g.wt for g in groups], proj.bias, w["w2"], w["b2"], w["w3"], w["b3"], [g.src for g in groups])
        for i in range(label.shape[0]):
            out = COMPILED([t[i] for t in taps], *weights, *meta)
            if out is None:
                return False
            label[i], unc[i] = out
        return True

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """safetensors weights + JSON config; written atomically."""
        write_labeler(path, self, "labelfoundry-handsoff", {
            "config": self.cfg.model_dump_json(),
            "tap_channels": json.dumps(self.tap_channels), "resolution": str(self.resolution),
            "num_outputs": str(self.num_outputs), "meta": json.dumps(self.meta),
        })

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "HandsOffLabeler":
        meta, state = read_labeler(path, "labelfoundry-handsoff")
        self = cls(
            HandsOffConfig.model_validate_json(meta["config"]), json.loads(meta["tap_channels"]),
            int(meta["resolution"]), int(meta["num_outputs"]), json.loads(meta["meta"]),
        )
        self.load_state_dict(state)
        return self.to(device).eval()
