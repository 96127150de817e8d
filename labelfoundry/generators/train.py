"""Train a StyleGAN2 on a procedural domain: non-saturating logistic loss, lazy R1, EMA of G.

Every step's randomness is derived from (seed, step), so resuming from a checkpoint continues the
exact same run. Real images are rendered on the fly from the domain's `train` split.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from ..domains import toyfaces
from ..precision import bf16_autocast_ok
from ..atomic import atomic_path
from .discriminator import Discriminator, DiscriminatorConfig
from .io import save_generator
from .stylegan2 import Generator, StyleGAN2Config


class GeneratorTrainConfig(BaseModel):
    resolution: int = 64
    z_dim: int = 128
    w_dim: int = 128
    map_layers: int = 4
    channel_base: int = 2048
    channel_max: int = 128
    d_channel_base: int = 1024
    batch: int = 32
    lr: float = 0.0025
    r1_gamma: float | None = Field(None, description="None: 0.0002 * res^2 / batch (the ADA heuristic)")
    r1_interval: int = 16
    style_mixing: float = 0.9
    ema_kimg: float = 10.0
    ema_rampup: float = 0.05
    real_pool: int = 200_000
    total_kimg: float = 200.0
    seed: int = 0
    amp: bool = True
    checkpoint_every: int = 200
    snapshot_every: int = 500  # steps between sample grids
    snapshot_kimg: float = 50.0  # kimg between kept model snapshots (generator-XXXXXXk.safetensors), scored later

    def gamma(self) -> float:
        return self.r1_gamma if self.r1_gamma is not None else 0.0002 * self.resolution**2 / self.batch


def _real_batch(cfg: GeneratorTrainConfig, rng: np.random.Generator, device) -> torch.Tensor:
    idx = rng.integers(0, cfg.real_pool, cfg.batch)
    seeds = [toyfaces.split_seeds("train", 1, int(i))[0] for i in idx]
    img = toyfaces.render(seeds, cfg.resolution)["image"]
    return torch.from_numpy(img).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _mixed_ws(G: Generator, z: torch.Tensor, prob: float, gen: torch.Generator, update_w_avg: bool) -> torch.Tensor:
    ws = G.mapping(z, update_w_avg=update_w_avg)
    if prob > 0 and torch.rand([], generator=gen).item() < prob:
        z2 = torch.randn(z.shape, generator=gen).to(z.device)
        cutoff = int(torch.randint(1, G.num_ws, [], generator=gen))
        ws = G.mix(ws, G.mapping(z2), cutoff)
    return ws


def save_grid(path: Path, images: torch.Tensor, nrow: int = 8) -> None:
    """images (N,3,H,W) in [-1,1] -> PNG grid."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().cpu().permute(0, 2, 3, 1).numpy()
    n, h, w, c = x.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * h, nrow * w, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = x[i]
    Image.fromarray(grid).save(path)


