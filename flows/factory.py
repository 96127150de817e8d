"""The factory flow: invert -> fit -> generate -> refine -> filter -> report (-> train + evaluate).

Each stage is a cached Prefect task (see tasks/common.py): re-running a config does no model work,
changing one section re-runs that stage and what follows. Artifacts travel as (path, hash).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.futures import as_completed

import storage
from labelfoundry.config import RunConfig, load_config
from labelfoundry.labelers import NEEDS_INVERSION
from tasks.common import Artifact, LabelerArtifact, cached, code_version, generator_hash
from tasks.filter import filter_task
from tasks.fit import fit_task
from tasks.generate import dataset_path, generate_shards_task, prepare_store
from tasks.invert import invert_task
from tasks.refine import refine_skipped, refine_stage
from tasks.report import publish_dataset_report, report_task

from . import progress
from .runners import task_runner


def run_stage(task, **kwargs) -> Artifact:
    """Run a cached stage; if its cached artifact went missing or changed on disk, recompute it."""
    art = cached(task, kwargs["run_dir"])(**kwargs)
    if not art.exists_unchanged():
        get_run_logger().warning("cached %s artifact %s is missing or changed; recomputing", task.name, art.path)
        art = cached(task, kwargs["run_dir"], refresh=True)(**kwargs)
    return art


def run_name(config: str | None, overrides: dict | None) -> str:
    """"demo · handsoff": the config's name and the labeling method."""
    try:
        cfg = load_config(config, overrides)
    except Exception:  # noqa: BLE001 - the flow itself reports the config error
        return f"invalid config {config or 'demo'}"
    return f"{cfg.name} · {cfg.labeler.method}"


def _factory_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return run_name(p.get("config"), p.get("overrides")) + (f" (up to {p['stop_after']})" if p.get("stop_after") else "")


def _generation_run_name() -> str:
    """"handsoff: 64 shards in 4 tasks" (the subflow's parameters)."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    n = sum(len(g) for g in p["groups"])
    return f"{p['task_args']['labeler'].method}: {n} shards in {len(p['groups'])} tasks"


@flow(name="generation", flow_run_name=_generation_run_name)
def generate_subflow(run_dir: str, groups: list[list[int]], task_args: dict) -> None:
    """Map one task per shard group over the configured task runner (the factory's progress
    artifact follows the committed shards). task_args: every generate_shards_task argument but
    shard_indices."""
    log = get_run_logger()
    task_ = cached(generate_shards_task, run_dir, tags=["gpu"] if task_args["device"] == "cuda" else [])
    futures = task_.map(shard_indices=groups, **{k: unmapped(v) for k, v in task_args.items()})
    done = 0
    for fut in as_completed(futures):
        fut.result()
        done += 1
        if done % max(1, len(groups) // 10) == 0 or done == len(groups):
            log.info("generation: %d / %d tasks done", done, len(groups))


@contextlib.contextmanager
def generation_progress(store_path: str) -> Iterator[None]:
    """A `generation-progress` artifact on the calling (factory) flow run that moves per committed
    shard, its description carrying the counts; the same counts go to in-process listeners."""
    start = progress.committed(store_path)
    art = link = None
    if FlowRunContext.get() is not None:  # the stage also runs alone (tests), outside any flow run
        art = create_progress_artifact(start.percent, key="generation-progress", description=start.describe())
        link = ui_link(f"artifacts/artifact/{art}")
        get_run_logger().info("generation progress: %s", link or f"artifact generation-progress of this flow run ({start.describe()})")
    progress.emit(progress.ProgressEvent("generate", start, link))

    def changed(now: progress.GenerationProgress) -> None:
        if art is not None:
            update_progress_artifact(art, now.percent, description=now.describe())
        progress.emit(progress.ProgressEvent("generate", now, link))

    with progress.StoreWatcher(store_path, changed):
        yield


def ui_link(path: str) -> str | None:
    """The Prefect UI's URL of `path` when a UI serves the API (not for the local ephemeral API)."""
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/{path}" if base else None


def generate_stage(cfg: RunConfig, run_dir: Path, gh: str, labeler: LabelerArtifact, device: str, cv: str,
                   extra: dict[str, LabelerArtifact] | None = None) -> tuple[str, list]:
    """Create/reopen the store, re-check what is committed, generate what is not, and check every
    shard committed. extra: the fitted extra labelers by label array (a multi-label dataset).
    Returns the store path and the states of the runs that wrote it (the `wait_for` of what reads it:
    a path computed outside any task gives Prefect no edge to draw)."""
    path = dataset_path(str(run_dir), gh, labeler, cfg.generate, cfg.seed, cv, extra)
    provenance = {
        "generator": cfg.generator.name, "generator_hash": gh, "labeler": labeler.method, "labeler_hash": labeler.hash,
        "generate": cfg.generate.model_dump(), "seed": cfg.seed, "code_version": cv, "task": labeler.task,
    }
    if extra:
        provenance["extra_labelers"] = {k: {"labeler": a.method, "labeler_hash": a.hash, "task": a.task} for k, a in extra.items()}
    store = prepare_store(path, labeler, cfg.generate, provenance, extra)
    recheck = storage.repair(path, deep=False)  # a re-run re-checks committed data (cheap: no decoding)
    if recheck.repaired:
        get_run_logger().warning(
            "re-check of %s found damaged shards %s; uncommitted them to regenerate:\n%s",
            path, recheck.repaired, "\n".join(str(b) for b in recheck.bad),
        )
    k = cfg.generate.shards_per_task
    groups = [list(range(i, min(i + k, store.num_shards))) for i in range(0, store.num_shards, k)]
    task_args = dict(store_path=path, generator=cfg.generator.name, generator_hash=gh, labeler=labeler, gen=cfg.generate,
                     run_seed=cfg.seed, code_version=cv, device=device, torch_threads=cfg.runner.torch_threads)
    if extra:
        task_args["extra_labelers"] = extra
    progress.emit(progress.ProgressEvent("generate"))
    with generation_progress(path), task_runner(cfg.runner) as runner:
        states = [generate_subflow.with_options(task_runner=runner)(
            run_dir=str(run_dir), groups=groups, task_args=task_args, return_state=True)]
        states[0].result()  # raise a failed generation here
        missing = storage.ShardStore.open(path).uncommitted_shards()
        if missing:  # a cached task whose shard was deleted or found damaged since: regenerate without the cache
            get_run_logger().warning("shards %s not committed after generation; regenerating them", missing[:10])
            states.append(cached(generate_shards_task, run_dir, refresh=True)(shard_indices=missing, **task_args, return_state=True))
            states[-1].result()
            get_run_logger().info("regenerated shards %s of %s", missing, path)
    return path, states


