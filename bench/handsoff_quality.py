"""HandsOff label quality on the built-in domain, where exact labels are known: the ablation bench.

Invert N labeled train-pool faces (a subset other than the headline's: `--offset`), fit the label
generator once per variant and fit seed, then label the *inverted* faces (the labeled ones, and
held-out val faces) and compare with their exact labels. What it reports per variant:
- parts mIoU and per-class IoU on inverted val faces (mean ± std over fit seeds) and on the inverted
  labeled faces themselves (train: how well the fit reproduces its own labels through the inversion);
- how much the labels vary with the image: std of the labels' foreground-area fraction and of
  their foreground centroid (x, y) over the val faces, as ratios to the same figures of the exact
  labels (1.0: as varied as the faces; a mean face gives ~0);
- whether the JS uncertainty is informative (mean JS on wrong vs right pixels);
- fit and labeling time;
- with `--generated N`: the labels of N generated images (the factory's own output, which no
  inversion touches) against a segmenter trained on real renders (the cached scorer of
  bench/generator_quality.py, which also finds the rare parts): pooled per-class IoU and, per rare
  class, the share of images whose labels draw it next to the share where the scorer finds it;
- with `--downstream STEPS` as well: what those labels are worth downstream. A tiny U-Net (the
  headline's: batch 32, STEPS steps, one thread, seeds --downstream-seeds) is trained on the N
  generated images with the labels of each variant's first fit seed, and once on the same images
  with the scorer's predictions as labels ("reference": labels as good as a segmenter trained on
  thousands of real renders, the most any labeler could give *these* images), and tested on
  --test real renders. The reference row is the generator's ceiling: what is left between it and
  the oracle is the generator's share of the gap, between it and a variant the labeler's.
Inversion quality (reconstruction MSE per image, worst and median) is reported once; inversions are
cached in --cache per (generator, split, offset, n, inversion config). A per-pixel RGB-only MLP on
the same labeled faces is the no-generator control.

    python bench/handsoff_quality.py                                   # the defaults, 2 fit seeds
    python bench/handsoff_quality.py --variant h128:hidden=128,32 --variant rgb:include_rgb=true \\
        --variant bal:class_balanced=true --variant long:min_steps=1200 --seeds 0,1
    python bench/handsoff_quality.py --offset 0 --seeds 0 --generated 1000 --inv-steps 1000 --inv-c-reg none
    python bench/handsoff_quality.py --offset 0 --val 16 --seeds 0 --generated 3000 --downstream 1000 --workers 2

A variant is NAME:key=value,... over HandsOffConfig fields (values parsed as YAML; a comma inside a
tuple value is fine: `hidden=128,32`). `default` (no overrides) is measured first unless --no-default.
The last line of stdout is one JSON object {variant: {...}, "_inversion": {...}}; --out writes it too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from labelfoundry.domains import toyfaces
from labelfoundry.evaluation import ArrayDataset, toyfaces_split, train_and_evaluate
from labelfoundry.features import generate_with_taps
from labelfoundry.generation import generate_samples
from labelfoundry.generator_quality import RARE_MIN_FRACTION, ScorerSpec, presence, scorer_outputs, train_scorer, uint8_to_tensor
from labelfoundry.generators import load_networks
from labelfoundry.inversion.optimize import InversionConfig, InversionResult, invert
from labelfoundry.labelers import FitData, GenBatch
from labelfoundry.labelers.handsoff import HandsOffConfig, HandsOffLabeler
from labelfoundry.segmenters.metrics import segmentation_iou
from labelfoundry.segmenters.train import TrainConfig


def rgb_baseline(train_img: np.ndarray, train_mask: np.ndarray, test_img: np.ndarray, k: int, steps: int = 1500) -> torch.Tensor:
    """Per-pixel MLP on RGB only (the 'no generator features' control)."""
    torch.manual_seed(0)
    x = torch.from_numpy(train_img.reshape(-1, 3)).float() / 127.5 - 1
    y = torch.from_numpy(train_mask.reshape(-1)).long()
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, k))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (4096,))
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        xt = torch.from_numpy(test_img.reshape(-1, 3)).float() / 127.5 - 1
        return net(xt).argmax(-1).reshape(test_img.shape[:3])


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:key=v,key=v1,v2' -> (name, {key: v, key: [v1, v2]}), values parsed as YAML and checked
    against HandsOffConfig (a typo fails here, before any fitting)."""
    name, _, body = text.partition(":")
    if not name or not re.fullmatch(r"[\w.-]+", name):
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value,... (NAME of letters, digits, _ . -)")
    over: dict = {}
    for part in re.split(r",(?=\w+=)", body) if body else []:
        key, eq, val = part.partition("=")
        if not eq:
            raise SystemExit(f"--variant {text!r}: {part!r} is not key=value")
        v = yaml.safe_load(f"[{val}]" if "," in val else val)
        over[key.strip()] = v
    HandsOffConfig(**over)  # validates names and types now
    return name, over


