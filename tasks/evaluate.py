"""Stage 6: downstream training + evaluation on real test images, with baselines, and the report."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.utilities.annotations import quote

import storage
from storage.filters import FilterSpec
from labelfoundry.domains import toyfaces
from labelfoundry.domains.base import resize_labeled
from labelfoundry.evaluation import (
    HEADLINE,
    TASK_METRICS,
    ArrayDataset,
    gap_closed_summary,
    generated_item,
    mean_std_text,
    summarize_seeds,
    task_dataset,
    toyfaces_split,
    train_and_evaluate,
)
from labelfoundry.report import (
    bar_png,
    colorize,
    depth_colormap,
    draw_keypoints,
    inline_images,
    markdown_table,
    round_record,
    save_png,
)
from labelfoundry.atomic import atomic_path
from labelfoundry.segmenters import TrainConfig
from labelfoundry.segmenters.checkpoint import checkpoint_path, list_checkpoints
from labelfoundry.segmenters.models import imagenet_weights_file

from .common import Artifact, cached, log_progress, retry_transient, run_side_by_side, torch_threads
from . import names


IN_MEMORY_MAX_BYTES = 1 << 30  # per training process: a larger generated set streams from its shards


def _train_cfg(ds: dict, seed: int) -> TrainConfig:
    return TrainConfig(lr=ds["lr"], batch_size=ds["batch_size"], epochs=ds["epochs"], max_steps=ds["max_steps"], seed=seed,
                       checkpoint_every=max(100, (ds["max_steps"] or 500) // 4), log_every=100)


def _fg_bg(d: ArrayDataset) -> ArrayDataset:
    """Collapse part labels to foreground (anything not background) for fg/bg labelers."""
    return ArrayDataset(d.images, (d.masks > 0).astype(np.uint8))


def labeled_dataset(labeled, task: str, resolution: int, sigma: float):
    """The few labeled images as the task's dataset, at the test resolution."""
    if task == "segmentation":  # labeled.resolution may differ from the generator's (gradient matching)
        return ArrayDataset(*resize_labeled(labeled["image"], labeled["mask"], resolution))
    if labeled["image"].shape[1] != resolution:
        raise ValueError(f"invert/labeled.npz holds {labeled['image'].shape[1]}px images but the generator makes "
                         f"{resolution}px ones; {task} evaluation needs them alike: remove labeled.resolution")
    return task_dataset(task, labeled["image"], {k: labeled[k] for k in labeled.files if k != "image"}, sigma)


def generated_set(store_path: str, filter_: FilterSpec, array: str = "label"):
    """(opened dataset, training items of `array`) of a generated store (`filter_` as open_dataset takes
    it): read into memory once where they fit, instead of one shard read per sample per step;
    streamed from the shards otherwise."""
    opened = storage.open_dataset(store_path, filter=filter_)
    item = functools.partial(generated_item, array=array)
    fits = opened.nbytes(["image", array]) <= IN_MEMORY_MAX_BYTES
    return opened, opened.in_memory(["image", array], transform=item) if fits else opened.dataset(transform=item)


