"""Learning curves of the downstream segmenters: test mIoU against steps, per method (for docs/).

Trains each method with the evaluate stage's code (`train_segmenter`, seeded init, one torch thread)
on a finished run's inputs and scores it every `--every` steps on real test images. The generated
method is also scored on held-out generated samples (the last `--holdout` of the kept samples, never
trained on): the signal of the schedule rule (`plateau_step`, docs/schedules.md), which needs no real
labels beyond the few.

    python bench/learning_curves.py runs/demo --steps 2000 --every 100 --out docs/learning-curves
    python bench/learning_curves.py --merge a.json b.json --out docs/learning-curves   # one figure

Writes <out>.json (curves + the step the rule picks) and <out>.png. Prints one line per method.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import Subset

from labelfoundry.domains.base import resize_labeled
from labelfoundry.evaluation import ArrayDataset, plateau_step, toyfaces_split
from labelfoundry.report import sweep_png
from labelfoundry.segmenters import SegmenterConfig, TrainConfig, build_segmenter, train_segmenter


def _sets(run: Path, methods: list[str], holdout: float, oracle_images: int, resolution: int) -> dict:
    """method -> (train set, held-out generated set or None)."""
    import storage

    summary = json.loads((run / "summary.json").read_text())
    out = {}
    for m in methods:
        if m == "generated":
            ds = storage.open_dataset(summary["dataset"], filter="keep").dataset()
            n_val = max(1, int(len(ds) * holdout))
            out[m] = (Subset(ds, range(len(ds) - n_val)), Subset(ds, range(len(ds) - n_val, len(ds))))
        elif m == "labeled_only":
            lab = np.load(Path(summary["inversion"]["path"]).parent / "labeled.npz")
            out[m] = (ArrayDataset(*resize_labeled(lab["image"], lab["mask"], resolution)), None)
        elif m == "oracle":
            out[m] = (toyfaces_split("train", oracle_images, resolution, offset=500_000), None)
        else:
            raise SystemExit(f"unknown method {m!r}; choose from generated, labeled_only, oracle")
    return out


def curve(train, scored: dict, cfg: TrainConfig, arch: str, num_classes: int, every: int) -> dict[str, list]:
    """Train from scratch, scoring on every set of `scored` each `every` steps: {set name: [mIoU, ...]}."""
    model = build_segmenter(SegmenterConfig(arch=arch, num_classes=num_classes), seed=cfg.seed)
    out: dict[str, list] = {k: [] for k in scored}
    with tempfile.TemporaryDirectory() as d:
        for step in range(every, cfg.max_steps + 1, every):  # resumes its own checkpoint: one run, scored on the way
            stage = cfg.model_copy(update={"max_steps": step, "checkpoint_every": every})
            for name, data in scored.items():
                res = train_segmenter(model, train, stage, task="segmentation", out_dir=d, device="cpu", val_data=data)
                out[name].append(res.val_metrics[-1]["miou"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?", help="a finished factory run (its summary.json, dataset and labeled images)")
    ap.add_argument("--methods", default="generated,labeled_only,oracle")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--test-images", type=int, default=500)
    ap.add_argument("--oracle-images", type=int, default=5000)
    ap.add_argument("--holdout", type=float, default=0.1, help="fraction of kept generated samples held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output stem; default <run_dir>/learning-curves")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="instead of training: plot these earlier outputs (.json, same steps) as one figure at --out")
    args = ap.parse_args()
    if args.merge:
        if not args.out:
            raise SystemExit("--merge needs --out STEM")
        return merge(args.merge, Path(args.out))
    if not args.run_dir:
        raise SystemExit("give a finished run directory (or --merge JSON... --out STEM)")
    torch.set_num_threads(1)
    run = Path(args.run_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    names = json.loads((Path(json.loads((run / "summary.json").read_text())["inversion"]["path"]).parent
                        / "schema.json").read_text())["class_names"]
    from labelfoundry.generators import load_generator

    resolution = load_generator(cfg["generator"]["name"]).resolution
    test = toyfaces_split("test", args.test_images, resolution)
    methods = args.methods.split(",")
    sets = _sets(run, methods, args.holdout, args.oracle_images, resolution)
    ds = cfg["downstream"]
    train_cfg = TrainConfig(lr=ds["lr"], batch_size=ds["batch_size"], max_steps=args.steps, seed=args.seed, keep_last=1)
    xs = list(range(args.every, args.steps + 1, args.every))
    curves, chosen = {}, {}
    for m in methods:
        train, held_out = sets[m]
        scored = {"test": test, **({"held_out": held_out} if held_out is not None else {})}
        c = curve(train, scored, train_cfg, ds["arch"], len(names), args.every)
        curves[m] = c
        if "held_out" in c:
            i = plateau_step(c["held_out"])
            chosen[m] = ({"step": None, "why": "still rising at the last step: train longer"} if i is None else
                         {"step": xs[i], "test_miou_there": c["test"][i], "best_test_miou": max(c["test"])})
        print(m, {k: [round(v, 4) for v in vals] for k, vals in c.items()}, chosen.get(m, ""), flush=True)
    result = {"steps": xs, "curves": curves, "rule": "plateau_step on held-out generated mIoU", "chosen": chosen,
              "run_dir": str(run), "train": train_cfg.model_dump(mode="json"), "test_images": args.test_images,
              "arch": ds["arch"]}
    write(result, Path(args.out) if args.out else run / "learning-curves")


def write(result: dict, stem: Path) -> None:
    """<stem>.json and <stem>.png: held-out generated and real-test mIoU against steps."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    curves = result["curves"]
    panels = {"held-out generated mIoU": {m: c["held_out"] for m, c in curves.items() if "held_out" in c},
              "real test mIoU": {m: c["test"] for m, c in curves.items()}}  # last panel: the legend of every method
    sweep_png(result["steps"], panels, stem.with_suffix(".png"), "training steps",
              f"learning curves ({result.get('arch', 'tiny_unet')})")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")


def merge(paths: list[Path], stem: Path) -> None:
    """Methods trained in separate runs of this script (side by side, one per core) as one result."""
    parts = [json.loads(p.read_text()) for p in paths]
    if any(p["steps"] != parts[0]["steps"] for p in parts):
        raise SystemExit(f"--merge: {', '.join(map(str, paths))} were scored at different steps; re-run with one --steps/--every")
    result = {**parts[0], "curves": {m: c for p in parts for m, c in p["curves"].items()},
              "chosen": {m: c for p in parts for m, c in p["chosen"].items()}, "merged_from": [str(p) for p in paths]}
    write(result, stem)


if __name__ == "__main__":
    main()
