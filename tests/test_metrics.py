"""Hand-computed checks of the downstream metrics (labelfoundry.segmenters.metrics)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from torch import nn

from labelfoundry.segmenters.heatmaps import keypoints_from_heatmaps
from labelfoundry.segmenters.metrics import (
    central_crop,
    decode_heatmaps,
    depth_metrics,
    evaluate_segmenter,
    keypoint_heatmaps,
    pck,
    segmentation_iou,
)

# ---------------------------------------------------------------- segmentation


def test_iou_absent_class_is_nan_and_excluded_from_mean():
    # class 2 is predicted only on an ignored pixel -> absent; class 3 never appears.
    target = torch.tensor([[[0, 0, 1, 1, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1, 2]]])
    miou, per_class = segmentation_iou(pred, target, num_classes=4)
    assert per_class[0] == pytest.approx(1 / 2)  # inter {0}, union {0,1}
    assert per_class[1] == pytest.approx(2 / 3)  # inter {2,3}, union {1,2,3}
    assert math.isnan(per_class[2]) and math.isnan(per_class[3])
    assert miou == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_iou_false_positive_class_counts_as_zero():
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 2, 1, 1]]])
    miou, per_class = segmentation_iou(pred, target, num_classes=3, ignore_index=None)
    assert per_class == pytest.approx([1 / 2, 1.0, 0.0])
    assert miou == pytest.approx(0.5)


# ------------------------------------------------------------------- keypoints


def test_pck_bbox_normalisation_and_invisible_keypoints():
    # image 0: visible bbox 20 wide x 40 high -> size 40; thresholds 4, 2, 0.8 px.
    # The invisible keypoint at (100, 100) must not enlarge the box (size 90 would make
    # the 4.1 px error correct at alpha=0.1) nor be counted.
    gt0 = [[10, 10, 1], [30, 10, 1], [10, 50, 1], [100, 100, 0]]
    pr0 = [[10 + 3.9, 10], [30, 10 - 4.1], [10, 50], [0, 0]]
    # image 1: box 10 x 0 -> size 10; thresholds 1, 0.5, 0.2 px.
    gt1 = [[0, 0, 1], [10, 0, 1], [5, 5, 0], [0, 0, 0]]
    pr1 = [[0.9, 0], [10, 0], [50, 50], [9, 9]]
    gt = torch.tensor([gt0, gt1], dtype=torch.float32)
    pred = torch.tensor([pr0, pr1], dtype=torch.float32)
    res = pck(pred, gt)
    assert res[0.1] == pytest.approx(4 / 5)  # 3.9<=4, 4.1>4, exact; 0.9<=1, exact
    assert res[0.05] == pytest.approx(2 / 5)  # only the exact ones
    assert res[0.02] == pytest.approx(2 / 5)


def test_pck_threshold_is_inclusive_boundary_side():
    gt = torch.tensor([[[0, 0, 1], [0, 100, 1]]], dtype=torch.float32)  # size 100
    just_in = torch.tensor([[[9.99, 0], [0, 100]]])
    just_out = torch.tensor([[[10.01, 0], [0, 100]]])
    assert pck(just_in, gt, alphas=(0.1,))[0.1] == 1.0
    assert pck(just_out, gt, alphas=(0.1,))[0.1] == 0.5


def test_decode_heatmaps_argmax_xy():
    hm = torch.zeros(2, 3, 7, 8)
    hm[0, 0, 2, 5] = 1.0  # y=2, x=5
    hm[0, 1, 6, 0] = 3.0
    hm[0, 2] = -1.0
    hm[0, 2, 0, 7] = -0.5
    hm[1, :, 3, 4] = 2.0
    xy = decode_heatmaps(hm)
    assert xy.shape == (2, 3, 2)
    assert xy[0].tolist() == [[5, 2], [0, 6], [7, 0]]
    assert xy[1].tolist() == [[4, 3]] * 3


def test_keypoint_heatmaps_peak_10_and_roundtrip():
    kps = torch.tensor([[5.0, 2.0, 1.0], [0.0, 9.0, 1.0], [3.0, 3.0, 0.0]])
    hm = keypoint_heatmaps(kps, H=12, W=8, sigma=2.0)
    assert hm.shape == (3, 12, 8)
    assert hm[0].max() == pytest.approx(10.0) and hm[0, 2, 5] == pytest.approx(10.0)
    assert hm[0, 2, 7] == pytest.approx(10.0 * math.exp(-0.5))  # one sigma away
    assert hm[1, 9, 0] == pytest.approx(10.0)
    assert hm[2].abs().max() == 0  # invisible -> empty map
    assert decode_heatmaps(hm[None])[0, :2].tolist() == [[5, 2], [0, 9]]
    rec = keypoints_from_heatmaps(hm[None])[0]
    assert rec[:, 2].tolist() == [1.0, 1.0, 0.0]


# ----------------------------------------------------------------------- depth


def test_central_crop_is_middle_half():
    x = torch.arange(64).view(8, 8)
    c = central_crop(x)
    assert c.shape == (4, 4) and c[0, 0] == 2 * 8 + 2 and c[-1, -1] == 5 * 8 + 5


def test_depth_metrics_crop_clamp_and_mask():
    gt = torch.full((2, 8, 8), 10.0)
    pred = torch.full((2, 8, 8), 10.0)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    p, g, v = pred[0], gt[0], valid[0]
    p[0, 0] = 1000.0  # outside the crop: only mNMSE sees it
    p[2, 2] = 100.0  # clamped to 80
    p[3, 3] = -5.0  # clamped to 0.001
    g[4, 4], p[4, 4] = 200.0, 90.0  # both clamped to 80 -> no error
    v[5, 5], p[5, 5] = False, 50.0  # invalid: excluded everywhere
    res = depth_metrics(pred, gt, valid)

    n_crop = 15  # 4x4 crop minus one invalid pixel
    rmse0 = math.sqrt(((80 - 10) ** 2 + (0.001 - 10) ** 2) / n_crop)
    rlog0 = math.sqrt((math.log(80 / 10) ** 2 + math.log(0.001 / 10) ** 2) / n_crop)
    err0 = 990**2 + 90**2 + 15**2 + 110**2
    norm0 = 62 * 10**2 + 200**2
    # image 1 is perfect -> 0 for every metric; means over the 2 images
    assert res["rmse"] == pytest.approx(rmse0 / 2)
    assert res["rmse_log"] == pytest.approx(rlog0 / 2)
    assert res["mnmse"] == pytest.approx(err0 / norm0 / 2)


# ------------------------------------------------------------------ evaluation


class _Const(nn.Module):
    """Returns a fixed (C, H, W) output for every image in the batch."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("out", out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.expand(x.shape[0], *self.out.shape)


