"""Progress off a terminal: timed lines with stage, counts, elapsed and time left; a heartbeat."""

import io
import time

import pytest

from saddlescope.progress import LineProgress, stage_progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_are_timed_and_say_what_is_left():
    out, clock = io.StringIO(), Clock()
    lines = LineProgress(out, interval=10, clock=clock, heartbeat=False)
    lines("hessian products", 0, 100)  # a stage's first update is always written
    clock.now = 4
    lines("hessian products", 20, 100)  # within the interval: nothing
    clock.now = 10
    lines("hessian products", 50, 100)  # 50 in 10 s: 50 more take ~10 s
    clock.now = 12
    lines("hessian products", 100, 100)  # the end is always written
    written = out.getvalue().splitlines()
    assert written == [
        "[saddlescope] hessian products: 0/100 (0%), 0s elapsed",
        "[saddlescope] hessian products: 50/100 (50%), 10s elapsed, ~10s left",
        "[saddlescope] hessian products: 100/100 (100%), 12s elapsed, done",
    ]


def test_a_new_stage_restarts_the_clock_and_details_follow_the_counts():
    out, clock = io.StringIO(), Clock()
    lines = LineProgress(out, interval=10, clock=clock, heartbeat=False)
    lines("a", 1, 2)
    clock.now = 100
    lines.update("b", 1, 4, detail="saddle 1")
    assert out.getvalue().splitlines()[-1] == "[saddlescope] b: 1/4 (25%), 0s elapsed; saddle 1"


def test_the_heartbeat_writes_while_no_update_comes():
    out = io.StringIO()
    lines = LineProgress(out, interval=0.05)
    lines("one slow product", 0, 3)
    time.sleep(0.4)
    lines.close()
    assert len(out.getvalue().splitlines()) >= 3  # the first line and at least two heartbeats


def test_quiet_and_a_bad_interval():
    with stage_progress(quiet=True) as progress:
        progress("x", 1, 2)  # no output, no error
    with pytest.raises(ValueError):
        LineProgress(io.StringIO(), interval=0)
