"""Generation-only flow for scheduled runs: reuses the cached inversion and label generator."""

from __future__ import annotations

from prefect import flow

from .factory import factory, run_name


def _overrides(num_samples: int | None, run_dir: str | None) -> dict:
    overrides: dict = {}
    if num_samples is not None:
        overrides["generate"] = {"num_samples": num_samples}
    if run_dir is not None:
        overrides["run_dir"] = run_dir
    return overrides


def _generate_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"{run_name(p.get('config'), _overrides(p.get('num_samples'), p.get('run_dir')))} (generate)"


@flow(name="generate", flow_run_name=_generate_run_name, log_prints=True)
def generate(config: str | None = None, num_samples: int | None = None, run_dir: str | None = None) -> dict:
    """Invert/fit (cache hits after the first run), then generate, filter and report."""
    return factory(config=config, overrides=_overrides(num_samples, run_dir), stop_after="filter")
