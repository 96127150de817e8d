"""Reports as a user sees them in the Prefect UI: images embedded (a browser refuses file:// links),
numbers rounded, tables described, and the artifacts present on a fully cached re-run too."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelfoundry.report import fmt_number, inline_images, markdown_table, round_record

MANY_DECIMALS = re.compile(r"\d\.\d{5,}")


def test_numbers_are_rounded_and_small_fractions_stay_visible():
    assert fmt_number(0.0736907958984375) == "0.074"
    assert fmt_number(0.5181547356797218) == "0.518"
    assert fmt_number(0.00031) == "3.1e-04"  # a rare class's mean pixel fraction, not "0.000"
    assert fmt_number(0.0) == "0" and fmt_number(None) == "—" and fmt_number(float("nan")) == "—"
    assert fmt_number(7) == "7" and fmt_number(np.float32(0.25)) == "0.250"
    assert round_record({"m": "a", "miou": 0.0736907958984375, "n": 3, "x": float("nan")}) == {
        "m": "a", "miou": 0.07369, "n": 3, "x": None}
    table = markdown_table(["class", "mean pixel fraction"], [["hat", 0.000412], ["skin", 0.31234567]])
    assert "4.1e-04" in table and "0.312" in table and not MANY_DECIMALS.search(table)


def _decode(uri: str) -> Image.Image:
    head, data = uri.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_inline_images_embeds_downscaled_data_uris(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 2000, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "small.png")
    md = "# r\n![noise](noise.png)\n![small](small.png)\n![web](https://example.org/x.png)\n![gone](gone.png)\n"
    out = inline_images(md, tmp_path)
    uris = re.findall(r"!\[[^\]]*\]\((data:[^)]+)\)", out)
    assert len(uris) == 2 and "file://" not in out
    big, small = (_decode(u) for u in uris)
    assert max(big.size) <= 768 and len(uris[0]) <= 4 * 150_000 // 3 + 64  # incompressible noise: JPEG or smaller
    assert small.size == (40, 20)
    assert "https://example.org/x.png" in out and "gone.png is missing" in out


# ----------------------------------------------------------------------------- through Prefect


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts if a.key}


def _check_report_artifacts(arts: dict) -> None:
    for key in ("dataset-report", "evaluation-report"):
        md = arts[key].data
        assert "file://" not in md, key
        assert "data:image/png;base64," in md or "data:image/jpeg;base64," in md, key
        for uri in re.findall(r"\((data:image/[^)]+)\)", md):
            _decode(uri).load()
        assert len(md) < 2_000_000, key
    for key in ("filter-counts", "evaluation-table"):
        assert arts[key].description, key
        rows = json.loads(arts[key].data) if isinstance(arts[key].data, str) else arts[key].data
        floats = [v for r in rows for v in r.values() if isinstance(v, float)]
        assert all(float(f"{v:.4g}") == v for v in floats), rows  # <= 4 significant digits


@pytest.mark.prefect
def test_report_artifacts_embed_images_and_show_on_cache_hits(tmp_path, make_config):
    from tests.test_flow import run_factory

    cfg = make_config(tmp_path, tmp_path / "run")
    _, first = run_factory(cfg)
    _, again = run_factory(cfg)  # every stage a cache hit
    for fid in (first, again):
        arts = _artifacts(fid)
        assert {"dataset-report", "filter-counts", "evaluation-report", "evaluation-table"} <= set(arts), sorted(arts)
        _check_report_artifacts(arts)
    for md in (tmp_path / "run" / "report").glob("*.md"):
        text = md.read_text()
        assert "file://" not in text and not MANY_DECIMALS.search(text), md
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            assert (md.parent / target).is_file(), target


@pytest.mark.prefect
def test_longtail_report_artifact_embeds_its_plot(tmp_path):
    from prefect import flow

    from flows.longtail import write_report

    rows = [{"k": k, "method": m, "long_tail_iou": 0.1234567 * k, "non_long_tail_miou": 0.5, "miou": 0.45678901}
            for k in (0, 1) for m in ("HandsOff", "labeled-only")]
    result = {"cls": "glasses", "mode": "substitution", "ks": [0, 1], "oversample": None, "ignored_classes": ["hat"],
              "rows": rows, "oracle": None, "settings": [{"k": k, "num_labeled": 4, "generated_share": 0.000321} for k in (0, 1)]}

    @flow
    def report() -> str:
        write_report(result, tmp_path, 4)
        from prefect.runtime import flow_run

        return flow_run.id

    arts = _artifacts(report())
    md = arts["longtail-glasses-substitution"].data
    assert "file://" not in md and "data:image/png;base64," in md and "3.2e-04" in md
    assert arts["longtail-table-glasses-substitution"].description
    assert "file://" not in (tmp_path / "glasses-substitution.md").read_text()
