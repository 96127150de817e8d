"""Generation-only flow for scheduled runs: reuses the cached inversion and label generator."""

from __future__ import annotations

from prefect import flow

from labelfoundry.config import deep_merge

from .factory import factory, run_name


def _overrides(num_samples: int | None, run_dir: str | None, overrides: dict | None = None) -> dict:
    """Any config keys (as `labelfoundry run --set`), then the two shorthands, which win."""
    short: dict = {}
    if num_samples is not None:
        short["generate"] = {"num_samples": num_samples}
    if run_dir is not None:
        short["run_dir"] = run_dir
    return deep_merge(overrides or {}, short)


def _generate_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"{run_name(p.get('config'), _overrides(p.get('num_samples'), p.get('run_dir'), p.get('overrides')))} (generate)"


@flow(name="generate", flow_run_name=_generate_run_name, log_prints=True)
def generate(config: str | None = None, num_samples: int | None = None, run_dir: str | None = None,
             overrides: dict | None = None) -> dict:
    """Invert/fit (cache hits after the first run), then generate, filter and report. overrides:
    nested config keys, e.g. {"generate": {"compile": "on"}} (a deployment's parameters can set them)."""
    return factory(config=config, overrides=_overrides(num_samples, run_dir, overrides), stop_after="filter")