def _items(n: int, **labels: torch.Tensor) -> list[dict]:
    return [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), **labels} for _ in range(n)]


def test_evaluate_segmentation_json_ready():
    label = torch.zeros(8, 8, dtype=torch.int64)
    label[:, 4:] = 1
    logits = torch.stack([(label == 0).float(), (label == 1).float(), torch.zeros(8, 8)])
    res = evaluate_segmenter(_Const(logits), _items(3, label=label), "segmentation", 3, "cpu")
    assert res["miou"] == pytest.approx(1.0)
    assert res["per_class_iou"] == [1.0, 1.0, None]
    assert res["num_images"] == 3
    json.dumps(res, allow_nan=False)


def test_evaluate_segmentation_reports_foreground_iou_of_part_labels():
    # gt: bg left half, class 1 cols 4-5, class 2 cols 6-7; pred: class 2 on cols 3-7 (wrong part,
    # one extra column). Parts IoU is poor, but fg/bg only asks "not background": fg IoU = 4/5.
    label = torch.zeros(8, 8, dtype=torch.int64)
    label[:, 4:6], label[:, 6:] = 1, 2
    pred = torch.zeros(8, 8, dtype=torch.int64)
    pred[:, 3:] = 2
    logits = torch.stack([(pred == c).float() for c in range(3)])
    res = evaluate_segmenter(_Const(logits), _items(2, label=label), "segmentation", 3, "cpu")
    assert res["fg_iou"] == pytest.approx(4 / 5)
    assert res["fgbg_miou"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert res["per_class_iou"][1] == pytest.approx(0.0)


def test_evaluate_keypoints_and_depth():
    kps = torch.tensor([[1.0, 1.0, 1.0], [6.0, 5.0, 1.0], [3.0, 3.0, 0.0]])
    hm = keypoint_heatmaps(kps, 8, 8, sigma=1.0)
    res = evaluate_segmenter(_Const(hm), _items(2, label=hm), "keypoints", 0, "cpu")
    assert res["pck@0.1"] == res["pck@0.02"] == 1.0 and res["num_visible"] == 4
    shifted = torch.roll(hm, shifts=1, dims=-1)  # 1 px off; box size 5 -> only alpha>=0.2 ok
    res = evaluate_segmenter(
        _Const(shifted), _items(2, label=hm, keypoints=kps), "keypoints", 0, "cpu"
    )
    assert res["pck@0.1"] == 0.0
    json.dumps(res, allow_nan=False)

    depth = torch.full((8, 8), 4.0)
    valid = torch.ones(8, 8, dtype=torch.bool)
    res = evaluate_segmenter(
        _Const(torch.full((1, 8, 8), 5.0)), _items(2, label=depth, valid=valid), "depth", 0, "cpu"
    )
    assert res["rmse"] == pytest.approx(1.0)
    assert res["mnmse"] == pytest.approx(1 / 16)
    assert res["rmse_log"] == pytest.approx(math.log(5 / 4))
    json.dumps(res, allow_nan=False)


def test_gap_closed_is_undefined_without_a_gap():
    from labelfoundry.evaluation import gap_closed

    assert gap_closed(0.5, 0.4, 0.6) == pytest.approx(0.5)
    assert gap_closed(0.3, 0.4, 0.6) == pytest.approx(-0.5)
    # labeled-only at or above the oracle (a short oracle schedule vs 50 labels): no gap, no ratio
    assert gap_closed(0.32, 0.576, 0.537) is None and gap_closed(0.5, 0.5, 0.5) is None


def test_seeds_summarize_to_mean_and_std_per_method_and_class():
    from labelfoundry.evaluation import gap_closed_summary, mean_std_text, summarize_seeds

    def run(miou, per_class):
        return {"miou": miou, "fg_iou": 0.9, "fgbg_miou": 0.8, "per_class_iou": per_class, "train_samples": 16}

    ours = summarize_seeds([run(0.5, [0.9, 0.1, None]), run(0.7, [0.7, 0.3, None])])
    assert ours["miou"] == pytest.approx(0.6) and ours["miou_std"] == pytest.approx(0.1414, abs=1e-4)
    assert ours["per_class_iou"][:2] == pytest.approx([0.8, 0.2]) and ours["per_class_iou"][2] is None
    assert ours["per_class_iou_std"][0] == pytest.approx(0.1414, abs=1e-4) and ours["num_seeds"] == 2
    assert ours["train_samples"] == 16 and len(ours["seeds"]) == 2
    one = summarize_seeds([run(0.123456789, [0.5, 0.5, 0.5])])
    assert one["miou"] == 0.1235 and one["miou_std"] is None  # rounded; no spread from one seed
    assert mean_std_text(0.6, 0.1414) == "0.600 ± 0.141" and mean_std_text(0.6, None) == "0.600"

    lo = summarize_seeds([run(0.4, [0] * 3), run(0.4, [0] * 3)])
    orc = summarize_seeds([run(0.8, [0] * 3), run(0.6, [0] * 3)])
    g = gap_closed_summary(ours, lo, orc)  # per seed: 0.1/0.4 and 0.3/0.2; of the means: 0.2/0.3
    assert g["gap_closed"] == pytest.approx(0.6667, abs=1e-4) and g["gap_closed_note"] is None
    assert g["gap_closed_std"] == pytest.approx(statistics.stdev([0.25, 1.5]), abs=1e-4)
    none = gap_closed_summary(ours, orc, lo)  # labeled-only above the oracle: a reason, not a bare None
    assert none["gap_closed"] is None and "no gap to close" in none["gap_closed_note"]


def test_plateau_rule_picks_the_last_real_gain_or_none_while_rising():
    from labelfoundry.evaluation import plateau_step

    assert plateau_step([0.1, 0.3, 0.40, 0.402, 0.401, 0.403, 0.5], patience=3) == 2  # 3 evaluations without a 0.005 gain
    # a slow climb (0.001 per evaluation) is still learning: the default patience waits for it, 3 does not
    climb = [0.5, 0.7, 0.8] + [0.8 + 0.001 * k for k in range(1, 13)] + [0.812] * 10
    assert plateau_step(climb, patience=3) == 2
    assert plateau_step(climb) == 14  # 0.812, the last gain of more than 0.005 (over 0.806 at index 8)
    assert plateau_step([0.1, 0.2, 0.3, 0.4]) is None  # still rising: the schedule is too short
    assert plateau_step([None, 0.2, float("nan"), 0.2, 0.2, 0.2], patience=3) == 1
