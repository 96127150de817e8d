"""Train a StyleGAN2 on a procedural domain: non-saturating logistic loss, lazy R1, EMA of G.

Every step's randomness is derived from (seed, step), so resuming from a checkpoint continues the
exact same run. Real images are rendered on the fly from the domain's `train` split.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from ..domains import toyfaces
from ..atomic import atomic_path
from ..precision import bf16_autocast_ok
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
    mbstd_group: int = Field(4, ge=1, description="D's minibatch-std group: samples whose spread D sees together "
                             "(StyleGAN2 4; ADA's CIFAR setting 32). Holds no weights, so a warm start may change it")
    batch: int = Field(32, ge=1, description="images per step; R1's default weight and G_ema's default half-life scale with it")
    lr: float = 0.0025
    d_lr: float | None = Field(None, gt=0, description="D's learning rate before the lazy-R1 correction (None: `lr`, as "
                               "StyleGAN2); the ramp-down scales it like G's. Stored in no weights, so a warm start may change it")
    lr_decay_from_kimg: float | None = Field(
        None, description="cosine ramp-down of both learning rates from this kimg to `lr * lr_final` at total_kimg "
        "(None: constant). Set on every step, so a resumed run picks up a schedule its checkpoint never had.")
    lr_final: float = Field(0.1, gt=0, le=1, description="the ramp-down's last multiplier of lr")
    r1_gamma: float | None = Field(None, ge=0, description="None: 0.0002 * res^2 / batch (the ADA heuristic)")
    r1_interval: int = 16
    style_mixing: float = 0.9
    ema_kimg: float | None = Field(None, gt=0, description="G_ema's half-life in kimg (None: batch * 10 / 32, "
                                   "StyleGAN2-ADA's scaling: 10 at batch 32)")
    ema_rampup: float = 0.05
    real_pool: int = Field(200_000, ge=1, description="the train split's first N renders, which D's real images are drawn from")
    total_kimg: float = 200.0
    seed: int = 0
    amp: bool = True
    checkpoint_every: int = 200
    snapshot_every: int = 500  # steps between sample grids
    snapshot_kimg: float = 50.0  # kimg between kept model snapshots (generator-XXXXXXk.safetensors), scored later

    def ema_half_life_kimg(self) -> float:
        return self.ema_kimg if self.ema_kimg is not None else self.batch * 10 / 32

    def gamma(self) -> float:
        return self.r1_gamma if self.r1_gamma is not None else 0.0002 * self.resolution**2 / self.batch

    def lr_at(self, nimg: int) -> float:
        """G's learning rate after `nimg` images: constant, then a cosine ramp-down. At 64² the
        scored snapshots got worse after 600 kimg at the constant rate (domain FD 6.5 -> 11.8 at 768k),
        the usual sign that the rate is too high for the late, fine-detail phase."""
        start = self.lr_decay_from_kimg
        if start is None or nimg <= start * 1000 or self.total_kimg <= start:
            return self.lr
        t = min(1.0, (nimg / 1000 - start) / (self.total_kimg - start))
        return self.lr * (self.lr_final + (1 - self.lr_final) * 0.5 * (1 + math.cos(math.pi * t)))

    def d_lr_at(self, nimg: int) -> float:
        """D's rate after `nimg` images, before the lazy-R1 correction: G's schedule scaled by d_lr / lr."""
        return self.lr_at(nimg) * (self.d_lr / self.lr if self.d_lr is not None else 1.0)

    def r1_lazy_c(self) -> float:
        """StyleGAN2's lazy-regularisation correction of D's lr and betas."""
        return self.r1_interval / (self.r1_interval + 1)


class RealPool:
    """The `real_pool` training renders, drawn once and held on the training device. On a GPU a step
    takes milliseconds while rendering its batch takes tens of milliseconds of one CPU core, so the
    renderer, not the networks, would set the pace. A batch drawn from the pool is exactly the batch
    `_real_batch` renders on the fly (same indices, same seeds)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images  # (real_pool, H, W, 3) uint8

    @classmethod
    def render(cls, cfg: GeneratorTrainConfig, device: torch.device, workers: int = 1, chunk: int = 2048) -> RealPool:
        seeds = toyfaces.split_seeds("train", cfg.real_pool)
        if workers <= 1:
            return cls(torch.from_numpy(toyfaces.render_images(seeds, cfg.resolution)).to(device))
        jobs = [(seeds[i : i + chunk], cfg.resolution) for i in range(0, len(seeds), chunk)]
        # spawn: a forked child of a process holding CUDA or OpenMP state can hang
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.starmap(toyfaces.render_images, jobs)
        return cls(torch.from_numpy(np.concatenate(parts)).to(device))


