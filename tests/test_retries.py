"""Stage tasks retry only what a retry can fix: not bad input, not a full or read-only disk."""

from __future__ import annotations

import errno

import pytest
from prefect import flow, task

from tasks import evaluate, fit, generate, invert
from tasks.common import is_permanent, retry_transient

pytestmark = pytest.mark.prefect


@pytest.mark.parametrize("exc,calls", [
    (ValueError("bad mask"), 1),
    (FileNotFoundError("nope.pkl"), 1),
    (OSError(errno.ENOSPC, "No space left on device"), 1),
    (ConnectionError("flaky"), 3),
])
def test_task_retries_only_transient_errors(exc, calls):
    n = {"calls": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def failing() -> None:
        n["calls"] += 1
        raise exc

    @flow
    def f() -> None:
        failing()

    with pytest.raises(type(exc)):
        f()
    assert n["calls"] == calls


def test_every_retrying_stage_task_uses_the_condition():
    for t in (invert.invert_task, fit.fit_task, generate.generate_shards_task, evaluate.train_eval_task):
        assert t.retries >= 1 and t.retry_condition_fn is retry_transient, t.name
    assert is_permanent(OSError(errno.EROFS, "read-only")) and not is_permanent(TimeoutError())