@task(name="train-evaluate", task_run_name=names.train_evaluate, retries=1, retry_condition_fn=retry_transient)
def train_eval_task(
    method: str, run_dir: str, store_path: str | None, manifest_hash_: str | None, inverted: Artifact,
    labeled_cfg: dict, downstream_cfg: dict, resolution: int, num_outputs: int, binary: bool, seed: int, code_version: str,
    device: str, task: str = "segmentation", sigma: float = 2.0, array: str = "label",
) -> dict:
    """One method's network for `task`, one seed: trained on its label source, scored on the real test
    split. num_outputs: classes or keypoints; sigma: keypoint heatmap std (the labeler's), pixels;
    array: the generated samples' label array that trains it (a multi-label dataset has several)."""
    log = get_run_logger()
    ds = downstream_cfg
    labeled = np.load(Path(inverted.path).parent / "labeled.npz")
    labeled_set = labeled_dataset(labeled, task, resolution, sigma)
    as_task = _fg_bg if binary else (lambda d: d)
    labeled_set = as_task(labeled_set)
    from labelfoundry.labelers import REGISTRY

    weights = None
    if method in REGISTRY or method in ("unfiltered", "unrefined"):  # the generated dataset (filtered by default)
        opened, train = generated_set(store_path, "keep" if method in REGISTRY else None, array)
        if ds.get("oversample"):  # targeted oversampling: weights from the manifest's frac_<class> columns
            from labelfoundry.sampling import drawn_fraction, oversample_weights

            with warnings.catch_warnings(record=True) as caught:  # an unreachable target: say so in the run's log
                warnings.simplefilter("always")
                weights = oversample_weights(opened.manifest, ds["oversample"])
            for w in caught:
                log.warning("%s: %s", method, w.message)
            log.info("%s: oversampling, share of draws showing %s", method,
                     ", ".join(f"{c} {drawn_fraction(opened.manifest, weights, c):.3f}" for c in ds["oversample"]))
    elif method in ("labeled_only", "imagenet_transfer"):  # transfer: an ImageNet backbone, same labeled images
        train = labeled_set
    elif method == "oracle":
        train = as_task(toyfaces_split("train", ds["oracle_images"], resolution, offset=500_000, task=task, sigma=sigma))
    else:
        raise ValueError(f"unknown method {method!r}")
    test = as_task(toyfaces_split("test", ds["test_images"], resolution, task=task, sigma=sigma))

    def eval_dir(cfg: dict) -> Path:
        """One directory per distinct training input: a resumable checkpoint must never be reused for other data."""
        key = hashlib.sha256(json.dumps([method, store_path, manifest_hash_, inverted.hash, cfg, binary, seed, resolution,
                                         code_version, task, sigma, array], sort_keys=True).encode()).hexdigest()[:12]
        return Path(run_dir) / "evaluate" / f"{method}-{key}"

    out = eval_dir(downstream_cfg)
    transfer = method == "imagenet_transfer"
    finetune = ds["finetune_on_labeled"] and method in REGISTRY
    what = f"{method} + fine-tune" if finetune else method  # the log's name for it (the finetuned variant trains ours)
    if finetune and start_from_trained(eval_dir({**downstream_cfg, "finetune_on_labeled": False}), out, ds["max_steps"]):
        log.info("%s (seed %d): starts from %s (seed %d)'s trained network, fine-tunes only", what, seed, method, seed)
    with torch_threads(ds["torch_threads"]):  # a fixed count: float sums, hence metrics, never depend on what ran before
        metrics = train_and_evaluate(
            train, test, task=task, arch=ds["transfer_arch"] if transfer else ds["arch"], num_outputs=num_outputs,
            out_dir=out, train_cfg=_train_cfg(ds, seed), device=device, sample_weights=weights, examples=ds["examples"],
            finetune_data=labeled_set if finetune else None,
            progress=log_progress(log, f"{what} (seed {seed}) training"),
        )
    key_metric = HEADLINE[task][0]
    value = metrics[key_metric]
    log.info("%s (seed %d): %s %s on %d test images", what, seed, key_metric,
             "undefined" if value is None else f"{value:.4f}", len(test))
    return metrics


def start_from_trained(trained: Path, out: Path, steps: int | None) -> bool:
    """Give a fine-tuned variant the finished training of the same method, seed and inputs (its first
    phase, bit for bit: seeded, one thread, exact resume) by copying that run's final checkpoint into
    `out`, so it resumes there and only fine-tunes. False (it trains from scratch) when `out` already
    holds a checkpoint or the training has not finished."""
    done = checkpoint_path(trained, steps) if steps else None
    if done is None or not done.is_file() or list_checkpoints(out):
        return False
    with atomic_path(checkpoint_path(out, steps)) as tmp:
        shutil.copyfile(done, tmp)
    return True