def _real_batch(cfg: GeneratorTrainConfig, rng: np.random.Generator, device, pool: RealPool | None = None) -> torch.Tensor:
    idx = rng.integers(0, cfg.real_pool, cfg.batch)
    if pool is not None:
        if len(pool.images) != cfg.real_pool or pool.images.shape[1] != cfg.resolution:
            raise ValueError(f"the real pool holds {tuple(pool.images.shape)}; this run needs {cfg.real_pool} images of "
                             f"{cfg.resolution}²: render it with RealPool.render(cfg, ...)")
        img = pool.images[torch.from_numpy(idx).to(pool.images.device)].to(device)
    else:
        seeds = [toyfaces.split_seeds("train", 1, int(i))[0] for i in idx]
        img = torch.from_numpy(toyfaces.render(seeds, cfg.resolution)["image"]).to(device)
    return img.permute(0, 3, 1, 2).float() / 127.5 - 1.0


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


@dataclass
class GANState:
    """Everything a resumed run needs: the networks, their optimisers and the counters."""

    G: Generator
    D: Discriminator
    G_ema: Generator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    step: int = 0
    nimg: int = 0


def build_state(cfg: GeneratorTrainConfig, dev: torch.device) -> GANState:
    """Fresh networks (seeded by cfg.seed) and Adam with StyleGAN2's lazy-regularisation correction."""
    gcfg = StyleGAN2Config(
        resolution=cfg.resolution, z_dim=cfg.z_dim, w_dim=cfg.w_dim, map_layers=cfg.map_layers,
        channel_base=cfg.channel_base, channel_max=cfg.channel_max,
    )
    dcfg = DiscriminatorConfig(resolution=cfg.resolution, channel_base=cfg.d_channel_base, channel_max=cfg.channel_max,
                               mbstd_group_size=cfg.mbstd_group)
    torch.manual_seed(cfg.seed)
    G, D = Generator(gcfg).to(dev), Discriminator(dcfg).to(dev)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    c = cfg.r1_lazy_c()
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.0, 0.99), eps=1e-8)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.d_lr_at(0) * c, betas=(0.0, 0.99**c), eps=1e-8)
    return GANState(G, D, G_ema, opt_g, opt_d)


def load_state(st: GANState, ckpt: Path, dev: torch.device) -> None:
    """Resume exactly from a checkpoint written by `save_state` (tensors only, weights_only=True)."""
    d = torch.load(ckpt, map_location=dev, weights_only=True)
    st.G.load_state_dict(d["G"]); st.D.load_state_dict(d["D"]); st.G_ema.load_state_dict(d["G_ema"])
    st.opt_g.load_state_dict(d["opt_g"]); st.opt_d.load_state_dict(d["opt_d"])
    st.step, st.nimg = int(d["step"]), int(d["nimg"])


