"""Waiting for a condition in tests, with a generous deadline (never a timed assertion)."""

from __future__ import annotations

import time


def wait_until(condition, timeout: float = 60.0, interval: float = 0.02):
    """Poll ``condition`` until it is true and return its value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
