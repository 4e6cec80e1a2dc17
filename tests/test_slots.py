"""Slot cache policy, tested against a fake KV memory that records every call.

Each case states the slots' contents, their LRU order and which are busy, then
asserts the exact slot chosen, the number of cached inputs, the exact KV calls
and that the fake memory still holds exactly what every slot claims.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.engine.slots import (
    NoFreeSlot, PositionedKV, ShiftResult, SlotCache, SpanInput, common_prefix, kv_position,
    truncate_prompt,
)


class FakeKV:
    """KV memory double: per-sequence {position: input}, plus a log of calls."""

    def __init__(self, *, refuse_partial: bool = False, shift_ok: bool = True) -> None:
        self.kv: dict[int, dict[int, object]] = {}  # sequence id -> position -> input
        self.calls: list[tuple] = []  # ("rm"|"cp"|"add", args...) in call order
        self.refuse_partial = refuse_partial  # seq_rm refuses anything but (0, -1)
        self.shift_ok = shift_ok  # value of can_shift()

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        self.calls.append(("rm", seq, p0, p1))
        if self.refuse_partial and (p0, p1) != (0, -1):
            return False
        cells = self.kv.setdefault(seq, {})
        for p in [p for p in cells if p >= p0 and (p1 < 0 or p < p1)]:
            del cells[p]
        return True

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.calls.append(("cp", src, dst, p0, p1))
        cells = self.kv.setdefault(dst, {})
        for p, v in self.kv.get(src, {}).items():
            if p >= p0 and (p1 < 0 or p < p1):
                assert p not in cells, f"seq_cp onto occupied position {p} of {dst}"
                cells[p] = v

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        self.calls.append(("add", seq, p0, p1, delta))
        cells = self.kv.setdefault(seq, {})
        moved = {p: cells.pop(p) for p in list(cells) if p >= p0 and (p1 < 0 or p < p1)}
        for p, v in moved.items():
            assert p + delta not in cells, f"seq_add collides at {p + delta}"
            cells[p + delta] = v

    def can_shift(self) -> bool:
        return self.shift_ok

    def decode(self, cache: SlotCache, slot, inputs) -> None:
        """What the engine does for a successful decode: write the KV, then record."""
        cells = self.kv.setdefault(slot.id, {})
        start = len(slot.inputs)
        for i, v in enumerate(inputs):
            assert start + i not in cells
            cells[start + i] = v
        cache.record(slot, inputs)


def assert_consistent(cache: SlotCache, kv: FakeKV) -> None:
    """The module invariant: every slot's inputs are exactly its KV content."""
    for s in cache.slots:
        assert kv.kv.get(s.id, {}) == dict(enumerate(s.inputs)), f"slot {s.id} out of sync"


def make_cache(contents, *, lru=None, busy=(), policy="single", slot_ctx=64, **kv_opts):
    """A cache whose slot i holds contents[i]; lru lists slot ids oldest first."""
    kv = FakeKV(**kv_opts)
    cache = SlotCache(kv, len(contents), slot_ctx, policy=policy)
    order = list(lru) if lru is not None else list(range(len(contents)))
    for i, inputs in enumerate(contents):
        slot = cache.slots[i]
        slot.inputs = list(inputs)
        kv.kv[i] = dict(enumerate(inputs))
        slot.last_used = order.index(i) - len(order)  # older than anything the cache stamps
        slot.in_use = i in busy
    return cache, kv


def serve(cache: SlotCache, kv: FakeKV, prompt, generated=()):
    """One whole request: acquire, decode the uncached prompt and the reply, release."""
    slot, n_cached = cache.acquire(prompt)
    kv.decode(cache, slot, prompt[n_cached:])
    kv.decode(cache, slot, list(generated))
    cache.release(slot, list(prompt) + list(generated))
    return slot.id, n_cached


# -- acquire -----------------------------------------------------------------

