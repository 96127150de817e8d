"""The evaluate stage's report: the ImageNet-transfer baseline (run or skipped) and prediction examples."""

import json

import pytest
import torch
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.prefect]


def _run(make_config, tmp_path, name):
    from flows.factory import factory

    cfg = make_config(tmp_path / name, tmp_path / name / "run", downstream={
        "baselines": ["labeled_only", "imagenet_transfer", "finetuned"], "transfer_arch": "unet", "examples": 3})
    factory(config=str(cfg))
    run = tmp_path / name / "run"
    return json.loads((run / "metrics.json").read_text()), run


def test_transfer_baseline_is_skipped_and_named_without_weights_then_runs_with_them(tmp_path, make_config, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    metrics, run = _run(make_config, tmp_path, "absent")
    assert "imagenet_transfer" not in metrics["methods"]
    # the fine-tuned variant of ours trains in its own directory and then fine-tunes on the labeled images
    tuned = [d for d in (run / "evaluate").glob("handsoff-*") if (d / "finetune").is_dir()]
    assert "finetuned" in metrics["methods"] and len(tuned) == 1 and any((tuned[0] / "finetune").glob("ckpt_*.pt"))
    assert "resnet18-" in metrics["skipped"]["imagenet_transfer"] and str(tmp_path / "hub") in metrics["skipped"]["imagenet_transfer"]
    report = (run / "report" / "evaluation.md").read_text()
    assert "skipped imagenet_transfer" in report
    # prediction examples: image row, ground-truth row, one row per method, 3 test images wide (x2 scale)
    from PIL import Image

    grid = Image.open(run / "report" / "predictions.png")
    assert grid.size == (3 * 16 * 2, (2 + len(metrics["methods"])) * 16 * 2)
    assert "predictions.png" in report

    name = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "hub" / "checkpoints" / name)
    metrics, _ = _run(make_config, tmp_path, "present")
    assert metrics["skipped"] == {}
    t = metrics["methods"]["imagenet_transfer"]
    assert t["train_samples"] == metrics["methods"]["labeled_only"]["train_samples"] == 4
    assert 0.0 <= t["miou"] <= 1.0 and t["fg_iou"] is not None
