"""Host-memory tier of the prefix cache, tested with fake memories.

The slot cache runs over tests/test_slots.py's FakeKV; :class:`FakeState`
adds the state copy and restore of one sequence, each state ``PER_INPUT``
bytes per input so that byte bounds are exact.  The clock is frozen, so the
cost decision uses exactly the rates each test sets.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_slots import FakeKV, assert_consistent

from runner.engine.hostbuffers import HostBuffers
from runner.engine.hostcache import RESTORE_OVERHEAD_S, HostCache
from runner.engine.slots import SlotCache

PER_INPUT = 10  # bytes of fake state per input


class FakeState:
    """Sequence states over a FakeKV: ``state_get`` returns bytes that
    ``state_set`` maps back to the cells they were taken from."""

    def __init__(self, kv: FakeKV, *, min_keep: str = "any", refuse: bool = False) -> None:
        self.kv = kv                        # the memory the states come from
        self.min_keep_rule = min_keep       # "any": trim anywhere; "whole": recurrent
        self.refuse = refuse                # state_set refuses every state
        self.saved: dict[bytes, dict] = {}  # state bytes -> the cells they hold
        self.calls: list[tuple] = []        # ("get", seq, n_inputs) | ("set", seq, n_inputs)

    def state_get(self, seq: int) -> bytes:
        cells = dict(self.kv.kv.get(seq, {}))
        self.calls.append(("get", seq, len(cells)))
        tag = f"{len(self.saved)}:".encode()
        data = tag + b"." * (PER_INPUT * len(cells) - len(tag))
        self.saved[data] = cells
        return data

    def state_size(self, seq: int) -> int:
        return PER_INPUT * len(self.kv.kv.get(seq, {}))

    def state_get_into(self, seq: int, out) -> int:
        data = self.state_get(seq)
        out[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        return len(data)

    def state_set(self, seq: int, data) -> bool:
        cells = self.saved[bytes(data)]
        self.calls.append(("set", seq, len(cells)))
        self.kv.kv[seq] = {} if self.refuse else dict(cells)
        return not self.refuse

    def min_keep(self, seq: int, inputs) -> int:
        return len(inputs) if self.min_keep_rule == "whole" else 0


def make(n_slots=1, *, max_entries=4, policy="single", slot_ctx=256, min_inputs=4,
         eval_s=1e-3, bps=1e9, **state_opts):
    """A slot cache with a host tier bounded to ``max_entries`` 20-input states."""
    kv = FakeKV()
    state = FakeState(kv, **state_opts)
    host = HostCache(state, max_entries * 20 * PER_INPUT, min_inputs=min_inputs,
                     restore_bytes_per_s=bps, eval_s_per_input=eval_s, clock=lambda: 0.0,
                     buffers=HostBuffers(thread=False))
    return SlotCache(kv, n_slots, slot_ctx, policy, host=host), kv, state, host


def serve(cache, kv, prompt, generated=()):
    """One request: acquire, decode what is not cached and the reply, release."""
    slot, n = cache.acquire(prompt)
    kv.decode(cache, slot, prompt[n:])
    kv.decode(cache, slot, list(generated))
    cache.release(slot, list(prompt) + list(generated))
    assert_consistent(cache, kv)
    return slot.id, n


def conv(c: int, n: int = 20) -> list[int]:
    """Conversation ``c``'s first ``n`` inputs: distinct for every c."""
    return [1000 * c + i for i in range(n)]


