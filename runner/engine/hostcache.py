"""Host-memory tier of the prefix cache.

A slot's KV content survives only while the slot is not lent to another
prompt.  This tier keeps the sequence state of a slot that is about to be
reused (``llama_state_seq_get_data``) in host memory, keyed by the exact
inputs it holds, and restores it into a slot (``llama_state_seq_set_data``)
when a later prompt shares a longer prefix with it than with any slot.

Rules (each one tested in tests/test_hostcache.py with a fake backend):

* **Bounded in bytes.**  The entries' states add up to at most ``max_bytes``;
  storing evicts the least recently used entries first (a save or a restore
  counts as a use).  A state larger than the whole bound is not kept.
  ``max_bytes == 0`` turns the tier off: nothing is copied.
* **One copy per prefix.**  Entry A *covers* inputs B when B is a prefix of
  A's inputs and A's state may be cut back to ``len(B)`` (``min_keep``).
  Storing B that an entry covers copies nothing (the entry is marked used);
  storing B drops every entry B covers.
* **Restore only what can be cut back correctly.**  A state holds the whole
  input list it was saved with; the slot cache trims the tail after a
  restore.  ``min_keep`` is the shortest prefix the state can be cut back
  to: 0 for an ordinary KV cache, the whole length for a recurrent or
  hybrid memory (whose state cannot be trimmed, so the entry serves only
  prompts that extend it), and for a sliding-window cache the length from
  which the window before the cut is still in the state.  The backend
  computes it when saving (:meth:`StateBackend.min_keep`).
* **Restore when it pays.**  Restoring costs copying the entry's bytes;
  it saves evaluating the inputs it adds over the best slot.  The tier
  restores when ``(n_host - n_slot) * eval_s_per_input >
  RESTORE_OVERHEAD_S + nbytes / restore_bytes_per_s``, with both rates
  measured as exponential averages (the engine reports prompt evaluation
  through :meth:`HostCache.note_eval`; restores time themselves), starting
  from the priors below.

* **Save without page faults on the loop.**  A save stalls every other
  sequence for its length, and writing into fresh memory faults each page
  in, which cost far more than the copy itself (runner.engine.hostbuffers).  The
  state is sized first (a walk over the cells) and copied by llama.cpp
  straight into memory touched before: the spare buffer a helper thread made
  at the size :meth:`HostCache.expect` asked for after the last change of
  the free slots, or else the buffer of an entry this save evicts; only when
  neither exists is a fresh buffer used.  Dropped buffers are freed on the
  helper thread.  The spare counts against ``max_bytes`` with the entries.

Not thread-safe except :meth:`HostCache.info`: the engine's loop thread
saves and restores; ``info`` may be read from any thread (each counter is
read once, so the set may be a step out of date).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import numpy as np

from runner.engine.hostbuffers import HostBuffers
from runner.engine.slots import reusable_prefix

__all__ = ["HostCache", "HostCacheStats", "HostEntry", "StateBackend"]

# Priors for the cost decision, replaced by measurements as they come:
# 1 GB/s is below a host memcpy and a PCIe upload; 0.2 ms per input is a fast
# prompt evaluation (5,000 tokens/s), so the tier restores less eagerly than
# the measured rates will let it.
PRIOR_RESTORE_BYTES_PER_S = 1e9
PRIOR_EVAL_S_PER_INPUT = 2e-4
RESTORE_OVERHEAD_S = 2e-4  # fixed cost of one restore (sequence clear, cell search)
RATE_WEIGHT = 0.3  # weight of the newest measurement in the exponential averages


class StateBackend(Protocol):
    """The per-sequence state operations the tier needs (``llama_state_seq_*``)."""

    def state_size(self, seq: int) -> int:
        """Bytes of the whole state of sequence ``seq`` now."""
        ...

    def state_get_into(self, seq: int, out: np.ndarray) -> int:
        """Write the whole state of sequence ``seq`` (its KV cells, or its
        recurrent state) into the start of ``out``; returns the bytes written."""
        ...

    def state_set(self, seq: int, data) -> bool:
        """Replace sequence ``seq`` with a saved state.  False when the
        memory refuses it (no room, other shape); the sequence is then empty."""
        ...

    def min_keep(self, seq: int, inputs: Sequence[Hashable]) -> int:
        """The shortest prefix of ``inputs`` (what ``seq`` holds now) that a
        restore of ``seq``'s state may be cut back to; ``len(inputs)`` when
        it cannot be cut at all."""
        ...


@dataclasses.dataclass(eq=False)
class HostEntry:
    """One saved sequence state."""

    inputs: tuple         # the inputs whose KV the state holds, position by position
    data: np.ndarray      # the state as state_get_into wrote it (uint8, owns its memory)
    min_keep: int         # shortest prefix the restored state may be cut back to
    last_used: int        # logical clock of the last save or restore; larger = more recent

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def covers(self, inputs: Sequence[Hashable]) -> bool:
        """Whether restoring this entry and cutting it back gives exactly ``inputs``."""
        n = len(inputs)
        return self.min_keep <= n <= len(self.inputs) and tuple(self.inputs[:n]) == tuple(inputs)


@dataclasses.dataclass
class HostCacheStats:
    """Counters since load (loop thread writes them)."""

    lookups: int = 0          # admissions that consulted the tier
    hits: int = 0             # of which restored an entry
    misses: int = 0           # of which restored nothing (no entry, or a slot was as good)
    hit_inputs: int = 0       # prompt inputs served by restores, beyond what the slot had
    saves: int = 0            # states copied in
    covered: int = 0          # saves skipped because an entry already covered the inputs
    replaced: int = 0         # entries dropped because a longer save covered them
    evictions: int = 0        # entries dropped to stay under max_bytes
    too_large: int = 0        # states not copied: larger than max_bytes
    restore_failures: int = 0  # restores the memory refused (the entry is dropped)
    into_spare: int = 0       # saves copied into the spare buffer
    into_evicted: int = 0     # saves copied into the buffer of an entry they evicted
    into_fresh: int = 0       # saves copied into fresh memory (faulted in on the loop)
    save_seconds: float = 0.0     # time of the saves that copied (sizing, buffer, copy, bookkeeping)
    restore_seconds: float = 0.0  # time in state_set
    max_save_seconds: float = 0.0  # longest single save (a stall of the loop)


class HostCache:
    """Saved sequence states, least recently used evicted first.  See the module docstring."""

    def __init__(self, backend: StateBackend, max_bytes: int, *, min_inputs: int = 16,
                 restore_bytes_per_s: float = PRIOR_RESTORE_BYTES_PER_S,
                 eval_s_per_input: float = PRIOR_EVAL_S_PER_INPUT,
                 clock: Callable[[], float] = time.perf_counter,
                 buffers: HostBuffers | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if min_inputs < 1:
            raise ValueError(f"min_inputs must be >= 1, got {min_inputs}")
        self.backend = backend          # where states come from and go to
        self.max_bytes = max_bytes      # bound on the sum of entry sizes; 0: the tier is off
        self.min_inputs = min_inputs    # shorter sequences are not worth a copy
        self.restore_bytes_per_s = restore_bytes_per_s  # measured restore rate (exp. average)
        self.eval_s_per_input = eval_s_per_input        # measured prompt evaluation cost (exp. average)
        self.bytes = 0                  # sum of entry sizes now
        self.stats = HostCacheStats()   # counters, see HostCacheStats
        self._clock = clock             # seconds, for the timings and the measured restore rate
        self._entries: list[HostEntry] = []  # in no particular order; few (bytes-bounded)
        self._tick = 0                  # logical clock for HostEntry.last_used
        self.bytes_per_input = 0.0      # state bytes per input of the last sizing (0: none yet)
        self._pinned: HostEntry | None = None  # touched for a restore: its buffer is not reused
        # spare buffers made off the loop thread (None: the tier is off)
        self.buffers = (buffers or HostBuffers()) if max_bytes > 0 else None

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[HostEntry]:
        """Entries from least to most recently used."""
        return sorted(self._entries, key=lambda e: e.last_used)

    # -- saving -----------------------------------------------------------

    def save(self, seq: int, inputs: Sequence[Hashable]) -> bool:
        """Copy the state of ``seq``, which holds exactly ``inputs``, into the
        tier.  Returns whether a new entry was stored."""
        if not self.enabled or len(inputs) < self.min_inputs:
            return False
        key = tuple(inputs)
        for e in self._entries:
            if e.covers(key):
                e.last_used = self._next()
                self.stats.covered += 1
                return False
        t0 = self._clock()
        min_keep = min(max(0, self.backend.min_keep(seq, key)), len(key))
        size = self.backend.state_size(seq)
        self.bytes_per_input = size / len(key)
        if size > self.max_bytes:
            self.stats.too_large += 1
            return False
        # The entries the new one covers go, then the least recently used
        # until it fits; their buffers may take the copy.
        gone = [e for e in self._entries if _covering(key, min_keep, e.inputs)]
        for e in gone:
            self._drop(e)
            self.stats.replaced += 1
        while self.bytes + size > self.max_bytes:
            victim = min(self._entries, key=lambda e: e.last_used)
            self._drop(victim)
            gone.append(victim)
            self.stats.evictions += 1
        buf = self._buffer(size, gone)
        try:
            n = self.backend.state_get_into(seq, buf)
        except BaseException:
            self.buffers.discard(buf)
            raise
        finally:
            for e in gone:
                if e.data is not buf and e is not self._pinned:
                    self.buffers.discard(e.data)
        if n != size:
            buf.resize(n, refcheck=False)
        entry = HostEntry(key, buf, min_keep, self._next())
        self._entries.append(entry)
        self.bytes += entry.nbytes
        self.stats.saves += 1
        dt = self._clock() - t0
        self.stats.save_seconds += dt
        self.stats.max_save_seconds = max(self.stats.max_save_seconds, dt)
        return True

    def expect(self, n_inputs: Sequence[tuple[int, int]]) -> None:
        """Have the spare ready for the next save: ``n_inputs`` lists the
        ``(seq, inputs held)`` of the slots a save may copy next (the free
        ones).  Sized for the largest of them from the measured bytes per
        input (a sizing walk of the first one before any is known), within
        the room the bound leaves."""
        if not self.enabled:
            return
        n = [(seq, k) for seq, k in n_inputs if k >= self.min_inputs]
        if not n:
            return
        if not self.bytes_per_input:
            seq, k = n[0]
            self.bytes_per_input = self.backend.state_size(seq) / k
        need = int(self.bytes_per_input * max(k for _, k in n))
        self.buffers.prepare(max(0, min(need, self.max_bytes - self.bytes)))

    def _buffer(self, size: int, gone: list[HostEntry]) -> np.ndarray:
        """Where a ``size``-byte state is copied: the spare if it is large
        enough, else the largest buffer of an entry this save drops if that
        is, else the larger of the two grown (its new pages fault in on the
        loop), else fresh memory; resized in place to ``size``.  The spare
        is spent either way (it counted against the bound)."""
        spare = self.buffers.take()
        reusable = [e.data for e in gone if e is not self._pinned
                    and isinstance(e.data, np.ndarray) and e.data.flags.owndata]
        evicted = max(reusable, key=len, default=None)
        if spare is not None and (len(spare) >= size or evicted is None
                                  or (len(evicted) < size and len(spare) >= len(evicted))):
            buf = spare
            self.stats.into_spare += 1
        elif evicted is not None:
            buf = evicted
            if spare is not None:
                self.buffers.discard(spare)
            self.stats.into_evicted += 1
        else:
            self.stats.into_fresh += 1
            return np.empty(size, dtype=np.uint8)
        if len(buf) != size:
            buf.resize(size, refcheck=False)
        return buf

    # -- restoring --------------------------------------------------------

    def best(self, prompt: Sequence[Hashable], limit: int) -> tuple[HostEntry | None, int]:
        """The entry serving the longest prefix of ``prompt`` (at most
        ``limit`` inputs) and that length; ``(None, 0)`` when none serves any.
        Ties go to the smaller entry (fewer bytes to copy)."""
        found, n_found = None, 0
        for e in self._entries:
            n = reusable_prefix(e.inputs, prompt, limit)
            if n < max(e.min_keep, 1):
                continue
            if n > n_found or (n == n_found and found is not None and e.nbytes < found.nbytes):
                found, n_found = e, n
        return found, n_found

    def worth(self, entry: HostEntry, n: int, n_slot: int) -> bool:
        """The cost decision: restoring ``entry`` (serving ``n`` inputs)
        beats evaluating the ``n - n_slot`` inputs the best slot lacks."""
        gain = (n - n_slot) * self.eval_s_per_input
        cost = RESTORE_OVERHEAD_S + entry.nbytes / self.restore_bytes_per_s
        return gain > cost

    def touch(self, entry: HostEntry) -> None:
        """Mark ``entry`` most recently used and keep its buffer from reuse
        until :meth:`restore` (a save before it could evict it)."""
        entry.last_used = self._next()
        self._pinned = entry

    def restore(self, entry: HostEntry, seq: int) -> bool:
        """Write ``entry``'s state into ``seq``; False (and the entry
        dropped) when the memory refused it, leaving ``seq`` empty."""
        t0 = self._clock()
        try:
            ok = self.backend.state_set(seq, entry.data)
        finally:
            if self._pinned is entry:
                self._pinned = None
        dt = self._clock() - t0
        self.stats.restore_seconds += dt
        if not ok:
            self.stats.restore_failures += 1
            self._drop(entry)
            return False
        if dt > 0:
            self.restore_bytes_per_s = _average(self.restore_bytes_per_s, entry.nbytes / dt)
        entry.last_used = self._next()
        return True

    def count_lookup(self, hit_inputs: int) -> None:
        """Note one admission that consulted the tier; ``hit_inputs`` > 0:
        a restore served that many inputs beyond the best slot."""
        self.stats.lookups += 1
        if hit_inputs > 0:
            self.stats.hits += 1
            self.stats.hit_inputs += hit_inputs
        else:
            self.stats.misses += 1

    def note_eval(self, n_inputs: int, seconds: float) -> None:
        """A decode evaluated ``n_inputs`` prompt inputs in ``seconds``."""
        if n_inputs > 0 and seconds > 0:
            self.eval_s_per_input = _average(self.eval_s_per_input, seconds / n_inputs)

    # -- introspection ----------------------------------------------------

    def info(self) -> dict:
        """Bound, contents, counters and rates, as plain data (any thread)."""
        s = self.stats
        spare = self.buffers.spare_bytes if self.buffers is not None else 0
        return {"max_bytes": self.max_bytes, "bytes": self.bytes, "spare_bytes": spare,
                "entries": len(self._entries),
                "lookups": s.lookups, "hits": s.hits, "misses": s.misses,
                "hit_inputs": s.hit_inputs, "saves": s.saves, "covered": s.covered,
                "replaced": s.replaced, "evictions": s.evictions, "too_large": s.too_large,
                "restore_failures": s.restore_failures, "into_spare": s.into_spare,
                "into_evicted": s.into_evicted, "into_fresh": s.into_fresh,
                "save_seconds": round(s.save_seconds, 6),
                "max_save_seconds": round(s.max_save_seconds, 6),
                "restore_seconds": round(s.restore_seconds, 6),
                "restore_bytes_per_s": round(self.restore_bytes_per_s),
                "eval_s_per_input": round(self.eval_s_per_input, 9)}

    def close(self) -> None:
        """Stop the buffer thread and drop every entry."""
        self._entries.clear()
        self.bytes = 0
        if self.buffers is not None:
            self.buffers.close()

    # -- internals --------------------------------------------------------

    def _drop(self, entry: HostEntry) -> None:
        if entry in self._entries:
            self._entries.remove(entry)
            self.bytes -= entry.nbytes

    def _next(self) -> int:
        self._tick += 1
        return self._tick


def _covering(inputs: tuple, min_keep: int, other: Sequence[Hashable]) -> bool:
    """Whether a state of ``inputs`` (cut back no shorter than ``min_keep``)
    covers ``other`` (HostEntry.covers before the entry exists)."""
    n = len(other)
    return min_keep <= n <= len(inputs) and inputs[:n] == tuple(other)


def _average(old: float, new: float) -> float:
    return (1 - RATE_WEIGHT) * old + RATE_WEIGHT * new
