"""What a user sees of a run in the Prefect UI and the CLI: run names that say what runs, a
per-shard progress artifact on the factory run, readable log lines (segmenter training included),
a graph without false edges, and a CLI display that prints plain lines when not on a terminal.

The Prefect checks read back one tiny factory run through the API of the session's test server."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from flows import progress
from flows.display import RunDisplay
from tasks.common import format_progress
from tasks.names import shard_span
from tests.conftest import wait_for


# ----------------------------------------------------------------------------- unit
def test_progress_lines_carry_totals_rounded_numbers_and_time():
    d = {"batch": 0 + 1, "batches": 2, "step": 101, "steps": 300, "loss": 0.012044984847307205, "seconds": 12.34}
    assert format_progress(d) == "batch 1/2 step 101/300 loss 0.0120 (12.3 s)"
    assert format_progress({"phase": "fine-tune", "step": 5, "steps": 50, "loss": 3.1e-05}) == "fine-tune step 5/50 loss 3.1e-05"
    assert format_progress({"direction": "light", "step": 1, "steps": 1}) == "direction light step 1/1"


def test_shard_span_names_ranges():
    assert shard_span([3, 0, 1, 2]) == "[0-3]" and shard_span([5]) == "[5]" and shard_span([0, 2, 7]) == "[0,2,7]"


def test_store_watcher_reports_every_committed_shard(tmp_path):
    from tests.test_storage import _create, make_samples

    store = _create(str(tmp_path / "ds"))  # 18 samples in 5 shards, the last with 2
    seen: list[progress.GenerationProgress] = []
    with progress.StoreWatcher(store.url, seen.append, interval=0.01):
        for i in range(store.num_shards):
            store.write_shard(i, *make_samples(store, i))
            wait_for(lambda i=i: seen[-1].shards == i + 1, 30, f"the watcher to see shard {i}")
    assert [g.shards for g in seen] == [0, 1, 2, 3, 4, 5]
    assert [g.samples for g in seen] == [0, 4, 8, 12, 16, 18]
    assert seen[-1].describe() == "5 / 5 shards, 18 / 18 samples" and seen[-1].percent == 100.0
    assert progress.GenerationProgress(37, 64, 2368, 4096).describe() == "37 / 64 shards, 2,368 / 4,096 samples"


def _replay(console: Console) -> None:
    with RunDisplay(console, plain_every=0):
        for stage in ("invert", "fit", "generate"):
            progress.emit(progress.ProgressEvent(stage))
        for i in range(5):
            g = progress.GenerationProgress(i, 4, min(64, 16 * i), 64)
            progress.emit(progress.ProgressEvent("generate", g, link="http://127.0.0.1:4200/artifacts/artifact/x"))
        progress.emit(progress.ProgressEvent("filter"))


def test_cli_display_prints_plain_lines_when_not_a_terminal():
    buf = io.StringIO()
    _replay(Console(file=buf, force_terminal=False, width=80))
    out = buf.getvalue()
    assert "\x1b" not in out and "\r" not in out  # no cursor movement, no colour codes
    lines = out.splitlines()
    assert lines[:3] == ["invert ...", "fit ...", "generate ..."]
    assert "generate: 2 / 4 shards, 32 / 64 samples" in out and lines[-1] == "filter ..."
    assert sum("artifacts/artifact/x" in line for line in lines) == 1  # the link once
    assert not progress._LISTENERS  # detached after the run


def test_cli_display_draws_a_bar_on_a_terminal():
    buf = io.StringIO()
    _replay(Console(file=buf, force_terminal=True, width=120))
    out = buf.getvalue()
    assert "4 / 4 shards, 64 / 64 samples" in out and "generate" in out and "━" in out


# ----------------------------------------------------------------------------- through Prefect
@pytest.fixture(scope="module")
def run(tmp_path_factory, make_config):
    """One tiny factory run (downstream included); the progress events it published; its API records."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    from tests.test_flow import run_factory

    d = tmp_path_factory.mktemp("ui")
    events: list[progress.ProgressEvent] = []
    progress.add_listener(events.append)
    try:
        summary, fid = run_factory(make_config(d, d / "run"))
    finally:
        progress.remove_listener(events.append)
    # Logs reach the API through a background worker in batches: send what is queued before reading.
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)

    def fetch():
        with get_client(sync_client=True) as client:
            subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[fid])))
            ids = [fid, *(s.id for s in subs)]
            tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids)))
            if len(tasks) < 12 or any(t.state is None or not t.state.is_final() for t in tasks):
                return None
            return {
                "flow_run": client.read_flow_run(fid), "subflows": subs, "tasks": tasks,
                "artifacts": client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fid]))),
                "logs": client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids))),
            }

    api = wait_for(fetch, 60, "the run's task runs to be recorded", interval=0.5)
    return {"summary": summary, "events": events, **api}


