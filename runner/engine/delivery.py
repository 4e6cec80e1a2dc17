"""Delivery: sampled tokens into text events, stop strings, finals.

The loop thread hands the delivery side one record per event, in order
(:class:`StepTokens`, :class:`SeqEnded`, :class:`SeqReleased`,
:class:`Shutdown`).  Delivery turns tokens into text (a piece table, UTF-8
hold-back and stop strings in runner.engine.textstream), calls each request's event
sink, and talks back to the engine only through :class:`DeliveryOwner`.

It runs on a thread of its own, overlapping the next decode, or inline on the
loop thread when the decode threads already use every core (see
runner.engine.core.Engine._pick_delivery).

A stop string is found one or two steps after its last token was sampled; the
sequence is flagged (``stop_hit``) and the loop ends it at its next step,
trimming the slot to the tokens actually returned.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

from runner.engine.handoff import Doorbell
from runner.engine.requests import Chunk, Final
from runner.engine.sequence import Sequence
from runner.engine.textstream import TextStream

log = logging.getLogger("runner.engine")


# -- what the loop thread sends the delivery side (in order, one queue) -------


@dataclass(slots=True)
class StepTokens:
    """The tokens one step generated, in batch order."""

    tokens: list[tuple]   # (seq, token id, log-probability entry or None)


@dataclass(slots=True)
class SeqEnded:
    """A sequence stopped: flush its held-back text, say how many tokens were
    returned, then hand it back to the loop to release its slot."""

    seq: Sequence         # the sequence
    final: Final          # its final event (done_reason may still become "stop")


@dataclass(slots=True)
class SeqReleased:
    """The loop released the sequence's slot: send its final event."""

    seq: Sequence         # the sequence


@dataclass(slots=True)
class Shutdown:
    """The loop stopped: send the finals of ended sequences it will never release."""


DeliveryRecord = StepTokens | SeqEnded | SeqReleased | Shutdown


class DeliveryOwner(Protocol):
    """What delivery asks of the engine (called on the delivering thread)."""

    def stop_found(self, seq: Sequence) -> None:
        """``seq.stop_hit`` was set: the loop should end it soon."""

    def flushed(self, seq: Sequence) -> bool:
        """``seq`` ended and its text is out; True when the loop takes it to
        release its slot (a SeqReleased record follows), False when the
        final should go out now (the loop is stopping)."""

    def unreleased(self) -> list[Sequence]:
        """At shutdown: the flushed sequences the loop will never release."""

    def finishing(self, seq: Sequence) -> None:
        """``seq``'s final is about to be sent (bookkeeping, totals)."""


@dataclass
class _Output:
    """Delivery-side state of one sequence."""

    stream: TextStream                # UTF-8 hold-back and stop strings
    n_fed: int = 0                    # generated tokens fed to the stream
    tokens: list = field(default_factory=list)    # tokens of text not yet sent
    logprobs: list = field(default_factory=list)  # their log-probabilities
    text: list = field(default_factory=list)      # this record's text, sent at its end
    sent_tokens: list = field(default_factory=list)    # the tokens of that text
    sent_logprobs: list = field(default_factory=list)  # and their log-probabilities