def spread(masks: torch.Tensor) -> dict:
    """Std over images of the foreground (class > 0) area fraction and centroid (in pixels)."""
    fg = (masks > 0).float()
    n, h, w = fg.shape
    area = fg.mean((1, 2))
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    tot = fg.sum((1, 2)).clamp_min(1)
    cy = (fg.sum(2) * ys).sum(1) / tot
    cx = (fg.sum(1) * xs).sum(1) / tot
    return {"area": area.std().item(), "cx": cx.std().item(), "cy": cy.std().item()}


def inverted(G, split: str, n: int, offset: int, cfg: InversionConfig, cache: Path, tag: str):
    """(samples, inversion) for n faces of a split from `offset`; cached per generator + config."""
    samples = toyfaces.samples(split, n, G.resolution, offset=offset)
    key = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:10]
    path = cache / f"inv-{tag}-{split}-{offset}-{n}-{key}.pt"
    if path.exists():
        return samples, InversionResult.load(path)
    cache.mkdir(parents=True, exist_ok=True)
    res = invert(G, np.stack([s.image for s in samples]), cfg, ids=[s.sample_id for s in samples])
    res.save(path)
    return samples, res


@torch.no_grad()
def label_all(G, lab: HandsOffLabeler, ws: torch.Tensor, batch: int = 16):
    labels, unc = [], []
    for i in range(0, len(ws), batch):
        img, taps = generate_with_taps(G, ws[i : i + batch], lab.tap_spec)
        out = lab.label(GenBatch(ws[i : i + batch], img, taps, G=G))
        labels.append(out.label.long())
        unc.append(out.uncertainty)
    return torch.cat(labels), torch.cat(unc)


def generated_agreement(G, lab: HandsOffLabeler, scorer, n: int, k: int) -> tuple[dict, dict[str, np.ndarray]]:
    """The labels of n generated images (fixed seeds) against the scorer's predictions on them;
    also returns the images, the labels and the scorer's predictions."""
    arrays, _ = generate_samples(G, lab, list(range(n)), 12345, store_w=False)
    _, pred = scorer_outputs(scorer, uint8_to_tensor(arrays["image"]))
    _, per = segmentation_iou(torch.from_numpy(arrays["label"]).long(), torch.from_numpy(pred).long(), k)
    rare = {c: {src: float(presence(m, toyfaces.CLASSES.index(c), RARE_MIN_FRACTION).mean())
                for src, m in (("labels", arrays["label"]), ("scorer", pred))} for c in toyfaces.RARE_CLASSES}
    data = {"image": arrays["image"], "label": arrays["label"], "reference": pred.astype(np.uint8)}
    return {"gen_parts_miou": float(np.mean(per[1:])), "gen_per": per, "rare": rare}, data


