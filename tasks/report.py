"""Stage 5: the run report — sample grid, uncertainty histogram, per-class counts — as PNG files in
the run directory and as Prefect artifacts in the UI.

The markdown on disk links its PNGs by relative path (it opens in any viewer, from any machine);
the artifacts embed them as data URIs (a browser refuses file:// links). The flow, not the cached
task, creates the artifacts, so a cached re-run shows them too."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import storage
from labelfoundry.report import histogram_png, inline_images, markdown_table, round_record, samples_grid, save_png

from . import names


def refined_from(provenance: dict) -> list[str]:
    """The report's line on where a refined store's labels come from (none for a generated store)."""
    if "refined_from" not in provenance:
        return []
    members = len(provenance.get("refine_members", []))
    mirrored = "with" if provenance.get("refine_mirror") else "without"
    return [f"Labels refined by {members} self-trained segmenters ({mirrored} the mirrored pass) from the labeler's "
            f"labels in `{provenance['refined_from']}`; uncertainty and scores are theirs (the labeler's scores are "
            "the manifest's `score_unrefined` columns).", ""]


def dataset_report(store_path: str, out_dir: Path, counts: dict, max_rows: int = 8) -> str:
    """Write report PNGs for a generated dataset and return its markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = storage.ShardStore.open(store_path)
    m = store.manifest()
    schema = store.info["schema"]
    kept = m[m["keep"]] if "keep" in m else m
    dropped = m[~m["keep"]] if "keep" in m else m.iloc[:0]
    picks = {"kept": kept.sort_values("sample_id").head(max_rows), "most-uncertain": dropped.sort_values("score", ascending=False).head(4)}
    lines = [f"# Dataset `{store_path}`", "", *refined_from(store.layout.provenance),
             markdown_table(list(counts), [list(counts.values())]), ""]
    for name, rows in picks.items():
        if rows.empty:
            continue
        grid = samples_grid([store.read_sample(int(i)) for i in rows["sample_id"]], schema["colors"])
        p = save_png(grid, out_dir / f"samples-{name}.png")
        lines += [f"## {name} samples (image | label | overlay | uncertainty)", f"![{name}]({p.name})", ""]
    cut = float(kept["score"].max()) if len(dropped) else None
    h = histogram_png(m["score"].to_numpy(), out_dir / "uncertainty-hist.png", "image uncertainty (JS, summed)", cut)
    lines += ["## Uncertainty", f"![histogram]({h.name})", ""]
    rows = []
    for cls in schema["class_names"]:
        col = f"frac_{cls}"
        if col in m:
            rows.append([cls, int((kept[col] > 0).sum()), float(kept[col].mean())])
    if rows:
        lines += ["## Classes in kept samples", markdown_table(["class", "samples containing it", "mean pixel fraction"], rows)]
    md = "\n".join(lines)
    (out_dir / "dataset.md").write_text(md)
    return md


@task(name="report", task_run_name=names.report)
def report_task(run_dir: str, store_path: str, manifest_hash_: str, counts: dict, code_version: str) -> str:
    out = Path(run_dir) / "report"
    dataset_report(store_path, out, counts)
    return str(out / "dataset.md")


def publish_dataset_report(md_path: str, counts: dict) -> None:
    """The `dataset-report` and `filter-counts` artifacts of this run (call from the flow)."""
    md = Path(md_path)
    create_markdown_artifact(inline_images(md.read_text(), md.parent), key="dataset-report",
                             description="generated dataset: samples, uncertainty, classes")
    create_table_artifact([round_record(counts)], key="filter-counts", description="samples kept / dropped by the filter")
