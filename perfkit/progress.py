"""What ``perfkit optimize`` and ``perfkit sweep`` show while they run for minutes.

On a terminal: a progress bar (rich) with the current stage, the runs done of the stage's planned
runs, the time elapsed and an estimate of the time left, each result printed above it. Elsewhere
(a pipe, a CI log): the same events as plain lines, one each, so a log reads the same as before.

A reporter is called ``progress(line)`` for an event, and ``progress(line, done, total)`` for the
``done``-th of ``total`` planned runs of the current stage.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import IO, Any, Protocol


class Reporter(Protocol):
    def __call__(self, line: str, done: int | None = None, total: int | None = None) -> None: ...


def quiet(line: str, done: int | None = None, total: int | None = None) -> None:
    """A reporter that shows nothing."""


class Progress:
    """A reporter for a person: a bar on a terminal, plain lines elsewhere. Use as a context
    manager so the bar is taken down (also on Ctrl-C)."""

    def __init__(self, stream: IO[str] | None = None, prefix: str = "perfkit: ", bar: bool | None = None):
        self.stream = stream or sys.stderr
        self.prefix = prefix
        self.bar = self.stream.isatty() if bar is None else bar
        self._live: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.bar:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self._live = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("runs"),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self._live.start()
            self._task = self._live.add_task("starting", total=None)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __call__(self, line: str, done: int | None = None, total: int | None = None) -> None:
        if self._live is None:
            print(f"{self.prefix}{line}", file=self.stream, flush=True)
            return
        self._live.console.print(f"{self.prefix}{line}", markup=False, highlight=False)
        if total is None:  # a new stage: its runs (and its time left) are counted afresh
            self._live.remove_task(self._task)
            self._task = self._live.add_task(line[:60], total=None)
        else:
            self._live.update(self._task, completed=done, total=total)
