"""Labeling benchmark: generator alone vs naive hypercolumn labeling vs ours (HandsOffLabeler.label).

    python bench/labeling.py --quick                 # 256^2, batch 1, one timed run per phase
    python bench/labeling.py                         # 256^2, batch 2, warm-up + 3 timed runs
    python bench/labeling.py --res 512               # the full run (batch 1)
    python bench/labeling.py --device cuda           # same, on a GPU
    python bench/labeling.py --quick --threads 1 --phases ours,ours_bf16,naive
    python bench/labeling.py --quick --members 3 --hidden 128,32 --phases ours,ours_compiled,naive

--quick takes ~25-90 s on 2 idle cores (3 x (128, 32) / the paper's 10 x (256, 32)); most of it is
`naive`, each phase being a fresh process (startup, setup, tiny warm-up: a few s each).

Setup (identical in every phase; seeded, so every process builds bit-identical weights and ws):
a randomly initialised StyleGAN2 (config-f-like, channels halved for CPU: channel_base=16384,
channel_max=256, z_dim=w_dim=512, 8 mapping layers) and a HandsOffLabeler with the default
ensemble (M=10 members, hidden (256, 32), K=8 classes), its BatchNorm layers calibrated on one
generated image (see `setup`), so the eval-mode BN affine is non-trivial and the label maps have
several classes with real boundaries.

Phases, each timed on the same batch of ws:
  gen      generate_with_taps: ws -> image + taps (the GenBatch). Measured in every phase process
           before its labeling step; gen_ms is the median over all of them.
  naive    the papers' labeling, honestly reproduced: every tap bilinearly upsampled
           (align_corners=False) to full resolution and concatenated into the fp32 hypercolumn
           (N, C, R, R) (stored channels-last, so its (N*R*R, C) pixel matrix is a free view and the
           hypercolumn exists once, not twice as with torch.cat + reshape), then for each of the M
           members in sequence its own nn.Sequential(Linear C->H1, BatchNorm1d, ReLU, Linear H1->H2,
           BatchNorm1d, ReLU, Linear H2->K) over all pixels at once (DatasetGAN / HandsOff code),
           then softmax, mean over members, argmax and JS divergence. The weights are copied from
           the HandsOffLabeler's EnsembleMLP, so it computes the same function as ours.
  ours     HandsOffLabeler.label(GenBatch) as shipped (labelfoundry/labelers/handsoff.py, its first
           layer in labelfoundry/features.py:TiledProjection), fp32.
  ours_bf16  the same call under bf16 autocast, as the generation stage runs it when
           labelfoundry.precision says bf16 pays (run by default where it does): the three layers in
           bf16 with fp32 accumulation, softmax/JS in fp32. The taps are the fp32 generator's (so the
           agreement below is the labeler's alone); the phase also times the generator under the same
           autocast (gen_bf16_ms), the figure its labeling time is held against.

Agreement: label maps of naive and ours must agree (argmax equal on >= 99.9% of pixels, JS
divergence within 1e-3 nats per pixel); ours_bf16 within the reduced-precision bar (argmax equal
on >= 99% of pixels, JS within 0.02 nats per pixel); the benchmark fails otherwise.

Time: each phase runs `warmup` untimed repetitions and then `reps` timed ones (--quick: the
memory-metered cold run is the one warm-up, then one timed run: timing that cold run, as --quick
did before, held a labeling pass refaulting its freshly trimmed heap against a warm generator, and
the compiled bf16 pass read 0.94-1.49x the bf16 generator where warm runs read 0.59-0.74x);
*_ms are medians, *_min_ms minima (on a shared machine the minimum is the better estimate of the
intrinsic cost, the median of what you get).
*_ms is the labeling step alone, given the GenBatch; *_total_ms is gen + labeling of the same
repetition; gen_ms is the generator alone. speedup = naive_ms / ours_ms (labeling only),
speedup_total = naive_total_ms / ours_total_ms, ours_minus_gen_over_gen = (ours_total - gen) / gen
= ours_ms / gen_ms.

Peak memory (MiB): every phase runs in a fresh subprocess (this script re-invoked with --phase),
so no phase inherits allocator caches or fragmentation from another. In it, after setup (models
built, ws made) the phase is first run once on a tiny problem of the same structure (so one-time
library allocations, e.g. MKL/oneDNN buffer pools, are not charged to it); then we collect
garbage, malloc_trim(0), and on CPU reset the kernel's RSS high-water mark (write "5" to
/proc/self/clear_refs: VmHWM := current RSS), read VmRSS as the baseline, run the step, and read
VmHWM: peak = VmHWM - baseline. Exact (the kernel updates it at every page fault), no sampling.
Where clear_refs is not writable a 1 kHz sampling thread of VmRSS is used instead (can miss short
peaks; `mem_method` says which). On CUDA: reset_peak_memory_stats, then max_memory_allocated -
memory_allocated. The memory numbers come from the first real run of each phase.
  *_peak_mb        labeling step alone: extra memory above the state with the GenBatch resident.
  *_total_peak_mb  gen + labeling, above the post-setup baseline (includes the generator's own
                   activations and the taps).
  gen_peak_mb      generator alone.
mem_ratio = naive_peak_mb / ours_peak_mb, mem_ratio_total likewise with *_total_peak_mb.

Threads: torch's default unless --threads. On a CPU shared with other busy processes use
--threads 1: with 2 OpenMP threads on 2 contended cores every parallel op waits for a
descheduled thread (measured here: generator 0.3 s -> 2.2 s, labeling 1.8 s -> 13 s per image).

The LAST line of stdout is one JSON object (see `summarize`). Timings on a shared machine are
noisy: run it a few times and take medians.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from labelfoundry.features import TapSpec, generate_with_taps, pixel_grid, sample_bilinear  # noqa: E402
from labelfoundry.generators.stylegan2 import Generator, StyleGAN2Config  # noqa: E402
from labelfoundry.labelers.base import GenBatch  # noqa: E402
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler  # noqa: E402
from labelfoundry.precision import bf16_autocast_ok  # noqa: E402
from labelfoundry.uncertainty import entropy, js_divergence  # noqa: E402

PHASES = ("ours", "ours_bf16", "naive")
# HandsOffLabeler.label(compiled=True), fp32 / under bf16 autocast: run when asked (--phases); compiled
# before the clock (once per process). Labelers outside handsoff_compiled's `applies` label tiled anyway.
COMPILED_PHASES = ("ours_compiled", "ours_compiled_bf16")
AGREE_MIN = 0.999  # fraction of pixels whose argmax must agree
JS_ATOL = 1e-3  # nats, per pixel
AGREE_MIN_BF16 = 0.99  # the reduced-precision bar (ours_bf16)
JS_ATOL_BF16 = 0.02


@dataclass
class BenchConfig:
    res: int = 256
    batch: int = 2
    channel_base: int = 16384
    channel_max: int = 256
    z_dim: int = 512
    w_dim: int = 512
    map_layers: int = 8
    members: int = 10
    hidden: tuple[int, int] = (256, 32)
    classes: int = 8
    tile_pixels: int | None = HandsOffConfig().tile_pixels  # ours: the shipped default (None: per precision)
    seed: int = 0
    device: str = "cpu"
    warmup: int = 1
    reps: int = 3
    threads: int = 0  # 0 = torch default
    warm_libraries: bool = True  # tiny warm-up run before the memory baseline (see warm_libraries)


# ----------------------------------------------------------------------------- setup


def setup(cfg: BenchConfig, state: str | None = None):
    """Seeded generator, labeler and ws; identical in every process.

    The labeler is randomly initialised and its BatchNorm layers calibrated on pixels of one
    generated image (running mean/var = the actual statistics of their inputs, random affine), so
    hidden units are well scaled and the label maps have several classes with real boundaries
    (with raw random init one class wins almost everywhere and agreement checks would be weak).
    `state`: a file to load the calibrated labeler from, or to save it to if it does not exist.
    """
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    G = Generator(
        resolution=cfg.res, channel_base=cfg.channel_base, channel_max=cfg.channel_max,
        z_dim=cfg.z_dim, w_dim=cfg.w_dim, map_layers=cfg.map_layers,
    ).eval()
    hcfg = HandsOffConfig(members=cfg.members, hidden=tuple(cfg.hidden), tile_pixels=cfg.tile_pixels)
    labeler = HandsOffLabeler(hcfg, hcfg.tap_spec.channels(G.tap_channels), cfg.res, cfg.classes)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    z = torch.randn(cfg.batch, cfg.z_dim, generator=gen)
    G = G.to(dev)
    labeler = labeler.to(dev).eval()
    with torch.no_grad():
        ws = G.mapping(z.to(dev))
    if state and os.path.exists(state):
        labeler.load_state_dict(torch.load(state, map_location=dev))
    else:
        calibrate_bn(labeler, generate(G, labeler, ws[:1]).taps, gen)
        if state:
            torch.save(labeler.state_dict(), state)
    return G, labeler, ws


@torch.no_grad()
def calibrate_bn(labeler: HandsOffLabeler, taps: list[torch.Tensor], gen: torch.Generator, pixels: int = 4096) -> None:
    """BN running stats := statistics of the BN inputs at random pixels; BN affine random."""
    net, R = labeler.net, labeler.resolution
    M, H1, H2 = net.members, net.h1, net.h2
    dev = taps[0].device
    flat = torch.randint(0, R * R, (1, pixels), generator=gen).to(dev)
    grid = pixel_grid(flat // R, flat % R, R)
    x = torch.cat([sample_bilinear(t[:1], grid) for t in taps], dim=-1)[0]  # (P, C) hypercolumn pixels
    a1 = F.linear(x, net.proj.weight, net.proj.bias)  # (P, M*H1)

    def set_bn(bn, a):
        n = bn.num_features
        bn.running_mean.copy_(a.mean(0))
        bn.running_var.copy_(a.var(0) + 1e-3)
        bn.weight.copy_((0.5 + torch.rand(n, generator=gen)).to(dev))
        bn.bias.copy_((0.2 * torch.randn(n, generator=gen)).to(dev))
    set_bn(net.bn1, a1)
    h1 = F.relu(net.bn1(a1)).view(-1, M, H1)
    a2 = (torch.einsum("pmi,moi->pmo", h1, net.w2) + net.b2).reshape(-1, M * H2)
    set_bn(net.bn2, a2)


@torch.no_grad()
def generate(G, labeler: HandsOffLabeler, ws: torch.Tensor) -> GenBatch:
    image, taps = generate_with_taps(G, ws, labeler.tap_spec)
    return GenBatch(ws=ws, image=image, taps=taps)


# ----------------------------------------------------------------------------- naive (the papers' way)


def naive_members(labeler: HandsOffLabeler) -> list[nn.Sequential]:
    """One nn.Sequential pixel classifier per member, weights copied from the EnsembleMLP."""
    net = labeler.net
    M, H1, H2, K = net.members, net.h1, net.h2, net.out
    C = net.proj.weight.shape[1]
    dev = net.proj.weight.device
    members = []
    with torch.no_grad():
        for m in range(M):
            seq = nn.Sequential(
                nn.Linear(C, H1), nn.BatchNorm1d(H1), nn.ReLU(),
                nn.Linear(H1, H2), nn.BatchNorm1d(H2), nn.ReLU(),
                nn.Linear(H2, K),
            ).to(dev)
            s1, s2 = slice(m * H1, (m + 1) * H1), slice(m * H2, (m + 1) * H2)
            seq[0].weight.copy_(net.proj.weight[s1])
            seq[0].bias.copy_(net.proj.bias[s1])
            seq[3].weight.copy_(net.w2[m])
            seq[3].bias.copy_(net.b2[m])
            seq[6].weight.copy_(net.w3[m])
            seq[6].bias.copy_(net.b3[m])
            for bn_seq, bn_ens, s in ((seq[1], net.bn1, s1), (seq[4], net.bn2, s2)):
                bn_seq.weight.copy_(bn_ens.weight[s])
                bn_seq.bias.copy_(bn_ens.bias[s])
                bn_seq.running_mean.copy_(bn_ens.running_mean[s])
                bn_seq.running_var.copy_(bn_ens.running_var[s])
                bn_seq.eps = bn_ens.eps
            members.append(seq.eval())
    return members


@torch.no_grad()
def naive_label(members: list[nn.Sequential], taps: list[torch.Tensor], resolution: int):
    """Full-resolution hypercolumn + M pixel MLPs in sequence -> (label uint8 (N,R,R), JS (N,R,R))."""
    R = resolution
    n = taps[0].shape[0]
    C = sum(t.shape[1] for t in taps)
    # The (N, C, R, R) hypercolumn, stored channels-last so that its (N*R*R, C) pixel matrix is a view.
    storage = torch.empty(n, R, R, C, device=taps[0].device, dtype=torch.float32)
    hyper = storage.permute(0, 3, 1, 2)
    c0 = 0
    for t in taps:
        c = t.shape[1]
        up = F.interpolate(t.contiguous(memory_format=torch.channels_last), size=(R, R), mode="bilinear", align_corners=False)
        hyper[:, c0 : c0 + c].copy_(up)
        del up
        c0 += c
    x = storage.view(n * R * R, C)
    probs = torch.stack([mlp(x).softmax(-1) for mlp in members], dim=1)  # (P, M, K)
    label = probs.mean(1).argmax(-1).to(torch.uint8).view(n, R, R)
    js = js_divergence(probs).view(n, R, R)
    return label, js


# ----------------------------------------------------------------------------- measurement


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _proc_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMeter:
    """Peak memory increase of one step over the memory in use when `start()` is called (MiB)."""

    def __init__(self, device: torch.device):
        self.dev = device
        self.method = "cuda-max-allocated" if device.type == "cuda" else self._cpu_method()
        self._thread = None

    @staticmethod
    def _cpu_method() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "vmhwm-reset"
        except OSError:
            return "rss-sampler" if _proc_kb("VmRSS") is not None else "ru_maxrss"

    def start(self) -> float:
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev) / 2**20
            return self.base
        _malloc_trim()
        if self.method == "vmhwm-reset":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _proc_kb("VmRSS") / 1024
        elif self.method == "rss-sampler":
            self.base = self._peak = _proc_kb("VmRSS") / 1024
            self._stop = threading.Event()

            def sample():
                while not self._stop.is_set():
                    self._peak = max(self._peak, _proc_kb("VmRSS") / 1024)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        else:
            import resource

            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self.base

    def stop(self) -> tuple[float, float]:
        """(peak increase, absolute peak) in MiB."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            peak = torch.cuda.max_memory_allocated(self.dev) / 2**20
        elif self.method == "vmhwm-reset":
            peak = _proc_kb("VmHWM") / 1024
        elif self.method == "rss-sampler":
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _proc_kb("VmRSS") / 1024)
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return max(0.0, peak - self.base), peak


