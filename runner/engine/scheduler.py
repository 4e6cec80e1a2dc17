"""Scheduling policy: which sequences run, and what each step decodes.

The scheduler owns the waiting queue and the running sequences, admits
requests into slots (runner.engine.slots), and turns the running set into a
:class:`StepPlan` each step.  It never touches a Context or a Batch: the KV
memory is reached only through the slot cache's backend (and one read-only
query for sliding-window models), so its tests run on the fake backend of
tests/test_slots.py.  The executor (runner.engine.executor) turns a plan into a
decode; :meth:`Scheduler.update` then records what was decoded.

Prefill policy: each step first takes one token per generating sequence, then
fills the rest of ``n_batch`` with prompt chunks, visiting prefilling
sequences in a rotating order.  While any sequence is generating, prompt
chunks are capped at ``prefill_budget`` inputs per step, which bounds the gap
between two tokens of a generating stream to one decode of about
``prefill_budget + parallel`` inputs, however long an arriving prompt is.

Batch order: the running sequences are kept in slot order, and a step with
prompt chunks lists its entries by slot too, so a step's rows come in
ascending sequence ids.  With one KV stream per slot (no
``kv_unified``), llama.cpp splits a batch into micro-batches of *consecutive*
sequence ids taken in batch order (llama_batch_allocr::split_equal), and every
micro-batch is a pass over the weights: eight generating slots listed as
3, 4, 0, 1, 2, 5, 6, 7 cost two passes where 0..7 cost one.  Slots that are
not adjacent (2 and 5 running, 3 and 4 idle) still cost a pass each; see
docs/design.md ("Batch order").  A micro-batch also takes the same number of
rows from each of its sequences, so a prompt chunk's rows past its first
(and proposals past a verifying sequence's first row) take passes of their
own whatever the order.

Speculation yields: proposed tokens (runner.engine.speculative) are added last, only
to a step that holds fewer than ``draft_room / 2`` inputs after every
generating sequence's token and the prompt chunks, and only into the room it
has left below ``draft_room`` inputs, shared evenly among the speculating
sequences (in rotating order).  A step with ``draft_room / 2`` inputs of
other work or more (8 generating streams at the default 16) verifies no
proposals at all: on a CPU such a decode is compute-bound already, and
proposals there cost about as much per row as they can save (docs/design.md,
"Speculative decoding").  A step never grows past ``draft_room`` inputs
because of them.

LoRA policy: llama.cpp applies adapters to the whole context, so one decode
runs under one adapter set (runner.engine.lora.LoraKey), and each sequence carries
its set.  Every step serves one *group* (the sequences of one set): the
plan holds only that group's entries and names its set (``StepPlan.lora``).
A group keeps the turn for up to ``lora_turn_steps`` steps while it has
work, then the turn passes to the next set with work, in the sets' sort
order, wrapping around; a set alone with work keeps the turn.  So no group
waits longer than ``lora_turn_steps`` steps per other group with work, and
the executor switches adapters (which makes llama.cpp reserve its compute
graph again) at most once per turn.  The engine lengthens the turn when
that reservation is dear beside a decode (runner.engine.lora.SwitchCost).  Admission stays first come first
served: a queued request takes the next free slot whatever its set.
"""

from __future__ import annotations

import bisect
import collections
import operator
import threading
from dataclasses import dataclass, field
from typing import Callable

from runner.engine.media import MediaSpan
from runner.engine.sequence import Sequence
from runner.engine.slots import NoFreeSlot, SlotCache
from runner.engine.speculative import NgramLookup

# Steps one adapter set keeps the turn while others wait (see the LoRA policy
# above), until the engine has measured what a switch costs and sets
# ``Scheduler.lora_turn_steps`` from it (runner.engine.lora.SwitchCost: 8 to 64).
LORA_TURN_STEPS = 8


@dataclass(slots=True)
class Scheduled:
    """One sequence's share of a step's batch."""

    seq: Sequence          # whose inputs these are
    start: int             # input index of the first input (generating: the slot length)
    n_inputs: int          # consecutive inputs in the batch (1 for a generating sequence)
    generating: bool       # the input is the token sampled last step (else prompt inputs)
    wants_output: bool     # the last input's logits are sampled after the decode
    out_index: int = -1    # batch row of those logits (set by the executor; -1: none)
    span: MediaSpan | None = None  # media steps: the chunk these rows belong to
    draft: list[int] = field(default_factory=list)  # generating: proposed tokens after the input,
                                   # each with an output row (n_inputs = 1 + len(draft))
    draft_limit: int = 0           # draft model: tokens it is to propose (the executor's drafter fills draft)


