"""The pool's policy (runner/pool_policy.py) with plain numbers: no process, no model."""

from __future__ import annotations

import pytest

from runner.pool_policy import PoolPolicy, Room

MiB = 1 << 20
UNKNOWN = Room(0, 0)  # discover said nothing: only the pool's own limits apply


def loaded(policy: PoolPolicy, *models: tuple[str, int, float]) -> PoolPolicy:
    """Models (name, MiB, last used) loaded and idle, in that order."""
    for name, mib, last_used in models:
        a = policy.admit(name, mib * MiB, UNKNOWN)
        assert a.kind == "load", a
        policy.start_load(name, mib * MiB, a.evict, last_used)
        policy.loaded(name, last_used)
    return policy


@pytest.mark.parametrize("need_mib, evict", [
    (100, ()),                    # 300 + 100 <= 400
    (150, ("b",)),                # the least recently used goes first (b at t=1)
    (250, ("b", "c")),            # then the next (c at t=2)
    (400, ("b", "c", "a")),       # everything
])
def test_budget_evicts_idle_runners_least_recently_used_first(need_mib, evict):
    policy = loaded(PoolPolicy(memory_budget=400 * MiB), ("a", 100, 3.0), ("b", 100, 1.0),
                    ("c", 100, 2.0))
    a = policy.admit("new", need_mib * MiB, UNKNOWN)
    assert (a.kind, a.evict) == ("load", evict)


@pytest.mark.parametrize("max_loaded, evict", [(4, ()), (3, ("b",)), (2, ("b", "c")), (1, ("b", "c", "a"))])
def test_max_loaded_evicts_least_recently_used(max_loaded, evict):
    policy = loaded(PoolPolicy(), ("a", 10, 3.0), ("b", 10, 1.0), ("c", 10, 2.0))
    policy.max_loaded = max_loaded
    a = policy.admit("new", 10 * MiB, UNKNOWN)
    assert (a.kind, a.evict) == ("load", evict)


def test_a_busy_runner_is_never_evicted_the_request_waits_for_it():
    policy = loaded(PoolPolicy(memory_budget=300 * MiB), ("a", 100, 1.0), ("b", 100, 2.0))
    policy.acquire("a")                                  # a is the LRU, but busy
    a = policy.admit("new", 150 * MiB, UNKNOWN)
    assert (a.kind, a.evict) == ("load", ("b",))         # b goes instead
    a = policy.admit("new", 250 * MiB, UNKNOWN)          # would need a's room too
    assert a.kind == "wait" and a.evict == ()
    assert "a (1 in flight)" in a.reason and "250.0 MiB" in a.reason
    policy.release("a", now=5.0, answered=True)
    a = policy.admit("new", 250 * MiB, UNKNOWN)
    assert (a.kind, a.evict) == ("load", ("b", "a"))       # a was used last now


def test_a_loading_runner_is_never_evicted():
    policy = PoolPolicy(max_loaded=1)
    policy.start_load("a", 10 * MiB, (), 0.0)
    assert policy.admit("a", 10 * MiB, UNKNOWN).kind == "join"
    a = policy.admit("b", 10 * MiB, UNKNOWN)
    assert a.kind == "wait" and "a (loading)" in a.reason


def test_what_can_never_fit_is_refused_with_the_numbers():
    policy = loaded(PoolPolicy(memory_budget=300 * MiB), ("a", 100, 1.0))
    a = policy.admit("huge", 301 * MiB, UNKNOWN)
    assert a.kind == "refuse"
    assert a.reason == "huge needs 301.0 MiB, more than the pool's memory budget of 300.0 MiB"
    a = PoolPolicy().admit("huge", 9000 * MiB, Room(free=4000 * MiB, total=8000 * MiB, where="CUDA0"))
    assert a.kind == "refuse"
    assert a.reason == "huge needs 9000.0 MiB, more than the 8000.0 MiB that CUDA0 holds in all"


def test_free_memory_from_discover_counts_what_evictions_give_back():
    # 500 MiB free on the GPU now; a (200 MiB) and b (100 MiB) loaded.
    room = Room(free=500 * MiB, total=1000 * MiB, where="CUDA0")
    policy = loaded(PoolPolicy(), ("a", 200, 1.0), ("b", 100, 2.0))
    assert policy.admit("c", 500 * MiB, room).evict == ()
    assert policy.admit("c", 600 * MiB, room).evict == ("a",)
    assert policy.admit("c", 800 * MiB, room).evict == ("a", "b")
    a = policy.admit("c", 900 * MiB, room)   # under the total, but other processes hold the rest
    assert a.kind == "refuse" and "CUDA0 has 500.0 MiB free" in a.reason


