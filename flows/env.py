"""Prefect settings for a local run, applied before prefect is imported.

A run needs no server started by hand: Prefect's ephemeral API with SQLite under a project-chosen
PREFECT_HOME. A user's own PREFECT_API_URL / PREFECT_HOME always win.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "PREFECT_TASKS_REFRESH_CACHE": "false",
}


def configure_prefect_env() -> None:
    os.environ.setdefault("PREFECT_HOME", str(Path(os.environ.get("LABELFOUNDRY_HOME", "~/.labelfoundry")).expanduser() / "prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)  # prefect creates only the leaf
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
