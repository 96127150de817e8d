"""GAN inversion by latent optimisation in W+ (HandsOff §3.1, App. B.4).

Minimise LPIPS(X, G(w)) + lambda * ||X - G(w)||^2 (or the L2 term alone) over W+, batched over
images, projecting w back into the ball ||w - w_e||^2 <= c_reg after every step. Adam's update is
elementwise, so summing per-image losses optimises every image independently in one batch.

The ball is measured as the mean squared deviation per latent coordinate (not the raw sum), so
c_reg means the same for any w_dim / num_ws; with the paper's W+ of 18x512 a sum of 0.5 would be
a mean of 5e-5, which only makes sense around an encoder's estimate. Without an encoder the
start is w_avg (or the best of K random starts) and `c_reg` applies around that start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..atomic import atomic_path


class InversionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: Literal["l2", "lpips"] = "l2"
    lpips_net: Literal["vgg", "alex"] = "vgg"
    lambda_l2: float = Field(0.1, description="weight of the L2 term next to LPIPS (ignored for loss=l2)")
    steps: int = Field(500, ge=0)
    lr: float = 0.05
    c_reg: float | None = Field(0.5, description="max mean squared deviation per latent coordinate from the start")
    random_starts: int = Field(0, ge=0, description="also try K mapped random latents, keep the best start")
    start_psi: float = 0.7
    batch: int = 16
    flag_factor: float = Field(3.0, description="flag images whose loss exceeds this many times the median")
    seed: int = 0


@dataclass
class InversionResult:
    """ws (N, num_ws, w_dim) in input order, keyed by `ids`; reconstructions uint8 (N,H,W,3)."""

    ids: list[str]
    ws: torch.Tensor
    recon: np.ndarray
    loss: np.ndarray
    flagged: np.ndarray

    def save(self, path: str | os.PathLike) -> None:
        """One .pt file with plain tensors/lists (loads with weights_only=True)."""
        with atomic_path(path) as tmp:
            torch.save(
                {"ids": list(self.ids), "ws": self.ws.cpu(), "recon": torch.from_numpy(self.recon),
                 "loss": torch.from_numpy(self.loss), "flagged": torch.from_numpy(self.flagged)},
                tmp,
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InversionResult":
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(d["ids"], d["ws"], d["recon"].numpy(), d["loss"].numpy(), d["flagged"].numpy())


_LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def load_lpips(net: str, device) -> torch.nn.Module:
    """LPIPS from the `lpips` package; its backbone must already be in the torch hub cache (no downloads)."""
    ckpt = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONE_FILES[net]
    if not ckpt.exists():
        raise FileNotFoundError(
            f"LPIPS needs the ImageNet {net} backbone at {ckpt}, which is missing and cannot be downloaded "
            f"offline. Place {_LPIPS_BACKBONE_FILES[net]} there (from torchvision's model zoo), or set "
            "`inversion.loss: l2` in the config."
        )
    import lpips

    model = lpips.LPIPS(net=net, verbose=False)
    return model.to(device).eval().requires_grad_(False)


def _to_float(images: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.to(device).contiguous()


def _project(w: torch.Tensor, w_start: torch.Tensor, c_reg: float | None) -> torch.Tensor:
    if c_reg is None:
        return w
    d = w - w_start
    msd = d.square().mean(dim=[1, 2], keepdim=True)
    scale = torch.where(msd > c_reg, (c_reg / msd.clamp(min=1e-12)).sqrt(), torch.ones_like(msd))
    return w_start + d * scale


def invert(
    G,
    images: np.ndarray | torch.Tensor,
    cfg: InversionConfig,
    *,
    ids: list[str] | None = None,
    w_start: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[dict], None] | None = None,
) -> InversionResult:
    """Invert `images` (N,H,W,3) uint8 or (N,3,H,W) in [-1,1] at the generator's resolution.

    `w_start` (N, num_ws, w_dim): an encoder's estimate w_e; otherwise w_avg / best random start.
    """
    dev = torch.device(device)
    G = G.to(dev).eval().requires_grad_(False)
    x_all = _to_float(images, dev)
    n = x_all.shape[0]
    if x_all.shape[-1] != G.resolution:
        raise ValueError(f"images are {x_all.shape[-1]}px but the generator makes {G.resolution}px; resize first")
    ids = ids or [str(i) for i in range(n)]
    lp = load_lpips(cfg.lpips_net, dev) if cfg.loss == "lpips" else None

    def per_image_loss(img: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        l2 = (img - x).square().mean(dim=[1, 2, 3])
        if lp is None:
            return l2
        return lp(img, x).flatten() + cfg.lambda_l2 * l2

    gen = torch.Generator().manual_seed(cfg.seed)
    cands = [G.w_avg.reshape(1, 1, -1).expand(1, G.num_ws, -1)]
    if cfg.random_starts:
        z = torch.randn(cfg.random_starts, G.z_dim, generator=gen).to(dev)
        with torch.no_grad():
            cands.append(G.mapping(z, psi=cfg.start_psi))
    cands = torch.cat(cands)  # (K+1, num_ws, w_dim)

    ws_out, losses, recons = [], [], []
    t0 = time.time()
    for b0 in range(0, n, cfg.batch):
        x = x_all[b0 : b0 + cfg.batch]
        nb = x.shape[0]
        if w_start is not None:
            start = w_start[b0 : b0 + nb].to(dev).float()
        else:
            with torch.no_grad():
                cand_img = G.synthesis(cands)
                scores = torch.stack([per_image_loss(cand_img[k : k + 1].expand(nb, -1, -1, -1), x) for k in range(len(cands))])
            start = cands[scores.argmin(0)]
        w = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=cfg.lr)
        for step in range(cfg.steps):
            loss = per_image_loss(G.synthesis(w, noise_mode="const"), x)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                w.copy_(_project(w, start, cfg.c_reg))
            if progress is not None and (step % 100 == 0 or step == cfg.steps - 1):
                progress({"batch": b0 // cfg.batch + 1, "batches": -(-n // cfg.batch), "step": step + 1, "steps": cfg.steps,
                          "loss": loss.mean().item(), "seconds": time.time() - t0})
        with torch.no_grad():
            img = G.synthesis(w.detach(), noise_mode="const")
            losses.append(per_image_loss(img, x).cpu())
            recons.append(((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu())
        ws_out.append(w.detach().cpu())
    loss = torch.cat(losses).numpy()
    flagged = loss > cfg.flag_factor * max(float(np.median(loss)), 1e-12)
    return InversionResult(ids, torch.cat(ws_out), torch.cat(recons).numpy(), loss, flagged)