def make_label_fn(phase: str, labeler: HandsOffLabeler, cfg: BenchConfig, G=None):
    """phase -> fn(GenBatch) -> (label uint8 (N,R,R), JS (N,R,R))."""
    if phase in ("ours", "ours_bf16") + COMPILED_PHASES:
        compiled, bf16 = "compiled" in phase, phase.endswith("bf16")

        def fn_variant(batch):
            with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=bf16):
                out = labeler.label(batch, compiled=compiled)
            return out.label, out.uncertainty
        return fn_variant
    if phase == "naive":
        members = naive_members(labeler)
        return lambda batch: naive_label(members, batch.taps, labeler.resolution)
    raise ValueError(f"unknown phase {phase!r}")


def warm_libraries(phase: str, cfg: BenchConfig) -> None:
    """Run generator + phase once on a tiny problem of the same structure, so that one-time
    allocations of the libraries (MKL/oneDNN buffer pools, thread-local scratch, lazily loaded
    kernels) happen before the memory baseline and are not charged to the measured step."""
    phase = phase.replace("_compiled", "")  # run_phase compiles at full size; a tiny graph would be a second compilation
    tiny = BenchConfig(**{
        **asdict(cfg), "res": min(cfg.res, 64), "batch": 1, "channel_base": 1024, "channel_max": 32,
        "z_dim": 32, "w_dim": 32, "map_layers": 2,
    })
    G, labeler, ws = setup(tiny)
    make_label_fn(phase, labeler, tiny, G)(generate(G, labeler, ws))


