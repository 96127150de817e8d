"""Flow-level tests of the factory: caching, stage invalidation, kill -9 + resume, filter flags in the
flow, and the Dask and Ray task runners giving the same bytes as threads, reporting to one server.

Everything runs on a random resolution-16 generator (conftest.tiny_generator) with a tiny config, in
process against the session's Prefect test server (conftest.prefect_server), except the kill -9 test,
whose victim is a subprocess (tests/helpers_flow.py) reporting to the same server.

"No model work on a re-run" is checked two ways: the task runs' final states read back from the
Prefect API (``Cached`` vs ``Completed``), and the inode + mtime of every artifact a model stage writes.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from storage import LayoutMismatchError
from tests.conftest import ROOT, wait_for

pytestmark = [pytest.mark.prefect, pytest.mark.slow]  # all end-to-end: every test runs the flow

HELPER = Path(__file__).with_name("helpers_flow.py")
STAGES_WITH_DOWNSTREAM = 4 + 3  # invert, fit, filter, report + train-evaluate x (handsoff + 2 baselines)


# ----------------------------------------------------------------------------- helpers
def run_factory(config: Path, overrides: dict | None = None, **kwargs) -> tuple[dict, object]:
    """Call the factory flow in process; returns (summary, flow run id)."""
    from flows.factory import factory

    state = factory(config=str(config), overrides=overrides, return_state=True, **kwargs)
    assert state.is_completed(), f"factory ended in {state!r}"
    return state.result(), state.state_details.flow_run_id


def stage_of(task_run_name: str) -> str:
    """The stage of a task run named like "generate-shards[0-3] handsoff" or "train-evaluate oracle seed 0"."""
    return re.split(r"[\[ ]", task_run_name, maxsplit=1)[0]


def task_states(flow_run_id, expected: int, timeout: float = 60) -> dict[str, list[str]]:
    """Final state names of a factory run's task runs (its own and its generation subflow's),
    keyed by stage ("invert", "fit", "generate-shards", ...), once `expected` of them are recorded."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    def fetch():
        with get_client(sync_client=True) as client:
            subflows = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
            )
            wrappers = {s.parent_task_run_id for s in subflows}  # the subflow's stand-in task run
            runs = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id, *(s.id for s in subflows)]))
            )
        runs = [r for r in runs if r.id not in wrappers]
        if len(runs) < expected or any(r.state is None or not r.state.is_final() for r in runs):
            return None
        out: dict[str, list[str]] = defaultdict(list)
        for r in runs:
            out[stage_of(r.name)].append(r.state.name)
        return {k: sorted(v) for k, v in out.items()}

    return wait_for(fetch, timeout, f"{expected} finished task runs of flow run {flow_run_id}", interval=0.2)


def generate_with_labeler(config: Path, run_dir: Path, labeler: dict, overrides: dict | None = None,
                          code_version_: str | None = None) -> str:
    """The factory's generation stage alone, in another run dir, with an already fitted labeler
    (summary["labeler"]): an uninterrupted generation to compare a dataset against. (A whole factory
    run would fit a new labeler, which is not reproducible yet: see
    test_same_config_gives_the_same_labeler_in_another_run_dir.)"""
    from flows.factory import generate_stage
    from labelfoundry.config import load_config
    from tasks.common import LabelerArtifact, code_version, generator_hash

    cfg = load_config(config, {"run_dir": str(run_dir), **(overrides or {})})
    run_dir = Path(cfg.run_dir).resolve()
    return generate_stage(cfg, run_dir, generator_hash(cfg.generator.name), LabelerArtifact.model_validate(labeler),
                          cfg.resolved_device(), code_version_ or code_version())[0]


