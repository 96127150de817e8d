"""Generation-only flow for scheduled runs: reuses the cached inversion and label generator."""

from __future__ import annotations

from prefect import flow

from .factory import factory


@flow(name="generate", log_prints=True)
def generate(config: str | None = None, num_samples: int | None = None, run_dir: str | None = None) -> dict:
    """Invert/fit (cache hits after the first run), then generate, filter and report."""
    overrides: dict = {}
    if num_samples is not None:
        overrides["generate"] = {"num_samples": num_samples}
    if run_dir is not None:
        overrides["run_dir"] = run_dir
    return factory(config=config, overrides=overrides, stop_after="filter")
