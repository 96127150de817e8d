"""Shared fixtures: one Prefect test server per session, a tiny random generator, tiny run configs.

Prefect reads its settings when it is first imported, so the environment is fixed here, at
conftest import time (before any test module imports prefect): analytics off, a generous
ephemeral-server startup timeout (the server takes ~15 s to start on a busy 2-core machine), and a
throw-away PREFECT_HOME. A user's PREFECT_API_URL / PREFECT_PROFILE never leak into the tests.

One ``prefect_test_harness`` server serves the whole session (a session-scoped autouse fixture, so
it is up before any module fixture runs a flow). It starts only when the selected tests include
one marked ``prefect`` (``pytestmark = pytest.mark.prefect`` in flow modules), so a run of the
storage / config / unit tests alone does not pay for it. While the harness runs, its API URL is also exported as
PREFECT_API_URL so subprocesses (the kill -9 helper, Dask worker processes) report to the same
server instead of each starting a temporary server of their own.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="lf-test-prefect-home-")
for _k in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
    os.environ.pop(_k, None)
os.environ.update(
    {
        "PREFECT_HOME": _PREFECT_HOME,
        "LABELFOUNDRY_HOME": str(Path(_PREFECT_HOME) / "labelfoundry"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_TASKS_REFRESH_CACHE": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # never wait on the (absent) internet
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        "DO_NOT_TRACK": "1",
    }
)

import copy  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The smallest configuration that still runs every stage: resolution-16 generator, 4 labeled
# toy faces, 3 inversion steps, a 2-member labeler, 64 samples in 4 shards, 5 downstream steps.
# Refinement is off here (tests/test_refine.py turns it on: 2 refiners of 4+2 steps).
TINY: dict = {
    "name": "test",
    "seed": 0,
    "device": "cpu",
    "labeled": {"source": "toyfaces", "num_images": 4},
    "inversion": {"steps": 3, "batch": 4},
    "labeler": {"members": 2, "hidden": [8, 4], "min_steps": 10, "epochs": 0.01, "pixels_per_image": 64},
    "generate": {"num_samples": 64, "samples_per_shard": 16, "batch": 16},
    "refine": {"enabled": False, "members": 2, "steps": 4, "finetune_steps": 2, "batch_size": 8, "workers": 1, "batch": 16},
    "filter": {"drop_top": 0.1},
    "downstream": {
        "max_steps": 5, "epochs": 1, "test_images": 16, "oracle_images": 32, "batch_size": 8,
        "baselines": ["labeled_only", "oracle"], "workers": 1,
    },
    "runner": {"kind": "threads", "workers": 2, "torch_threads": 1},
}


@pytest.fixture(scope="session", autouse=True)
def prefect_server(request):
    """One Prefect test server for the whole session, started before any other fixture when the
    selected tests include one marked ``prefect``; yields its API URL (None when not started)."""
    if not any(item.get_closest_marker("prefect") for item in request.session.items):
        yield None
        return
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url  # inherited by subprocesses and Dask workers
        try:
            yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)


def tiny_G(resolution: int = 16, seed: int = 0):
    """A random StyleGAN2 small enough for CPU tests: channels and z/w dims equal the resolution,
    two mapping layers; the same weights for the same (resolution, seed), in eval mode."""
    import torch

    from labelfoundry.generators import Generator

    torch.manual_seed(seed)
    G = Generator(resolution=resolution, channel_base=8 * resolution, channel_max=resolution,
                  z_dim=resolution, w_dim=resolution, map_layers=2)
    return G.eval()


@pytest.fixture(scope="module")
def G16():
    """tiny_G(16), one per test module."""
    return tiny_G(16)


@pytest.fixture(scope="module")
def G32():
    """tiny_G(32), one per test module."""
    return tiny_G(32)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: intra-op threads only oversubscribe (10-30x slower).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`; the count comes back after the module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def schema_of(num_classes: int) -> dict:
    """A label schema with `num_classes` made-up class names (for tests that need only the count)."""
    return {"class_names": [f"c{i}" for i in range(num_classes)], "colors": [[0, 0, 0]] * num_classes, "keypoint_names": []}


def fit_data(masks=None, num_classes: int = 2, **fields):
    """A FitData of masks with `num_classes` made-up classes."""
    from labelfoundry.labelers import FitData

    return FitData(masks=masks, schema=schema_of(num_classes), **fields)


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory) -> str:
    """tiny_G(16) saved as safetensors (seconds to run on CPU)."""
    from labelfoundry.generators import save_generator

    path = tmp_path_factory.mktemp("generator") / "g.safetensors"
    save_generator(path, tiny_G(16))
    return str(path)


def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@pytest.fixture(scope="session")
def make_config(tiny_generator):
    """make_config(dir, run_dir=..., **section overrides) -> path of a tiny YAML run config."""

    def make(directory: Path, run_dir: Path, name: str = "config.yaml", **overrides) -> Path:
        data = deep_merge(TINY, {"run_dir": str(run_dir), "generator": {"name": tiny_generator}})
        data = deep_merge(data, overrides)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll until predicate() is truthy; fail the test after `timeout` seconds (never asserts on time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