def prediction_examples(results: dict, resolution: int, binary: bool, schema: dict, path: Path,
                        task: str = "segmentation") -> Path | None:
    """One column per test image: the image, its ground truth, then each method's prediction.
    Keypoints: every row is the image with peaks drawn (ground truth as green circles; a method's
    predictions as red crosses beside them); depth: colour maps on one shared scale."""
    preds = {m: np.load(r["examples"]) for m, r in results.items() if r.get("examples") and Path(r["examples"]).exists()}
    if not preds:
        return None
    n = min(len(p) for p in preds.values())
    render = toyfaces.render(toyfaces.split_seeds("test", n), resolution)
    images = render["image"]
    if task == "keypoints":
        scale = 4  # markers are legible on 64px faces only when drawn on the upscaled image
        gt = render["keypoints"]
        rows = [[draw_keypoints(im, None, g, scale) for im, g in zip(images, gt)]]
        rows += [[draw_keypoints(im, pr, g, scale) for im, pr, g in zip(images, p[:n], gt)] for p in preds.values()]
        grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
        return save_png(grid, path)
    if task == "depth":
        gt = render["depth"]
        lo, hi = float(gt.min()), float(gt.max())
        rows = [list(images), [depth_colormap(d, lo, hi) for d in gt]]
        rows += [[depth_colormap(d, lo, hi) for d in p[:n]] for p in preds.values()]
    else:
        gt = (render["mask"] > 0).astype(np.uint8) if binary else render["mask"]
        colors = [[0, 0, 0], [255, 255, 255]] if binary else schema["colors"]
        rows = [list(images), [colorize(m, colors) for m in gt]]
        rows += [[colorize(m, colors) for m in p[:n]] for p in preds.values()]
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    return save_png(np.kron(grid, np.ones((2, 2, 1), dtype=np.uint8)), path)


def _outputs(cfg, task: str, binary: bool, schema: dict) -> list[str]:
    """The names of the network's outputs: classes, keypoints, or the one depth channel."""
    if task == "keypoints":
        return list(schema["keypoint_names"])
    if task == "depth":
        return ["depth"]
    return ["background", "foreground"] if binary else list(schema["class_names"])