ACQUIRE_CASES = [
    # id, policy, slot contents, lru (oldest first), busy, prompt, slot, n_cached, calls, kv options
    ("empty cache", "single", [[], []], None, (), [1, 2, 3], 0, 0, [], {}),
    ("follow-up extends", "single", [[1, 2, 3, 4, 5], []], None, (), [1, 2, 3, 4, 5, 6], 0, 5, [], {}),
    ("diverged reply trimmed", "single", [[1, 2, 3, 4, 5], []], None, (), [1, 2, 3, 4, 9], 0, 4,
     [("rm", 0, 4, -1)], {}),
    ("new prompt takes empty slot", "single", [[1, 2, 3], []], [0, 1], (), [7, 8], 1, 0, [], {}),
    ("LRU evicted (slot 1 oldest)", "single", [[1, 2], [3, 4]], [1, 0], (), [7], 1, 0,
     [("rm", 1, 0, -1)], {}),
    ("LRU evicted (slot 0 oldest)", "single", [[1, 2], [3, 4]], [0, 1], (), [7], 0, 0,
     [("rm", 0, 0, -1)], {}),
    ("longest prefix beats LRU", "single", [[1, 2], [3, 4]], [1, 0], (), [1, 2, 5], 0, 2, [], {}),
    ("busy slot skipped", "single", [[1, 2], [3, 4]], None, {0}, [1, 2, 5], 1, 0, [("rm", 1, 0, -1)], {}),
    ("whole prompt cached leaves one", "single", [[1, 2, 3], []], None, (), [1, 2, 3], 0, 2,
     [("rm", 0, 2, -1)], {}),
    ("prompt is prefix of slot", "single", [[1, 2, 3, 4], []], None, (), [1, 2], 0, 1,
     [("rm", 0, 1, -1)], {}),
    ("tie prefers lossless slot", "single", [[1, 2, 3], [1, 2]], [0, 1], (), [1, 2, 9], 1, 2, [], {}),
    ("one-input prompt keeps cache", "single", [[5], []], None, (), [5], 1, 0, [], {}),
    ("seq_rm refused clears slot", "single", [[1, 2, 3, 4], []], None, (), [1, 2, 9], 0, 0,
     [("rm", 0, 2, -1), ("rm", 0, 0, -1)], {"refuse_partial": True}),
    ("multi: exact prefix extends", "multi", [[9, 9], [1, 2]], [1, 0], (), [1, 2, 3], 1, 2, [], {}),
    ("multi: fork from busy slot", "multi", [[1, 2, 3, 4], []], None, {0}, [1, 2, 3, 7], 1, 3,
     [("cp", 0, 1, 0, 3)], {}),
    ("multi: fork keeps free source", "multi", [[1, 2, 3, 4], []], None, (), [1, 2, 9], 1, 2,
     [("cp", 0, 1, 0, 2)], {}),
    ("multi: fork into LRU victim", "multi", [[1, 2, 3, 4], [5, 6]], None, {0}, [1, 2, 9], 1, 2,
     [("rm", 1, 0, -1), ("cp", 0, 1, 0, 2)], {}),
    ("multi: longer prefix beats exact prefix", "multi", [[1, 2], [1, 2, 3, 4, 5]], None, {1},
     [1, 2, 3, 4, 6], 0, 4, [("rm", 0, 0, -1), ("cp", 1, 0, 0, 4)], {}),
    ("multi: LRU victim without prefix", "multi", [[5, 6], [7, 8]], [1, 0], (), [1], 1, 0,
     [("rm", 1, 0, -1)], {}),
    ("multi: whole prompt cached leaves one", "multi", [[1, 2, 3], []], None, (), [1, 2, 3], 0, 2,
     [("rm", 0, 2, -1)], {}),
    ("multi: fork capped at prompt-1", "multi", [[1, 2, 3], [4]], None, {0}, [1, 2, 3], 1, 2,
     [("rm", 1, 0, -1), ("cp", 0, 1, 0, 2)], {}),
]


@pytest.mark.parametrize(
    "policy,contents,lru,busy,prompt,want_slot,want_cached,want_calls,kv_opts",
    [c[1:] for c in ACQUIRE_CASES], ids=[c[0] for c in ACQUIRE_CASES])
def test_acquire(policy, contents, lru, busy, prompt, want_slot, want_cached, want_calls, kv_opts):
    cache, kv = make_cache(contents, lru=lru, busy=busy, policy=policy, **kv_opts)
    slot, n_cached = cache.acquire(prompt)
    assert (slot.id, n_cached) == (want_slot, want_cached)
    assert kv.calls == want_calls
    assert slot.in_use
    assert slot.inputs == prompt[:n_cached]
    assert_consistent(cache, kv)


def test_acquire_inputs_are_not_assumed_to_be_ints():
    image = ("img", 0xBEEF)  # stands for a media chunk position
    cache, kv = make_cache([["a", image, "b"], []])
    slot, n_cached = cache.acquire(["a", image, "c"])
    assert (slot.id, n_cached) == (0, 2)
    assert kv.calls == [("rm", 0, 2, -1)]


