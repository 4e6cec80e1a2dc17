"""Multi-slot prefix KV cache policy.

The KV cache of one llama context is split into ``n_slots`` slots; slot ``i``
is llama sequence id ``i`` and holds at most ``slot_ctx`` inputs. A request
borrows one slot for its whole life: :meth:`SlotCache.acquire` picks the slot
whose KV already holds the longest useful prefix of the prompt, trims the rest
and says how many prompt inputs need no evaluation.

An *input* is any hashable item occupying one KV entry: an int token id, or a
:class:`SpanInput` — one embedding row of a media chunk, listed once per row.
A reusable prefix never ends inside a span (see :func:`reusable_prefix`).

Everything here counts in *input indices*.  The KV position of index ``p`` is
``p`` itself, except after media whose rows share positions (M-RoPE images
take ``n_pos < n_tokens`` positions): :func:`kv_position` gives it, and
:class:`PositionedKV` translates a backend's index ranges into positions.

Invariant (the one everything here relies on): for every slot,
``slot.inputs[p]`` is the input whose KV entry sits at index ``p`` of
sequence ``slot.id``, for ``p < len(slot.inputs)``, and the sequence holds
nothing at indices ``>= len(slot.inputs)``. The engine keeps it true by
calling :meth:`SlotCache.record` with exactly the inputs each successful
decode wrote, and :meth:`Slot.truncate` or :meth:`SlotCache.release` to
forget inputs (a failed decode: ``release(slot, [])`` clears the slot).
The cache therefore issues KV removals only when ``slot.inputs`` says there is
something to remove.

Nothing here touches llama.cpp directly: every KV operation goes through a
:class:`KVBackend`, so the policy is tested with a fake that records calls.

With a host tier (:class:`runner.engine.hostcache.HostCache`), a slot about to lose
inputs to another prompt is saved there first, and :meth:`SlotCache.acquire`
restores a saved state when it serves a longer prefix than any slot (and the
copy costs less than evaluating the difference).

LoRA: a slot's KV content depends on the adapter set it was computed under
(:mod:`runner.engine.lora`), recorded as ``Slot.lora``.  A prefix is reused, forked
or restored only for a prompt of the same set; a slot lent to another set is
cleared first.  The host tier and slot files hold only prefixes computed
under the load's default set (``base_lora``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

if TYPE_CHECKING:
    from runner.engine.hostcache import HostCache

__all__ = [
    "KVBackend",
    "NoFreeSlot",
    "ShiftResult",
    "Slot",
    "SlotCache",
    "PositionedKV",
    "SpanInput",
    "common_prefix",
    "kv_position",
    "reusable_prefix",
    "truncate_prompt",
]

Policy = Literal["single", "multi"]


class KVBackend(Protocol):
    """The KV-memory operations the slot cache needs (``llama_memory_seq_*``).

    Positions are half-open ``[p0, p1)``; ``p1 == -1`` means "to the end".
    """

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        """Remove positions ``[p0, p1)`` of ``seq``.

        Returns False when the memory refuses a partial removal (recurrent
        models); removing everything (``0, -1``) must always succeed.
        """
        ...

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Make positions ``[p0, p1)`` of ``src`` also belong to ``dst``."""
        ...

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """Add ``delta`` to the positions ``[p0, p1)`` of ``seq`` (RoPE shift)."""
        ...

    def can_shift(self) -> bool:
        """Whether :meth:`seq_add` is supported by this memory."""
        ...


class NoFreeSlot(Exception):
    """Every slot is in use; the request has to wait."""


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (compared with ``==``)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SpanInput(NamedTuple):
    """One KV position of an item spanning several (a media chunk's embedding
    rows). Two span inputs are equal when they name the same span and row."""

    key: Hashable  # the whole span, e.g. (sha256 of the media, chunk number)
    index: int     # row within the span, 0-based
    shrink: int = 0  # on the last row only: rows minus KV positions of the span (M-RoPE)


def kv_position(inputs: Sequence[Hashable], i: int) -> int:
    """The KV position of input index ``i`` (``i <= len(inputs)``): ``i``
    less the positions given back by the spans that end before it."""
    return i - sum(x.shrink for x in inputs[:i] if type(x) is SpanInput and x.shrink)