def train_generator(
    cfg: GeneratorTrainConfig,
    out_dir: str | os.PathLike,
    device: str = "cpu",
    progress: Callable[[dict], None] | None = None,
    max_seconds: float | None = None,
) -> Path:
    """Train (or resume) until `cfg.total_kimg`; returns the path of the exported G_ema + D file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    gcfg = StyleGAN2Config(
        resolution=cfg.resolution, z_dim=cfg.z_dim, w_dim=cfg.w_dim, map_layers=cfg.map_layers,
        channel_base=cfg.channel_base, channel_max=cfg.channel_max,
    )
    dcfg = DiscriminatorConfig(resolution=cfg.resolution, channel_base=cfg.d_channel_base, channel_max=cfg.channel_max)
    torch.manual_seed(cfg.seed)
    G, D = Generator(gcfg).to(dev), Discriminator(dcfg).to(dev)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    c = cfg.r1_interval / (cfg.r1_interval + 1)  # lazy-regularisation correction of lr and betas
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.0, 0.99), eps=1e-8)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr * c, betas=(0.0, 0.99**c), eps=1e-8)
    ckpt = out / "checkpoint.pt"
    step, nimg = 0, 0
    if ckpt.exists():
        st = torch.load(ckpt, map_location=dev, weights_only=True)
        G.load_state_dict(st["G"]); D.load_state_dict(st["D"]); G_ema.load_state_dict(st["G_ema"])
        opt_g.load_state_dict(st["opt_g"]); opt_d.load_state_dict(st["opt_d"])
        step, nimg = int(st["step"]), int(st["nimg"])
    amp = cfg.amp and bf16_autocast_ok(dev)
    gamma = cfg.gamma()
    fixed_z = G.z_from_seeds(list(range(64)), dev)

    def save_ckpt() -> None:
        with atomic_path(ckpt) as tmp:
            torch.save(
                {"G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict(), "opt_g": opt_g.state_dict(),
                 "opt_d": opt_d.state_dict(), "step": step, "nimg": nimg, "config": cfg.model_dump_json()},
                tmp,
            )
        save_generator(out / "generator.safetensors", G_ema, D, extra={"kimg": nimg / 1000, "train_config": cfg.model_dump()})

    t0, t_last, n_last = time.time(), time.time(), nimg
    while nimg < cfg.total_kimg * 1000:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        rng = np.random.default_rng([cfg.seed, step])
        real = _real_batch(cfg, rng, dev)
        z1 = torch.randn(cfg.batch, G.z_dim, generator=gen).to(dev)
        z2 = torch.randn(cfg.batch, G.z_dim, generator=gen).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            # D: push fakes down, reals up; lazy R1 on reals.
            with torch.no_grad():
                fake = G.synthesis(_mixed_ws(G, z1, cfg.style_mixing, gen, False), noise_mode="random")
            do_r1 = step % cfg.r1_interval == 0
            real_in = real.detach().requires_grad_(do_r1)
            real_logits = D(real_in).float()
            loss_d = F.softplus(D(fake).float()).mean() + F.softplus(-real_logits).mean()
            if do_r1:
                (grad,) = torch.autograd.grad(real_logits.sum(), real_in, create_graph=True)
                loss_d = loss_d + grad.float().square().sum([1, 2, 3]).mean() * (gamma / 2) * cfg.r1_interval
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            fake = G.synthesis(_mixed_ws(G, z2, cfg.style_mixing, gen, True), noise_mode="random")
            loss_g = F.softplus(-D(fake).float()).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        nimg += cfg.batch
        step += 1
        # EMA with the ADA ramp-up: a short half-life early, `ema_kimg` later.
        ema_nimg = min(cfg.ema_kimg * 1000, nimg * cfg.ema_rampup)
        beta = 0.5 ** (cfg.batch / max(ema_nimg, 1e-8))
        with torch.no_grad():
            for pe, p in zip(G_ema.parameters(), G.parameters()):
                pe.copy_(p.lerp(pe, beta))
            for be, b in zip(G_ema.buffers(), G.buffers()):
                be.copy_(b)
        if step % cfg.checkpoint_every == 0:
            save_ckpt()
        if nimg // int(cfg.snapshot_kimg * 1000) != (nimg - cfg.batch) // int(cfg.snapshot_kimg * 1000):
            save_generator(out / f"generator-{nimg // 1000:06d}k.safetensors", G_ema, D,
                           extra={"kimg": nimg / 1000, "train_config": cfg.model_dump()})
        if step % cfg.snapshot_every == 0:
            with torch.no_grad():
                save_grid(out / f"samples-{nimg // 1000:06d}k.png", G_ema(fixed_z, noise_mode="const"))
        if progress is not None and step % 10 == 0:
            now = time.time()
            progress({"step": step, "kimg": nimg / 1000, "loss_d": loss_d.item(), "loss_g": loss_g.item(),
                      "img_per_s": (nimg - n_last) / max(now - t_last, 1e-9)})
            t_last, n_last = now, nimg
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
    save_ckpt()
    with torch.no_grad():
        save_grid(out / "samples-final.png", G_ema(fixed_z, noise_mode="const"))
    return out / "generator.safetensors"