@pytest.mark.parametrize("policy", ["single", "multi"])
def test_all_slots_in_use_raises(policy):
    cache, kv = make_cache([[1], [2]], busy={0, 1}, policy=policy)
    with pytest.raises(NoFreeSlot):
        cache.acquire([1, 2])
    with pytest.raises(NoFreeSlot):
        cache.acquire_uncached()
    assert kv.calls == []


def test_acquire_rejects_empty_and_oversized_prompts():
    cache, _ = make_cache([[]], slot_ctx=4)
    with pytest.raises(ValueError, match="empty"):
        cache.acquire([])
    with pytest.raises(ValueError, match="truncate"):
        cache.acquire([1, 2, 3, 4, 5])


def test_constructor_validates():
    with pytest.raises(ValueError):
        SlotCache(FakeKV(), 0, 8)
    with pytest.raises(ValueError):
        SlotCache(FakeKV(), 1, 1)
    with pytest.raises(ValueError, match="policy"):
        SlotCache(FakeKV(), 1, 8, policy="fifo")


# -- whole requests ------------------------------------------------------------

def test_follow_up_turn_extends_slot():
    kv = FakeKV()
    cache = SlotCache(kv, 2, 64)
    assert serve(cache, kv, [1, 2, 3], [10, 11]) == (0, 0)
    kv.calls.clear()
    assert serve(cache, kv, [1, 2, 3, 10, 11, 4, 5], [12]) == (0, 5)
    assert kv.calls == []
    assert cache.slots[0].inputs == [1, 2, 3, 10, 11, 4, 5, 12]
    assert_consistent(cache, kv)


@pytest.mark.parametrize("policy", ["single", "multi"])
def test_lru_eviction_order(policy):
    a, b, c, d, e = [1, 1], [2, 2], [3, 3], [4, 4], [5, 5]
    kv = FakeKV()
    cache = SlotCache(kv, 3, 64, policy=policy)
    # (prompt, slot it lands in, inputs found cached)
    steps = [(a, 0, 0), (b, 1, 0), (c, 2, 0), (a, 0, 1), (d, 1, 0), (e, 2, 0), (b, 0, 0), (a, 1, 0)]
    for prompt, want_slot, want_cached in steps:
        assert serve(cache, kv, prompt) == (want_slot, want_cached)
        assert_consistent(cache, kv)


@pytest.mark.parametrize("policy", ["single", "multi"])
@pytest.mark.parametrize("adjacent, want", [(True, 1), (False, 0)])
def test_adjacency_breaks_ties_between_slots_that_lose_nothing(policy, adjacent, want):
    # slots 0, 1, 3 empty, slot 2 running: an empty neighbour of 2 keeps the
    # running ids consecutive (runner.engine.scheduler, "Batch order"); of the two
    # neighbours, 1 is the less recently used
    cache, kv = make_cache([[], [], [9, 9], []], lru=[0, 1, 3, 2], busy=(2,), policy=policy)
    cache.adjacent = adjacent
    slot, n = cache.acquire([1, 2, 3])
    assert (slot.id, n) == (want, 0) and kv.calls == []
    assert_consistent(cache, kv)


@pytest.mark.parametrize("policy", ["single", "multi"])
def test_without_a_host_tier_the_victim_stays_the_least_recently_used(policy):
    cache, kv = make_cache([[1, 1], [2, 2], [3, 3], [4, 4]], lru=[0, 1, 2, 3], busy=(3,), policy=policy)
    cache.adjacent = True
    slot, _ = cache.acquire([5, 5, 5])
    assert slot.id == 0 and kv.calls == [("rm", 0, 0, -1)]
    assert_consistent(cache, kv)


def test_multi_policy_serves_shared_system_prompt_concurrently():
    system = [100, 101, 102, 103]
    kv = FakeKV()
    cache = SlotCache(kv, 3, 64, policy="multi")
    s0, n0 = cache.acquire(system + [1])
    kv.decode(cache, s0, system + [1])
    s1, n1 = cache.acquire(system + [2])  # slot 0 busy: fork its system prompt
    assert (s0.id, n0, s1.id, n1) == (0, 0, 1, 4)
    assert kv.calls == [("cp", 0, 1, 0, 4)]
    assert_consistent(cache, kv)