@pytest.mark.prefect
@pytest.mark.slow
def test_runs_are_named_by_config_method_and_shards(run):
    assert run["flow_run"].name == "test · handsoff"  # the config's name · the labeling method
    (sub,) = run["subflows"]
    assert sub.name == "handsoff: 4 shards in 4 tasks"
    names = {t.name for t in run["tasks"] if t.id != sub.parent_task_run_id}
    assert names == {
        "invert 4 images", "fit handsoff/segmentation",
        *(f"generate-shards[{i}] handsoff" for i in range(4)),
        f"filter {Path(run['summary']['dataset']).name} drop_top 0.1", f"report {Path(run['summary']['dataset']).name}",
        "train-evaluate handsoff seed 0", "train-evaluate labeled_only seed 0", "train-evaluate oracle seed 0",
    }
    wrapper = next(t for t in run["tasks"] if t.id == sub.parent_task_run_id)
    assert wrapper.name != next(t.name for t in run["tasks"] if t.name.startswith("generate-shards"))


@pytest.mark.prefect
@pytest.mark.slow
def test_graph_draws_real_dependencies_only(run):
    by_id = {t.id: t for t in run["tasks"]}

    def parents(task) -> set[str]:
        return {by_id[i.id].name for ins in task.task_inputs.values() for i in ins if i.id in by_id}

    evals = [t for t in run["tasks"] if t.name.startswith("train-evaluate")]
    assert len(evals) == 3
    for t in evals:
        assert not any(p.startswith("train-evaluate") for p in parents(t)), (t.name, parents(t))
        assert "invert 4 images" in parents(t)
    (sub,) = run["subflows"]
    wrapper = by_id[sub.parent_task_run_id]
    filt = next(t for t in run["tasks"] if t.name.startswith("filter"))
    assert wrapper.name in parents(filt)  # filter reads what generation wrote


@pytest.mark.prefect
@pytest.mark.slow
def test_generation_progress_is_on_the_factory_run_with_counts(run):
    arts = {a.key: a for a in run["artifacts"] if a.key}
    art = arts["generation-progress"]
    assert art.flow_run_id == run["flow_run"].id and art.type == "progress"
    assert float(art.data) == 100.0 and art.description == "4 / 4 shards, 64 / 64 samples"
    gen = [e.generation for e in run["events"] if e.generation is not None]
    assert gen[0].shards == 0 and gen[-1].shards == 4 and gen[-1].samples == 64
    assert [g.shards for g in gen] == sorted(g.shards for g in gen)  # never backwards
    stages = [e.stage for e in run["events"]]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == ["invert", "fit", "generate", "filter", "report", "evaluate"]


@pytest.mark.prefect
@pytest.mark.slow
def test_logs_are_readable_and_carry_segmenter_training(run):
    msgs = [log.message for log in run["logs"]]
    assert not [m for m in msgs if "{'" in m], "raw dicts in the run logs"
    assert any(m.startswith("inversion batch 1/1 step 3/3 loss ") and m.endswith(" s)") for m in msgs), msgs
    assert any(m.startswith("fit handsoff step 10/10 loss ") for m in msgs), msgs
    for method in ("handsoff", "labeled_only", "oracle"):  # the segmenters' training reaches the run logs
        assert any(m.startswith(f"{method} (seed 0) training step 5/5 loss ") for m in msgs), method
