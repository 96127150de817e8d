"""Task runner chosen by config: threads locally, Dask or Ray processes on a cluster."""

from __future__ import annotations


def make_task_runner(section):
    if section.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=section.workers)
    if section.kind == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(
            # memory_limit=0: no spilling, so no spill folder named storage/ in the worker's cwd to shadow our package
            cluster_kwargs={"n_workers": section.workers, "threads_per_worker": 1, "processes": True,
                            "dashboard_address": None, "memory_limit": 0}
        )
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:  # optional extra
        raise RuntimeError("runner.kind 'ray' needs prefect-ray: pip install 'labelfoundry[ray]'") from e
    return RayTaskRunner()