def write_run_file(path: Path, text: str) -> None:
    """Write a run-directory file unless it already holds ``text``: a fully cached re-run then needs
    no write access to the run dir. A failed write names the directory and the fix."""
    try:
        if path.is_file() and path.read_text() == text:
            return
    except OSError:
        pass  # unreadable: try to write it
    try:
        path.write_text(text)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot write {path.name} in the run directory {path.parent} ({exc.strerror or exc}); make "
            "that directory writable, or set run_dir to a writable directory (in the config, `labelfoundry run "
            "--set run_dir=DIR` or `labelfoundry generate --run-dir DIR`)",
            str(path),
        ) from exc


@flow(name="factory", flow_run_name=_factory_run_name, log_prints=True)
def factory(config: str | None = None, overrides: dict | None = None, stop_after: str | None = None) -> dict:
    """The whole factory for one run config (YAML path; None = built-in demo) + nested overrides.

    stop_after: "fit" / "filter" to end early (the `generate` flow stops after "filter").
    """
    cfg = load_config(config, overrides)
    log = get_run_logger()
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_file(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    device = cfg.resolved_device()
    cv = code_version()
    gh = generator_hash(cfg.generator.name)
    log.info("run %s in %s on %s (code %s)", cfg.name, run_dir, device, cv)

    progress.emit(progress.ProgressEvent("invert"))
    inverted = run_stage(
        invert_task, run_dir=str(run_dir), generator=cfg.generator.name, generator_hash=gh,
        labeled_cfg=cfg.labeled, code_version=cv, device=device,
        inversion_cfg=cfg.inversion if any(c.method in NEEDS_INVERSION for c in cfg.label_arrays().values()) else None,
    )
    progress.emit(progress.ProgressEvent("fit"))
    labeler = run_stage(
        fit_task, run_dir=str(run_dir), generator=cfg.generator.name, generator_hash=gh, inverted=inverted,
        labeler_cfg=cfg.labeler, code_version=cv, device=device,
    )
    extra = {  # further label types, fitted on the same inverted images
        array: run_stage(fit_task, run_dir=str(run_dir), generator=cfg.generator.name, generator_hash=gh, inverted=inverted,
                         labeler_cfg=lcfg, code_version=cv, device=device, array=array)
        for array, lcfg in cfg.label_arrays().items() if array != "label"
    }
    summary: dict = {"run_dir": str(run_dir), "inversion": inverted.model_dump(), "labeler": labeler.model_dump()}
    if extra:
        summary["extra_labelers"] = {k: a.model_dump() for k, a in extra.items()}
    if stop_after != "fit":
        store_path, generation = generate_stage(cfg, run_dir, gh, labeler, device, cv, extra)
        skip = refine_skipped(cfg)
        if skip is None:
            progress.emit(progress.ProgressEvent("refine"))
            summary["unrefined_dataset"] = store_path
            store_path = refine_stage(cfg, run_dir, inverted, labeler, store_path, storage.manifest_hash(store_path), device, cv)
        elif cfg.refine.enabled:
            log.info("refine: skipped, %s", skip)
        mh = storage.manifest_hash(store_path)
        progress.emit(progress.ProgressEvent("filter"))
        filt_args = dict(store_path=store_path, manifest_hash_=mh, filter_cfg=cfg.filter, code_version=cv)
        filtered = cached(filter_task, run_dir)(**filt_args, wait_for=generation)
        if filtered["flags_hash"] != storage.flags_hash(store_path):  # another filter config wrote its flags since
            filtered = cached(filter_task, run_dir, refresh=True)(**filt_args, wait_for=generation)
        counts, fh = filtered["counts"], filtered["flags_hash"]
        progress.emit(progress.ProgressEvent("report"))
        report = cached(report_task, run_dir)(run_dir=str(run_dir), store_path=store_path, manifest_hash_=mh + fh, counts=counts,
                                              code_version=cv, wait_for=generation)
        publish_dataset_report(report, counts)  # here, not in the cached task: a cache hit shows them too
        summary.update({"dataset": store_path, "filter": counts, "report": report})
        if stop_after != "filter" and cfg.downstream.enabled:
            from tasks.evaluate import evaluate_stage

            progress.emit(progress.ProgressEvent("evaluate"))
            summary["evaluation"] = evaluate_stage(cfg, run_dir, inverted, store_path, mh, fh, device, cv,
                                                   unrefined=summary.get("unrefined_dataset"))
            for array in extra:  # a multi-label dataset: each further label type trains its own networks
                summary.setdefault("extra_evaluations", {})[array] = evaluate_stage(
                    cfg, run_dir, inverted, store_path, mh, fh, device, cv, array=array)
    write_run_file(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