def keys(host):
    """Entries, least recently used first, as (first input // 1000, length)."""
    return [(e.inputs[0] // 1000, len(e.inputs)) for e in host.entries()]


# -- saving and restoring through the slot cache ----------------------------

def test_reused_slot_is_saved_and_returning_prompt_restored():
    cache, kv, state, host = make()
    a, b = conv(1), conv(2)
    serve(cache, kv, a)
    assert serve(cache, kv, b) == (0, 0)
    assert state.calls == [("get", 0, 20)] and keys(host) == [(1, 20)]
    state.calls.clear()
    # conversation 1 returns with a new turn: restored, only its tail evaluated
    assert serve(cache, kv, a + [7, 8, 9]) == (0, 20)
    assert state.calls == [("get", 0, 20), ("set", 0, 20)]
    assert keys(host) == [(2, 20), (1, 20)]
    info = host.info()
    assert (info["lookups"], info["hits"], info["misses"], info["hit_inputs"]) == (3, 1, 2, 20)
    assert info["entries"] == 2 and info["bytes"] == 2 * 20 * PER_INPUT


def test_restore_is_cut_back_to_the_shared_prefix():
    cache, kv, state, host = make()
    serve(cache, kv, conv(1, 30))
    serve(cache, kv, conv(2))
    prompt = conv(1, 25) + [5, 5]  # shares 25 of the 30 saved inputs
    slot, n = cache.acquire(prompt)
    assert n == 25 and slot.inputs == conv(1, 25)
    assert kv.calls[-1] == ("rm", 0, 25, -1)
    assert_consistent(cache, kv)


def test_slot_holding_the_prompt_beats_the_tier():
    cache, kv, state, host = make(n_slots=2)
    serve(cache, kv, conv(1))
    serve(cache, kv, conv(2))
    state.calls.clear()
    assert serve(cache, kv, conv(1) + [3]) == (0, 20)
    assert state.calls == []  # nothing saved, nothing restored
    assert host.info()["misses"] == 3


def test_restore_goes_to_the_slot_that_loses_nothing():
    cache, kv, state, host = make(n_slots=2)
    serve(cache, kv, conv(1, 30))                  # slot 0
    serve(cache, kv, conv(9))                      # slot 1 (empty, so it loses nothing)
    serve(cache, kv, conv(2))                      # LRU slot 0: conversation 1 saved
    assert serve(cache, kv, conv(1, 10)) == (1, 9)  # restored into LRU slot 1 (conv 9 saved)
    assert cache.slots[1].inputs == conv(1, 10)
    state.calls.clear()
    # slot 0 is least recently used, but slot 1 holds a prefix of what is restored
    slot, n = cache.acquire(conv(1, 30) + [4])
    assert (slot.id, n) == (1, 30) and state.calls == [("set", 1, 30)]
    assert cache.slots[0].inputs == conv(2)
    assert_consistent(cache, kv)


@pytest.mark.parametrize("policy", ["single", "multi"])
def test_with_the_tier_a_victim_next_to_a_running_slot_goes_first(policy):
    cache, kv, state, host = make(n_slots=4, max_entries=8, policy=policy)
    cache.adjacent = True
    for c in range(4):
        serve(cache, kv, conv(c + 1))              # slots 0..3, least recently used first
    running, _ = cache.acquire(conv(4) + [1])      # conversation 4 goes on in slot 3
    assert running.id == 3
    state.calls.clear()
    slot, n = cache.acquire(conv(7))
    # slot 0 is the least recently used, but slot 2 is next to the running
    # slot; its conversation goes to the tier
    assert (slot.id, n) == (2, 0) and state.calls == [("get", 2, 20)]
    cache.release(slot, [])
    cache.release(running, [])
    back, n = cache.acquire(conv(3) + [5])         # and comes back from there
    assert n == 20 and state.calls[-1][0] == "set"
    assert_consistent(cache, kv)


def test_exact_eviction_order_under_the_byte_bound():
    cache, kv, state, host = make(max_entries=3)
    for c in (1, 2, 3, 4):
        serve(cache, kv, conv(c))
    assert keys(host) == [(1, 20), (2, 20), (3, 20)]
    serve(cache, kv, conv(1) + [1])   # saves 4 (2 evicted), then restores 1: most recent
    assert keys(host) == [(3, 20), (4, 20), (1, 20)]
    assert host.stats.evictions == 1 and host.bytes == 3 * 20 * PER_INPUT <= host.max_bytes
    # saves conversation 1's 21 inputs: they replace (1, 20), and 10 more bytes evict 3
    serve(cache, kv, conv(5))
    assert keys(host) == [(4, 20), (1, 21)]
    assert host.stats.replaced == 1 and host.stats.evictions == 2
    serve(cache, kv, conv(6))         # saves 5: 4 evicted
    assert keys(host) == [(1, 21), (5, 20)]
    assert host.stats.evictions == 3 and host.bytes == 410


def test_longer_save_drops_the_prefix_it_extends():
    cache, kv, state, host = make()
    serve(cache, kv, conv(1, 20))
    serve(cache, kv, conv(2))                      # saves (1, 20)
    serve(cache, kv, conv(1, 20) + [5] * 10)       # restores it, grows to 30
    serve(cache, kv, conv(3))                      # saves (1, 30): (1, 20) dropped
    assert keys(host) == [(2, 20), (1, 30)]
    assert not any(a is not b and b.covers(a.inputs) for a in host.entries() for b in host.entries())


def test_saving_a_covered_prefix_copies_nothing():
    cache, kv, state, host = make()
    serve(cache, kv, conv(1, 30))
    serve(cache, kv, conv(2))                      # saves (1, 30)
    slot, n = cache.acquire(conv(1, 12) + [0])     # restores it (saving conv 2), cut to 12
    cache.release(slot, conv(1, 12))
    state.calls.clear()
    serve(cache, kv, conv(3))                      # the slot's conv 1[:12]: covered by (1, 30)
    assert state.calls == [] and host.stats.covered == 1
    assert keys(host) == [(2, 20), (1, 30)]


def test_states_larger_than_the_bound_are_not_kept():
    cache, kv, state, host = make(max_entries=1)
    serve(cache, kv, conv(1, 30))
    serve(cache, kv, conv(2))
    assert len(host) == 0 and host.stats.too_large == 1 and host.bytes == 0
    assert state.calls == []  # sized, never copied


# -- where a save is copied to ------------------------------------------------

def test_saves_go_into_the_spare_made_after_the_last_release():
    cache, kv, state, host = make(max_entries=4)
    serve(cache, kv, conv(1, 30))     # released: the spare is sized for its 30 inputs
    assert host.buffers.spare_bytes == 30 * PER_INPUT
    assert host.info()["spare_bytes"] == 30 * PER_INPUT
    spare = host.buffers._spare
    serve(cache, kv, conv(2))         # saves conv 1 into that very buffer
    entry, = host.entries()
    assert entry.data is spare and entry.nbytes == 30 * PER_INPUT
    assert (host.stats.into_spare, host.stats.into_evicted, host.stats.into_fresh) == (1, 0, 0)
    # the next spare (for conv 2, released) fits in what the bound leaves
    assert host.buffers.spare_bytes == 20 * PER_INPUT
    assert host.bytes + host.buffers.spare_bytes <= host.max_bytes


def test_a_full_store_copies_into_the_buffer_it_evicts():
    cache, kv, state, host = make(max_entries=2)
    for c in (1, 2, 3):
        serve(cache, kv, conv(c))     # saves 1 and 2: the store is full
    assert keys(host) == [(1, 20), (2, 20)] and host.buffers.spare_bytes == 0
    evicted = host.entries()[0].data
    serve(cache, kv, conv(4))         # saves 3, evicting 1 and reusing its buffer
    assert keys(host) == [(2, 20), (3, 20)] and host.entries()[1].data is evicted
    assert host.stats.into_evicted == 1
    assert state.saved[bytes(evicted)] == dict(enumerate(conv(3)))


def test_the_entry_being_restored_keeps_its_buffer_when_the_save_before_evicts_it():
    cache, kv, state, host = make(n_slots=1, max_entries=1)
    serve(cache, kv, conv(1))
    serve(cache, kv, conv(2))         # saves 1: the store is full
    kept = bytes(host.entries()[0].data)
    # conversation 1 returns: its entry is restored into the slot, whose
    # conv 2 is saved first and evicts it; the copy must not land in its buffer
    assert serve(cache, kv, conv(1) + [5]) == (0, 20)
    assert state.calls[-2:] == [("get", 0, 20), ("set", 0, 20)]
    assert cache.slots[0].inputs[:20] == conv(1) and keys(host) == [(2, 20)]
    assert state.saved[kept] == dict(enumerate(conv(1)))
    assert host.stats.into_evicted == 0


def test_the_buffer_thread_makes_touched_spares_and_frees_dropped_buffers():
    from polling import wait_until

    buffers = HostBuffers()
    try:
        assert buffers.take() is None
        buffers.prepare(3 * 4096 + 5)
        assert buffers.spare_bytes == 3 * 4096 + 5         # counted while it is being made
        wait_until(lambda: buffers.made == 1)
        buffers.prepare(100)                               # large enough: kept
        assert buffers.made == 1 and buffers.spare_bytes == 3 * 4096 + 5
        got = buffers.take()
        assert got.shape == (3 * 4096 + 5,) and got.dtype == np.uint8 and got.flags.owndata
        assert buffers.spare_bytes == 0 and buffers.take() is None and buffers.taken == 1
        buffers.discard(got)
        buffers.prepare(1 << 16)
        buffers.prepare(1 << 17)                           # wanted larger before it was made
        wait_until(lambda: buffers.spare_bytes == 1 << 17 and buffers._spare is not None)
        assert len(buffers.take()) == 1 << 17
    finally:
        buffers.close()
    assert not buffers._thread.is_alive()


def test_a_small_spare_gives_way_to_a_large_enough_evicted_buffer():
    cache, kv, state, host = make(max_entries=3)
    serve(cache, kv, conv(1, 40))
    serve(cache, kv, conv(2, 20))     # saves conv 1 (400 bytes): 200 of 600 left
    serve(cache, kv, conv(3, 40))     # saves conv 2 (200 bytes): 0 left, no spare
    big = host.entries()[0].data      # conv 1's 400 bytes
    host.buffers.prepare(100)         # a spare smaller than the next state
    serve(cache, kv, conv(4))         # saves conv 3 (400 bytes), evicting conv 1
    assert keys(host) == [(2, 20), (3, 40)] and host.entries()[1].data is big
    assert host.stats.into_evicted == 1
    assert state.saved[bytes(big)] == dict(enumerate(conv(3, 40)))


def test_short_slots_are_not_saved():
    cache, kv, state, host = make(min_inputs=8)
    serve(cache, kv, conv(1, 7))
    serve(cache, kv, conv(2))
    assert state.calls == [] and len(host) == 0


def test_zero_bytes_turns_the_tier_off():
    kv = FakeKV()
    state = FakeState(kv)
    host = HostCache(state, 0)
    cache = SlotCache(kv, 1, 64, host=host)
    serve(cache, kv, conv(1))
    serve(cache, kv, conv(2))
    serve(cache, kv, conv(1) + [1])
    assert state.calls == [] and host.info()["lookups"] == 0


def test_recurrent_state_serves_only_prompts_extending_it():
    cache, kv, state, host = make(min_keep="whole")
    serve(cache, kv, conv(1, 30))
    serve(cache, kv, conv(2))
    assert host.entries()[0].min_keep == 30
    state.calls.clear()
    assert serve(cache, kv, conv(1, 25) + [7]) == (0, 0)   # would need a cut: not restored
    assert ("set", 0, 30) not in state.calls
    serve(cache, kv, conv(3))
    state.calls.clear()
    assert serve(cache, kv, conv(1, 30) + [7]) == (0, 30)  # extends it: restored whole
    assert ("set", 0, 30) in state.calls


def test_refused_restore_drops_the_entry_and_falls_back():
    cache, kv, state, host = make(n_slots=2, refuse=True)
    serve(cache, kv, conv(1))
    serve(cache, kv, conv(2))
    serve(cache, kv, conv(3))          # slot 0 (conv 1) saved
    assert keys(host) == [(1, 20)]
    slot, n = cache.acquire(conv(1) + [5])
    assert n == 0 and host.stats.restore_failures == 1
    assert (1, 20) not in keys(host)
    assert_consistent(cache, kv)


def test_multi_policy_saves_the_fork_target():
    cache, kv, state, host = make(n_slots=2, policy="multi")
    serve(cache, kv, conv(1))                      # slot 0
    serve(cache, kv, conv(2))                      # slot 1
    busy, _ = cache.acquire(conv(1) + [5])         # slot 0 stays busy
    kv.calls.clear()
    slot, n = cache.acquire(conv(1, 10) + [3])     # forked from slot 0 into slot 1
    assert (slot.id, n) == (1, 10)
    assert state.calls == [("get", 1, 20)] and keys(host) == [(2, 20)]
    assert kv.calls == [("rm", 1, 0, -1), ("cp", 0, 1, 0, 10)]
    assert_consistent(cache, kv)


# -- the cost decision -------------------------------------------------------

@pytest.mark.parametrize("n,n_slot,nbytes,eval_s,bps,want", [
    (100, 0, 10_000, 1e-3, 1e9, True),             # 0.1 s of evaluation against 10 us of copy
    (100, 99, 10_000_000, 1e-3, 1e9, False),       # 1 ms of evaluation against 10 ms of copy
    (100, 90, 8_000_000, 1e-3, 1e9, True),         # 10 ms against 8.2 ms
    (100, 90, 9_900_000, 1e-3, 1e9, False),        # 10 ms against 10.1 ms
    (2000, 0, 46_000_000, 5e-5, 20e9, True),       # GPU: 100 ms against 2.5 ms
])
def test_cost_decision(n, n_slot, nbytes, eval_s, bps, want):
    host = HostCache(FakeState(FakeKV()), 1 << 30, restore_bytes_per_s=bps, eval_s_per_input=eval_s)
    from runner.engine.hostcache import HostEntry

    entry = HostEntry(tuple(range(n)), b"x" * nbytes, 0, 0)
    assert host.worth(entry, n, n_slot) is want
    assert RESTORE_OVERHEAD_S < 1e-3


def test_restore_not_worth_it_evaluates_instead():
    # the slot has 19 of 20 inputs; the tier's 20-input copy costs more than one input's evaluation
    cache, kv, state, host = make(n_slots=2, eval_s=1e-6, bps=1e6)
    serve(cache, kv, conv(1))
    serve(cache, kv, conv(2))
    serve(cache, kv, conv(3))                      # slot 0 saved (conv 1)
    state.calls.clear()
    slot, n = cache.acquire(conv(1) + [1])
    assert n == 0 and not any(c[0] == "set" for c in state.calls)


def test_measured_rates_move_toward_observations():
    ticks = iter([0.0, 0.0, 0.0, 0.0, 1.0, 1.0 + 400 * PER_INPUT / 1e3])
    kv = FakeKV()
    state = FakeState(kv)
    host = HostCache(state, 1 << 20, min_inputs=4, restore_bytes_per_s=1e9, eval_s_per_input=1.0,
                     clock=lambda: next(ticks))
    cache = SlotCache(kv, 1, 1024, host=host)
    serve(cache, kv, conv(1, 400))
    serve(cache, kv, conv(2))                      # save: clock 0 -> 0
    serve(cache, kv, conv(1, 400) + [1])           # save 0 -> 1, restore 1 -> 1 + 4 s at 1e3 B/s
    assert host.restore_bytes_per_s == pytest.approx(0.7 * 1e9 + 0.3 * 1e3)
    host.note_eval(100, 0.5)
    assert host.eval_s_per_input == pytest.approx(0.7 * 1.0 + 0.3 * 0.005)


# -- invariants under random traffic ----------------------------------------

OPS = st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40), st.integers(0, 5)), min_size=1,
               max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, n_slots=st.integers(1, 3), max_entries=st.integers(0, 4),
       policy=st.sampled_from(["single", "multi"]), whole=st.booleans())