def evaluate_stage(cfg, run_dir: Path, inverted: Artifact, store_path: str, mh: str, fh: str, device: str, cv: str,
                   array: str = "label", unrefined: str | None = None) -> dict:
    """Train/evaluate every method (each a cached task) for one label array's task (`label`: the
    labeler's; in a multi-label run also each extra labeler's), then write its metrics and report:
    metrics.json and report/evaluation.md for `label`, metrics-<array>.json and
    report/evaluation-<array>.md for the others (artifact keys suffixed alike)."""
    log = get_run_logger()
    if cfg.labeled.source != "toyfaces":
        log.warning("evaluation needs real labeled test images; only the built-in domain provides them for now")
        return {}
    from labelfoundry.labelers import SUPERVISED

    lcfg = cfg.label_arrays()[array]
    suffix = "" if array == "label" else f"-{array}"
    task = lcfg.task
    binary = lcfg.method not in SUPERVISED
    sigma = float(getattr(lcfg, "keypoint_sigma", 2.0))  # the generated heatmaps' std: baselines train alike
    schema = json.loads((Path(inverted.path).parent / "schema.json").read_text())
    names = _outputs(cfg, task, binary, schema)
    from tasks.common import load_generator_cached

    R = load_generator_cached(cfg.generator.name, device).resolution
    ours = lcfg.method
    generated = {ours, "unfiltered", "unrefined"}
    ds_cfg = cfg.downstream.model_dump()
    if array != "label":  # oversampling draws by the primary label's class fractions
        ds_cfg["oversample"] = {}
    if ds_cfg["oversample"] and task != "segmentation":
        raise ValueError(f"downstream.oversample draws by class pixel fractions; labeler.task {task!r} has no classes: remove it")
    unknown = sorted(set(ds_cfg["oversample"]) - set(names))
    if unknown:  # before any training: the labels have no such class
        raise ValueError(f"downstream.oversample: unknown classes {unknown}; valid classes: {names}")
    ds_cfg.pop("seeds")  # not a training input: seed i's cache entry is the same whatever the number of seeds
    ds_cfg.pop("workers")  # nor is how many trainings run at once
    oracle_steps = ds_cfg.pop("oracle_steps")  # the oracle's schedule alone: no other method's cache key carries it
    seeds = [cfg.seed + i for i in range(cfg.downstream.seeds)]
    plain_cfg = {**ds_cfg, "oversample": {}}  # uniform-draw methods: the same cache key with or without oversample
    results, skipped = {}, {}
    baselines = list(cfg.downstream.baselines)
    if "imagenet_transfer" in baselines:
        found, expected = imagenet_weights_file(cfg.downstream.transfer_arch)
        if found is None:  # nothing is ever downloaded: say which file would enable the baseline
            skipped["imagenet_transfer"] = f"ImageNet weights not found; place {expected} to run this baseline"
            log.warning("imagenet_transfer baseline skipped: %s", skipped["imagenet_transfer"])
            baselines.remove("imagenet_transfer")
    if "unrefined" in baselines and unrefined is None:
        skipped["unrefined"] = "the run did not refine its labels (refine.enabled false, or a label type it does not refine)"
        log.warning("unrefined baseline skipped: %s", skipped["unrefined"])
        baselines.remove("unrefined")

    def method_cfg(name: str) -> dict:
        """The downstream config a method trains with (its cache key): variants of ours change one key."""
        if name == "finetuned":
            return {**ds_cfg, "finetune_on_labeled": True}
        if name == "oracle" and oracle_steps is not None:
            return {**plain_cfg, "max_steps": oracle_steps}
        return ds_cfg if name in generated else plain_cfg  # no_oversample and baselines draw uniformly

    # each generated-data method's store and the manifest hash its cache key carries
    sources = {ours: (store_path, mh + fh), "unfiltered": (store_path, mh)}
    if "unrefined" in baselines:
        sources["unrefined"] = (unrefined, storage.manifest_hash(unrefined))
    jobs = []  # (method name, task, parameters): one training per method and seed
    for name in [ours, *baselines]:
        m = ours if name in ("no_oversample", "finetuned") else name  # variants of ours (own cache keys)
        for seed in seeds:
            run = cached(train_eval_task, run_dir,
                         task_run_name=f"train-evaluate {name}{'' if array == 'label' else ' ' + array} seed {seed}")
            # quote: values built here are no task's result; Prefect's input tracking (by id) would
            # otherwise take a recycled id for a finished train-evaluate's result and draw a false edge
            params = {"inverted": inverted, **{k: quote(v) for k, v in dict(
                method=m, run_dir=str(run_dir), store_path=sources.get(m, (None, None))[0],
                manifest_hash_=sources.get(m, (None, None))[1],
                labeled_cfg=cfg.labeled.model_dump(), downstream_cfg=method_cfg(name), resolution=R,
                num_outputs=len(names), binary=binary, seed=seed, code_version=cv, device=device, task=task, sigma=sigma,
                array=array,
            ).items()}}
            jobs.append((name, run, params))
    # the oracle's trainings (5,000 renders to make first) start first: side by side, the others fill in;
    # the fine-tuned variants last, each from its plain twin's finished training (start_from_trained)
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0] != "oracle")
    outcomes = {}
    for wave in ([i for i in order if jobs[i][0] != "finetuned"], [i for i in order if jobs[i][0] == "finetuned"]):
        outcomes.update(zip(wave, run_side_by_side([jobs[i][1:] for i in wave], cfg.downstream.workers)))
    for name in dict.fromkeys(n for n, _, _ in jobs):
        results[name] = summarize_seeds([outcomes[i] for i, (n, _, _) in enumerate(jobs) if n == name])
    out = {"task": task, "methods": results, "class_names" if task == "segmentation" else "output_names": names,
           "num_labeled": cfg.labeled.num_images, "labeler": lcfg.method, "array": array, "seeds": seeds, "skipped": skipped}
    if task == "keypoints":
        out["keypoint_sigma"] = sigma
    if "labeled_only" in results and "oracle" in results:
        out.update(gap_closed_summary(results[ours], results["labeled_only"], results["oracle"], task))
    (run_dir / f"metrics{suffix}.json").write_text(json.dumps(out, indent=2))
    md = evaluation_markdown(out, cfg.downstream, run_dir)
    examples = prediction_examples(results, R, binary, schema, run_dir / "report" / f"predictions{suffix}.png", task)
    if examples is not None:
        shown = ", ".join(r for r in results if "examples" in results[r])
        what = (f"image with ground-truth peaks as green circles; then {shown}, each with its predicted peaks as red "
                "crosses over the ground truth" if task == "keypoints" else f"image, ground truth, {shown}")
        md += ["", f"Predictions on real test images (rows: {what}):",
               "", f"![predictions]({examples.name})"]
    (run_dir / "report" / f"evaluation{suffix}.md").write_text("\n".join(md))
    keys = ("miou",) if task == "segmentation" else TASK_METRICS[task]
    create_markdown_artifact(inline_images("\n".join(md), run_dir / "report"), key=f"evaluation-report{suffix}",
                             description=f"downstream {', '.join(keys)} vs baselines")
    create_table_artifact([round_record({"method": m, **{k2: r[k2] for k in keys for k2 in (k, f"{k}_std")},
                                         "train_samples": r["train_samples"]}) for m, r in results.items()],
                          key=f"evaluation-table{suffix}",
                          description=f"{', '.join(keys)} (mean and std over seeds) on {cfg.downstream.test_images} real "
                          "test images, per training method")
    return out