def snapshot(paths) -> dict[str, tuple[int, int, int]]:
    """inode, size and mtime (ns) of each file: a rewrite, even with identical bytes, changes it."""
    out = {}
    for p in paths:
        st = os.stat(p)
        out[str(p)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def files(root: Path, pattern: str = "**/*") -> list[Path]:
    return sorted(p for p in Path(root).glob(pattern) if p.is_file())


def model_artifacts(run_dir: Path) -> list[Path]:
    """Every file a cached stage writes (not config.yaml / summary.json / metrics.json / evaluation
    report, which the flow itself rewrites on each run)."""
    report = [run_dir / "report" / n for n in ("dataset.md", "samples-kept.png", "samples-most-uncertain.png", "uncertainty-hist.png")]
    return (
        files(run_dir / "invert") + files(run_dir / "fit") + files(run_dir / "datasets")
        + files(run_dir / "evaluate") + [p for p in report if p.exists()]
    )


def eval_files(run_dir: Path, method: str) -> list[Path]:
    """Checkpoints etc. of one downstream method (in evaluate/<method>[-<input key>]/)."""
    return [p for d in sorted((run_dir / "evaluate").glob(f"{method}*")) if d.name.split("-")[0] == method for p in files(d)]


def checksums(dataset: str) -> dict[int, str]:
    import storage

    m = storage.ShardStore.open(dataset).manifest()
    return dict(zip(m["sample_id"].astype(int), m["checksum"]))


def data_files(dataset: str | Path, shards) -> list[Path]:
    """The Zarr shard files (all arrays) of the given shards."""
    import storage

    store = storage.ShardStore.open(str(dataset))
    return [Path(store.shard_file(a, i)) for i in shards for a in store.layout.arrays]


def assert_uncertain_are_top(m, n_drop: int) -> None:
    top = m.sort_values(["score", "sample_id"], ascending=[False, True]).head(n_drop)["sample_id"]
    assert int(m["uncertain"].sum()) == n_drop
    assert set(m.loc[m["uncertain"], "sample_id"]) == set(top)
    assert set(m.loc[~m["keep"], "sample_id"]) == set(top)  # no dedup / rebalance configured
    assert m.loc[m["keep"], "score"].max() <= m.loc[~m["keep"], "score"].min()


# ----------------------------------------------------------------------------- a base run
@pytest.fixture(scope="module")
def base(tmp_path_factory, make_config):
    """One complete factory run (every stage, downstream evaluation included), read-only for tests."""
    d = tmp_path_factory.mktemp("base")
    cfg = make_config(d, d / "run")
    summary, fid = run_factory(cfg)
    return {"config": cfg, "run_dir": d / "run", "summary": summary, "flow_run_id": fid}


def test_rerun_with_same_config_does_no_model_work(base):
    run_dir = base["run_dir"]
    first = task_states(base["flow_run_id"], STAGES_WITH_DOWNSTREAM + 4)
    assert {s for v in first.values() for s in v} == {"Completed"}, first  # the first run did the work
    before = snapshot(model_artifacts(run_dir))
    assert any("/manifest/shard-" in p for p in before) and any(p.endswith("labeler.safetensors") for p in before)

    summary, fid = run_factory(base["config"])

    states = task_states(fid, STAGES_WITH_DOWNSTREAM + 4)
    assert set(states) == {"invert", "fit", "generate-shards", "filter", "report", "train-evaluate"}, states
    assert len(states["generate-shards"]) == 4 and len(states["train-evaluate"]) == 3
    assert {s for v in states.values() for s in v} == {"Cached"}, states
    assert snapshot(model_artifacts(run_dir)) == before
    assert sorted(p.name for p in (run_dir / "datasets").iterdir()) == [Path(base["summary"]["dataset"]).name]
    assert summary == base["summary"]


def test_filter_flags_after_the_flow(base):
    import storage

    path = base["summary"]["dataset"]
    store = storage.ShardStore.open(path)
    m = store.manifest()
    n = 64
    n_drop = math.floor(0.1 * n)
    assert len(m) == n and store.is_complete()
    assert {"keep", "uncertain", "duplicate"} <= set(m.columns)
    assert_uncertain_are_top(m, n_drop)
    assert not m["duplicate"].any()
    assert base["summary"]["filter"] == {"total": n, "kept": n - n_drop, "dropped_uncertain": n_drop, "dropped_duplicate": 0}
    assert len(storage.open_dataset(path)) == n - n_drop  # training sees the kept samples only
    assert len(storage.open_dataset(path, filter=None)) == n

    # flags only: the data still matches the checksums recorded at commit, and no shard file was
    # written after its shard was committed
    report = storage.verify(path)
    assert report.ok, str(report)
    assert report.checked == list(range(4)) and not report.uncommitted
    for i in range(4):
        committed_at = os.stat(Path(path) / "manifest" / f"shard-{i:06d}.parquet").st_mtime_ns
        assert all(os.stat(f).st_mtime_ns <= committed_at for f in data_files(path, [i]))


def test_changing_the_labeler_reruns_fit_and_what_follows_only(tmp_path, make_config):
    run_dir = tmp_path / "run"
    cfg = make_config(tmp_path, run_dir)
    s1, _ = run_factory(cfg)
    untouched = snapshot(files(run_dir / "invert") + files(Path(s1["dataset"])))
    baselines = snapshot(eval_files(run_dir, "labeled_only") + eval_files(run_dir, "oracle"))
    assert len(baselines) >= 2
    labeler_before = snapshot([run_dir / "fit" / "labeler.safetensors"])

    s2, fid = run_factory(cfg, overrides={"labeler": {"min_steps": 12}})

    states = task_states(fid, STAGES_WITH_DOWNSTREAM + 4)
    assert states["invert"] == ["Cached"], states
    assert states["fit"] == ["Completed"], states
    assert states["generate-shards"] == ["Completed"] * 4, states
    assert states["filter"] == ["Completed"] and states["report"] == ["Completed"], states
    assert states["train-evaluate"] == ["Cached", "Cached", "Completed"], states  # only HandsOff's re-trains
    assert s2["inversion"] == s1["inversion"]
    assert s2["labeler"]["hash"] != s1["labeler"]["hash"]
    assert snapshot([run_dir / "fit" / "labeler.safetensors"]) != labeler_before
    # a new labeler -> a new dataset directory; the old one and the inversion are left alone
    assert s2["dataset"] != s1["dataset"]
    assert sorted(p.name for p in (run_dir / "datasets").iterdir()) == sorted(Path(s["dataset"]).name for s in (s1, s2))
    assert snapshot(untouched) == untouched
    assert snapshot(baselines) == baselines

    import storage

    m = storage.ShardStore.open(s2["dataset"]).manifest()
    assert len(m) == 64 and "keep" in m and storage.verify(s2["dataset"]).ok
    assert set(checksums(s2["dataset"]).values()) != set(checksums(s1["dataset"]).values())  # new labels


def test_changing_only_drop_top_reruns_filter_and_report(tmp_path, make_config):
    import storage

    run_dir = tmp_path / "run"
    cfg = make_config(tmp_path, run_dir, downstream={"enabled": False})
    s1, _ = run_factory(cfg)
    path = s1["dataset"]
    m1 = storage.ShardStore.open(path).manifest()
    assert_uncertain_are_top(m1, 6)
    data = snapshot(files(run_dir / "invert") + files(run_dir / "fit") + files(Path(path) / "data.zarr") + files(Path(path) / "manifest"))

    s2, fid = run_factory(cfg, overrides={"filter": {"drop_top": 0.25}})

    states = task_states(fid, 4 + 4)
    assert states["invert"] == ["Cached"] and states["fit"] == ["Cached"], states
    assert states["generate-shards"] == ["Cached"] * 4, states
    assert states["filter"] == ["Completed"] and states["report"] == ["Completed"], states
    assert s2["dataset"] == path
    assert s2["filter"] == {"total": 64, "kept": 48, "dropped_uncertain": 16, "dropped_duplicate": 0}
    m2 = storage.ShardStore.open(path).manifest()
    assert_uncertain_are_top(m2, 16)
    assert set(m1.loc[~m1["keep"], "sample_id"]) < set(m2.loc[~m2["keep"], "sample_id"])
    assert snapshot(data) == data  # flags only; no data, manifest part or upstream artifact rewritten
    assert storage.verify(path).ok


def test_labeler_change_retrains_the_downstream_model_on_the_new_dataset(tmp_path, make_config):
    run_dir = tmp_path / "run"
    cfg = make_config(tmp_path, run_dir, downstream={"baselines": []})
    run_factory(cfg)
    handsoff = snapshot(eval_files(run_dir, "handsoff"))
    assert handsoff
    _, fid = run_factory(cfg, overrides={"labeler": {"min_steps": 12}})
    assert task_states(fid, 4 + 1 + 4)["train-evaluate"] == ["Completed"]
    after = snapshot(eval_files(run_dir, "handsoff"))
    assert set(after) - set(handsoff) or any(after[p] != v for p, v in handsoff.items() if p in after), (
        "no new checkpoint: the segmenter was not trained on the new dataset")


def test_going_back_to_an_earlier_filter_config_restores_its_flags(tmp_path, make_config):
    import storage

    cfg = make_config(tmp_path, tmp_path / "run", downstream={"enabled": False})
    s1, _ = run_factory(cfg)
    run_factory(cfg, overrides={"filter": {"drop_top": 0.25}})
    s3, _ = run_factory(cfg)  # drop_top 0.1 again
    assert s3["filter"] == s1["filter"]
    m = storage.ShardStore.open(s3["dataset"]).manifest()
    assert int((~m["keep"]).sum()) == s3["filter"]["total"] - s3["filter"]["kept"] == 6


def test_changing_drop_top_retrains_the_filtered_downstream_model(tmp_path, make_config):
    cfg = make_config(tmp_path, tmp_path / "run", downstream={"baselines": ["unfiltered"]})
    s1, _ = run_factory(cfg)
    s2, fid = run_factory(cfg, overrides={"filter": {"drop_top": 0.25}})
    states = task_states(fid, 4 + 2 + 4)
    assert states["filter"] == ["Completed"], states
    assert "Completed" in states["train-evaluate"], states  # (the unfiltered baseline need not re-train)
    assert s1["evaluation"]["methods"]["handsoff"]["train_samples"] == 58
    assert s2["evaluation"]["methods"]["handsoff"]["train_samples"] == 48  # trained on the new flags
    assert s2["evaluation"]["methods"]["unfiltered"]["train_samples"] == 64


def test_oracle_steps_retrains_the_oracle_alone(tmp_path, make_config):
    """downstream.oracle_steps is the reference's own schedule: setting it re-trains the oracle only,
    for that many steps; set to max_steps it is the default's training (a cache hit)."""
    cfg = make_config(tmp_path, tmp_path / "run")
    s1, _ = run_factory(cfg)
    s2, fid = run_factory(cfg, overrides={"downstream": {"oracle_steps": 7}})
    states = task_states(fid, STAGES_WITH_DOWNSTREAM + 4)
    assert states["train-evaluate"] == ["Cached", "Cached", "Completed"], states
    steps = {m: [r["train_steps"] for r in s2["evaluation"]["methods"][m]["seeds"]] for m in ("handsoff", "labeled_only", "oracle")}
    assert steps == {"handsoff": [5], "labeled_only": [5], "oracle": [7]}, steps
    assert s2["evaluation"]["methods"]["handsoff"] == s1["evaluation"]["methods"]["handsoff"]
    _, fid = run_factory(cfg, overrides={"downstream": {"oracle_steps": 5}})  # = max_steps: the default's training
    assert set(task_states(fid, STAGES_WITH_DOWNSTREAM + 4)["train-evaluate"]) == {"Cached"}


# ----------------------------------------------------------------------------- kill -9 + resume
def test_kill_9_during_generation_then_rerun_generates_only_uncommitted_shards(tmp_path, make_config):
    import storage
    from tasks.common import code_version

    num_shards = 12
    gen = {"num_samples": 96, "samples_per_shard": 8, "shards_per_task": 1, "batch": 8}
    cfg = make_config(tmp_path, tmp_path / "run", generate=gen, runner={"workers": 1}, downstream={"enabled": False})
    marker, log = tmp_path / "hung-at-shard", tmp_path / "helper.log"
    hang_at = 5  # commits 0..4 go through; the 6th shard's data is written, then the process hangs before its commit
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(HELPER), str(cfg), "--hang-at-commit", str(hang_at), "--marker", str(marker),
             "--code-version", code_version()],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, 300, "the helper to reach the hang point")
        assert proc.poll() is None and marker.exists(), f"helper exited early:\n{log.read_text()[-5000:]}"
        (ds,) = (tmp_path / "run" / "datasets").iterdir()
        parts = files(ds / "manifest", "shard-*.parquet")
        assert len(parts) == hang_at  # one writer: shards 0..hang_at-1 committed, the hung one not
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    store = storage.ShardStore.open(str(ds))
    committed = store.committed_shards()
    hung = int(marker.read_text())
    assert len(committed) == hang_at and hung not in committed
    assert all(f.is_file() for f in data_files(ds, [hung]))  # written, never committed
    pre = storage.verify(str(ds))
    assert pre.ok and pre.checked == committed and len(pre.uncommitted) == num_shards - hang_at
    kept = snapshot(files(ds / "manifest", "shard-*.parquet") + data_files(ds, committed))

    summary, fid = run_factory(cfg)

    assert summary["dataset"] == str(ds)
    states = task_states(fid, 4 + num_shards)
    assert states["invert"] == ["Cached"] and states["fit"] == ["Cached"], states
    assert states["generate-shards"] == sorted(["Cached"] * hang_at + ["Completed"] * (num_shards - hang_at)), states
    assert snapshot(kept) == kept  # the committed shards were not regenerated nor rewritten
    store = storage.ShardStore.open(str(ds))
    assert store.committed_shards() == list(range(num_shards))
    report = storage.verify(str(ds))
    assert report.ok and len(report.checked) == num_shards, str(report)

    # the same as an uninterrupted generation (same config and labeler, another run dir)
    ref = generate_with_labeler(cfg, tmp_path / "reference", summary["labeler"])
    assert Path(ref).name == ds.name and Path(ref).parent != ds.parent
    assert len(checksums(str(ds))) == 96
    assert checksums(str(ds)) == checksums(ref)
    resumed, reference = (storage.ShardStore.open(p).manifest() for p in (str(ds), ref))
    assert resumed["seed"].tolist() == reference["seed"].tolist()
    assert resumed["score"].tolist() == reference["score"].tolist()