def test_random_traffic_keeps_every_invariant(ops, n_slots, max_entries, policy, whole):
    cache, kv, state, host = make(n_slots, max_entries=max_entries, policy=policy,
                                  min_keep="whole" if whole else "any")
    for c, length, reply in ops:
        prompt = conv(c, length)
        slot, n = cache.acquire(prompt)
        assert slot.inputs == prompt[:n] and n < len(prompt)
        kv.decode(cache, slot, prompt[n:])
        kv.decode(cache, slot, [7] * reply)
        cache.release(slot, prompt + [7] * reply)
        assert_consistent(cache, kv)
        assert host.bytes == sum(e.nbytes for e in host.entries()) <= host.max_bytes
        if host.enabled:  # the spare counts against the bound too
            assert host.bytes + host.buffers.spare_bytes <= host.max_bytes
        for a in host.entries():
            assert state.saved[bytes(a.data)] == dict(enumerate(a.inputs))  # the state holds its key
            assert not any(b is not a and b.covers(a.inputs) for b in host.entries())


# -- the memory estimate -----------------------------------------------------

def test_memory_estimate_counts_the_tier_in_host_memory(tmp_path):
    from gguf_bytes import write_tiny_llama

    from runner.model.gguf import read_gguf
    from runner.model.memory import Device, LoadOptions, estimate, plan_layers

    info = read_gguf(write_tiny_llama(tmp_path / "tiny.gguf"))
    bound = 256 << 20
    assert estimate(info, LoadOptions(n_ctx=256, cache_ram=bound)).host_cache == bound
    assert "prefix cache, host tier" in estimate(info, LoadOptions(n_ctx=256, cache_ram=bound)).table()
    assert estimate(info, LoadOptions(n_ctx=256)).host_cache == 0
    gpu = Device("gpu0", "gpu0", "gpu", 1 << 34, 1 << 34)
    off, on = (plan_layers(info, [gpu, Device("cpu", "cpu", "cpu", 1 << 34, 1 << 34)],
                           LoadOptions(n_ctx=256, cache_ram=c, gpu_reserve=0)) for c in (0, bound))
    assert on.usage[-1].used - off.usage[-1].used == bound  # on the CPU entry
    assert [u.used for u in on.usage[:-1]] == [u.used for u in off.usage[:-1]]  # not on the GPU
    # a host without room for the bound does not fit
    small_cpu = Device("cpu", "cpu", "cpu", off.usage[-1].used + bound // 2, 1 << 34)
    assert not plan_layers(info, [gpu, small_cpu], LoadOptions(n_ctx=256, cache_ram=bound,
                                                                gpu_reserve=0)).fits
