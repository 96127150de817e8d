"""Long-tail sweep (HandsOff §4.5, Fig. 4): the factory once per number k of labeled images that show
a rare class, with HandsOff, labeled-only and (optionally) HandsOff with targeted oversampling.

Each k is its own factory run under `<run_dir>/longtail/<cls>-<mode>-k<k>` (its own cache, so a
re-run is all cache hits and a longer `ks` list only runs the new settings). The oracle does not
depend on the labeled set, so it is trained once, in the first setting, and drawn as a reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from labelfoundry.config import deep_merge, load_config
from labelfoundry.evaluation import longtail_metrics
from labelfoundry.report import fmt_number, inline_images, markdown_table, round_record, sweep_png

from .factory import factory

METRICS = {"long_tail_iou": "long-tail IoU", "non_long_tail_miou": "non-long-tail mIoU", "miou": "overall mIoU"}
_NAMES = {"handsoff": "HandsOff", "labeled_only": "labeled-only", "oracle": "oracle"}


def _display(method: str) -> str:
    return _NAMES.get(method, method)


def method_labels(ours: str, oversample: float | None) -> dict[str, str]:
    """metrics.json method key -> the name in the sweep's table and plot."""
    if oversample is None:
        return {ours: _display(ours), "labeled_only": "labeled-only"}
    return {"no_oversample": _display(ours), ours: f"{_display(ours)}+oversample", "labeled_only": "labeled-only"}


def setting_overrides(
    run_root: Path, name: str, cls: str, mode: str, k: int, oversample: float | None, with_oracle: bool
) -> dict:
    """The overrides that turn the base config into one setting of the sweep."""
    baselines = ["labeled_only"] + (["no_oversample"] if oversample is not None else []) + (["oracle"] if with_oracle else [])
    return {
        "name": f"{name}-{cls}-{mode}-k{k}",
        "run_dir": str(run_root / f"{cls}-{mode}-k{k}"),
        "labeled": {"longtail": {"cls": cls, "k": k, "mode": mode}},
        "downstream": {"enabled": True, "baselines": baselines, "oversample": {cls: oversample} if oversample is not None else {}},
    }


def _generated_share(dataset: str, cls: str) -> float | None:
    """Fraction of the kept generated samples whose label shows `cls` (how often the labeler draws it)."""
    import storage
    from labelfoundry.sampling import fraction_column

    m = storage.open_dataset(dataset, filter="keep").manifest
    col = fraction_column(cls)
    return float((m[col] > 0).mean()) if col in m and len(m) else None


@flow(name="longtail", log_prints=True)
def longtail(
    config: str | None = None,
    overrides: dict | None = None,
    cls: str = "glasses",
    mode: Literal["substitution", "addition"] = "substitution",
    ks: list[int] | None = None,
    oversample: float | None = None,
    drop_top: float | None = 0.0,
    oracle: bool = True,
) -> dict:
    """Sweep k (labeled images showing `cls`) and collect Fig. 4's three metrics per method.

    oversample: also train the generated-data method with `downstream.oversample={cls: oversample}`.
    drop_top: the filter's cut for every setting; 0 by default, as the paper does not filter in
    long-tail experiments (uncertain samples are often the rare ones); None keeps the config's.
    `overrides` (e.g. `--set filter.drop_top=0.1`) win over drop_top.
    """
    log = get_run_logger()
    ks = list(ks) if ks is not None else [0, 1, 2, 4]
    if not ks or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct numbers of rare images, got {ks}")
    base = deep_merge({"filter": {"drop_top": drop_top}} if drop_top is not None else {}, overrides or {})
    cfg = load_config(config, base)
    from labelfoundry.labelers import SUPERVISED

    if cfg.labeler.method not in SUPERVISED:
        raise ValueError(f"a long-tail sweep needs a part labeler ({sorted(SUPERVISED)}); {cfg.labeler.method!r} labels fg/bg only")
    for k in ks:  # every setting validates before the first one runs
        load_config(config, deep_merge(base, setting_overrides(Path("."), cfg.name, cls, mode, k, oversample, False)))
    from labelfoundry.domains.toyfaces import RARE_CLASSES

    ignore = [c for c in RARE_CLASSES if c != cls]  # other rare classes: in no labeled image, left out of non-long-tail
    run_root = Path(cfg.run_dir).resolve() / "longtail"
    labels = method_labels(cfg.labeler.method, oversample)
    rows, settings, oracle_row = [], [], None
    for i, k in enumerate(ks):
        ov = setting_overrides(run_root, cfg.name, cls, mode, k, oversample, oracle and i == 0)
        log.info("long tail: %s %s k=%d (%d/%d) in %s", cls, mode, k, i + 1, len(ks), ov["run_dir"])
        summary = factory(config=config, overrides=deep_merge(base, ov))
        ev = summary["evaluation"]
        n_labeled = cfg.labeled.num_images + (k if mode == "addition" else 0)
        settings.append({"k": k, "num_labeled": n_labeled, "run_dir": summary["run_dir"],
                         "generated_share": _generated_share(summary["dataset"], cls)})
        for key, label in labels.items():
            r = ev["methods"][key]
            rows.append({"k": k, "method": label, "key": key, "num_labeled": n_labeled,
                         **longtail_metrics(r["per_class_iou"], ev["class_names"], [cls], ignore),
                         "per_class_iou": r["per_class_iou"], "train_samples": r["train_samples"]})
        if "oracle" in ev["methods"]:
            r = ev["methods"]["oracle"]
            oracle_row = {"method": "oracle", **longtail_metrics(r["per_class_iou"], ev["class_names"], [cls], ignore),
                          "per_class_iou": r["per_class_iou"], "train_samples": r["train_samples"]}
    result = {"cls": cls, "mode": mode, "ks": ks, "oversample": oversample, "ignored_classes": ignore,
              "class_names": ev["class_names"], "rows": rows, "oracle": oracle_row, "settings": settings}
    write_report(result, run_root, cfg.labeled.num_images)
    return result


