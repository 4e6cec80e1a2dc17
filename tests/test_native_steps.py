"""Native runs of generation steps in the engine (Engine._run_burst,
``burst_ms``): the same text, ends and counts as one step at a time, with
what users send -- default options, greedy, penalties, stop strings,
n_predict, cancellation, several streams at once -- on the tiny model."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import pytest

from runner.engine.core import Engine, EngineConfig
from runner.engine.requests import CompletionOptions, CompletionRequest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from tiny_model import write_tiny_llama  # noqa: E402

pytestmark = pytest.mark.model

REQUESTS = [
    ("Once upon a time", {"seed": 1, "num_predict": 150}),                     # the defaults, seeded
    ("ünïcödé 🐉 数据 \u200b", {"temperature": 0, "num_predict": 97}),         # greedy
    ("1, 2, 3,", {"temperature": 0, "repeat_penalty": 1.3, "num_predict": 120}),
    ("The end", {"seed": 5, "top_k": 5, "num_predict": 200, "ignore_eos": True}),
    ("a b c", {"seed": 3, "stop": ["e", "zz"], "num_predict": 200}),          # a stop string
    ([1], {"temperature": 0, "num_predict": 1}),                              # token ids, one token
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("native") / "tiny.gguf")


def run_all(path, burst_ms):
    with Engine(EngineConfig(str(path), n_ctx=4096, n_batch=256, n_threads=1, parallel=4,
                             burst_ms=burst_ms)) as e:
        e.complete("warm up", num_predict=8, temperature=0)  # times one step
        handles = []
        for prompt, options in REQUESTS:
            req = CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(options))
            handles.append(e.submit(req))
        out = [h.result() for h in handles]
        steps = [t.steps for t in e.timings]
        totals = e.totals.snapshot()
    # A run's decodes are counted one by one in the totals, as ordinary steps are.
    assert totals["steps"] == sum(steps) == totals["step_seconds"]["count"] == totals["batch_tokens"]["count"]
    assert sum(totals["batch_tokens"]["counts"]) == sum(steps)
    return [(text, f.done_reason, f.eval_count) for text, f in out], steps


def test_runs_give_what_one_step_at_a_time_gives(tiny):
    """Six requests over four slots: queued ones start as others end, so
    runs are cut by admissions and ends; every text, end reason and count
    is the same as with burst_ms 0, and some steps did run natively."""
    alone, steps_off = run_all(tiny, 0.0)
    native, steps_on = run_all(tiny, 1000.0)
    assert native == alone
    assert set(steps_off) == {1}
    assert max(steps_on) > 1
    assert alone[4][1] == "stop" or alone[4][2] == 200


def test_cancel_and_a_new_request_during_a_run(tiny):
    """A request cancelled while runs are going ends as cancelled; a request
    that arrives then is admitted and answered as it would be alone."""
    with Engine(EngineConfig(str(tiny), n_ctx=8192, n_batch=256, n_threads=1, parallel=2,
                             burst_ms=1000.0)) as e:
        e.complete("warm up", num_predict=8, temperature=0)
        expected, _ = e.complete("late", num_predict=30, temperature=0)
        seen = threading.Event()
        got = []

        def on_event(event):
            got.append(event)
            if len(got) == 40:
                seen.set()

        long = e.submit(CompletionRequest(prompt="long", options=CompletionOptions.from_dict(
            {"num_predict": 3000, "ignore_eos": True})), on_event)
        assert seen.wait(60)
        text, final = e.complete("late", num_predict=30, temperature=0)
        assert text == expected and final.eval_count == 30
        long.cancel()
        for _ in range(600):
            if long.final is not None:
                break
            threading.Event().wait(0.05)
        assert long.final is not None and long.final.done_reason == "cancelled"
        assert long.final.eval_count < 3000


def test_a_wake_up_interrupts_a_run(tiny):
    """Whatever notifies the loop (a request, a cancel, a stop string, a job)
    sets the interrupt that decode_steps checks before each step."""
    with Engine(EngineConfig(str(tiny), n_ctx=512, n_threads=1)) as e:
        e._interrupt.clear()
        with e._lock:
            e._wake.notify()
        assert e._interrupt.is_set()


@pytest.mark.parametrize("options", [{"logprobs": True, "temperature": 0},
                                     {"speculative": True, "temperature": 0},
                                     {"temperature": 0.8, "top_k": 0, "seed": 2}])  # llama.cpp's chain
def test_requests_that_need_python_between_tokens_never_run_natively(tiny, options):
    with Engine(EngineConfig(str(tiny), n_ctx=1024, n_threads=1, burst_ms=1000.0)) as e:
        e.complete("warm up", num_predict=8, temperature=0)
        first = len(e.timings)
        e.complete("hello hello hello hello", num_predict=40, ignore_eos=True, **options)
        assert {t.steps for t in list(e.timings)[first:]} == {1}


@pytest.mark.parametrize("grammar", ['root ::= [^\\x00]*', 'root ::= [a-z ]+'])
def test_a_grammar_stream_runs_natively_with_the_same_text(tiny, grammar):
    """A grammar's stream rides native runs while its grammar takes the
    picks (every pick, for the first grammar) and leaves them at a pick it
    rejects (most picks, for the second): the same text as one step at a
    time.  One stream, so no other stream's timing changes its batches."""
    out = {}
    for burst in (0.0, 1000.0):
        with Engine(EngineConfig(str(tiny), n_ctx=1024, n_threads=1, burst_ms=burst)) as e:
            e.complete("warm up", num_predict=8, temperature=0)
            first = len(e.timings)
            text, final = e.complete("Once upon a time", seed=4, num_predict=60, grammar=grammar)
            out[burst] = ((text, final.done_reason, final.eval_count),
                          [t.steps for t in list(e.timings)[first:]])
    assert out[0.0][0] == out[1000.0][0]
    assert set(out[0.0][1]) == {1}
    if "^" in grammar and out[0.0][0][2] > 8:
        assert max(out[1000.0][1]) > 1


def test_a_grammar_stream_among_others_in_native_runs(tiny):
    """Three plain streams keep the loop stepping while the grammar stream's
    redraws run off the loop: a run that ended at its rejected pick must not
    leave it scheduled (it once was, with the run's last token, and its
    sampler refused the next pick)."""
    with Engine(EngineConfig(str(tiny), n_ctx=4096, n_threads=1, parallel=4, burst_ms=1000.0)) as e:
        e.complete("warm up", num_predict=8, temperature=0)
        handles = [e.submit(CompletionRequest(prompt=[1000 + 37 * i + k for k in range(32)],
                                              options=CompletionOptions.from_dict(
            {"temperature": 0.0, "repeat_penalty": 1.0, "ignore_eos": True, "num_predict": 120,
             **({"grammar": "root ::= [a-z ]+"} if i == 0 else {})}))) for i in range(4)]
        results = [h.result() for h in handles]
        redraws = e.totals.snapshot()["grammar_redraw_seconds"]["count"]
        steps = [t.steps for t in e.timings]
    for text, final in results:
        assert final.error is None and final.done_reason == "length" and final.eval_count == 120, final
    assert re.fullmatch(r"[a-z ]+", results[0][0]), results[0][0]
    assert redraws > 0 and max(steps) > 1
