"""Task runner chosen by config: threads locally, Dask or Ray processes on a cluster.

Worker processes report their task runs (and logs) to the Prefect API. With no PREFECT_API_URL
configured, Prefect would start a temporary server in each worker process: ~15 s each, all on one
SQLite file, and the runs of one flow spread over several servers. So a multi-process runner always
gets one server on loopback for the run, and every worker is pointed at it through PREFECT_API_URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner

from labelfoundry.config import RunnerSection


@contextmanager
def task_runner(section: RunnerSection) -> Iterator[TaskRunner]:
    """The runner for ``section``; Dask and Ray workers report to this process's Prefect API."""
    if section.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        yield ThreadPoolTaskRunner(max_workers=section.workers)
        return
    with shared_prefect_api() as url:
        env = {"PREFECT_API_URL": url}
        yield _dask(section, env) if section.kind == "dask" else _ray(section, env)


@contextmanager
def shared_prefect_api() -> Iterator[str]:
    """The API URL every worker process of the run must use.

    The configured PREFECT_API_URL when there is one. Otherwise the temporary server Prefect runs
    for this process (``SubprocessASGIServer``, on 127.0.0.1; the flow run of this process already
    reports to it): it is set as PREFECT_API_URL while the block runs, so the settings Prefect sends
    with each task carry it. A server started here is stopped at the end of the block; one that was
    already running stops when the process exits, as Prefect arranged.
    """
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # Prefect's per-process instance: the one get_client() uses
    started_here = not server.running
    server.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        if started_here:
            server.stop()


def _dask(section: RunnerSection, env: dict[str, str]) -> TaskRunner:
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": section.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            # no spilling, so no spill folder named storage/ in the worker's cwd to shadow our package
            "memory_limit": 0,
            # set in each worker process before it starts: Prefect's log shipping reads the process
            # settings, not the settings sent with each task
            "env": env,
        }
    )


def _ray(section: RunnerSection, env: dict[str, str]) -> TaskRunner:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:  # optional extra
        raise RuntimeError("runner.kind 'ray' needs prefect-ray: pip install 'labelfoundry[ray]'") from e
    # A local Ray instance of `workers` CPUs (one task each); no dashboard, a small object store:
    # tasks exchange paths and hashes, never tensors.
    return RayTaskRunner(init_kwargs={
        "num_cpus": section.workers, "include_dashboard": False, "object_store_memory": 100 * 2**20,
        "runtime_env": {"env_vars": env},
    })