def test_embeddings_never_cached():
    cache, kv = make_cache([[1, 2, 3], [], [7, 8]], lru=[2, 1, 0])
    slot = cache.acquire_uncached()
    assert slot.id == 1 and kv.calls == []  # an empty slot is taken before any eviction
    kv.decode(cache, slot, [4, 5, 6])
    cache.release(slot, [4, 5, 6])
    assert slot.inputs == [] and kv.calls == [("rm", 1, 0, -1)]
    assert_consistent(cache, kv)

    kv.calls.clear()
    busy = cache.acquire_uncached()  # slot 1 again: still the empty one
    assert busy.id == 1
    second = cache.acquire_uncached()  # no empty slot left: LRU (slot 2) is cleared
    assert second.id == 2 and kv.calls == [("rm", 2, 0, -1)]
    cache.release(busy)
    cache.release(second)

    slot, n_cached = cache.acquire([4, 5, 6])  # what the embedding evaluated is not reused
    assert n_cached == 0
    assert_consistent(cache, kv)


def test_trim_after_stop_string_with_truncate():
    kv = FakeKV()
    cache = SlotCache(kv, 1, 64)
    slot, _ = cache.acquire([1, 2, 3])
    kv.decode(cache, slot, [1, 2, 3])
    kv.decode(cache, slot, [10])
    kv.decode(cache, slot, [11])  # 11 and the sampled, never decoded 12 spell the stop string
    kv.calls.clear()
    assert slot.truncate(4) == 4
    cache.release(slot, [1, 2, 3, 10])
    assert kv.calls == [("rm", 0, 4, -1)]
    assert slot.inputs == [1, 2, 3, 10] and not slot.in_use
    assert_consistent(cache, kv)


def test_release_keeps_common_prefix_of_kept_inputs():
    kv = FakeKV()
    cache = SlotCache(kv, 1, 64)
    slot, _ = cache.acquire([1, 2, 3])
    kv.decode(cache, slot, [1, 2, 3, 10, 11])
    kv.calls.clear()
    cache.release(slot, [1, 2, 3, 10, 11, 12])  # 12 was never decoded: cannot be kept
    assert slot.inputs == [1, 2, 3, 10, 11] and kv.calls == []

    slot, _ = cache.acquire([1, 2, 3, 10, 11, 20])
    kv.decode(cache, slot, [20, 21, 22])
    kv.calls.clear()
    cache.release(slot, [1, 2, 3, 10, 11, 20])  # the engine trims a stop string via release
    assert slot.inputs == [1, 2, 3, 10, 11, 20] and kv.calls == [("rm", 0, 6, -1)]
    assert_consistent(cache, kv)


def test_release_after_failure_clears_slot():
    kv = FakeKV()
    cache = SlotCache(kv, 1, 64)
    slot, _ = cache.acquire([1, 2, 3])
    kv.decode(cache, slot, [1, 2, 3])
    kv.calls.clear()
    cache.release(slot, [])
    assert slot.inputs == [] and kv.calls == [("rm", 0, 0, -1)]


def test_truncate_refused_clears_slot():
    cache, kv = make_cache([[1, 2, 3, 4]], refuse_partial=True)
    assert cache.slots[0].truncate(2) == 0
    assert kv.calls == [("rm", 0, 2, -1), ("rm", 0, 0, -1)]
    assert_consistent(cache, kv)


def test_record_and_release_misuse():
    kv = FakeKV()
    cache = SlotCache(kv, 2, 4)
    slot, _ = cache.acquire([1, 2])
    kv.decode(cache, slot, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="exceed"):
        cache.record(slot, [5])
    cache.release(slot)
    with pytest.raises(ValueError, match="not in use"):
        cache.release(slot)
    with pytest.raises(ValueError, match="not in use"):
        cache.record(slot, [5])
    other = SlotCache(FakeKV(), 2, 4).slots[0]
    with pytest.raises(ValueError, match="belong"):
        cache.release(other)


def test_snapshot():
    kv = FakeKV()
    cache = SlotCache(kv, 2, 64)
    serve(cache, kv, [1, 2, 3], [4])
    slot, _ = cache.acquire([9])
    assert cache.snapshot() == [
        {"id": 0, "n_inputs": 4, "in_use": False, "last_used": 2},
        {"id": 1, "n_inputs": 0, "in_use": True, "last_used": 3},
    ]
    assert cache.n_free == 1


# -- context shift -------------------------------------------------------------

