"""Progress of the long loops: training, features, labeler, evaluation, baselines, monitor, `medvlm generate`.

One bar layout for all of them. On an interactive terminal it is a rich bar. Where stderr is a log (DVC, CI, a
pipe) a redrawn bar would be hundreds of lines, so a loop prints a plain line at each quarter instead. Always on
stderr: the CLI prints its JSON summaries on stdout.

Loops that several stages share (generation, the labeler's report encoder, the metrics, the bootstrap) take an
`advance` callback and the stage that runs them holds the bar, so no bar is ever drawn inside another one and a
loop called where nobody watches (serving, tests) reports to nothing.
"""

from __future__ import annotations

import time
from typing import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int], None]  # called with the number of items a loop has just finished
LOG_LINES = 4  # plain lines per loop in a log: at 25, 50, 75 and 100 %


def unwatched(n: int) -> None:
    """The `advance` of a loop that nobody watches."""


def progress_bar(*columns: ProgressColumn, console: Console | None = None, disable: bool = False) -> Progress:
    """The one bar layout: task description, bar, done/total, `columns`, elapsed, remaining. On stderr unless
    `console` says otherwise; draws nothing when disabled or when the console is not a terminal."""
    console = console or Console(stderr=True)
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(), *columns,
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=disable or not console.is_terminal,
    )


class StageProgress:
    """`with StageProgress("features train", n) as bar: ... bar.advance(k)`: a bar on a terminal, LOG_LINES plain
    lines in a log, nothing at all when `disable` (e.g. a run too short to be worth one)."""

    def __init__(self, label: str, total: int, console: Console | None = None, disable: bool = False):
        self.console = console or Console(stderr=True)
        self.label, self.total, self.done = label, total, 0
        self.bar = progress_bar(console=self.console, disable=disable)
        self.task: TaskID | None = None
        self._log = not disable and not self.console.is_terminal
        self._lines, self._started = 0, time.perf_counter()

    def __enter__(self) -> "StageProgress":
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.bar.advance(self.task, n)
        reached = self.done * LOG_LINES // max(1, self.total)
        if self._log and reached > self._lines:
            self._lines = reached
            seconds = time.perf_counter() - self._started
            self.console.print(f"{self.label}: {self.done}/{self.total} ({seconds:.0f} s)", markup=False,
                               highlight=False)
