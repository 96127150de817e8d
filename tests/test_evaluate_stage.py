"""The evaluate stage's report: the ImageNet-transfer baseline (run or skipped) and prediction examples."""

import json
import os

import pytest
import torch
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.prefect]


def _run(make_config, tmp_path, name):
    from tests.test_flow import run_factory

    cfg = make_config(tmp_path / name, tmp_path / name / "run", downstream={
        "baselines": ["labeled_only", "imagenet_transfer", "finetuned"], "transfer_arch": "unet", "examples": 3})
    _, fid = run_factory(cfg)
    run = tmp_path / name / "run"
    return json.loads((run / "metrics.json").read_text()), run, fid


def _run_log(flow_run_id) -> str:
    """The run's log as the Prefect UI shows it (every record sent to the API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        return "\n".join(r.message for r in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))


def test_transfer_baseline_is_skipped_and_named_without_weights_then_runs_with_them(tmp_path, make_config, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    metrics, run, fid = _run(make_config, tmp_path, "absent")
    log = _run_log(fid)
    assert "handsoff + fine-tune (seed 0): miou" in log and "handsoff (seed 0): miou" in log  # each variant named
    # the fine-tuned variant starts from the plain one's finished training instead of repeating it
    assert "handsoff + fine-tune (seed 0): starts from handsoff (seed 0)'s trained network" in log
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
    import tasks.evaluate

    # this time the fine-tuned variant trains from scratch: the same network, bit for bit
    monkeypatch.setattr(tasks.evaluate, "start_from_trained", lambda *a: False)
    tuned_before = metrics["methods"]["finetuned"]
    metrics, _, fid = _run(make_config, tmp_path, "present")
    assert "starts from handsoff" not in _run_log(fid)
    for k in ("miou", "per_class_iou", "final_loss", "train_steps"):
        assert metrics["methods"]["finetuned"][k] == tuned_before[k], k
    assert metrics["skipped"] == {}
    t = metrics["methods"]["imagenet_transfer"]
    assert t["train_samples"] == metrics["methods"]["labeled_only"]["train_samples"] == 4
    assert 0.0 <= t["miou"] <= 1.0 and t["fg_iou"] is not None


def test_same_evaluation_twice_gives_identical_metrics_whatever_ran_before(tmp_path, make_config, monkeypatch):
    """Two runs of one config (two run dirs, so nothing is cached) give the same metrics, per seed, bit
    for bit, even when the second one's trainings start from another global RNG state and thread count
    (what a cache hit, an earlier stage or another task leaves behind); two seeds give a spread. The
    first run trains side by side in two worker processes, the second one after another in this one."""
    import tasks.evaluate
    from flows.factory import factory

    render = tasks.evaluate.toyfaces_split

    def disturbed(*args, **kwargs):  # runs inside every train-evaluate task, just before training
        torch.manual_seed(12345)
        torch.set_num_threads(2)
        return render(*args, **kwargs)

    train, here = tasks.evaluate.train_and_evaluate, os.getpid()

    def elsewhere(*args, **kwargs):  # the task travels pickled by value, this check with it
        assert os.getpid() != here, "downstream.workers 2 trained in the flow's own process"
        return train(*args, **kwargs)

    metrics = []
    for name in ("a", "b"):
        if name == "a":
            monkeypatch.setattr(tasks.evaluate, "train_and_evaluate", elsewhere)
        if name == "b":
            monkeypatch.undo()
            monkeypatch.setattr(tasks.evaluate, "toyfaces_split", disturbed)
        torch.set_num_threads(1)  # the upstream stages (outside this test's scope) start alike
        cfg = make_config(tmp_path / name, tmp_path / name / "run", downstream={"seeds": 2, "workers": 2 if name == "a" else 1})
        factory(config=str(cfg))
        metrics.append(json.loads((tmp_path / name / "run" / "metrics.json").read_text()))
    a, b = metrics
    assert a["seeds"] == b["seeds"] == [0, 1]
    for method in ("handsoff", "labeled_only", "oracle"):
        runs_a, runs_b = a["methods"][method]["seeds"], b["methods"][method]["seeds"]
        assert [r["miou"] for r in runs_a] == [r["miou"] for r in runs_b], method
        assert [r["per_class_iou"] for r in runs_a] == [r["per_class_iou"] for r in runs_b], method
        assert [r["final_loss"] for r in runs_a] == [r["final_loss"] for r in runs_b], method
        assert runs_a[0]["final_loss"] != runs_a[1]["final_loss"], f"{method}: the two seeds trained alike"
        assert a["methods"][method]["miou_std"] is not None
    assert a["gap_closed"] == b["gap_closed"]
    report = (tmp_path / "a" / "run" / "report" / "evaluation.md").read_text()
    assert "mean ± std over 2 seeds" in report and " ± " in report.split("gap closed:")[0]
    assert "None" not in report
