"""How good is a generator of the built-in domain: fidelity, coverage, rare parts and head-size spread.

Inception features mean little on toy faces and need downloads, so every figure here is measured in
the eyes of our own *scorer*: a small part segmenter trained on real renders. Its pooled mid-level
features give the Fréchet distance and the k-NN manifold precision/recall of Kynkäänniemi et al.
(2019); its predictions give the rate at which generated faces carry each rare part and the spread
of the head's area. Real-vs-disjoint-real FD, precision and recall are reported beside them as the
scale of "as good as real" (k-NN recall between two finite real sets is well below 1), and so is the
metric's response to known changes of real images (`calibration`): 4/255 of pixel noise, a 0.5-px
blur, and half the hair styles dropped (a real loss of coverage).

The scorer is trained with light blur and pixel noise: trained on clean renders only, its features
took 4/255 of invisible noise on real images for a new domain (recall 0.03, FD 41, where the shipped
generator scores 0.07 and 9.1), so they measured pixel exactness more than fidelity and coverage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .domains import toyfaces
from .evaluation import toyfaces_split
from .sampling import oversample_weights
from .segmenters import Segmenter, SegmenterConfig, TrainConfig, build_segmenter, train_segmenter


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row (the radius of its manifold ball)."""
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    d2, _ = index.search(x, k + 1)  # the first neighbour is the point itself
    return np.sqrt(np.maximum(d2[:, k], 0.0))