SHIFT_CASES = [
    # (inputs in slot, num_keep, expected discard)
    (10, 0, 5),
    (10, 4, 3),
    (9, 4, 2),
    (8, 7, 1),  # (8 - 7) // 2 == 0: one input is still dropped so the engine makes progress
    (2, 1, 1),
    (4096, 5, 2045),
]


@pytest.mark.parametrize("n,num_keep,discard", SHIFT_CASES)
def test_shift_in_place(n, num_keep, discard):
    inputs = list(range(n))
    cache, kv = make_cache([inputs], busy={0}, slot_ctx=n)
    result = cache.shift(cache.slots[0], num_keep)
    assert result == ShiftResult(discard, [])
    assert kv.calls == [("rm", 0, num_keep, num_keep + discard),
                        ("add", 0, num_keep + discard, n, -discard)]
    assert cache.slots[0].inputs == inputs[:num_keep] + inputs[num_keep + discard:]
    assert_consistent(cache, kv)


@pytest.mark.parametrize("kv_opts,calls", [
    ({"shift_ok": False}, [("rm", 0, 0, -1)]),
    ({"refuse_partial": True}, [("rm", 0, 2, 6), ("rm", 0, 0, -1)]),
], ids=["cannot shift", "seq_rm refused"])
def test_shift_reprocess(kv_opts, calls):
    inputs = list(range(10))
    cache, kv = make_cache([inputs], busy={0}, slot_ctx=10, **kv_opts)
    result = cache.shift(cache.slots[0], 2)
    assert result == ShiftResult(4, [0, 1, 6, 7, 8, 9])
    assert kv.calls == calls
    assert cache.slots[0].inputs == []
    assert_consistent(cache, kv)


@pytest.mark.parametrize("num_keep", [-1, 4, 5])
def test_shift_rejects_bad_num_keep(num_keep):
    cache, kv = make_cache([[1, 2, 3, 4]], busy={0})
    with pytest.raises(ValueError, match="num_keep"):
        cache.shift(cache.slots[0], num_keep)
    assert kv.calls == []


# -- prompt truncation ------------------------------------------------------------

TRUNCATE_CASES = [
    # (prompt length, slot_ctx, num_keep, expected result over list(range(length)))
    (5, 8, 2, [0, 1, 2, 3, 4]),
    (7, 8, 2, [0, 1, 2, 3, 4, 5, 6]),  # one free position is enough: no truncation
    (8, 8, 2, [0, 1, 5, 6, 7]),  # keep 2 + half of the 6 after them
    (20, 8, 0, [16, 17, 18, 19]),
    (20, 10, 4, [0, 1, 2, 3, 17, 18, 19]),
    (20, 8, 100, [0, 1, 2, 3, 4, 5, 19]),  # num_keep clamped to slot_ctx - 2
    (3, 2, 0, [2]),
]


@pytest.mark.parametrize("n,slot_ctx,num_keep,want", TRUNCATE_CASES)
def test_truncate_prompt(n, slot_ctx, num_keep, want):
    assert truncate_prompt(list(range(n)), slot_ctx, num_keep) == want


@given(n=st.integers(0, 300), slot_ctx=st.integers(2, 100), num_keep=st.integers(0, 120))
def test_truncate_prompt_fits_and_keeps_head_and_tail(n, slot_ctx, num_keep):
    prompt = list(range(n))
    out = truncate_prompt(prompt, slot_ctx, num_keep)
    if n < slot_ctx:
        assert out == prompt
        return
    keep = min(num_keep, slot_ctx - 2)
    assert 1 <= len(out) <= slot_ctx - 1
    assert out[:keep] == prompt[:keep]
    assert out[-1] == prompt[-1]
    assert out[keep:] == prompt[n - (len(out) - keep):]


def test_truncate_prompt_rejects_bad_arguments():
    with pytest.raises(ValueError):
        truncate_prompt([1, 2, 3], 1, 0)
    with pytest.raises(ValueError):
        truncate_prompt([1, 2, 3], 8, -1)


def test_common_prefix():
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2, 3], [1, 2]) == 2
    assert common_prefix([1, 2], [1, 3]) == 1


# -- random walks ----------------------------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["serve", "hold", "drop", "shift", "trim"]),
                         st.lists(st.integers(0, 3), min_size=1, max_size=6),
                         st.integers(0, 5)), max_size=25)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, policy=st.sampled_from(["single", "multi"]),
       refuse=st.booleans(), shift_ok=st.booleans())