def write_report(result: dict, run_root: Path, num_images: int) -> dict[str, Path]:
    """`<cls>-<mode>.json`, `.md` and `.png` under run_root, plus the Prefect artifacts."""
    cls, mode, ks = result["cls"], result["mode"], result["ks"]
    stem = run_root / f"{cls}-{mode}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=2))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    panels = {title: {m: [next((r[key] for r in result["rows"] if r["k"] == k and r["method"] == m), None) for k in ks]
                      for m in methods} for key, title in METRICS.items()}
    orc = result["oracle"]
    reference = {title: {"oracle": orc[key]} for key, title in METRICS.items()} if orc else None
    what = (f"{num_images} labeled images, k of them with {cls}" if mode == "substitution"
            else f"{num_images} labeled images without rare classes + k with {cls}")
    png = sweep_png(ks, panels, stem.with_suffix(".png"), f"k (labeled images with {cls})", f"long tail: {cls}, {mode} ({what})", reference)
    table = markdown_table(["k", "method", "long-tail IoU", "non-long-tail mIoU", "overall mIoU"],
                           [[r["k"], r["method"], r["long_tail_iou"], r["non_long_tail_miou"], r["miou"]] for r in result["rows"]])
    md = [f"# Long tail: {cls}, {mode}", "", f"{what}; no other labeled image shows a rare class. "
          f"Long-tail IoU is the IoU of {cls}; non-long-tail mIoU leaves out {cls}"
          + (f" and {', '.join(result['ignored_classes'])}" if result["ignored_classes"] else "") + "; overall mIoU covers every class."
          + (f" +oversample: training draws target {result['oversample']:.0%} samples showing {cls} (not reachable where no "
             "generated sample shows it; the run's log says so)." if result["oversample"] is not None else ""),
          "", table, ""]
    if orc:
        md += [f"oracle ({orc['train_samples']} real labels): long-tail IoU {fmt_number(orc['long_tail_iou'])}, "
               f"non-long-tail mIoU {fmt_number(orc['non_long_tail_miou'])}, overall mIoU {fmt_number(orc['miou'])}", ""]
    md += [markdown_table(["k", "labeled images", f"generated samples showing {cls}"],
                          [[s["k"], s["num_labeled"], s["generated_share"]] for s in result["settings"]]), "",
           f"![long tail]({png.name})", ""]
    md_path = stem.with_suffix(".md")
    md_path.write_text("\n".join(md))
    create_markdown_artifact(inline_images("\n".join(md), stem.parent), key=f"longtail-{_key(cls)}-{mode}",
                             description=f"long-tail sweep: {cls}, {mode}")
    create_table_artifact([round_record({k: r[k] for k in ("k", "method", *METRICS)}) for r in result["rows"]],
                          key=f"longtail-table-{_key(cls)}-{mode}",
                          description=f"{', '.join(METRICS.values())} per k and method (long tail: {cls}, {mode})")
    return {"json": json_path, "md": md_path, "png": png}


def _key(s: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", s.lower()).strip("-")
