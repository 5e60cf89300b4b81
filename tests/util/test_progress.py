"""Progress when stderr is not a terminal: plain lines with done/total, elapsed and remaining."""
from __future__ import annotations

import io
import re
import time

from layerwise.util import progress as progress_module
from layerwise.util.progress import PlainProgress, progress_bars

LINE = re.compile(r"^layerwise: (?P<what>.+) (?P<done>[\d.]+)/(?P<total>[\d.?]+)(?: \(\d+%\))?, "
                  r"elapsed (?P<elapsed>\d+:\d\d:\d\d), remaining (?P<remaining>~?\d+:\d\d:\d\d|\?)$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_carry_done_total_elapsed_and_remaining():
    stream, clock = io.StringIO(), FakeClock()
    plain = PlainProgress(stream, interval=30.0, clock=clock)
    task = plain.add_task("sensitivity", total=120)
    clock.now += 90
    for _ in range(30):
        plain.advance(task)
    plain.report()  # what the background thread does every interval
    clock.now += 270
    plain.update(task, advance=90)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "layerwise: sensitivity 0/120 (0%), elapsed 0:00:00, remaining ?",
        "layerwise: sensitivity 30/120 (25%), elapsed 0:01:30, remaining ~0:04:30",
        "layerwise: sensitivity 120/120 (100%), elapsed 0:06:00, remaining 0:00:00",  # on completion
    ]
    assert all(LINE.match(line) for line in lines)
    plain.report()
    assert len(stream.getvalue().splitlines()) == 3  # a finished task says nothing more


def test_a_resumed_task_estimates_from_the_work_done_since_it_started():
    stream, clock = io.StringIO(), FakeClock()
    plain = PlainProgress(stream, clock=clock)
    task = plain.add_task("sensitivity", total=100, completed=60)
    clock.now += 100
    plain.advance(task, 10)
    plain.report()
    assert stream.getvalue().splitlines()[-1] == \
        "layerwise: sensitivity 70/100 (70%), elapsed 0:01:40, remaining ~0:05:00"


def test_empty_and_open_ended_tasks():
    stream = io.StringIO()
    plain = PlainProgress(stream, clock=FakeClock())
    plain.add_task("ablation", total=0)
    assert stream.getvalue() == ""
    task = plain.add_task("reading", total=None)
    plain.advance(task, 3)
    plain.report()
    assert stream.getvalue().splitlines()[-1] == "layerwise: reading 3/?, elapsed 0:00:00, remaining ?"


def test_a_non_terminal_stream_gets_lines_at_every_interval_even_within_one_step():
    stream = io.StringIO()
    with progress_bars(True, stream=stream, interval=0.05) as bars:
        assert isinstance(bars, PlainProgress)
        task = bars.add_task("quantizing", total=4)
        bars.advance(task)
        time.sleep(0.5)  # one long step: the lines must keep coming without any advance
        bars.advance(task, 3)
    lines = stream.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines), lines
    periodic = [line for line in lines if line.startswith("layerwise: quantizing 1/4 (25%)")]
    assert len(periodic) >= 3, lines
    assert lines[-1].startswith("layerwise: quantizing 4/4 (100%)")
    assert LINE.match(periodic[-1])["remaining"] != "?"
    count = len(lines)
    time.sleep(0.2)
    assert len(stream.getvalue().splitlines()) == count  # the ticker stopped with the block


def test_the_default_interval_is_thirty_seconds_and_a_terminal_keeps_rich_bars():
    assert progress_module.PLAIN_INTERVAL_S == 30.0
    with progress_bars(True, stream=Terminal()) as bars:
        assert not isinstance(bars, PlainProgress)
        bars.advance(bars.add_task("profiling", total=2), 2)
    silent = io.StringIO()
    with progress_bars(False, stream=silent) as bars:
        bars.advance(bars.add_task("profiling", total=2))
    assert silent.getvalue() == ""