def _covered(query: np.ndarray, support: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each query row: does it fall inside the ball of at least one support row?"""
    out = np.zeros(len(query), bool)
    s = torch.from_numpy(support)
    r = torch.from_numpy(radii)
    for i in range(0, len(query), chunk):
        d = torch.cdist(torch.from_numpy(query[i : i + chunk]), s)  # exact, fp32
        out[i : i + chunk] = (d <= r[None]).any(1).numpy()
    return out


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    precision: fraction of generated samples inside the real manifold (the union of balls around
    each real sample reaching its k-th real neighbour); recall: fraction of real samples inside the
    generated manifold. Identical sets give (1, 1); disjoint, far-apart sets give (0, 0).
    """
    fake_in, real_in = knn_membership(real, fake, k)
    return float(fake_in.mean()), float(real_in.mean())


def knn_membership(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the two halves of `knn_precision_recall`: (is each generated sample inside the real
    manifold, is each real sample inside the generated manifold), bool arrays."""
    real = np.ascontiguousarray(real, np.float32)
    fake = np.ascontiguousarray(fake, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with one D; got {real.shape} and {fake.shape}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples in each set; got {len(real)} real, {len(fake)} generated")
    return _covered(fake, real, _knn_radii(real, k)), _covered(real, fake, _knn_radii(fake, k))


@dataclass(frozen=True)
class ScorerSpec:
    """The scorer segmenter: trained on real renders, seeded, so one spec gives one scorer."""

    resolution: int
    train_images: int = 4000
    steps: int = 1500
    width: int = 32
    seed: int = 0
    rare_draws: float = 0.3  # fraction of training draws showing a rare part, so the scorer learns to find them
    blur_sigma: float = 0.6  # training augmentation (augment_batch): pixel-level changes no viewer sees
    pixel_noise: float = 0.04  # (5/255); 0 and 0 give the clean-render scorer of the earlier figures

    def key(self) -> str:
        # augmentation fields enter the key only when on, so clean scorers cached before they existed keep their key
        d = {k: v for k, v in self.__dict__.items() if not (k in ("blur_sigma", "pixel_noise") and v == 0)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def train_scorer(spec: ScorerSpec, cache_dir: str | Path) -> Segmenter:
    """Train the scorer once per spec, cached under `cache_dir` (its weights are the determinism)."""
    cache = Path(cache_dir) / f"scorer-{spec.key()}"
    weights = cache / "scorer.pt"
    torch.manual_seed(spec.seed)
    model = build_segmenter(SegmenterConfig(arch="tiny_unet", num_classes=len(toyfaces.CLASSES), tiny_width=spec.width,
                                            pretrained_backbone=False))
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval()
    data = toyfaces_split("train", spec.train_images, spec.resolution, offset=700_000)
    rare_ids = [toyfaces.CLASSES.index(c) for c in toyfaces.RARE_CLASSES]
    frac = pd.DataFrame({"frac_rare": np.isin(data.masks, rare_ids).mean((1, 2))})
    draws = oversample_weights(frac, {"rare": spec.rare_draws})
    tcfg = TrainConfig(max_steps=spec.steps, batch_size=32, seed=spec.seed, checkpoint_every=10**9,
                       blur_sigma=spec.blur_sigma, pixel_noise=spec.pixel_noise)
    train_segmenter(model, data, tcfg,
                    task="segmentation", out_dir=cache / "train", device="cpu", sample_weights=draws.tolist())
    with atomic_path(weights) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()


def scorer_outputs(model: Segmenter, images: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """images (N,3,R,R) in [-1,1] -> (pooled mid-level features (N, D), predicted class maps (N,R,R))."""
    net = model.net
    feats, preds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i : i + batch].float()
            e1 = net.enc1(x)
            e2 = net.enc2(F.max_pool2d(e1, 2))
            m = net.mid(F.max_pool2d(e2, 2))
            d2 = net.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:], mode="nearest"), e2], 1))
            feats.append(torch.cat([m.mean((2, 3)), m.amax((2, 3)), d2.mean((2, 3)), d2.amax((2, 3))], 1))
            preds.append(model(x).argmax(1).to(torch.uint8))
    return torch.cat(feats).double().numpy(), torch.cat(preds).numpy()


def uint8_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,H,W) in [-1, 1], the generator's range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _fd_precision_recall(f_real: np.ndarray, f: np.ndarray, k: int) -> dict[str, float]:
    precision, recall = knn_precision_recall(f_real, f, k=k)
    return {"fd": frechet_distance(f_real, f), "precision": precision, "recall": recall}


def calibration(scorer: Segmenter, f_real: np.ndarray, real2: torch.Tensor, f_real2: np.ndarray, real2_seeds: list[int],
                k: int) -> dict:
    """FD, precision and recall of disjoint real images changed in known ways, against `f_real`:
    the scale on which to read a generator's figures (which changes the metric forgives, which it sees)."""
    from kornia.filters import gaussian_blur2d  # the blur the scorer's training augmentation uses

    g = torch.Generator().manual_seed(0)
    noisy = (real2 + (4 / 127.5) * torch.randn(real2.shape, generator=g)).clamp(-1, 1)
    styles = np.array([int(toyfaces.face_params(s)["hair_style"]) for s in real2_seeds])
    keep = np.resize(np.flatnonzero(styles < 2), len(real2))  # short and medium hair only, as many images
    return {
        "noise_4of255": _fd_precision_recall(f_real, scorer_outputs(scorer, noisy)[0], k),
        "blur_0.5px": _fd_precision_recall(f_real, scorer_outputs(scorer, gaussian_blur2d(real2, (5, 5), (0.5, 0.5), border_type="reflect"))[0], k),
        "half_hair_styles": _fd_precision_recall(f_real, f_real2[keep], k),
    }


RARE_MIN_FRACTION = 0.004  # share of an image's pixels a part must cover to count as present


def presence(pred: np.ndarray, cls: int, min_fraction: float) -> np.ndarray:
    """Per image: does the class cover at least `min_fraction` of the pixels?"""
    return (pred == cls).mean((1, 2)) >= min_fraction


def head_fraction(pred: np.ndarray) -> np.ndarray:
    """Per image: fraction of pixels that are not background (face, hair and accessories)."""
    return (pred != toyfaces.CLASSES.index("background")).mean((1, 2))


def generator_quality(G, scorer: Segmenter, n: int = 2000, k: int = 3, min_fraction: float = RARE_MIN_FRACTION,
                      batch: int = 250, kimg: float | None = None) -> dict:
    """Every figure of a generator's quality on the built-in domain (see the module docstring).

    Real sets are disjoint test and val renders; generated images come from seeds 0..n-1 with constant
    noise, so a given model and scorer always give the same numbers.
    """
    R = G.resolution
    real_seeds = toyfaces.split_seeds("test", n)
    real_render = [toyfaces.render(real_seeds[i : i + 500], R) for i in range(0, n, 500)]
    real_img = np.concatenate([r["image"] for r in real_render])
    has = {"glasses": np.concatenate([r["has_glasses"] for r in real_render]),
           "hat": np.concatenate([r["has_hat"] for r in real_render])}
    real2_seeds = toyfaces.split_seeds("val", n, offset=10_000)
    real2_img = toyfaces.render_images(real2_seeds, R)
    with torch.no_grad():
        fake = torch.cat([G(G.z_from_seeds(list(range(i, min(i + batch, n)))), noise_mode="const").clamp(-1, 1)
                          for i in range(0, n, batch)])
    f_real, p_real = scorer_outputs(scorer, uint8_to_tensor(real_img))
    real2 = uint8_to_tensor(real2_img)
    f_real2, _ = scorer_outputs(scorer, real2)
    f_fake, p_fake = scorer_outputs(scorer, fake)
    fake_in, real_covered = knn_membership(f_real, f_fake, k=k)
    real2_in, real_covered_by_real2 = knn_membership(f_real, f_real2, k=k)
    rare_rate, domain_rate, scorer_rate_real, rare_recall, rare_recall_real = {}, {}, {}, {}, {}
    for name in toyfaces.RARE_CLASSES:
        c = toyfaces.CLASSES.index(name)
        rare_rate[name] = float(presence(p_fake, c, min_fraction).mean())
        domain_rate[name] = float(has[name].mean())
        scorer_rate_real[name] = float(presence(p_real, c, min_fraction).mean())
        rare_recall[name] = float(real_covered[has[name]].mean()) if has[name].any() else None
        rare_recall_real[name] = float(real_covered_by_real2[has[name]].mean()) if has[name].any() else None
    return {
        "kimg": kimg,
        "n": n,
        "fd": frechet_distance(f_real, f_fake),
        "fd_real": frechet_distance(f_real, f_real2),
        "precision": float(fake_in.mean()),
        "recall": float(real_covered.mean()),
        "precision_real": float(real2_in.mean()),
        "recall_real": float(real_covered_by_real2.mean()),
        "rare_rate": rare_rate,
        "domain_rate": domain_rate,
        "scorer_rate_on_real": scorer_rate_real,
        "rare_recall": rare_recall,  # of the real faces with the part, the share inside the generated manifold
        "rare_recall_real": rare_recall_real,  # the same for disjoint real faces: its ceiling
        "head_size_std_ratio": float(head_fraction(p_fake).std() / head_fraction(p_real).std()),
        "calibration": calibration(scorer, f_real, real2, f_real2, real2_seeds, k),
    }
