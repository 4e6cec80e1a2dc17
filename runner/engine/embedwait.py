"""When an embedding decode should wait a moment for more texts.

An embedding decode is one prompt evaluation: on a CPU, and on a GPU for
short texts, four texts in one decode cost far less than four decodes of one.
Callers that embed one text at a time in a loop (a client thread per
worker, an indexing job with a few requests in flight) send their next text
as soon as the last one comes back.  Decoding whatever is queued at once
then locks into a bad rhythm: while a decode of three texts runs, the fourth
caller's text arrives and is decoded alone in the next step, during which
the three send again, and so on (measured: decodes of 1 and 3 texts in
turn, where 4 fit).

So after a decode answers ``n`` requests, the loop expects those ``n``
callers back.  The next embedding decode waits until they are queued, the
decode is full (no free slot, or ``n_batch`` reached), or a short window
has passed since the answer: ``fraction`` of the last decode's time, at
most ``max_wait`` seconds.  The window is measured from the answer, so a
caller that does not come back costs at most that window once; a caller
that never sent before (nothing answered recently) is not held at all.
The engine holds texts only while no completion is running or waiting
(runner.engine.core): a completion's step is never delayed by it.
"""

from __future__ import annotations

from dataclasses import dataclass

FRACTION = 0.1     # of the last embedding decode's time
MAX_WAIT = 0.005   # seconds; the reply-and-resend round trip through a runner process is ~0.5 ms


@dataclass(slots=True)
class EmbedWindow:
    """The policy's state (the loop thread only)."""

    fraction: float = FRACTION
    max_wait: float = MAX_WAIT
    t_answer: float = 0.0    # when the last embedding decode's finished requests were answered
    expect: int = 0          # requests expected queued: those left then plus those answered
    window: float = 0.0      # seconds after t_answer that a decode may wait

    def answered(self, now: float, n_answered: int, n_left: int, decode_seconds: float) -> None:
        """A decode took ``decode_seconds`` and answered ``n_answered``
        requests at ``now``; ``n_left`` requests stay queued."""
        self.t_answer = now
        self.expect = n_left + n_answered if n_answered else 0
        self.window = min(self.max_wait, self.fraction * max(decode_seconds, 0.0))

    def wait_until(self, now: float, n_queued: int, full: bool) -> float | None:
        """With ``n_queued`` requests queued (``full``: the next decode has
        no room for more), the time to wait until for more to arrive, or
        None to decode now."""
        if full or n_queued >= self.expect:
            return None
        deadline = self.t_answer + self.window
        return deadline if now < deadline else None