class PositionedKV:
    """A :class:`KVBackend` over another, for memories whose positions are not
    input indices (M-RoPE media): it turns the index ranges the slot cache asks
    for into KV positions, from what the sequence's slot holds at the time of
    the call (``inputs_of(seq)``; the cache calls the backend before changing
    a slot's inputs).  It never shifts: positions after a shifted image would
    no longer be the ones the model was given.
    """

    def __init__(self, inner: KVBackend) -> None:
        self.inner = inner
        self.inputs_of = lambda seq: ()  # set by the owner once the slots exist

    def _pos(self, seq: int, i: int) -> int:
        return i if i <= 0 else kv_position(self.inputs_of(seq), i)

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        return self.inner.seq_rm(seq, self._pos(seq, p0), self._pos(seq, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.inner.seq_cp(src, dst, self._pos(src, p0), self._pos(src, p1))

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        raise NotImplementedError("positions mapped from input indices cannot be shifted")

    def can_shift(self) -> bool:
        return False


def reusable_prefix(cached: Sequence[Hashable], prompt: Sequence[Hashable], limit: int) -> int:
    """How many leading inputs of ``prompt`` the KV content ``cached`` can serve.

    The common prefix, capped at ``limit``, then moved back to the start of a
    span it would end inside of: a span is reused whole or not at all (a
    media chunk decoded halfway, or with non-causal attention over a different
    set of rows, is not the same KV content).
    """
    n = min(common_prefix(cached, prompt), limit)
    if 0 < n < len(prompt):
        nxt = prompt[n]
        if isinstance(nxt, SpanInput) and nxt.index > 0:
            n = max(0, n - nxt.index)
    return n


def truncate_prompt(inputs: Sequence[Hashable], slot_ctx: int, num_keep: int) -> list:
    """Shorten a prompt that does not fit a slot, keeping its head and tail.

    A prompt shorter than ``slot_ctx`` is returned unchanged (as a new list):
    it leaves at least one free position to generate into, and later growth is
    handled by :meth:`SlotCache.shift`.

    Otherwise the result is ``inputs[:keep] + inputs[-tail:]`` with

    * ``keep = min(num_keep, slot_ctx - 2)`` — the protected head (system
      prompt, BOS), clamped so that at least one tail input and one free
      position remain;
    * ``tail = max(1, (slot_ctx - keep) // 2)`` — the most recent inputs.

    so the result fills the head plus half of the room after it, leaving
    ``slot_ctx - keep - tail >= 1`` positions for generation: the same state a
    context shift of a full slot would leave.

    Raises ValueError if ``slot_ctx < 2`` or ``num_keep < 0``.
    """
    if slot_ctx < 2:
        raise ValueError(f"slot_ctx must be at least 2, got {slot_ctx}")
    if num_keep < 0:
        raise ValueError(f"num_keep must be >= 0, got {num_keep}")
    if len(inputs) < slot_ctx:
        return list(inputs)
    keep = min(num_keep, slot_ctx - 2)
    tail = max(1, (slot_ctx - keep) // 2)
    return list(inputs[:keep]) + list(inputs[len(inputs) - tail:])


@dataclasses.dataclass(frozen=True)
class ShiftResult:
    """Outcome of :meth:`SlotCache.shift`.

    Exactly one of two cases:

    * in place (``reprocess == []``): ``discarded`` inputs after ``num_keep``
      were removed from the KV and the slot, later positions moved down;
    * reprocess (``reprocess`` non-empty): the memory cannot shift, so the slot
      was cleared; the engine must evaluate ``reprocess`` again (recording it)
      before continuing. ``discarded`` still counts the dropped inputs.
    """

    discarded: int  # inputs dropped from the slot's history
    reprocess: list  # inputs to evaluate again into the (now empty) slot; [] when shifted in place


@dataclasses.dataclass(eq=False)
class Slot:
    """One KV sequence and the inputs it holds.

    Invariant: ``inputs`` is exactly the content of sequence ``id`` in the KV
    memory (see the module docstring). Not thread-safe; owned by the engine
    loop thread, like the :class:`SlotCache` that creates it.
    """

    id: int  # llama sequence id; also the index in SlotCache.slots
    backend: KVBackend = dataclasses.field(repr=False)  # KV memory holding this sequence
    inputs: list = dataclasses.field(default_factory=list)  # input at each KV position 0..len-1
    in_use: bool = False  # borrowed by a request between acquire() and release()
    last_used: int = 0  # logical clock of the last acquire/release; larger = more recent
    cached: bool = True  # False while lent by acquire_uncached(): emptied on release
    lora: tuple = ()  # adapter scales the KV content was computed under (runner.engine.lora.LoraKey)

    def truncate(self, n: int) -> int:
        """Forget every input from position ``n`` on; return how many remain.

        Issues ``seq_rm(id, n, -1)`` when there is something to remove. If the
        memory refuses the partial removal, the slot is cleared entirely and 0
        is returned (the engine must then treat nothing as cached).
        """
        if n < 0:
            raise ValueError(f"truncate position must be >= 0, got {n}")
        if n >= len(self.inputs):
            return len(self.inputs)
        if n > 0 and self.backend.seq_rm(self.id, n, -1):
            del self.inputs[n:]
            return n
        self._clear()
        return 0

    def _clear(self) -> None:
        """Remove the whole sequence (always supported by the memory)."""
        if self.inputs:
            self.backend.seq_rm(self.id, 0, -1)
            self.inputs.clear()


class SlotCache:
    """Chooses, trims, forks and shifts the KV slots of one context.

    Policies for :meth:`acquire`:

    * ``'single'``: the free slot sharing the longest prefix with the prompt;
      ties go to a slot that loses nothing (its inputs are all part of that
      prefix, e.g. an empty slot), then to the least recently used.
    * ``'multi'``: the free slot whose inputs are an exact prefix of the
      prompt (longest first, ties least recently used), else the least
      recently used free slot. If any *other* slot, free or in use, shares a
      longer prefix with the prompt, that prefix is forked into the chosen
      slot with ``seq_rm(dst, 0, -1)`` then ``seq_cp(src, dst, 0, n)``. Needs
      a memory that copies partial ranges (a unified KV cache); use
      ``'single'`` for recurrent models.

    Adjacency (``adjacent``, set when every slot has a KV stream of its own):
    llama.cpp decodes the running sequences in one pass over the weights
    only while their ids are consecutive (runner.engine.scheduler, "Batch order").
    So where the rules above leave a choice between slots that lose nothing
    (empty ones, say), the slot next to the most running slots wins before
    recency.  Choosing a victim, adjacency goes before recency only with an
    enabled host tier, which keeps the victim's KV (in host memory), so that
    the choice costs a copy at worst; without one, least recently used stays
    the rule, since evicting a fresher slot costs evaluating it again.

    With a host tier (``host``), whichever the policy: a slot about to lose
    inputs is saved to the tier first; and when a saved state serves a longer
    prefix than the slot chosen above, and the tier judges the copy worth it
    (:meth:`HostCache.worth`), it is restored into the free slot that loses
    nothing (empty, or holding a prefix of what is restored), else into the
    least recently used one, and cut back to the shared prefix.

    Not thread-safe; owned by the engine loop thread. Calls into the backend
    happen synchronously, so an acquire never runs between a ``record()`` and
    the decode that writes those inputs.
    """

    def __init__(self, backend: KVBackend, n_slots: int, slot_ctx: int,
                 policy: Policy = "single", host: HostCache | None = None,
                 base_lora: tuple = (), adjacent: bool = False) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots must be at least 1, got {n_slots}")
        if slot_ctx < 2:
            raise ValueError(f"slot_ctx must be at least 2, got {slot_ctx}")
        if policy not in ("single", "multi"):
            raise ValueError(f"unknown slot policy {policy!r}; expected 'single' or 'multi'")
        self.backend = backend  # KV memory shared by all slots
        self.slot_ctx = slot_ctx  # capacity of each slot, in inputs
        self.policy: Policy = policy  # how acquire() picks a slot
        self.slots = [Slot(i, backend) for i in range(n_slots)]  # index == sequence id
        self._clock = 0  # logical time source for Slot.last_used
        self.host = host  # host-memory tier saving and restoring slot states (None: none)
        self.base_lora = base_lora  # the load's default adapter set: the only one the host tier keeps
        self.adjacent = adjacent  # prefer slots next to running ones (one KV stream per slot)
        for s in self.slots:
            s.lora = base_lora

    # -- lending ----------------------------------------------------------

    @property
    def n_free(self) -> int:
        """Number of slots not in use."""
        return sum(not s.in_use for s in self.slots)

    def acquire(self, prompt: Sequence[Hashable], lora: tuple | None = None) -> tuple[Slot, int]:
        """Lend a slot for ``prompt`` computed under adapter set ``lora``
        (None: ``base_lora``); return ``(slot, n_cached)``.  Only slots of
        the same set offer a prefix.

        On return ``slot.inputs == list(prompt[:n_cached])`` and the KV holds
        exactly that, so the engine evaluates ``prompt[n_cached:]``, which is
        never empty (a fully cached prompt gives ``n_cached = len(prompt) - 1``
        so that its last input produces fresh logits).

        Raises NoFreeSlot when every slot is in use, ValueError for an empty
        prompt or one longer than ``slot_ctx`` (see :func:`truncate_prompt`).
        """
        if not prompt:
            raise ValueError("cannot acquire a slot for an empty prompt")
        if len(prompt) > self.slot_ctx:
            raise ValueError(
                f"prompt of {len(prompt)} inputs exceeds slot_ctx={self.slot_ctx}; truncate it first")
        free = [s for s in self.slots if not s.in_use]
        if not free:
            raise NoFreeSlot(f"all {len(self.slots)} slots are in use")
        limit = len(prompt) - 1  # at least one input must remain to evaluate
        lora = self.base_lora if lora is None else lora
        slot, src, n_cached = self._plan(free, prompt, limit, lora)
        restored = self._restore(free, prompt, limit, n_cached) if lora == self.base_lora else None
        if restored is _REFUSED:  # the target slot was emptied: choose again
            slot, src, n_cached = self._plan(free, prompt, limit, lora)
        elif restored is not None:
            slot, n_cached = restored
        if restored is None or restored is _REFUSED:
            if src is not slot:
                self._fork(src, slot, n_cached, prompt)
            else:
                self._save(slot, n_cached)
            if slot.truncate(n_cached) < n_cached:
                n_cached = 0  # the memory refused a partial removal; the slot was cleared
        slot.lora = lora
        self._lend(slot, cached=True)
        self._expect()
        return slot, n_cached

    def acquire_uncached(self) -> Slot:
        """Lend an empty slot to a request that must not use or leave a cache (embeddings).

        Takes a free empty slot if there is one, else the least recently used
        free slot, cleared. :meth:`release` empties it again.
        """
        free = [s for s in self.slots if not s.in_use]
        if not free:
            raise NoFreeSlot(f"all {len(self.slots)} slots are in use")
        slot = min(free, key=lambda s: (bool(s.inputs), self._apart(s, bool(s.inputs)), s.last_used))
        self._save(slot, 0)
        slot._clear()
        slot.lora = self.base_lora
        self._lend(slot, cached=False)
        self._expect()
        return slot

    def release(self, slot: Slot, kept_inputs: Sequence[Hashable] | None = None) -> None:
        """Return ``slot`` after a request.

        The slot keeps the longest common prefix of what it holds and
        ``kept_inputs`` (the prompt plus the tokens returned); ``None`` keeps
        everything recorded, ``[]`` clears it (use that after a failed decode).
        Inputs never decoded cannot be kept, whatever ``kept_inputs`` claims.
        A slot lent by :meth:`acquire_uncached` is always left empty.
        """
        self._check_lent(slot)
        if not slot.cached:
            slot._clear()
        elif kept_inputs is not None:
            slot.truncate(common_prefix(slot.inputs, kept_inputs))
        slot.in_use = False
        slot.cached = True
        slot.last_used = self._tick()
        self._expect()

    def record(self, slot: Slot, inputs: Sequence[Hashable]) -> None:
        """Note that ``inputs`` were decoded into ``slot`` after what it holds.

        Raises ValueError if they would overflow ``slot_ctx``: shift first.
        """
        self._check_lent(slot)
        if len(slot.inputs) + len(inputs) > self.slot_ctx:
            raise ValueError(
                f"slot {slot.id} holds {len(slot.inputs)} inputs; {len(inputs)} more exceed "
                f"slot_ctx={self.slot_ctx}")
        slot.inputs.extend(inputs)

    def put(self, slot: Slot, inputs: Sequence[Hashable], set_state: Callable[[], bool]) -> bool:
        """Replace what a free ``slot`` holds with a saved sequence state (the
        ``restore_slot`` op).  What the slot held goes to the host tier first,
        then ``set_state()`` writes the sequence.  True: the slot holds
        ``inputs`` (counted as a use); False: the memory refused the state
        and the slot is empty.  Raises ValueError for a lent slot."""
        if not (0 <= slot.id < len(self.slots) and self.slots[slot.id] is slot):
            raise ValueError(f"slot {slot.id} does not belong to this cache")
        if slot.in_use:
            raise ValueError(f"slot {slot.id} is in use")
        self._save(slot, 0)
        slot._clear()
        slot.lora = self.base_lora  # slot files hold prefixes of the default set
        if not set_state():
            slot.inputs.clear()  # the memory emptied the sequence
            return False
        slot.inputs[:] = inputs
        slot.last_used = self._tick()
        self._expect()
        return True

    # -- context shift ----------------------------------------------------

    def shift(self, slot: Slot, num_keep: int) -> ShiftResult:
        """Make room in a slot by dropping half of what follows its first ``num_keep`` inputs.

        ``discard = max(1, (len(inputs) - num_keep) // 2)`` inputs at positions
        ``[num_keep, num_keep + discard)`` are dropped. If the memory can shift
        this is ``seq_rm(id, num_keep, num_keep + discard)`` then
        ``seq_add(id, num_keep + discard, len, -discard)``. If it cannot
        (``can_shift()`` False, or the partial ``seq_rm`` refused), the slot is
        cleared and the returned :class:`ShiftResult` lists the surviving inputs
        for the engine to evaluate again.

        Raises ValueError unless ``0 <= num_keep < len(slot.inputs)``.
        """
        self._check_lent(slot)
        n = len(slot.inputs)
        if not 0 <= num_keep < n:
            raise ValueError(
                f"cannot shift slot {slot.id}: num_keep={num_keep} must be in [0, {n})")
        discard = max(1, (n - num_keep) // 2)
        kept = slot.inputs[:num_keep] + slot.inputs[num_keep + discard:]
        if self.backend.can_shift() and self.backend.seq_rm(slot.id, num_keep, num_keep + discard):
            self.backend.seq_add(slot.id, num_keep + discard, n, -discard)
            slot.inputs[:] = kept
            return ShiftResult(discard, [])
        slot._clear()
        return ShiftResult(discard, kept)

    # -- introspection ----------------------------------------------------

    def snapshot(self) -> list[dict]:
        """Per-slot state for the ``info`` op: id, n_inputs, in_use, last_used."""
        return [
            {"id": s.id, "n_inputs": len(s.inputs), "in_use": s.in_use, "last_used": s.last_used}
            for s in self.slots
        ]

    # -- internals --------------------------------------------------------

    def _pick_longest(self, free: list[Slot], prompt: Sequence[Hashable],
                      limit: int, lora: tuple) -> tuple[Slot, int]:
        """'single' policy: most reusable prefix, then nothing lost, then LRU."""
        def rank(s: Slot) -> tuple[int, bool, int, int]:
            n = reusable_prefix(s.inputs, prompt, limit) if s.lora == lora else 0
            loses = len(s.inputs) > n
            return (-n, loses, self._apart(s, loses), s.last_used)

        chosen = min(free, key=rank)
        return chosen, -rank(chosen)[0]

    def _plan(self, free: list[Slot], prompt: Sequence[Hashable],
              limit: int, lora: tuple) -> tuple[Slot, Slot, int]:
        """``(slot, source, n)``: lend ``slot`` holding ``prompt[:n]``,
        forked from ``source`` when that is another slot."""
        if self.policy == "single":
            slot, n = self._pick_longest(free, prompt, limit, lora)
            return slot, slot, n
        return self._pick_multi(free, prompt, limit, lora)

    def _pick_multi(self, free: list[Slot], prompt: Sequence[Hashable],
                    limit: int, lora: tuple) -> tuple[Slot, Slot, int]:
        """'multi' policy: exact-prefix free slot or LRU victim, with the slot to fork from."""
        exact = [s for s in free if not s.inputs
                 or (s.lora == lora and common_prefix(s.inputs, prompt) == len(s.inputs))]
        if exact:
            dst = min(exact, key=lambda s: (-len(s.inputs), self._apart(s, False), s.last_used))
        else:
            dst = min(free, key=lambda s: (self._apart(s, True), s.last_used))
        n_dst = reusable_prefix(dst.inputs, prompt, limit) if dst.lora == lora else 0
        src, n_src = dst, n_dst
        for s in self.slots:
            n = reusable_prefix(s.inputs, prompt, limit) if s.lora == lora else 0
            if s is not dst and n > n_src:
                src, n_src = s, n
        return dst, src, n_src

    def _fork(self, src: Slot, dst: Slot, n: int, prompt: Sequence[Hashable]) -> None:
        """Make ``dst`` hold the first ``n`` inputs of ``src`` (``seq_cp``)."""
        self._save(dst, common_prefix(dst.inputs, prompt[:n]))
        dst._clear()
        self.backend.seq_cp(src.id, dst.id, 0, n)
        dst.inputs[:] = src.inputs[:n]

    # -- host tier --------------------------------------------------------

    def _save(self, slot: Slot, keep: int) -> None:
        """Copy ``slot`` to the host tier if it is about to lose inputs
        (it keeps only its first ``keep``) and holds the default adapter set's KV."""
        if self.host is not None and len(slot.inputs) > keep and slot.lora == self.base_lora:
            self.host.save(slot.id, slot.inputs)

    def _expect(self) -> None:
        """Tell the host tier which slots a save may copy next: the free ones
        holding the default adapter set's KV (the only ones it saves)."""
        if self.host is not None:
            self.host.expect([(s.id, len(s.inputs)) for s in self.slots
                              if not s.in_use and s.lora == self.base_lora])

    def _restore(self, free: list[Slot], prompt: Sequence[Hashable], limit: int,
                 n_slot: int) -> tuple[Slot, int] | object | None:
        """Restore the tier's best entry for ``prompt`` if it serves more than
        the ``n_slot`` inputs a slot offers and the copy pays.  Returns
        ``(slot, n_cached)``, None when nothing was restored, or ``_REFUSED``
        when the memory refused the state (the target slot is then empty)."""
        host = self.host
        if host is None or not host.enabled:
            return None
        entry, n = host.best(prompt, limit)
        if entry is None or n <= n_slot or not host.worth(entry, n, n_slot):
            host.count_lookup(0)
            return None
        head = prompt[:n]
        host.touch(entry)  # saving the target below must not evict it
        def rank(s: Slot) -> tuple[bool, int, int]:
            loses = common_prefix(s.inputs, head) < len(s.inputs)
            return (loses, self._apart(s, loses), s.last_used)

        target = min(free, key=rank)
        self._save(target, common_prefix(target.inputs, head))
        target._clear()
        if not host.restore(entry, target.id):
            host.count_lookup(0)
            return _REFUSED
        target.inputs[:] = entry.inputs
        if target.truncate(n) < n:
            n = 0  # cannot happen when min_keep was right: the memory refused the cut
        host.count_lookup(max(0, n - n_slot))
        return target, n

    def _apart(self, slot: Slot, evicting: bool) -> int:
        """Ranks ``slot`` by adjacency (lower is better): minus the number of
        its neighbours in use, or 0 where adjacency does not count (see the
        class docstring)."""
        if not self.adjacent or (evicting and (self.host is None or not self.host.enabled)):
            return 0
        slots, i = self.slots, slot.id
        return -((i > 0 and slots[i - 1].in_use) + (i + 1 < len(slots) and slots[i + 1].in_use))

    def _lend(self, slot: Slot, *, cached: bool) -> None:
        slot.in_use = True
        slot.cached = cached
        slot.last_used = self._tick()

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _check_lent(self, slot: Slot) -> None:
        if not (0 <= slot.id < len(self.slots) and self.slots[slot.id] is slot):
            raise ValueError(f"slot {slot.id} does not belong to this cache")
        if not slot.in_use:
            raise ValueError(f"slot {slot.id} is not in use")


_REFUSED = object()  # SlotCache._restore: the memory refused a saved state
