"""Task runner chosen by config: threads locally, Dask or Ray processes on a cluster."""

from __future__ import annotations


def make_task_runner(section):
    if section.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=section.workers)
    if section.kind == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(
            cluster_kwargs={"n_workers": section.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
        )
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:  # optional extra
        raise RuntimeError("runner.kind 'ray' needs prefect-ray: pip install 'labelfoundry[ray]'") from e
    return RayTaskRunner()