def test_random_walk_keeps_kv_in_sync(ops, policy, refuse, shift_ok):
    """Whatever the sequence of requests, every slot's inputs match its KV."""
    kv = FakeKV(refuse_partial=refuse, shift_ok=shift_ok)
    cache = SlotCache(kv, 3, 12, policy=policy)
    held = []
    for op, prompt, k in ops:
        if op in ("serve", "hold"):
            try:
                slot, n_cached = cache.acquire(prompt)
            except NoFreeSlot:
                assert cache.n_free == 0
                continue
            assert slot.inputs == prompt[:n_cached] and n_cached < len(prompt)
            kv.decode(cache, slot, prompt[n_cached:])
            if op == "serve":
                cache.release(slot, prompt + [k])
            else:
                held.append(slot)
        elif held and op == "drop":
            cache.release(held.pop(k % len(held)), prompt if k % 2 else None)
        elif held and op == "shift" and held[k % len(held)].inputs:
            slot = held[k % len(held)]
            result = cache.shift(slot, min(k, len(slot.inputs) - 1))
            if result.reprocess:
                kv.decode(cache, slot, result.reprocess)
        elif held and op == "trim":
            slot = held[k % len(held)]
            assert slot.truncate(k) <= min(k, len(slot.inputs))
        assert_consistent(cache, kv)


# -- inputs whose KV positions are not their indices (M-RoPE media) -----------------

class CellKV:
    """KV memory double holding cells as (position, input) per sequence, where
    several cells may share a position, as an M-RoPE image's rows do."""

    def __init__(self) -> None:
        self.cells: dict[int, list[tuple[int, object]]] = {}
        self.calls: list[tuple] = []

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        self.calls.append(("rm", seq, p0, p1))
        self.cells[seq] = [(p, v) for p, v in self.cells.get(seq, [])
                           if not (p >= p0 and (p1 < 0 or p < p1))]
        return True

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.calls.append(("cp", src, dst, p0, p1))
        self.cells.setdefault(dst, []).extend(
            (p, v) for p, v in self.cells.get(src, []) if p >= p0 and (p1 < 0 or p < p1))

    def seq_add(self, seq, p0, p1, delta):
        raise AssertionError("never shifted")

    def can_shift(self) -> bool:
        return True

    def decode(self, cache: SlotCache, slot, inputs) -> None:
        """Write cells the way the engine positions them, then record."""
        for k, v in enumerate(inputs):
            i = len(slot.inputs) + k
            pos = kv_position(list(slot.inputs) + list(inputs[:k]), i)
            if isinstance(v, SpanInput):
                pos -= v.index  # every row of the image sits at its first row's position
            self.cells.setdefault(slot.id, []).append((pos, v))
        cache.record(slot, inputs)


def image(key: str, rows: int, n_pos: int) -> list[SpanInput]:
    return [SpanInput(key, i) for i in range(rows - 1)] + [SpanInput(key, rows - 1, rows - n_pos)]


def test_kv_position_subtracts_what_finished_spans_give_back():
    inputs = [1, 2, *image("a", 6, 3), 3, 4, *image("b", 4, 2), 5]
    assert [kv_position(inputs, i) for i in range(len(inputs) + 1)] == \
        [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10, 9, 10]


@pytest.mark.parametrize("policy", ["single", "multi"])
def test_positioned_kv_trims_and_forks_by_position(policy):
    """The slot cache counts inputs; the KV holds 3 positions for a 6-row
    image.  Cutting after the image removes from position 5 (not index 8),
    and a fork copies positions [0, 6) for 9 inputs."""
    kv = CellKV()
    pkv = PositionedKV(kv)
    cache = SlotCache(pkv, 2, 64, policy)
    pkv.inputs_of = lambda seq: cache.slots[seq].inputs
    first = [1, 2, *image("a", 6, 3), 3, 4, 5]
    slot, n = cache.acquire(first)
    assert n == 0
    kv.decode(cache, slot, first)
    cache.release(slot)
    follow = first[:9] + [9, 9]
    slot, n = cache.acquire(follow)
    assert n == 9
    if policy == "single":
        assert kv.calls[-1] == ("rm", slot.id, 6, -1)  # index 9 is position 6
    else:  # LRU free slot is the empty one: fork positions [0, 6) of slot 0 into it
        assert ("cp", 0, slot.id, 0, 6) in kv.calls
    assert [v for _, v in kv.cells[slot.id]] == follow[:9]
    assert not pkv.can_shift()