def downstream_score(images: np.ndarray, labels: np.ndarray, test_data: ArrayDataset, steps: int, seed: int) -> dict:
    """The headline's downstream segmenter trained from scratch on (images, labels), tested on the
    real renders of `test_data`. One thread: run side by side in spawned processes (see `downstream`)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:  # nothing to resume: a fresh training every time
        m = train_and_evaluate(ArrayDataset(images, labels), test_data, arch="tiny_unet",
                               num_outputs=len(toyfaces.CLASSES), out_dir=tmp,
                               train_cfg=TrainConfig(max_steps=steps, batch_size=32, seed=seed, checkpoint_every=10**9))
    return {"miou": m["miou"], "per": m["per_class_iou"]}


def mean_std(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=float)
    if np.isnan(a).all():
        return {"mean": None, "std": None, "n": len(a)}
    return {"mean": round(float(np.nanmean(a)), 4), "std": round(float(np.nanstd(a)), 4), "n": len(a)}


def downstream(images: np.ndarray, trainsets: dict[str, np.ndarray], args) -> dict:
    """Every (label source, downstream seed) trained side by side; mean ± std per source."""
    seeds = [int(s) for s in args.downstream_seeds.split(",")]
    test_data = toyfaces_split("test", args.test, images.shape[1])  # rendered once for every job
    jobs = {(name, seed): (images, labels, test_data, args.downstream, seed)
            for name, labels in trainsets.items() for seed in seeds}
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = {key: pool.submit(downstream_score, *job) for key, job in jobs.items()}
        runs = {key: f.result() for key, f in done.items()}
    out = {}
    for name in trainsets:
        rs = [runs[(name, s)] for s in seeds]
        out[name] = {"miou": mean_std([r["miou"] for r in rs]), "per_seed": [round(r["miou"], 4) for r in rs],
                     "per_class": {c: mean_std([r["per"][i] for r in rs]) for i, c in enumerate(toyfaces.CLASSES)}}
        print(f"# downstream on {len(images)} generated images, {name} labels: real-test mIoU "
              f"{out[name]['miou']['mean']:.3f} ± {out[name]['miou']['std']:.3f} (seeds {out[name]['per_seed']})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", default="toyfaces-64")
    ap.add_argument("--labeled", type=int, default=16)
    ap.add_argument("--offset", type=int, default=1000, help="first train-pool index of the labeled subset (the headline uses 0)")
    ap.add_argument("--val", type=int, default=64)
    ap.add_argument("--inv-steps", type=int, default=300)
    ap.add_argument("--inv-loss", choices=("l2", "lpips"), default="l2")
    ap.add_argument("--inv-c-reg", type=lambda v: None if v.lower() in ("none", "null") else float(v), default=0.5,
                    help="inversion's latent constraint (none: unconstrained)")
    ap.add_argument("--generated", type=int, default=0, help="also score the labels of this many generated images "
                    "against a segmenter trained on real renders (0: skip)")
    ap.add_argument("--downstream", type=int, default=0, help="with --generated: train the downstream segmenter this many "
                    "steps on the generated images, with each variant's labels and with the scorer's (0: skip)")
    ap.add_argument("--downstream-seeds", default="0,1,2")
    ap.add_argument("--test", type=int, default=1000, help="real test renders for --downstream")
    ap.add_argument("--workers", type=int, default=2, help="--downstream trainings side by side (one thread each)")
    ap.add_argument("--scorer-steps", type=int, default=800, help="that segmenter's training steps (cached in --cache)")
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    ap.add_argument("--base", default="", help="key=value,... applied to every variant (e.g. a quick smoke budget)")
    ap.add_argument("--seeds", default="0,1", help="fit seeds per variant")
    ap.add_argument("--no-default", action="store_true", help="measure only the --variant list (fits are deterministic "
                    "per seed: the defaults' figures from an earlier run still hold)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path("runs/handsoff-quality"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.downstream and not args.generated:
        raise SystemExit("--downstream trains on the --generated images: give --generated N too")
    torch.set_num_threads(args.threads)
    base_over = parse_variant(f"base:{args.base}")[1]
    variants = dict(([] if args.no_default else [("default", {})]) + [parse_variant(v) for v in args.variant])
    seeds = [int(s) for s in args.seeds.split(",")]
    nets = load_networks(args.generator)
    G = nets.G
    R, K = G.resolution, len(toyfaces.CLASSES)
    tag = hashlib.sha256(str(args.generator).encode()).hexdigest()[:8]
    icfg = InversionConfig(steps=args.inv_steps, loss=args.inv_loss, c_reg=args.inv_c_reg)
    scorer = train_scorer(ScorerSpec(resolution=R, steps=args.scorer_steps), args.cache) if args.generated else None
    tr, inv = inverted(G, "train", args.labeled, args.offset, icfg, args.cache, tag)
    va, invv = inverted(G, "val", args.val, 0, icfg, args.cache, tag)
    gt_tr = torch.from_numpy(np.stack([s.mask for s in tr])).long()
    gt_va = torch.from_numpy(np.stack([s.mask for s in va])).long()
    gt_spread = spread(gt_va)
    result: dict = {"_inversion": {
        "generator": args.generator, "kimg": (nets.extra or {}).get("kimg"), "config": icfg.model_dump(),
        "labeled": args.labeled, "offset": args.offset, "val": args.val,
        "recon_mse_train": {"median": float(np.median(inv.loss)), "max": float(inv.loss.max())},
        "recon_mse_val": {"median": float(np.median(invv.loss)), "max": float(invv.loss.max())},
        "gt_val_spread": gt_spread,
    }}
    base = rgb_baseline(np.stack([s.image for s in tr]), gt_tr.numpy(), np.stack([s.image for s in va]), K)
    b_miou, b_per = segmentation_iou(base, gt_va, K)
    result["rgb_baseline"] = {"val_miou": mean_std([b_miou]),
                              "val_per_class": {c: mean_std([v]) for c, v in zip(toyfaces.CLASSES, b_per)}}
    data = FitData.from_samples(tr, toyfaces.SCHEMA.to_json(), latents=inv.ws)
    trainsets: dict[str, np.ndarray] = {}  # name -> labels of the generated images, for --downstream
    for name, over in variants.items():
        runs = []
        for seed in seeds:
            cfg = HandsOffConfig(**{**base_over, **over, "seed": seed})
            t0 = time.time()
            lab = HandsOffLabeler.fit(G, data, cfg)
            fit_s = time.time() - t0
            t0 = time.time()
            lv, uv = label_all(G, lab, invv.ws)
            label_s = (time.time() - t0) / len(lv)
            lt, _ = label_all(G, lab, inv.ws)
            v_miou, v_per = segmentation_iou(lv, gt_va, K)
            t_miou, _ = segmentation_iou(lt, gt_tr, K)
            sp = spread(lv)
            wrong = lv != gt_va
            gen, arrays = generated_agreement(G, lab, scorer, args.generated, K) if scorer is not None else ({}, {})
            if args.downstream and name not in trainsets:
                trainsets.setdefault("reference", arrays["reference"])
                trainsets[name], images = arrays["label"], arrays["image"]
            runs.append({**gen, "val_miou": v_miou, "train_miou": t_miou, "per": v_per, "fit_s": fit_s, "label_s": label_s,
                         **{f"spread_{k}": sp[k] / max(gt_spread[k], 1e-9) for k in sp},
                         "js_wrong": uv[wrong].mean().item(), "js_right": uv[~wrong].mean().item()})
            print(f"# {name} seed {seed}: val mIoU {v_miou:.3f} train {t_miou:.3f} area spread {runs[-1]['spread_area']:.2f} "
                  f"fit {fit_s:.0f} s" + (f"; generated vs scorer {gen['gen_parts_miou']:.3f}, rare parts drawn "
                  + ", ".join(f"{c} {v['labels']:.3f} (scorer {v['scorer']:.3f})" for c, v in gen["rare"].items()) if gen else ""),
                  flush=True)
        result[name] = {
            "overrides": {**base_over, **over},
            **{k: mean_std([r[k] for r in runs]) for k in ("val_miou", "train_miou", "spread_area", "spread_cx", "spread_cy",
                                                         "js_wrong", "js_right", "fit_s", "label_s")},
            "val_per_class": {c: mean_std([r["per"][i] for r in runs]) for i, c in enumerate(toyfaces.CLASSES)},
        }
        if scorer is not None:
            result[name]["generated"] = {
                "n": args.generated, "parts_miou": mean_std([r["gen_parts_miou"] for r in runs]),
                "per_class": {c: mean_std([r["gen_per"][i] for r in runs]) for i, c in enumerate(toyfaces.CLASSES)},
                "rare_drawn": {c: mean_std([r["rare"][c]["labels"] for r in runs]) for c in toyfaces.RARE_CLASSES},
                "rare_scorer": {c: runs[0]["rare"][c]["scorer"] for c in toyfaces.RARE_CLASSES},
            }
    if args.downstream:
        result["_downstream"] = downstream(images, trainsets, args)
    gen_col = scorer is not None
    print("| variant | val mIoU | train mIoU | area spread | cx spread | fit s |" + (" generated vs scorer |" if gen_col else ""))
    print("|---|---|---|---|---|---|" + ("---|" if gen_col else ""))
    for name in variants:
        r = result[name]
        print(f"| {name} | {r['val_miou']['mean']:.3f} ± {r['val_miou']['std']:.3f} | {r['train_miou']['mean']:.3f} | "
              f"{r['spread_area']['mean']:.2f} | {r['spread_cx']['mean']:.2f} | {r['fit_s']['mean']:.0f} |"
              + (f" {r['generated']['parts_miou']['mean']:.3f} |" if gen_col else ""))
    line = json.dumps(result, default=lambda v: None if v != v else v)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
