"""Keypoints and depth through the evaluate stage: real sets per task, metrics of ground truth against
itself, summaries and gap closed per task's headline metric, report pictures, and tiny factory runs
whose metrics.json, report and table artifact carry the task's metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labelfoundry.evaluation import (
    gap_closed_summary,
    generated_item,
    predict,
    summarize_seeds,
    task_dataset,
    toyfaces_split,
)
from labelfoundry.segmenters.heatmaps import HEATMAP_PEAK, decode_heatmaps
from labelfoundry.segmenters.metrics import depth_metrics, pck

pytestmark = pytest.mark.usefixtures("one_thread")


def _stack(ds, key: str) -> torch.Tensor:
    return torch.stack([ds[i][key] for i in range(len(ds))])


def test_keypoint_split_items_carry_heatmaps_at_sigma_and_exact_keypoints():
    ds = toyfaces_split("test", 6, 32, task="keypoints", sigma=1.5)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    assert item["label"].shape == (5, 32, 32) and item["label"].dtype == torch.float32
    assert item["keypoints"].shape == (5, 3)
    vis = item["keypoints"][:, 2] > 0
    assert torch.all(item["label"][~vis] == 0)  # invisible keypoints: all-zero maps
    assert torch.all(item["label"][vis].flatten(1).amax(1) <= HEATMAP_PEAK)
    assert torch.all(item["label"][vis].flatten(1).amax(1) > 0.5 * HEATMAP_PEAK)  # a peak within a pixel


def test_ground_truth_against_itself_scores_perfectly():
    """PCK of the decoded target heatmaps vs the exact keypoints (argmax is within 0.71 px of a
    keypoint, PCK@0.05 allows >= 1 px at 64 px faces), and depth vs itself: every error 0."""
    kp = toyfaces_split("test", 16, 64, task="keypoints", sigma=2.0)
    scores = pck(decode_heatmaps(_stack(kp, "label")), _stack(kp, "keypoints"))
    assert scores[0.1] == 1.0 and scores[0.05] == 1.0
    depth = toyfaces_split("test", 8, 32, task="depth")
    d, valid = _stack(depth, "label"), _stack(depth, "valid")
    assert d.shape == (8, 32, 32) and valid.all() and 5.0 < float(d.min()) and float(d.max()) <= 10.0
    assert depth_metrics(d, d, valid) == {"mnmse": 0.0, "rmse": 0.0, "rmse_log": 0.0}
    worse = depth_metrics(d + 1.0, d, valid)
    assert worse["rmse"] == pytest.approx(1.0) and worse["mnmse"] > 0 and worse["rmse_log"] > 0


def test_task_dataset_names_the_missing_array():
    with pytest.raises(ValueError, match="no 'keypoints' array for task 'keypoints'.*'mask'"):
        task_dataset("keypoints", np.zeros((2, 8, 8, 3), np.uint8), {"mask": np.zeros((2, 8, 8))})


def test_generated_depth_trains_as_hw_and_heatmaps_as_stored():
    depth = {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "label": torch.ones(1, 8, 8, dtype=torch.float16)}
    assert generated_item(depth)["label"].shape == (8, 8)
    heat = {"image": depth["image"], "label": torch.ones(5, 8, 8, dtype=torch.float16)}
    assert generated_item(heat)["label"].shape == (5, 8, 8)
    # a multi-label sample: the task's own array becomes the label; its heatmaps never pass for (K,3) keypoints
    multi = {**heat, "label": torch.zeros(8, 8, dtype=torch.uint8), "keypoints": heat["label"], "depth": depth["label"],
             "uncertainty": torch.zeros(8, 8)}
    assert set(generated_item(multi, "keypoints")) == {"image", "label"}
    assert generated_item(multi, "keypoints")["label"].shape == (5, 8, 8)
    assert generated_item(multi, "depth")["label"].shape == (8, 8)


@pytest.mark.parametrize("task,shape,dtype", [("segmentation", (3, 16, 16), np.uint8),
                                              ("keypoints", (3, 5, 2), np.float32),
                                              ("depth", (3, 16, 16), np.float32)])
def test_predictions_have_the_task_shape(task, shape, dtype):
    from labelfoundry.segmenters import SegmenterConfig, build_segmenter

    heads = {"segmentation": {"num_classes": 4}, "keypoints": {"num_keypoints": 5}, "depth": {}}[task]
    model = build_segmenter(SegmenterConfig(arch="tiny_unet", task=task, tiny_width=4, **heads), seed=0)
    items = [toyfaces_split("test", 3, 16, task=task)[i] for i in range(3)]
    out = predict(model, items, task)
    assert out.shape == shape and out.dtype == dtype
    if task == "keypoints":
        assert out.min() >= 0 and out.max() <= 15


def test_summaries_and_gap_closed_follow_the_task_metric():
    def run(rmse: float, pck05: float) -> dict:
        return {"rmse": rmse, "mnmse": 0.1, "rmse_log": 0.2, "pck@0.05": pck05, "train_samples": 4}

    ours, lo, oracle = (summarize_seeds([run(r, p), run(r, p)]) for r, p in ((2.0, 0.5), (4.0, 0.2), (1.0, 0.8)))
    assert ours["rmse"] == 2.0 and ours["rmse_std"] == 0.0 and "per_class_iou" not in ours and "miou" not in ours
    depth = gap_closed_summary(ours, lo, oracle, "depth")  # lower is better: (4 - 2) / (4 - 1)
    assert depth["gap_closed"] == pytest.approx(0.6667, abs=1e-4) and depth["gap_closed_metric"] == "rmse"
    kp = gap_closed_summary(ours, lo, oracle, "keypoints")  # (0.5 - 0.2) / (0.8 - 0.2)
    assert kp["gap_closed"] == pytest.approx(0.5) and kp["gap_closed_metric"] == "pck@0.05"
    assert gap_closed_summary(ours, oracle, lo, "depth")["gap_closed"] is None  # labeled-only beats the oracle


def test_keypoint_drawing_marks_ground_truth_green_and_predictions_red():
    from labelfoundry.report import depth_colormap, draw_keypoints

    img = np.zeros((16, 16, 3), np.uint8)
    gt = np.array([[4.0, 4.0, 1.0], [12.0, 12.0, 0.0]], np.float32)
    out = draw_keypoints(img, np.array([[10.0, 3.0], [2.0, 12.0]], np.float32), gt, scale=4)
    assert out.shape == (64, 64, 3)
    green = (out[..., 1] == 255) & (out[..., 0] == 0)
    red = (out[..., 0] == 255) & (out[..., 1] == 0)
    assert green[10:26, 10:26].any() and not green[42:58, 42:58].any()  # the invisible keypoint is not drawn
    assert red[(3 * 4 + 2), (10 * 4 + 2)] and red[(12 * 4 + 2), (2 * 4 + 2)]  # cross centres
    d = np.array([[8.0, 10.0]], np.float32)
    c = depth_colormap(d, 8.0, 10.0)
    assert c.shape == (1, 2, 3) and c.dtype == np.uint8 and c[0, 0].sum() > c[0, 1].sum()  # near is bright


@pytest.mark.slow
@pytest.mark.prefect
@pytest.mark.parametrize("task,keys", [("keypoints", ("pck@0.1", "pck@0.05", "pck@0.02")),
                                       ("depth", ("mnmse", "rmse", "rmse_log"))])
def test_tiny_run_evaluates_the_labeler_task(tmp_path, make_config, task, keys):
    """invert -> fit -> generate -> filter -> evaluate with labeler.task keypoints / depth: every method's
    metrics.json entry has the task's metrics in range, the report shows them with the examples picture,
    and the table artifact carries them."""
    from PIL import Image

    from tests.test_flow import run_factory
    from tests.test_report_artifacts import _artifacts, _check_report_artifacts

    cfg = make_config(tmp_path, tmp_path / "run", labeler={"task": task}, downstream={"examples": 2})
    summary, flow_run = run_factory(cfg)
    assert summary["filter"]["kept"] < summary["filter"]["total"]  # filtered by the members' variance
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == task and set(metrics["methods"]) == {"handsoff", "labeled_only", "oracle"}
    assert metrics["gap_closed_metric"] == keys[1]  # PCK@0.05 or RMSE
    for method, r in metrics["methods"].items():
        for k in keys:
            assert r[k] is not None and r[k] >= 0, (method, k)
        if task == "keypoints":
            assert r["pck@0.1"] <= 1 and r["pck@0.02"] <= r["pck@0.05"] <= r["pck@0.1"]
            assert r["num_visible"] > 0 and metrics["output_names"] == ["left_eye", "right_eye", "nose_tip",
                                                                        "mouth_left", "mouth_right"]
        assert r["num_images"] == 16 and "miou" not in r
        assert np.load(r["examples"]).shape == ((2, 5, 2) if task == "keypoints" else (2, 16, 16))
    assert metrics["methods"]["handsoff"]["train_samples"] == summary["filter"]["kept"]
    report = (run / "report" / "evaluation.md").read_text()
    assert "None" not in report and "predictions.png" in report
    assert {"keypoints": "PCK@0.05", "depth": "RMSE-log"}[task] in report
    grid = Image.open(run / "report" / "predictions.png")
    # keypoints: 4x images with peaks, one row of ground truth + one per method; depth: image, truth, methods at 2x
    assert grid.size == ((2 * 16 * 4, 4 * 16 * 4) if task == "keypoints" else (2 * 16 * 2, 5 * 16 * 2))
    arts = _artifacts(flow_run)
    _check_report_artifacts(arts)
    rows = json.loads(arts["evaluation-table"].data)
    assert [r["method"] for r in rows] == ["handsoff", "labeled_only", "oracle"]
    assert all(k in r and f"{k}_std" in r for r in rows for k in keys)


def test_depth_head_starts_at_the_training_depths_scale():
    """The depth network's output affine comes from the training set (mean, std of valid depths):
    a fresh head predicts near the data's mean, not near 0."""
    from labelfoundry.evaluation import depth_affine
    from labelfoundry.segmenters import SegmenterConfig, build_segmenter

    data = toyfaces_split("train", 8, 16, task="depth")
    aff = depth_affine(data)
    d = _stack(data, "label")
    assert aff["depth_shift"] == pytest.approx(float(d.double().mean()), rel=1e-6)
    assert aff["depth_scale"] == pytest.approx(float(d.double().std()), rel=1e-4)
    model = build_segmenter(SegmenterConfig(arch="tiny_unet", task="depth", tiny_width=4, **aff), seed=0)
    out = predict(model, [data[i] for i in range(2)], "depth")
    assert abs(float(out.mean()) - aff["depth_shift"]) < 5 * aff["depth_scale"] and float(out.min()) > 3.0