def run_phase(phase: str, cfg: BenchConfig, G=None, labeler=None, ws=None, save: str | None = None, state: str | None = None) -> dict:
    """Setup (unless given), then: cold run under the memory meter, `warmup` more untimed runs,
    `reps` timed runs (with warmup == 0 the cold run is the first timed run)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if G is None:
        G, labeler, ws = setup(cfg, state)
    dev = torch.device(cfg.device)
    if cfg.warm_libraries:
        warm_libraries(phase, cfg)
    fn = make_label_fn(phase, labeler, cfg, G)
    if "compiled" in phase:  # compile before the meter and the clock: a one-time cost per process, not per image
        fn(generate(G, labeler, ws))
    meter = PeakMeter(dev)

    meter.start()
    _sync(dev)
    t0 = time.perf_counter()
    batch = generate(G, labeler, ws)
    _sync(dev)
    t1 = time.perf_counter()
    gen_peak, gen_abs = meter.stop()
    base_total = meter.base  # post-setup baseline
    meter.start()  # new baseline: GenBatch resident
    _sync(dev)
    t2 = time.perf_counter()
    label, js = fn(batch)
    _sync(dev)
    t3 = time.perf_counter()
    label_peak, label_abs = meter.stop()
    total_peak = max(gen_abs, label_abs) - base_total
    gen_ms, label_ms = [], []
    if cfg.warmup == 0:
        gen_ms.append((t1 - t0) * 1e3)
        label_ms.append((t3 - t2) * 1e3)
    result_label, result_js = label.cpu(), js.float().cpu()
    del batch, label, js
    for i in range(max(0, cfg.warmup - 1) + cfg.reps - (1 if cfg.warmup == 0 else 0)):
        _sync(dev)
        t0 = time.perf_counter()
        batch = generate(G, labeler, ws)
        _sync(dev)
        t1 = time.perf_counter()
        out = fn(batch)
        _sync(dev)
        t2 = time.perf_counter()
        del batch, out
        if i >= max(0, cfg.warmup - 1):
            gen_ms.append((t1 - t0) * 1e3)
            label_ms.append((t2 - t1) * 1e3)
    gen_bf16_ms = []
    if phase.endswith("bf16"):  # the generator under the same autocast: what this labeling is held against
        for i in range(max(1, cfg.warmup) + cfg.reps):
            _sync(dev)
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = generate(G, labeler, ws)
            _sync(dev)
            del out
            if i >= max(1, cfg.warmup):
                gen_bf16_ms.append((time.perf_counter() - t0) * 1e3)
    if save:
        torch.save({"label": result_label, "js": result_js}, save)
    totals = [g + l for g, l in zip(gen_ms, label_ms)]
    return {
        "phase": phase,
        "gen_ms": gen_ms,
        "gen_bf16_ms": gen_bf16_ms,
        "label_ms": label_ms,
        "total_ms": totals,
        "gen_peak_mb": gen_peak,
        "label_peak_mb": label_peak,
        "total_peak_mb": total_peak,
        "mem_method": meter.method,
        "threads": torch.get_num_threads(),
        "outputs": None if save else {"label": result_label, "js": result_js},
    }


def agreement(a: dict, b: dict) -> dict:
    la, lb = a["label"], b["label"]
    ja, jb = a["js"], b["js"]
    return {
        "argmax_agree": float((la == lb).float().mean()),
        "js_max_abs_diff": float((ja - jb).abs().max()),
        "js_mean": float(ja.mean()),
    }


def tap_info(cfg: BenchConfig) -> tuple[list[int], list[int]]:
    """(channels, resolutions) of the generator's taps, without building it."""
    c = StyleGAN2Config(resolution=cfg.res, channel_base=cfg.channel_base, channel_max=cfg.channel_max)
    res = [4] + [r for r in c.block_resolutions[1:] for _ in range(2)]
    return [c.channels[r] for r in res], res