def init_from_export(st: GANState, path: Path, cfg: GeneratorTrainConfig) -> None:
    """Warm start from an exported model (G_ema + D, e.g. a kept snapshot): G and G_ema both take
    the exported G_ema, D its D; the optimisers start fresh and the image count continues from the
    file's kimg. For a new schedule from the best snapshot when the resumable state has moved past
    it (StyleGAN2-ADA's resume from a network file works the same way, with fresh optimisers)."""
    from .io import load_own

    nets = load_own(path, st.G_ema.w_avg.device)
    if nets.D is None:
        raise ValueError(f"{path} holds no discriminator: training needs G_ema + D (a file written by train-generator)")
    try:
        st.G.load_state_dict(nets.G.state_dict()); st.G_ema.load_state_dict(nets.G.state_dict())
        st.D.load_state_dict(nets.D.state_dict())
    except RuntimeError as e:
        raise ValueError(f"{path} does not match this training configuration (resolution {cfg.resolution}, "
                         f"channel_base {cfg.channel_base}, channel_max {cfg.channel_max}): {str(e)[:300]}") from None
    kimg = float((nets.extra or {}).get("kimg", 0.0))
    st.nimg = int(round(kimg * 1000))
    st.step = st.nimg // cfg.batch


def save_state(st: GANState, cfg: GeneratorTrainConfig, out: Path) -> None:
    """The resumable checkpoint and the exported G_ema + D, each written atomically."""
    with atomic_path(out / "checkpoint.pt") as tmp:
        torch.save(
            {"G": st.G.state_dict(), "D": st.D.state_dict(), "G_ema": st.G_ema.state_dict(),
             "opt_g": st.opt_g.state_dict(), "opt_d": st.opt_d.state_dict(), "step": st.step, "nimg": st.nimg,
             "config": cfg.model_dump_json()},
            tmp,
        )
    export(st, cfg, out / "generator.safetensors")


def export(st: GANState, cfg: GeneratorTrainConfig, path: Path) -> None:
    save_generator(path, st.G_ema, st.D, extra={"kimg": st.nimg / 1000, "train_config": cfg.model_dump()})


def d_loss(st: GANState, cfg: GeneratorTrainConfig, real: torch.Tensor, z: torch.Tensor, gen: torch.Generator,
           amp: bool) -> torch.Tensor:
    """D's logistic loss: push fakes down, reals up; lazy R1 on reals every `r1_interval` steps."""
    dev = real.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        with torch.no_grad():
            fake = st.G.synthesis(_mixed_ws(st.G, z, cfg.style_mixing, gen, False), noise_mode="random")
        do_r1 = st.step % cfg.r1_interval == 0
        real_in = real.detach().requires_grad_(do_r1)
        real_logits = st.D(real_in).float()
        loss = F.softplus(st.D(fake).float()).mean() + F.softplus(-real_logits).mean()
        if do_r1:  # the gradient penalty itself is summed in fp32
            (grad,) = torch.autograd.grad(real_logits.sum(), real_in, create_graph=True)
            loss = loss + grad.float().square().sum([1, 2, 3]).mean() * (cfg.gamma() / 2) * cfg.r1_interval
    return loss


def g_loss(st: GANState, cfg: GeneratorTrainConfig, z: torch.Tensor, gen: torch.Generator, amp: bool) -> torch.Tensor:
    """G's non-saturating loss on style-mixed fakes (updates the tracked w_avg)."""
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=amp):
        fake = st.G.synthesis(_mixed_ws(st.G, z, cfg.style_mixing, gen, True), noise_mode="random")
        return F.softplus(-st.D(fake).float()).mean()


def update_ema(st: GANState, cfg: GeneratorTrainConfig) -> None:
    """EMA of G in fp32 with the ADA ramp-up: a short half-life early, `ema_kimg` later."""
    ema_nimg = min(cfg.ema_half_life_kimg() * 1000, st.nimg * cfg.ema_rampup)
    beta = 0.5 ** (cfg.batch / max(ema_nimg, 1e-8))
    with torch.no_grad():
        for pe, p in zip(st.G_ema.parameters(), st.G.parameters()):
            pe.copy_(p.lerp(pe, beta))
        for be, b in zip(st.G_ema.buffers(), st.G.buffers()):
            be.copy_(b)


def set_lr(st: GANState, cfg: GeneratorTrainConfig) -> None:
    """Both optimisers' rates for the current image count (a checkpoint's stored rate is overridden)."""
    for g in st.opt_g.param_groups:
        g["lr"] = cfg.lr_at(st.nimg)
    for g in st.opt_d.param_groups:
        g["lr"] = cfg.d_lr_at(st.nimg) * cfg.r1_lazy_c()