class Delivery:
    """Turns delivery records into events.  ``put`` is called by the loop
    thread only; in "thread" mode the records are handled on the delivery
    thread, in "inline" mode at once on the caller."""

    def __init__(self, owner: DeliveryOwner, token_to_piece: Callable[[int], bytes],
                 n_vocab: int, mode: str):
        self._owner = owner
        self._token_to_piece = token_to_piece
        # token id -> its bytes, filled on first use (a vocabulary of 150k
        # pieces would cost a noticeable load time up front).
        self._pieces: list[bytes | None] = [None] * n_vocab
        self._outputs: dict[int, _Output] = {}  # id(seq) -> its state (delivering thread only)
        self.mode = mode                        # "thread" or "inline"
        # Called on the delivering thread after each burst of events (a
        # step's worth); a sink that buffers its events flushes them here.
        self.on_delivered: Callable[[], object] | None = None
        # Thread mode: records wait in _records until the loop rings the
        # doorbell, at the end of its step or from inside the next decode
        # (claim_ring), so that the delivery thread wakes when the loop
        # thread has released the GIL rather than queueing behind it.
        self._records: collections.deque | None = None
        self._doorbell: Doorbell | None = None
        self._unrung = False                    # records were put since the last ring
        self._thread: threading.Thread | None = None
        if mode == "thread":
            self._records = collections.deque()
            self._doorbell = Doorbell()
            self._thread = threading.Thread(target=self._run, name="runner-delivery", daemon=True)
            self._thread.start()

    def put(self, record: DeliveryRecord) -> None:
        """Hand over a record (loop thread).  In thread mode it is delivered
        once the doorbell rings: :meth:`ring`, or the fd :meth:`claim_ring`
        gave to a decode."""
        if self._records is not None:
            self._records.append(record)
            self._unrung = True
            return
        try:
            self._handle(record)
        except Exception:
            log.exception("delivery failed")

    def claim_ring(self) -> int:
        """The doorbell's fd when records wait for a ring, else -1; the
        caller (the loop thread) promises to write to it without the GIL
        (``Context.decode``'s ``doorbell``)."""
        if not self._unrung:
            return -1
        self._unrung = False
        return self._doorbell.fd

    def ring(self) -> None:
        """Wake the delivery thread if records wait (loop thread)."""
        if self._unrung:
            self._unrung = False
            self._doorbell.ring()

    def step_done(self, ring: bool = True) -> None:
        """The loop finished a step.  Inline mode: its events are out.
        Thread mode: ``ring`` wakes the delivery thread now; the loop passes
        False when the next decode follows at once and rings it from there,
        without the GIL (ringing here would hand the GIL to the delivery
        thread and stall the loop until it is given back)."""
        if self._records is not None:
            if ring:
                self.ring()
        elif self.on_delivered is not None:
            self.on_delivered()

    def close(self, timeout: float) -> None:
        """Stop the delivery thread after the records already put."""
        if self._thread is not None:
            self.put(None)
            self.ring()
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._doorbell.close()

    def _run(self) -> None:
        records, doorbell = self._records, self._doorbell
        while True:
            doorbell.wait()
            handled = False
            while records:
                record = records.popleft()
                if record is None:
                    return
                try:
                    self._handle(record)
                    handled = True
                except BaseException:
                    log.exception("delivery failed")
            if handled and self.on_delivered is not None:
                try:
                    self.on_delivered()
                except BaseException:
                    log.exception("delivery failed")

    # -- records ------------------------------------------------------------------

    def _handle(self, record: DeliveryRecord) -> None:
        kind = type(record)
        if kind is StepTokens:
            self._tokens(record.tokens)
        elif kind is SeqEnded:
            self._ended(record.seq, record.final)
        elif kind is SeqReleased:
            self._send_final(record.seq)
        elif kind is Shutdown:  # nothing will release slots any more
            for seq in self._owner.unreleased():
                self._send_final(seq)

    def _tokens(self, tokens: list[tuple]) -> None:
        """One record's tokens (a step's, or a native run's several steps')
        into text; each sequence with new text gets one chunk for the
        record, carrying the tokens of that text."""
        outputs, pieces = self._outputs, self._pieces
        chunked: list[tuple[Sequence, _Output]] = []
        for seq, token, logprob in tokens:
            out = outputs.get(id(seq))
            if out is None:
                out = outputs[id(seq)] = _Output(TextStream(seq.options.stop))
            if out.stream.stopped:
                continue  # decoded after its stop string: not returned
            piece = pieces[token]
            if piece is None:
                piece = pieces[token] = self._token_to_piece(token)
            out.n_fed += 1
            out.tokens.append(token)
            if logprob is not None:
                logprob["text"] = piece.decode("utf-8", "replace")
                out.logprobs.append(logprob)
            text = out.stream.feed(piece)
            if out.stream.stopped:
                seq.stop_hit = out.n_fed - out.stream.n_feeds_to_trim
                self._owner.stop_found(seq)
            if text:
                if not out.text:
                    chunked.append((seq, out))
                out.text.append(text)
                out.sent_tokens += out.tokens
                out.sent_logprobs += out.logprobs
                out.tokens = []
                out.logprobs = []
        for seq, out in chunked:
            text = "".join(out.text) if len(out.text) > 1 else out.text[0]
            seq.handle._sink(Chunk(text=text, tokens=out.sent_tokens, logprobs=out.sent_logprobs or None))
            out.text = []
            out.sent_tokens = []
            out.sent_logprobs = []

    def _ended(self, seq: Sequence, final: Final) -> None:
        """Flush the held-back text, then let the loop release the slot."""
        out = self._outputs.pop(id(seq), None) or _Output(TextStream(seq.options.stop))
        if out.stream.stopped:
            final.done_reason = "stop"
            seq.n_returned = out.n_fed - out.stream.n_feeds_to_trim
        else:
            text = out.stream.finish()
            if text or out.tokens:
                seq.handle._sink(Chunk(text=text, tokens=out.tokens, logprobs=out.logprobs or None))
            seq.n_returned = out.n_fed
        final.eval_count = out.n_fed
        seq.final = final
        if not self._owner.flushed(seq):
            self._send_final(seq)

    def _send_final(self, seq: Sequence) -> None:
        self._owner.finishing(seq)
        seq.handle.final = seq.final
        seq.handle._sink(seq.final)