_METRIC_NAMES = {"miou": "mIoU", "fg_iou": "fg IoU", "pck@0.1": "PCK@0.1", "pck@0.05": "PCK@0.05", "pck@0.02": "PCK@0.02",
                 "mnmse": "mNMSE", "rmse": "RMSE", "rmse_log": "RMSE-log"}


def evaluation_markdown(out: dict, ds, run_dir: Path) -> list[str]:
    """The report's lines: mean ± std per method (and, for segmentation, per class) (3 decimals), gap
    closed with its spread, and a reason wherever a number is undefined."""
    task = out.get("task", "segmentation")
    results, n = out["methods"], len(out["seeds"])
    keys = TASK_METRICS[task]
    spread = f"mean ± std over {n} seeds" if n > 1 else "1 seed (no spread; set downstream.seeds for mean ± std)"
    rows = [[m, *[mean_std_text(r[k], r[f"{k}_std"]) for k in keys], r["train_samples"]] for m, r in results.items()]
    title = {"segmentation": "", "keypoints": ", keypoints: heatmap regression", "depth": ", depth"}[task]
    md = [f"# Downstream evaluation ({ds.arch}{title}, {ds.test_images} real test images, {spread})", "",
          markdown_table(["method", *[_METRIC_NAMES[k] for k in keys], "train samples"], rows), ""]
    if task == "depth":
        md += ["RMSE and RMSE-log on the middle-50% crop, clamped to [0.001, 80]; mNMSE on every valid pixel "
               "(lower is better)", ""]
    if "gap_closed" in out:
        g = out["gap_closed"]
        text = out["gap_closed_note"] if g is None else mean_std_text(g, out["gap_closed_std"])
        if g is not None and out["gap_closed_note"]:
            text += f" ({out['gap_closed_note']})"
        of = "" if task == "segmentation" else f" (in {_METRIC_NAMES[out['gap_closed_metric']]})"
        md += [f"gap closed{of}: {text}", ""]
    md += [f"skipped {m}: {why}" for m, why in out["skipped"].items()] + ([""] if out["skipped"] else [])
    if task != "segmentation":
        return md
    names = out["class_names"]
    per_class = {m: r["per_class_iou"] for m, r in results.items()}
    p = bar_png(names, per_class, run_dir / "report" / "per-class-iou.png", "per-class IoU on real test images", "IoU")
    table = [[c, *[mean_std_text(r["per_class_iou"][i], r["per_class_iou_std"][i]) for r in results.values()]]
             for i, c in enumerate(names)]
    md += [f"![per-class IoU]({p.name})", "", markdown_table(["class", *results], table)]
    if any(v is None for r in results.values() for v in r["per_class_iou"]):
        md += ["", "—: IoU undefined, the class is in neither the test labels nor the predictions"]
    return md