def train_step(st: GANState, cfg: GeneratorTrainConfig, dev: torch.device, amp: bool,
               pool: RealPool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One D step and one G step, all randomness from (seed, step); returns (loss_d, loss_g), detached
    (no device sync here). `pool`: the pre-rendered real images (the same batches, faster on a GPU)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.step)
    torch.manual_seed(cfg.seed * 1_000_003 + st.step)
    rng = np.random.default_rng([cfg.seed, st.step])
    set_lr(st, cfg)
    real = _real_batch(cfg, rng, dev, pool)
    z1 = torch.randn(cfg.batch, st.G.z_dim, generator=gen).to(dev)
    z2 = torch.randn(cfg.batch, st.G.z_dim, generator=gen).to(dev)
    loss_d = d_loss(st, cfg, real, z1, gen, amp)
    st.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    st.opt_d.step()
    loss_g = g_loss(st, cfg, z2, gen, amp)
    st.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    st.opt_g.step()
    st.nimg += cfg.batch
    st.step += 1
    update_ema(st, cfg)
    return loss_d.detach(), loss_g.detach()


def train_generator(
    cfg: GeneratorTrainConfig,
    out_dir: str | os.PathLike,
    device: str = "cpu",
    progress: Callable[[dict], None] | None = None,
    max_seconds: float | None = None,
    init_from: str | os.PathLike | None = None,
    prerender_workers: int = 0,
) -> Path:
    """Train (or resume) until `cfg.total_kimg`; returns the path of the exported G_ema + D file.
    `init_from`: an exported G_ema + D file to warm-start a fresh directory from (see `init_from_export`).
    `prerender_workers` > 0: render the real pool up front in that many processes and hold it on the
    device (for GPUs; the run's batches, and so its result, are the same either way)."""
    out = Path(out_dir)
    dev = torch.device(device)
    pool = RealPool.render(cfg, dev, prerender_workers) if prerender_workers > 0 else None
    st = build_state(cfg, dev)
    if (out / "checkpoint.pt").exists():
        if init_from is not None:
            raise ValueError(f"{out} already holds a checkpoint.pt, which resumes exactly; init_from applies only to "
                             "a fresh directory: choose another --out, or drop --init-from to resume")
        load_state(st, out / "checkpoint.pt", dev)
    elif init_from is not None:
        init_from_export(st, Path(init_from), cfg)
    out.mkdir(parents=True, exist_ok=True)
    amp = cfg.amp and bf16_autocast_ok(dev)
    fixed_z = st.G.z_from_seeds(list(range(64)), dev)
    snap = int(cfg.snapshot_kimg * 1000)
    t0, t_last, n_last = time.time(), time.time(), st.nimg
    while st.nimg < cfg.total_kimg * 1000:
        loss_d, loss_g = train_step(st, cfg, dev, amp, pool)
        if st.step % cfg.checkpoint_every == 0:
            save_state(st, cfg, out)
        if st.nimg // snap != (st.nimg - cfg.batch) // snap:
            export(st, cfg, out / f"generator-{st.nimg // 1000:06d}k.safetensors")
        if st.step % cfg.snapshot_every == 0:
            with torch.no_grad():
                save_grid(out / f"samples-{st.nimg // 1000:06d}k.png", st.G_ema(fixed_z, noise_mode="const"))
        if progress is not None and st.step % 10 == 0:
            now = time.time()
            progress({"step": st.step, "kimg": st.nimg / 1000, "loss_d": loss_d.item(), "loss_g": loss_g.item(),
                      "lr": cfg.lr_at(st.nimg), "img_per_s": (st.nimg - n_last) / max(now - t_last, 1e-9)})
            t_last, n_last = now, st.nimg
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
    save_state(st, cfg, out)
    with torch.no_grad():
        save_grid(out / "samples-final.png", st.G_ema(fixed_z, noise_mode="const"))
    return out / "generator.safetensors"
