"""The embedding batching window (runner.engine.embedwait): pure policy, times given."""

from __future__ import annotations

from hypothesis import given, strategies as st

from runner.engine.embedwait import EmbedWindow


def test_nothing_answered_yet_decodes_at_once():
    w = EmbedWindow()
    assert w.wait_until(now=100.0, n_queued=1, full=False) is None


def test_waits_for_the_answered_callers_then_decodes():
    w = EmbedWindow(fraction=0.1, max_wait=0.005)
    # a decode of 20 ms answered 3 requests; 1 stayed queued
    w.answered(now=10.0, n_answered=3, n_left=1, decode_seconds=0.020)
    assert w.wait_until(now=10.0001, n_queued=1, full=False) == 10.002  # 10% of the decode
    assert w.wait_until(now=10.0001, n_queued=3, full=False) == 10.002
    assert w.wait_until(now=10.0001, n_queued=4, full=False) is None    # all four are back
    assert w.wait_until(now=10.0021, n_queued=2, full=False) is None    # the window has passed


def test_a_full_decode_never_waits():
    w = EmbedWindow()
    w.answered(now=1.0, n_answered=8, n_left=0, decode_seconds=1.0)
    assert w.wait_until(now=1.0, n_queued=2, full=True) is None


def test_the_window_is_capped_and_a_decode_that_answered_nothing_resets_it():
    w = EmbedWindow(fraction=0.1, max_wait=0.005)
    w.answered(now=0.0, n_answered=2, n_left=0, decode_seconds=2.0)  # a slow decode
    assert w.wait_until(now=0.0, n_queued=1, full=False) == 0.005
    # part of a long request decoded, nobody answered: nobody to wait for
    w.answered(now=1.0, n_answered=0, n_left=1, decode_seconds=2.0)
    assert w.wait_until(now=1.0, n_queued=1, full=False) is None


@given(st.floats(0, 1e6), st.integers(0, 64), st.integers(0, 64), st.floats(0, 10),
       st.floats(0, 20), st.integers(0, 200), st.booleans())
def test_never_waits_past_the_window(t, answered, left, seconds, later, queued, full):
    w = EmbedWindow()
    w.answered(now=t, n_answered=answered, n_left=left, decode_seconds=seconds)
    until = w.wait_until(now=t + later, n_queued=queued, full=full)
    if until is not None:
        assert t + later < until <= t + w.max_wait
        assert not full and queued < answered + left