# ----------------------------------------------------------------------------- Dask and Ray runners
def record_task_runners(monkeypatch) -> list:
    """The task runners the factory uses from now on, in order."""
    from contextlib import contextmanager

    import flows.factory as factory_module

    runners = []
    real = factory_module.task_runner

    @contextmanager
    def recording(section):
        with real(section) as runner:
            runners.append(runner)
            yield runner

    monkeypatch.setattr(factory_module, "task_runner", recording)
    return runners


def generate_with_no_api_configured(monkeypatch, *args, expected: int, **kwargs) -> tuple[str, list[str]]:
    """generate_with_labeler as a user's run without PREFECT_API_URL; returns the dataset and the final
    states of its task runs as the session's Prefect server records them, once `expected` are final.

    This process's Prefect server (SubprocessASGIServer) is the session's test server. The database
    setting is back to its default too: a worker that started a temporary server of its own would
    write its task runs to PREFECT_HOME's database, where the test server never sees them."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime, TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    since = datetime.now(timezone.utc)
    with monkeypatch.context() as m:
        m.delenv("PREFECT_API_URL")
        with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL}):
            path = generate_with_labeler(*args, **kwargs)

    def fetch():
        with get_client(sync_client=True) as client:
            flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))
            runs = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[f.id for f in flow_runs])))
        assert len(flow_runs) == 1, [f.name for f in flow_runs]  # the generation subflow
        if len(runs) < expected or any(r.state is None or not r.state.is_final() for r in runs):
            return None
        return sorted(r.state.name for r in runs)

    return path, wait_for(fetch, 60, f"{expected} finished task runs in the session's Prefect server", interval=0.2)


@pytest.fixture(scope="module")
def threads_reference(tmp_path_factory, make_config) -> tuple[Path, dict]:
    """A factory run to `filter` on the thread runner, 32 samples in 4 shards: (config, summary).
    What the Dask and Ray runs must reproduce."""
    d = tmp_path_factory.mktemp("threads")
    cfg = make_config(d, d / "threads", generate={"num_samples": 32, "samples_per_shard": 8}, downstream={"enabled": False})
    with pytest.MonkeyPatch.context() as m:
        runners = record_task_runners(m)
        summary, _ = run_factory(cfg, stop_after="filter")
    assert [type(r).__name__ for r in runners] == ["ThreadPoolTaskRunner"]
    return cfg, summary


def assert_same_dataset(path: str, reference: str) -> None:
    import storage

    assert Path(path).name == Path(reference).name and Path(path).parent != Path(reference).parent
    assert storage.ShardStore.open(path).is_complete() and storage.verify(path).ok
    assert len(checksums(path)) == 32
    assert checksums(path) == checksums(reference)


def test_dask_task_runner_gives_the_same_dataset_as_threads(threads_reference, tmp_path, monkeypatch, prefect_server):
    """Generation mapped over a local 2-process Dask cluster (prefect-dask) writes the same bytes as
    the thread runner; with no PREFECT_API_URL configured, both workers report to the one server of
    the run (every task run is in its database, and completed)."""
    cfg, threads = threads_reference
    runners = record_task_runners(monkeypatch)
    path, states = generate_with_no_api_configured(monkeypatch, cfg, tmp_path / "dask", threads["labeler"],
                                                   {"runner": {"kind": "dask", "workers": 2}}, expected=4)

    assert [type(r).__name__ for r in runners] == ["DaskTaskRunner"]
    assert runners[0].cluster_kwargs["env"] == {"PREFECT_API_URL": prefect_server}
    assert states == ["Completed"] * 4  # one task run per shard, all in the one server
    assert_same_dataset(path, threads["dataset"])


def test_ray_task_runner_gives_the_same_dataset_as_threads(threads_reference, tmp_path, monkeypatch, prefect_server):
    """The same on a local 2-CPU Ray instance (prefect-ray, the `ray` extra), whose worker processes
    also report to the one server of the run."""
    pytest.importorskip("prefect_ray", reason="runner.kind 'ray' needs the ray extra: pip install 'labelfoundry[ray]'")
    cfg, threads = threads_reference
    runners = record_task_runners(monkeypatch)
    path, states = generate_with_no_api_configured(monkeypatch, cfg, tmp_path / "ray", threads["labeler"],
                                                   {"runner": {"kind": "ray", "workers": 2}}, expected=4)

    assert [type(r).__name__ for r in runners] == ["RayTaskRunner"]
    assert runners[0].init_kwargs["runtime_env"] == {"env_vars": {"PREFECT_API_URL": prefect_server}}
    assert states == ["Completed"] * 4
    assert_same_dataset(path, threads["dataset"])


def test_dask_workers_import_the_project_like_the_installed_cli(base, tmp_path, monkeypatch):
    """The console script has neither the repo root nor the cwd on sys.path (pytest adds the root,
    which hides the problem); Dask workers inherit the parent's sys.path, so drop the root here."""
    import storage

    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    path = generate_with_labeler(base["config"], tmp_path / "run", base["summary"]["labeler"],
                                 {"runner": {"kind": "dask", "workers": 1}, "generate": {"num_samples": 16}})
    assert storage.ShardStore.open(path).is_complete()


def test_generation_after_a_code_change_with_the_same_labeler_does_not_fail(base, tmp_path):
    import storage

    args = (base["config"], tmp_path / "run", base["summary"]["labeler"], {"generate": {"num_samples": 16}})
    generate_with_labeler(*args, code_version_="code-A")
    path = generate_with_labeler(*args, code_version_="code-B")
    assert storage.ShardStore.open(path).is_complete()


def test_same_config_gives_the_same_labeler_in_another_run_dir(tmp_path, make_config):
    cfg = make_config(tmp_path, tmp_path / "a", downstream={"enabled": False})
    a, _ = run_factory(cfg, stop_after="fit")
    b, _ = run_factory(cfg, overrides={"run_dir": str(tmp_path / "b")}, stop_after="fit")
    assert a["inversion"]["hash"] == b["inversion"]["hash"]
    assert a["labeler"]["hash"] == b["labeler"]["hash"]
