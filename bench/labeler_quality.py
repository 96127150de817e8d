"""Label quality of every labeler on the built-in domain, where exact labels are known.

Held-out val faces are inverted into the generator once (cached in --cache); each labeler labels
their reconstructions, and the labels are compared with the val ground truth:
- parts mIoU (supervised labelers: handsoff, gradient_matching);
- foreground/background IoU for every labeler (foreground = any class but background: head,
  hair, ears, accessories), reported as fg IoU and the fg/bg mIoU (mean of fg and bg IoU).
Each labeler is fitted with the budget given on the command line (CPU defaults are small; the
papers train for far longer), and its fit time and labeling time per image are reported.

    python bench/labeler_quality.py --methods handsoff,stylemix --val 64 \
        --set stylemix.n_styles=20 --set latent_direction.steps=300

The last line of stdout is one JSON object {method: {...}}; --out writes it to a file too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from labelfoundry.config import parse_config
from labelfoundry.domains import toyfaces
from labelfoundry.domains.base import LabeledSample
from labelfoundry.features import generate_with_taps
from labelfoundry.generators import load_networks
from labelfoundry.inversion.optimize import InversionConfig, InversionResult, invert
from labelfoundry.labelers import FG_BG_SCHEMA, SUPERVISED, FitData, GenBatch, labeler_class, load_labeler
from labelfoundry.segmenters.metrics import segmentation_iou

# CPU budgets (the papers' budgets are far larger; say so when you report these numbers).
CPU_DEFAULTS: dict[str, dict] = {
    "handsoff": {"members": 10, "min_steps": 300},
    "gradient_matching": {"steps": 300},
    "stylemix": {"n_styles": 50},
    "latent_direction": {"steps": 300, "batch_size": 16},
}


def inverted(G, split: str, n: int, steps: int, cache: Path, tag: str) -> tuple[list[LabeledSample], InversionResult]:
    """(samples, inversion) for n faces of a split; the inversion is cached per generator + budget."""
    samples = toyfaces.samples(split, n, G.resolution)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"inv-{tag}-{split}-{n}-{steps}.pt"
    if path.exists():
        return samples, InversionResult.load(path)
    res = invert(G, np.stack([s.image for s in samples]), InversionConfig(steps=steps), ids=[s.sample_id for s in samples])
    res.save(path)
    return samples, res


def fg_bg(pred: torch.Tensor, gt: torch.Tensor) -> dict:
    """IoU of foreground (class > 0) and background, and their mean."""
    _, per = segmentation_iou((pred > 0).long(), (gt > 0).long(), 2)
    return {"fg_iou": per[1], "bg_iou": per[0], "fgbg_miou": float(np.nanmean(per))}


def score(lab, method: str, cfg_d: dict, fit_s: float | None, invv: InversionResult, gt: torch.Tensor,
          label_sets: dict[str, dict], G) -> dict:
    """Label the inverted val latents (G: the labeler's generator) and compare with the exact labels."""
    if method in label_sets:
        lab.cfg = lab.cfg.model_copy(update=label_sets[method])
    t0 = time.time()
    preds = []
    with torch.no_grad():
        for i in range(0, len(invv.ws), 16):
            ws = invv.ws[i : i + 16]
            img, taps = generate_with_taps(G, ws, lab.tap_spec)
            preds.append(lab.label(GenBatch(ws, img, taps, G=G)).label.long())
    pred = torch.cat(preds)
    row = {"config": {**cfg_d, **label_sets.get(method, {})}, "fit_s": fit_s,
           "label_s_per_image": (time.time() - t0) / len(pred), **fg_bg(pred, gt)}
    if method in SUPERVISED:
        miou, per = segmentation_iou(pred, gt, len(toyfaces.CLASSES))
        row.update(parts_miou=miou, per_class=dict(zip(toyfaces.CLASSES, per)))
    return row


def parse_sets(sets: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for s in sets:
        key, val = s.split("=", 1)
        method, field = key.split(".", 1)
        out.setdefault(method, {})[field] = yaml.safe_load(val)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generator", default="toyfaces-64")
    ap.add_argument("--methods", default=",".join(CPU_DEFAULTS))
    ap.add_argument("--labeled", type=int, default=16)
    ap.add_argument("--val", type=int, default=64)
    ap.add_argument("--inv-steps", type=int, default=300)
    ap.add_argument("--labeled-style", default="photo", help="toyfaces render style of the labeled source (gradient matching)")
    ap.add_argument("--labeled-resolution", type=int, default=None, help="render the labeled source at this resolution (gradient matching)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="method.key=value (YAML value)")
    ap.add_argument("--label-set", dest="label_sets", action="append", default=[],
                    help="method.key=value applied to the fitted labeler's config before labeling (e.g. latent_direction.label_epsilon=4)")
    ap.add_argument("--save", default=None, help="directory: save each fitted labeler as <method>-<fit config hash>.safetensors")
    ap.add_argument("--reuse", action="store_true", help="reuse a saved labeler fitted with the same config instead of fitting")
    ap.add_argument("--labeler", action="append", default=[],
                    help="score a saved labeler file (e.g. a run's fit/labeler.safetensors) instead of fitting; repeatable")
    ap.add_argument("--tag", default="", help="suffix of the result keys (sweeps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="runs/bench-cache")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    G, D, _ = load_networks(args.generator)
    tag = hashlib.sha256(args.generator.encode()).hexdigest()[:8]
    cache = Path(args.cache)
    t0 = time.time()
    va, invv = inverted(G, "val", args.val, args.inv_steps, cache, tag)
    gt = torch.from_numpy(np.stack([s.mask for s in va]))
    results: dict[str, dict] = {"_setup": {"generator": args.generator, "val": args.val, "labeled": args.labeled,
                                           "inv_steps": args.inv_steps, "recon_mse_val": float(invv.loss.mean()),
                                           "invert_val_s_or_cached": time.time() - t0}}
    sets, label_sets = parse_sets(args.sets), parse_sets(args.label_sets)
    jobs = [(None, f) for f in args.labeler] or [(m, None) for m in args.methods.split(",")]
    for method, file in jobs:
        if file is not None:  # a labeler fitted elsewhere: its own header says what it is
            lab = load_labeler(file)
            method = lab.name
            cfg_d = {**lab.cfg.model_dump(mode="json"), "file": file}
            results[method + args.tag] = score(lab, method, cfg_d, None, invv, gt, label_sets, G)
            continue
        cfg_d = {**CPU_DEFAULTS.get(method, {}), **sets.get(method, {})}
        fit_key = hashlib.sha256(json.dumps([args.generator, args.labeled, args.labeled_style, args.labeled_resolution, cfg_d],
                                            sort_keys=True).encode()).hexdigest()[:10]
        saved = Path(args.save) / f"{method}-{fit_key}.safetensors" if args.save else None
        t0 = time.time()
        if args.reuse and saved is not None and saved.exists():
            lab = load_labeler(saved)
        else:
            cfg = parse_config({"labeler": {"method": method, **cfg_d}}).labeler
            data = FitData(schema=dict(FG_BG_SCHEMA), discriminator=D)
            if method == "handsoff":
                tr, inv = inverted(G, "train", args.labeled, args.inv_steps, cache, tag)
                data = FitData.from_samples(tr, toyfaces.SCHEMA.to_json(), latents=inv.ws)
            elif method in SUPERVISED:
                res = args.labeled_resolution or G.resolution
                style = {} if args.labeled_style == "photo" else {"style": args.labeled_style}
                r = toyfaces.render(toyfaces.split_seeds("train", args.labeled), res, **style)
                data = FitData(images=r["image"], masks=r["mask"], schema=toyfaces.SCHEMA.to_json())
            lab = labeler_class(method).fit(G, data, cfg)
        fit_s = time.time() - t0
        if saved is not None and not (args.reuse and saved.exists()):
            saved.parent.mkdir(parents=True, exist_ok=True)
            lab.save(saved)
        if method == "gradient_matching":
            cfg_d = {**cfg_d, "labeled_style": args.labeled_style, "labeled_resolution": args.labeled_resolution or G.resolution}
        results[method + args.tag] = score(lab, method, cfg_d, fit_s, invv, gt, label_sets, G)
    for key, row in results.items():
        if key != "_setup":
            print(json.dumps({key: row}, default=lambda v: None if v != v else v), flush=True)
    text = json.dumps(results, default=lambda v: None if v != v else v)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