def gflop_per_image(cfg: BenchConfig) -> dict[str, float]:
    """Multiply-add work per image (GFLOP, 2 per MAC) of the dominant terms:
    gen: the 3x3 modulated convs (conv0 as a stride-2 transposed conv on its input grid) + toRGB;
    naive: R^2 * C * M*H1 (first layers) + head; ours_min: the first layer evaluated at each tap's
    native resolution, sum_r r^2 * C_r * M*H1, + the same head (the floor of any exact
    factorized evaluation; bilinear interpolation not counted). speedup_bound = naive / ours_min."""
    c = StyleGAN2Config(resolution=cfg.res, channel_base=cfg.channel_base, channel_max=cfg.channel_max)
    ch = c.channels
    gen = 0.0
    for r in c.block_resolutions:
        if r > 4:
            gen += (r // 2) ** 2 * 9 * ch[r // 2] * ch[r]  # conv0 (up)
        gen += r * r * 9 * ch[r] * ch[r] + r * r * ch[r] * 3  # conv1, toRGB
    tap_ch, tap_res = tap_info(cfg)
    mh1 = cfg.members * cfg.hidden[0]
    head = cfg.res**2 * cfg.members * (cfg.hidden[0] * cfg.hidden[1] + cfg.hidden[1] * cfg.classes)
    naive = cfg.res**2 * sum(tap_ch) * mh1 + head
    ours = sum(r * r * c_ * mh1 for c_, r in zip(tap_ch, tap_res)) + head
    g = {"gen": 2 * gen / 1e9, "naive": 2 * naive / 1e9, "ours_min": 2 * ours / 1e9}
    g = {k: round(v, 1) for k, v in g.items()}
    g["speedup_bound"] = round(naive / ours, 2)
    g["ours_min_over_gen"] = round(ours / gen, 2)
    return g


def _med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _sfx(phase: str) -> str:
    """Key suffix of an ours* phase: ours -> '', ours_bf16 -> '_bf16', ours_compiled -> '_compiled'."""
    return phase[len("ours"):]


def summarize(cfg: BenchConfig, results: dict[str, dict], agree: dict[str, dict]) -> dict:
    """The final JSON object (last line of stdout)."""
    ch, res_list = tap_info(cfg)
    gen_all = [x for r in results.values() for x in r["gen_ms"]]
    gen_ms = _med(gen_all)
    gen_peak = _med([r["gen_peak_mb"] for r in results.values()])
    out = {
        "res": cfg.res,
        "batch": cfg.batch,
        "channels": {str(r): c for r, c in sorted(set(zip(res_list, ch)))},
        "channel_base": cfg.channel_base,
        "channel_max": cfg.channel_max,
        "taps": len(ch),
        "hypercolumn_C": sum(ch),
        "members": cfg.members,
        "hidden": list(cfg.hidden),
        "classes": cfg.classes,
        "threads": next(iter(results.values()))["threads"],
        "device": cfg.device,
        "device_name": _device_name(cfg.device),
        "warmup": cfg.warmup,
        "reps": cfg.reps,
        "mem_method": next(iter(results.values()))["mem_method"],
        "gen_ms": round(gen_ms, 1),
        "gen_min_ms": round(min(gen_all), 1),
        "gen_peak_mb": round(gen_peak, 1),
        "gflop_per_image": gflop_per_image(cfg),
    }
    for ph, r in results.items():
        out[f"{ph}_ms"] = round(_med(r["label_ms"]), 1)
        out[f"{ph}_min_ms"] = round(min(r["label_ms"]), 1)
        out[f"{ph}_total_ms"] = round(_med(r["total_ms"]), 1)
        out[f"{ph}_peak_mb"] = round(r["label_peak_mb"], 1)
        out[f"{ph}_total_peak_mb"] = round(r["total_peak_mb"], 1)
    ours_phases = [ph for ph in results if ph.startswith("ours")]
    if "naive" in results:
        for ph in ours_phases:
            sfx = _sfx(ph)
            out[f"speedup{sfx}"] = round(out["naive_ms"] / out[f"{ph}_ms"], 2)
            out[f"speedup_total{sfx}"] = round(out["naive_total_ms"] / out[f"{ph}_total_ms"], 2)
            out[f"mem_ratio{sfx}"] = round(out["naive_peak_mb"] / max(out[f"{ph}_peak_mb"], 1e-3), 2)
            out[f"mem_ratio_total{sfx}"] = round(out["naive_total_peak_mb"] / max(out[f"{ph}_total_peak_mb"], 1e-3), 2)
    for ph in ours_phases:
        out[f"ours_minus_gen_over_gen{_sfx(ph)}"] = round(out[f"{ph}_ms"] / gen_ms, 3)
    bf16_phases = [p for p in ours_phases if p.endswith("bf16")]
    gen_bf16 = [x for r in results.values() for x in r.get("gen_bf16_ms", [])]
    if gen_bf16:  # bf16 labeling against the bf16 generator
        out["gen_bf16_ms"] = round(_med(gen_bf16), 1)
        for ph in bf16_phases:
            out[f"{ph}_over_gen_bf16"] = round(out[f"{ph}_ms"] / out["gen_bf16_ms"], 3)
    for k, v in agree.items():
        out[f"agree_{k}"] = round(v["argmax_agree"], 6)
        out[f"js_max_abs_diff_{k}"] = float(f"{v['js_max_abs_diff']:.3g}")
    if agree:
        out["js_mean"] = float(f"{next(iter(agree.values()))['js_mean']:.4g}")
    # fp32 vs fp32: 70% of the FLOP bound (7x at 256^2); memory 20x; the bf16 labeling no slower
    # than the generator's forward (against the bf16 generator where measured, else the fp32 one)
    bound = out["gflop_per_image"]["speedup_bound"]
    targets_speed = 7.0 if cfg.res <= 256 else round(0.7 * bound, 1)
    out["targets"] = {"speedup_min": targets_speed, "mem_ratio_min": 20.0, "bf16_label_over_gen_max": 1.0}
    met = {}
    if "speedup" in out:
        met["speedup"] = out["speedup"] >= targets_speed
        met["mem_ratio"] = out["mem_ratio"] >= 20.0
    if bf16_phases:  # the faster of the bf16 paths (eager tiled, compiled)
        met["bf16_label_over_gen"] = min(out.get(f"{p}_over_gen_bf16", out[f"ours_minus_gen_over_gen{_sfx(p)}"])
                                         for p in bf16_phases) <= 1.0
    out["targets_met"] = met
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return "cpu"


def check_agreement(agree: dict[str, dict]) -> list[str]:
    """Failures of the agreement bars (the exact one, or the reduced-precision one for *_bf16)."""
    bad = []
    for k, v in agree.items():
        lo, tol = (AGREE_MIN_BF16, JS_ATOL_BF16) if "bf16" in k else (AGREE_MIN, JS_ATOL)
        if v["argmax_agree"] < lo or v["js_max_abs_diff"] > tol:
            bad.append(f"{k}: argmax agree {v['argmax_agree']:.6f} (min {lo}), JS max diff {v['js_max_abs_diff']:.3g} (max {tol})")
    return bad


def run_all(cfg: BenchConfig, phases=PHASES, in_process: bool = False, log=print) -> dict:
    """Every phase (in a fresh subprocess unless in_process), agreement checks, the summary dict."""
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "labeler.pt")
        if in_process:
            G, labeler, ws = setup(cfg)
        else:  # build + calibrate once here; every child loads the same labeler state
            setup(cfg, state)
        for ph in phases:
            if in_process:
                r = run_phase(ph, cfg, G, labeler, ws)
                outputs[ph] = r.pop("outputs")
            else:
                save = os.path.join(tmp, f"{ph}.pt")
                cmd = [
                    sys.executable, os.path.abspath(__file__), "--phase", ph, "--save", save, "--state", state,
                    "--config-json", json.dumps(asdict(cfg)),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"phase {ph} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                outputs[ph] = torch.load(save)
            results[ph] = r
            log(f"# {ph:8s} gen {_med(r['gen_ms']):9.1f} ms  label {_med(r['label_ms']):9.1f} ms "
                f"(runs {[round(x) for x in r['label_ms']]})  label peak {r['label_peak_mb']:8.1f} MiB  "
                f"gen+label peak {r['total_peak_mb']:8.1f} MiB")
    agree = {}
    if "naive" in outputs:
        for ph in outputs:
            if ph.startswith("ours"):
                agree[f"{ph}_vs_naive"] = agreement(outputs["naive"], outputs[ph])
    elif "ours" in outputs:
        for ph in outputs:
            if ph.startswith("ours") and ph != "ours":
                agree[f"{ph}_vs_ours"] = agreement(outputs["ours"], outputs[ph])
    summary = summarize(cfg, results, agree)
    summary["agreement_failures"] = check_agreement(agree)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256^2, batch 1, one warm-up (the memory-metered run), one timed run per phase")
    p.add_argument("--res", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--channel-base", type=int, default=16384)
    p.add_argument("--channel-max", type=int, default=256)
    p.add_argument("--members", type=int, default=10, help="10 (the paper's; the issue's reference); the shipped default is 3")
    p.add_argument("--hidden", default="256,32", help="H1,H2 (the paper's); the shipped default is 128,32")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--tile-pixels", type=int, default=HandsOffConfig().tile_pixels,
                   help="ours: output pixels per CPU tile (default: HandsOffConfig.tile_pixels, chosen per precision)")
    p.add_argument("--phases", default=None, help="comma-separated, from " + ",".join(PHASES + COMPILED_PHASES)
                   + " (default: all; ours_bf16 only where bf16 pays on the device)")
    p.add_argument("--in-process", action="store_true", help="all phases in this process (memory numbers less reliable)")
    p.add_argument("--phase", choices=PHASES + COMPILED_PHASES, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    p.add_argument("--config-json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.phase:  # child: one phase, JSON on the last line
        cfg = BenchConfig(**json.loads(a.config_json))
        cfg.hidden = tuple(cfg.hidden)
        r = run_phase(a.phase, cfg, save=a.save, state=a.state)
        r.pop("outputs")
        print(json.dumps(r))
        return 0

    res = a.res or 256
    cfg = BenchConfig(
        res=res,
        batch=a.batch or (1 if a.quick else 2 if res <= 256 else 1),
        channel_base=a.channel_base, channel_max=a.channel_max, members=a.members, classes=a.classes,
        hidden=tuple(int(x) for x in a.hidden.split(",")), tile_pixels=a.tile_pixels,
        device=a.device, threads=a.threads,
        warmup=a.warmup if a.warmup is not None else 1,
        reps=a.reps if a.reps is not None else (1 if a.quick else 3),
    )
    if a.phases is None:
        phases = [ph for ph in PHASES if ph != "ours_bf16" or bf16_autocast_ok(a.device)]
    else:
        phases = [x for x in a.phases.split(",") if x]
    t0 = time.time()
    summary = run_all(cfg, phases, in_process=a.in_process, log=lambda s: print(s, flush=True))
    summary["bench_wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(summary), flush=True)
    if summary["agreement_failures"]:
        print("# AGREEMENT FAILED: " + "; ".join(summary["agreement_failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
