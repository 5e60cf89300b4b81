"""Progress on stderr, so that stdout keeps only the results.

On a terminal, rich's live bars. Anywhere else (a log file, CI, `nohup`, a pipe) rich draws
nothing until the end, so a long run would look hung: there, each task prints a plain line when
it starts, at least every `PLAIN_INTERVAL_S` seconds while it runs, and when it completes.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Seconds between plain progress lines when stderr is not a terminal.
PLAIN_INTERVAL_S = 30.0


class _Silent:
    def add_task(self, description: str, total: float | None = 100.0, **fields) -> int:
        return 0

    def advance(self, task: int, advance: float = 1) -> None:
        pass

    def update(self, task: int, **fields) -> None:
        pass


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    started_at: float
    completed_at_start: float  # a resumed task's earlier work does not count towards its rate
    finished: bool = False


def _clock_text(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _count_text(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


class PlainProgress:
    """The add_task/advance/update surface of rich's Progress, printing plain lines to `stream`:
    `layerwise: DESCRIPTION DONE/TOTAL (P%), elapsed H:MM:SS, remaining ~H:MM:SS`.

    A background thread prints every unfinished task every `interval` seconds, so a line comes
    even while one step takes minutes. `clock` is injectable for tests.
    """

    def __init__(self, stream: TextIO, interval: float = PLAIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.interval, self.clock = stream, interval, clock
        self.tasks: list[_Task] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PlainProgress:
        self._thread = threading.Thread(target=self._tick, name="layerwise-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def _tick(self) -> None:
        while not self._stopped.wait(self.interval):
            self.report()

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0, **fields) -> int:
        with self._lock:
            now = self.clock()
            task = _Task(description, total, completed, now, completed)
            self.tasks.append(task)
            if total != 0:  # an empty task (e.g. no ablation asked for) says nothing
                self._print(task, now)
            self._finish_if_done(task, now)
            return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields) -> None:
        with self._lock:
            state = self.tasks[task]
            if total is not None:
                state.total = total
            if completed is not None:
                state.completed = completed
            if advance is not None:
                state.completed += advance
            if description is not None:
                state.description = description
            self._finish_if_done(state, self.clock())

    def report(self) -> None:
        """Print a line for every started, unfinished task (what the background thread calls)."""
        with self._lock:
            now = self.clock()
            for task in self.tasks:
                if not task.finished and task.total != 0:
                    self._print(task, now)

    def _finish_if_done(self, task: _Task, now: float) -> None:
        if not task.finished and task.total is not None and task.completed >= task.total:
            task.finished = True
            if task.total != 0:
                self._print(task, now)

    def _print(self, task: _Task, now: float) -> None:
        elapsed = now - task.started_at
        done = _count_text(task.completed)
        if task.total is None:
            count, remaining = f"{done}/?", "?"
        else:
            share = task.completed / task.total if task.total else 1.0
            count = f"{done}/{_count_text(task.total)} ({share:.0%})"
            worked = task.completed - task.completed_at_start
            left = task.total - task.completed
            if left <= 0:
                remaining = _clock_text(0)
            elif worked > 0:
                remaining = "~" + _clock_text(elapsed * left / worked)
            else:
                remaining = "?"
        print(f"layerwise: {task.description} {count}, elapsed {_clock_text(elapsed)}, remaining {remaining}",
              file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@contextlib.contextmanager
def progress_bars(enabled: bool = True, *, stream: TextIO | None = None,
                  interval: float | None = None) -> Iterator[Progress | PlainProgress | _Silent]:
    """Progress for long work: rich bars when `stream` (default stderr) is a terminal, plain
    lines every `interval` seconds (default PLAIN_INTERVAL_S) otherwise, nothing when disabled."""
    if not enabled:
        yield _Silent()
        return
    if not _is_terminal(stream if stream is not None else sys.stderr):
        with PlainProgress(stream if stream is not None else sys.stderr,
                           PLAIN_INTERVAL_S if interval is None else interval) as plain:
            yield plain
        return
    console = Console(stderr=True) if stream is None else Console(file=stream)
    bars = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )
    with bars:
        yield bars