def test_a_loading_runner_has_not_taken_its_memory_yet():
    room = Room(free=500 * MiB, total=1000 * MiB, where="CUDA0")
    policy = PoolPolicy()
    policy.start_load("a", 300 * MiB, (), 0.0)
    assert policy.admit("b", 200 * MiB, room).kind == "load"
    a = policy.admit("b", 300 * MiB, room)
    assert a.kind == "wait" and "200.0 MiB free on CUDA0" in a.reason


def test_unloading_memory_counts_until_the_process_is_gone():
    policy = loaded(PoolPolicy(memory_budget=200 * MiB), ("a", 150, 1.0))
    a = policy.admit("b", 100 * MiB, UNKNOWN)
    policy.start_load("b", 100 * MiB, a.evict, 2.0)
    assert a.evict == ("a",) and policy.unloading == {"a": 150 * MiB}
    assert policy.used() == 250 * MiB
    assert policy.admit("a", 150 * MiB, UNKNOWN).kind == "wait"   # a is still being unloaded
    policy.unloaded("a")
    policy.loaded("b", 3.0)
    assert (policy.admit("a", 150 * MiB, UNKNOWN).kind, policy.admit("a", 150 * MiB, UNKNOWN).evict) == \
        ("load", ("b",))


@pytest.mark.parametrize("keep_alive, own, at, expired", [
    (10.0, None, 10.9, ["b"]),            # b idle since 0.5, a since 1.0
    (10.0, None, 11.0, ["b", "a"]),       # least recently used first
    (10.0, 60.0, 11.0, ["b"]),            # a's own keep-alive (a request's) wins
    (None, None, 1e9, []),                # None: never
    (0.0, None, 1.0, ["b", "a"]),         # 0: as soon as idle
])
def test_keep_alive_expiry(keep_alive, own, at, expired):
    policy = loaded(PoolPolicy(keep_alive=keep_alive), ("a", 10, 1.0), ("b", 10, 0.5))
    if own is not None:
        policy.acquire("a", keep_alive=own)
        policy.release("a", now=1.0, answered=True)
    assert policy.expired(at) == expired


def test_busy_and_loading_runners_never_expire():
    policy = loaded(PoolPolicy(keep_alive=1.0), ("a", 10, 0.0))
    policy.start_load("b", 10 * MiB, (), 0.0)
    policy.acquire("a")
    assert policy.expired(100.0) == [] and policy.next_expiry() is None
    policy.release("a", now=50.0, answered=True)
    assert policy.next_expiry() == 51.0 and policy.expired(51.0) == ["a"]


def test_two_failures_in_a_row_are_reported_not_looped():
    policy = loaded(PoolPolicy(), ("a", 10, 0.0))
    assert policy.failure("a", "exit -9") is False          # the next request may start it again
    assert policy.admit("a", 10 * MiB, UNKNOWN).kind == "load"
    policy.start_load("a", 10 * MiB, (), 1.0)
    policy.loaded("a", 1.0)
    assert policy.failure("a", "exit -11") is True
    a = policy.admit("a", 10 * MiB, UNKNOWN)
    assert a.kind == "refuse"
    assert a.reason == ("a failed 2 times in a row (1: exit -9; 2: exit -11); "
                        "not starting it again until pool.reset('a')")
    policy.reset("a")
    assert policy.admit("a", 10 * MiB, UNKNOWN).kind == "load"


def test_an_answered_request_ends_the_row_of_failures():
    policy = loaded(PoolPolicy(), ("a", 10, 0.0))
    policy.failure("a", "exit -9")
    loaded(policy, ("a", 10, 1.0))
    policy.acquire("a")
    policy.release("a", now=2.0, answered=True)
    assert policy.failure("a", "exit -9") is False
    assert policy.crashes == {"a": ["exit -9"]}


def test_load_failures_count_as_failures():
    policy = PoolPolicy()
    policy.start_load("a", 10 * MiB, (), 0.0)
    assert policy.failure("a", "load failed: bad file") is False
    assert "a" not in policy.entries
    policy.start_load("a", 10 * MiB, (), 1.0)
    assert policy.failure("a", "load failed: bad file") is True


@pytest.mark.parametrize("kwargs", [{"max_loaded": 0}, {"memory_budget": 0}, {"keep_alive": -1}])
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(ValueError):
        PoolPolicy(**kwargs)