@dataclass
class StepPlan:
    """What one decode holds, in batch order, and what planning ended.
    Built by :meth:`Scheduler.schedule`, written into a batch by the
    executor, trimmed by :meth:`Scheduler.update`; one plan per step."""

    entries: list[Scheduled] = field(default_factory=list)  # batch order
    ended: list[tuple[Sequence, str]] = field(default_factory=list)  # (seq, reason) ended while planning
    media: bool = False    # the one entry is media rows (the media batch), not tokens
    lora: tuple = ()       # the adapter set every entry runs under (runner.engine.lora.LoraKey)

    def n_prompt(self) -> int:
        """Prompt inputs in the plan."""
        return sum(e.n_inputs for e in self.entries if not e.generating)

    def n_inputs(self) -> int:
        """Inputs in the plan."""
        return sum(e.n_inputs for e in self.entries)


_slot_id = operator.attrgetter("slot.id")            # of a Sequence: its batch order
_entry_slot_id = operator.attrgetter("seq.slot.id")  # of a Scheduled entry


class Scheduler:
    """Admission, step planning and rollback over a :class:`SlotCache`.

    Threads: ``waiting`` is appended by callers and read by the loop, both
    under ``lock`` (the engine's intake lock); everything else is the loop
    thread's.
    """

    def __init__(self, slots: SlotCache, *, n_batch: int, slot_ctx: int, prefill_budget: int,
                 lock: threading.Lock, n_swa: int = 0,
                 pos_min: Callable[[int], int] | None = None, draft_room: int = 16,
                 draft_model: bool = False, lora_turn_steps: int = LORA_TURN_STEPS):
        self.slots = slots                      # the slot cache (and through it the KV memory)
        self.n_batch = n_batch                  # most inputs one decode takes
        self.slot_ctx = slot_ctx                # context of one slot
        self.prefill_budget = prefill_budget    # prompt inputs per step while others generate
        self.lock = lock                        # guards `waiting`
        self.n_swa = n_swa                      # sliding window of the model's SWA layers (0: none)
        self._pos_min = pos_min                 # seq id -> smallest KV position held (SWA models)
        self.waiting: collections.deque[Sequence] = collections.deque()  # FIFO of queued requests
        self.active: list[Sequence] = []        # admitted and not ended, in slot order
        self._rotate = 0                        # prefill start offset, advanced each step
        self.draft_room = min(draft_room, n_batch)  # proposals fill a step up to this many inputs
        self._draft_rotate = 0                  # first speculating sequence served, advanced each step
        self.draft_model = draft_model          # a draft model proposes (else prompt lookup)
        self.lora_turn_steps = lora_turn_steps  # steps an adapter set keeps the turn while others wait
        self.lora: tuple = slots.base_lora      # the adapter set whose turn it is
        self._turn = 0                          # steps the current set has had in this turn

    # -- sequences in and out ---------------------------------------------

    def take_cancelled(self) -> list[Sequence]:
        """Remove and return the waiting requests that were cancelled."""
        with self.lock:
            cancelled = [s for s in self.waiting if s.cancelled]
            for s in cancelled:
                self.waiting.remove(s)
        return cancelled

    def flagged(self) -> list[tuple[Sequence, str]]:
        """Running sequences to end: a stop string was found, or cancelled."""
        out = []
        for seq in self.active:
            if seq.stop_hit >= 0:
                out.append((seq, "stop"))
            elif seq.cancelled:
                out.append((seq, "cancelled"))
        return out

    def admit(self, accepting: Callable[[], bool]) -> list[Sequence]:
        """Move queued requests into free slots, first come first served;
        returns those admitted.  ``accepting`` (called under the lock) says
        whether new work may still start."""
        admitted = []
        while self.slots.n_free > 0:
            with self.lock:
                if not self.waiting or not accepting():
                    break
                seq = self.waiting.popleft()
            try:
                seq.slot, seq.n_cached = self.slots.acquire(seq.inputs, seq.lora)
            except NoFreeSlot:
                with self.lock:
                    self.waiting.appendleft(seq)
                break
            if seq.n_cached and self.n_swa > 0 and not self._window_kept(seq):
                seq.slot.truncate(0)
                seq.n_cached = 0
            seq.n_sched = seq.n_cached
            bisect.insort(self.active, seq, key=_slot_id)  # batch order (module docstring)
            admitted.append(seq)
        return admitted

    def _window_kept(self, seq: Sequence) -> bool:
        """Whether a sliding-window model's KV still holds the window the
        next input attends to.  The SWA layers keep only the last ``n_swa``
        positions decoded; cutting a slot back to a shorter prefix leaves
        them without the positions just before the cut (llama.cpp reports
        the smallest position the SWA cells hold, or -1 when none)."""
        start = max(0, seq.position(seq.n_cached) - self.n_swa)
        pos_min = self._pos_min(seq.slot.id) if self._pos_min is not None else 0
        return 0 <= pos_min <= start

    def remove(self, seq: Sequence) -> None:
        """The sequence ended: it takes no more steps (its slot stays lent)."""
        if seq in self.active:
            self.active.remove(seq)

    def release(self, seq: Sequence) -> None:
        """Give the ended sequence's slot back, keeping the prompt and the
        tokens returned; a failed sequence leaves it empty (its KV state is
        not trusted)."""
        if seq.slot is not None:
            kept = [] if seq.error else seq.inputs + seq.generated[:seq.n_returned]
            self.slots.release(seq.slot, kept)

    # -- planning -----------------------------------------------------------

    def schedule(self) -> StepPlan:
        """The next text step: one token per generating sequence first, then
        prompt chunks up to the budget, in rotating order."""
        group = self._take_turn()
        plan = StepPlan(lora=group)
        entries = plan.entries
        for seq in [s for s in self.active if s.next_token is not None and s.lora == group]:
            n = len(seq.slot.inputs)
            if n + 1 > self.slot_ctx:
                if not self._make_room(seq, plan):
                    continue
                if seq.next_token is None:  # it became a prompt again
                    continue
                n = len(seq.slot.inputs)
            entries.append(Scheduled(seq, n, 1, True, True))
        budget = self.n_batch - len(entries)
        if entries:
            budget = min(budget, self.prefill_budget)
        prefilling = [s for s in self.active if s.prefilling and s.lora == group]
        if prefilling and budget > 0:
            start = self._rotate % len(prefilling)
            self._rotate += 1
            for seq in prefilling[start:] + prefilling[:start]:
                if budget <= 0:
                    break
                stop = seq.n_sched + budget
                if seq.spans:  # text only: stop before the next media chunk
                    span = seq.span_from(seq.n_sched)
                    if span is not None:
                        if span.start <= seq.n_sched:
                            continue  # media next: schedule_media's job
                        stop = min(stop, span.start)
                stop = min(stop, len(seq.inputs))
                n = stop - seq.n_sched
                entries.append(Scheduled(seq, seq.n_sched, n, False, stop == len(seq.inputs)))
                seq.n_sched = stop
                budget -= n
            if len(entries) > 1:
                entries.sort(key=_entry_slot_id)   # batch order (module docstring)
        self._add_drafts(plan)
        return plan

    def _add_drafts(self, plan: StepPlan) -> None:
        """Give speculating generating entries their proposed tokens, within
        the room left below ``draft_room`` (see the module docstring)."""
        speculating = [e for e in plan.entries if e.generating and e.seq.options.speculative]
        n_inputs = plan.n_inputs()
        if not speculating or 2 * n_inputs >= self.draft_room:
            return
        room = self.draft_room - n_inputs
        start = self._draft_rotate % len(speculating)
        self._draft_rotate += 1
        order = speculating[start:] + speculating[:start]
        for i, entry in enumerate(order):
            share = room // (len(order) - i)
            seq = entry.seq
            if seq.draft_wait > 0:  # backing off after rejected proposals (runner.engine.speculative)
                seq.draft_wait -= 1
                continue
            limit = min(seq.options.draft_max, share, self.slot_ctx - entry.start - 1)
            if seq.n_predict > 0:  # k proposals verify k + 1 tokens; the limit's last is never decoded
                limit = min(limit, seq.n_predict - len(seq.generated) - 1)
            if self.draft_model and not seq.spans:  # the drafter proposes exactly `limit` tokens,
                limit = min(limit, seq.draft_cap)   # within the cap its last proposals left
                if limit > 0:
                    entry.draft_limit = limit
                    room -= limit
                continue
            if limit <= 0:
                continue
            if seq.lookup is None:
                seq.lookup = NgramLookup.build(seq.inputs)
            seq.lookup.sync(seq.generated)
            draft = seq.lookup.propose(limit)
            entry.draft = draft
            entry.n_inputs = 1 + len(draft)
            room -= len(draft)

    def keep_accepted(self, entry: Scheduled, n_accepted: int) -> None:
        """After verification: the slot keeps the entry's input and its first
        ``n_accepted`` proposals; the rejected ones leave the KV memory."""
        if entry.draft:
            entry.seq.slot.truncate(entry.start + 1 + n_accepted)
    def _take_turn(self) -> tuple:
        """The adapter set this step serves (the LoRA policy above)."""
        cur = self.lora
        if not cur:  # no adapters loaded: every key is ()
            return cur
        groups = {s.lora for s in self.active if s.next_token is not None or s.prefilling}
        if not groups or (cur in groups and (len(groups) == 1 or self._turn < self.lora_turn_steps)):
            self._turn += 1
            return cur
        order = sorted(groups)
        self.lora = next((g for g in order if g > cur), order[0])
        self._turn = 1
        return self.lora

    def _make_room(self, seq: Sequence, plan: StepPlan) -> bool:
        """The slot is full: shift it, or end the sequence with 'length'."""
        if not seq.options.shift or (seq.spans and not self.slots.backend.can_shift()):
            # (Evaluating the survivors of a shift again would cut media apart.)
            self.remove(seq)
            plan.ended.append((seq, "length"))
            return False
        num_keep = min(seq.options.num_keep, self.slot_ctx // 2)
        result = self.slots.shift(seq.slot, num_keep)
        if result.reprocess:
            # The memory cannot shift (recurrent models): evaluate what
            # survives again, as a prompt that ends with the pending token.
            seq.inputs = list(result.reprocess) + [seq.next_token]
            seq.generated = []
            seq.n_sched = seq.n_cached = 0
            seq.next_token = None
        return True

    def schedule_media(self) -> StepPlan | None:
        """A media step: the rows of one media chunk (or part of one) for one
        prefilling sequence whose next input is media, or None.  One sequence
        per step, and no more than ``prefill_budget`` rows while others
        generate, as for text; a chunk needing non-causal attention is
        decoded whole.  Only sequences of the adapter set whose turn it is
        (chosen by the last :meth:`schedule`)."""
        waiting = [s for s in self.active if s.prefilling and s.spans and s.lora == self.lora]
        if not waiting:
            return None
        start = self._rotate % len(waiting)
        for seq in waiting[start:] + waiting[:start]:
            span = seq.span_from(seq.n_sched)
            if span is None or span.start > seq.n_sched:
                continue  # text next
            n = span.end - seq.n_sched
            if not span.non_causal:
                n = min(n, self.n_batch)
                if any(s.next_token is not None for s in self.active):
                    n = min(n, self.prefill_budget)
            entry = Scheduled(seq, seq.n_sched, n, False, seq.n_sched + n == len(seq.inputs),
                              span=span)
            seq.n_sched += n
            return StepPlan([entry], media=True, lora=self.lora)
        return None

    # -- after the decode ---------------------------------------------------

    def update(self, plan: StepPlan, n_decoded: int) -> None:
        """Record what the decode took into the slots.  Entries past the
        first ``n_decoded`` inputs (a batch halved for lack of KV room, or
        an aborted decode) are trimmed from the plan and scheduled again."""
        self._rollback(plan, n_decoded)
        record = self.slots.record
        for entry in plan.entries:
            seq = entry.seq
            if entry.generating:
                record(seq.slot, [seq.next_token, *entry.draft])
                seq.next_token = None
            else:
                record(seq.slot, seq.inputs[entry.start:entry.start + entry.n_inputs])

    def _rollback(self, plan: StepPlan, n_kept: int) -> None:
        offset = 0
        trimmed = False
        for entry in plan.entries:
            count = entry.n_inputs
            kept = min(count, max(0, n_kept - offset))
            offset += count
            if kept == count:
                continue
            trimmed = True
            if entry.generating and kept > 0:  # proposals cut; the decoded rows keep their outputs
                del entry.draft[kept - 1:]
                entry.n_inputs = kept
                continue
            if not entry.generating:
                entry.seq.n_sched -= count - kept
            entry.n_inputs = kept
            entry.wants_output = False  # the output row was not computed
            entry.out_index = -1
        if trimmed:
            plan.entries[:] = [e for e in plan.entries if e.n_inputs > 0]
