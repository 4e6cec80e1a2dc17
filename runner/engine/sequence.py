"""One completion as the engine sees it: its prompt, its place in the KV
cache, and how far it got.

A prompt is a list of *inputs*: token ids (``int``) and, for media, one
:class:`runner.engine.media.SpanInput` per embedding row, grouped into
:class:`runner.engine.media.MediaSpan` chunks.  Text and media prompts are the same
type; a text prompt simply has no spans.  Input index ``i`` sits at KV
position ``i`` unless an M-RoPE image before it gave positions back
(:meth:`Sequence.position`; the slot-level form is runner.engine.slots.kv_position).

Who writes what: the scheduler (runner.engine.scheduler) moves ``n_sched`` and the
slot; the engine's update phase writes ``generated`` and ``next_token``;
the delivery side (runner.engine.delivery) writes ``stop_hit``, ``n_returned`` and
``final``; ``cancelled`` may be set by any thread.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runner.engine.media import MediaSpan
from runner.engine.requests import CompletionOptions, EngineError, Final
from runner.engine.speculative import FIRST_CAP

if TYPE_CHECKING:  # pragma: no cover
    from runner import _llama
    from runner.engine.core import Handle
    from runner.engine.slots import Slot
    from runner.engine.speculative import NgramLookup


@dataclass(eq=False)
class Sequence:
    """One completion's state.  Loop-thread fields unless marked otherwise."""

    handle: "Handle"                  # where events go
    options: CompletionOptions        # validated options
    inputs: list                      # prompt inputs: token ids and media SpanInputs
    spans: list[MediaSpan]            # media chunks of the prompt, in order
    t_tokenize: float                 # seconds spent tokenizing (caller thread)
    t_queued: float                   # perf_counter when queued
    sampler: "_llama.Sampler | None" = None  # built at submit, closed at the end
    in_graph: bool = False            # the sampler samples inside the decode graph (attached at admission)
    slot: "Slot | None" = None        # slot while running
    n_cached: int = 0                 # prompt inputs found in the slot
    n_sched: int = 0                  # prompt inputs handed to a batch (decoded or in flight)
    generated: list[int] = field(default_factory=list)  # tokens sampled so far
    next_token: int | None = None     # sampled but not yet decoded
    t_admitted: float = 0.0           # perf_counter at admission
    t_first: float = 0.0              # perf_counter when the first token was sampled
    prompt_duration: float = 0.0      # tokenize + prompt evaluation seconds
    cancelled: bool = False           # set by any thread; honoured at the next step
    stop_hit: int = -1                # delivery side: tokens returned before a stop string (-1: none)
    ended: bool = False               # the loop sent the end record
    n_returned: int = -1              # delivery side: generated tokens returned (set at the end)
    error: EngineError | None = None  # why the sequence failed, if it did
    final: Final | None = None        # completed by the delivery side, sent after the release
    n_predict: int = 0                # generation limit in tokens (0: none; -1: prompt only)
    lookup: "NgramLookup | None" = None  # speculative: prompt lookup over prompt + generated (built on first use)
    n_proposed: int = 0               # speculative: tokens proposed and decoded for verification
    n_accepted: int = 0               # speculative: of those, accepted
    draft_cap: int = FIRST_CAP        # speculative, draft model: most tokens the next proposal may have (next_cap)
    draft_misses: int = 0             # speculative: proposals in a row with nothing accepted
    draft_wait: int = 0               # speculative: generating steps left without proposals (wait_after)
    lora: tuple = ()                  # adapter scales it runs under (runner.engine.lora.LoraKey)
    shrink_ends: list[int] = field(init=False)  # ends of the spans that give positions back
    shrinks: list[int] = field(init=False)      # positions given back before index i:
                                                # shrinks[bisect_right(shrink_ends, i)]

    def __post_init__(self) -> None:
        # The per-token form of runner.engine.slots.kv_position: the last row of a
        # span says how many positions the span gives back (M-RoPE images).
        self.shrink_ends, self.shrinks = [], [0]
        for span in self.spans:
            shrink = self.inputs[span.end - 1].shrink
            if shrink:
                self.shrink_ends.append(span.end)
                self.shrinks.append(self.shrinks[-1] + shrink)

    @property
    def prefilling(self) -> bool:
        """Prompt inputs remain to be scheduled."""
        return self.n_sched < len(self.inputs)

    @property
    def id(self) -> str:
        """The request id."""
        return self.handle.id

    def position(self, i: int) -> int:
        """KV position of input index ``i``: ``i`` less the positions the
        media before it gave back (M-RoPE images; see runner.engine.slots)."""
        if not self.shrink_ends:
            return i
        return i - self.shrinks[bisect.bisect_right(self.shrink_ends, i)]

    def span_from(self, pos: int) -> MediaSpan | None:
        """The first media span ending after input ``pos`` (None: text to the end)."""
        i = bisect.bisect_right(self.spans, pos, key=lambda sp: sp.end)
        return self.spans[i] if i < len(self.spans) else None

