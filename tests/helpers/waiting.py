"""Waiting for an event, not for a duration: the suite's outcome must not depend on how fast or how loaded
the machine is. Each wait returns as soon as its condition holds; its deadline is generous (a wait that
runs out says what it waited for), so a slow CI machine only makes the test slower, never red."""

from __future__ import annotations

import time
from typing import Callable

#: Seconds a condition may take to come true on a slow or loaded machine before the test fails.
PATIENCE = 120.0


def wait_until(condition: Callable[[], object], what: str, timeout: float = PATIENCE, interval: float = 0.005) -> None:
    """Return once ``condition()`` is true; fail naming ``what`` if it is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:g} s for {what}")
        time.sleep(interval)


def at_least(count: Callable[[], int], n: int, what: str, alive: Callable[[], bool] = lambda: True, timeout: float = PATIENCE) -> None:
    """Wait until ``count()`` is at least ``n`` (reads done, beats written), or until ``alive()`` turns false
    (the thread that counts has ended: the caller's assertions then report it). Returns at once when the
    count is there already: a test pacing a writer against a reader waits only where the reader lags."""
    wait_until(lambda: count() >= n or not alive(), what, timeout)
