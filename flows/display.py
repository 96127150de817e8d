"""The CLI's view of a running factory: the stage, shards committed, samples/s and the time left.

On a terminal, one rich progress bar; otherwise (a pipe, a log file, CI) plain lines, so nothing is
garbled by cursor movement. It listens to flows.progress, so it shows what the flow publishes to its
progress artifact, whatever task runner writes the shards.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from . import progress as run_progress


class RunDisplay:
    """Context manager: shows the flows.progress events of the flow run inside it.
    plain_every: seconds between plain lines while generating (a new stage always prints)."""

    def __init__(self, console: Console, plain_every: float = 5.0) -> None:
        self.console = console
        self.plain = not console.is_terminal
        self.plain_every = plain_every
        self.bar = Progress(
            TextColumn("[bold]{task.fields[stage]:<9}"), BarColumn(), TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]}"), console=console, disable=self.plain,
        )
        self._task: TaskID | None = None
        self._stage: str | None = None
        self._linked: str | None = None
        self._last_line = 0.0

    def __enter__(self) -> "RunDisplay":
        self.bar.start()
        self._task = self.bar.add_task("run", total=None, stage="starting", counts="", rate="", eta="")
        run_progress.add_listener(self.on_event)
        self._swapped = [] if self.plain else _route_prefect_console(self.console)
        return self

    def __exit__(self, *exc: object) -> None:
        run_progress.remove_listener(self.on_event)
        for handler, console in self._swapped:
            handler.console = console
        self.bar.stop()

    def on_event(self, ev: run_progress.ProgressEvent) -> None:
        assert self._task is not None
        if ev.link and ev.link != self._linked:
            self._linked = ev.link
            self.bar.console.print(f"generation progress in the Prefect UI: {ev.link}", highlight=False, soft_wrap=True)
        new_stage = ev.stage != self._stage
        self._stage = ev.stage
        g = ev.generation
        if g is None:
            self.bar.reset(self._task, total=None, stage=ev.stage, counts="", rate="", eta="")
            if self.plain and new_stage:
                self._line(f"{ev.stage} ...")
            return
        first = new_stage or self.bar.tasks[self._task].total != g.total_samples
        if first:  # rate and ETA from this run's start, not from shards committed by an earlier run
            self.bar.reset(self._task, total=g.total_samples, completed=g.samples, stage=ev.stage)
        self.bar.update(self._task, completed=g.samples, stage=ev.stage, counts=g.describe())
        done = g.shards == g.total_shards
        left = self.bar.tasks[self._task].time_remaining
        eta = f"ETA {_clock(left)}" if left is not None and not done else ""
        self.bar.update(self._task, rate=self._rate(), eta=eta, refresh=not self.plain)  # each shard shows at once
        if self.plain and (first or done or time.monotonic() - self._last_line >= self.plain_every):
            extra = ", ".join(x for x in (self._rate(), eta) if x)
            self._line(f"{ev.stage}: {g.describe()}" + (f", {extra}" if extra else ""))

    def _rate(self) -> str:
        speed = self.bar.tasks[self._task].speed if self._task is not None else None
        return f"{speed:,.1f} samples/s" if speed else ""

    def _line(self, text: str) -> None:
        self._last_line = time.monotonic()
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _route_prefect_console(console: Console) -> list:
    """Point Prefect's console log handlers at the live display's console, so log lines print above
    the bar instead of through it; returns (handler, previous console) pairs to restore."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    swapped = []
    for handler in {h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}:
        swapped.append((handler, handler.console))
        handler.console = console
    return swapped
