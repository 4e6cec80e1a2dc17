"""Waiting for a condition in tests, with a generous deadline (never a timed assertion)."""

from __future__ import annotations

import threading
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


def drain(stream, timeout: float) -> tuple[list, BaseException | None]:
    """Iterate ``stream`` to its end on a thread: its events and the exception
    that ended it (None when it ended normally).  Fails instead of hanging
    when it has not ended within ``timeout`` s."""
    events: list = []
    outcome: list = []

    def run() -> None:
        try:
            for event in stream:
                events.append(event)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"the stream neither ended nor failed within {timeout} s"
    return events, outcome[0]
