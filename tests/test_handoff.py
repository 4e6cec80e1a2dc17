"""runner.engine.handoff: items from several putting threads reach the one reader
in each putter's order, none lost, whoever waits first."""

from __future__ import annotations

import os
import threading

import pytest

from runner.engine.handoff import Handoff, new_handoff

pytestmark = pytest.mark.skipif(not hasattr(os, "eventfd"), reason="eventfd is Linux-only")


def test_every_item_arrives_in_each_putters_order():
    h = Handoff()
    n_putters, n_items = 4, 5000

    def putter(p):
        for i in range(n_items):
            h.put((p, i))

    threads = [threading.Thread(target=putter, args=(p,)) for p in range(n_putters)]
    for t in threads:
        t.start()
    seen = {p: [] for p in range(n_putters)}
    for _ in range(n_putters * n_items):
        p, i = h.get()
        seen[p].append(i)
    for t in threads:
        t.join()
    assert all(seen[p] == list(range(n_items)) for p in seen)
    assert h.empty()


def test_a_reader_waiting_first_is_woken():
    h = Handoff()
    got = []
    reader = threading.Thread(target=lambda: got.append(h.get()))
    reader.start()
    reader.join(0.05)
    assert reader.is_alive() and not got  # it waits
    h.put("x")
    reader.join(10)
    assert got == ["x"]


def test_spurious_wakeups_do_not_return_nothing():
    h = Handoff()
    h.put(1)
    h.put(2)
    assert (h.get(), h.get()) == (1, 2)  # the eventfd still counts 2
    h.put(3)
    assert h.get() == 3 and h.empty()


def test_new_handoff_has_the_queue_interface():
    q = new_handoff()
    q.put("a")
    assert not q.empty() and q.get() == "a" and q.empty()


def test_doorbell_rings_before_the_wait_are_kept():
    from runner.engine.handoff import Doorbell

    bell = Doorbell()
    try:
        bell.ring()
        bell.ring()
        bell.wait()  # returns at once: rung before
        woke = threading.Event()
        waiter = threading.Thread(target=lambda: (bell.wait(), woke.set()))
        waiter.start()
        assert not woke.wait(0.05)  # the two rings were taken by one wait
        bell.ring()
        waiter.join(10)
        assert woke.is_set()
    finally:
        bell.close()
