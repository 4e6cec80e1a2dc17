"""Running totals are exact: a known mix of completions (finished, stopped,
cancelled, failed, refused, busy) and embeddings, then every counter is
checked against the finals the callers received; the Prometheus text of a
real runner parses back to the same numbers."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from runner.engine.core import Engine, EngineConfig
from runner.process.client import Runner
from runner.engine.requests import (BadRequest, Busy, Chunk, CompletionOptions, CompletionRequest, EngineError,
                             Final)

pytestmark = pytest.mark.model


def submit(engine, prompt, **options):
    return engine.submit(CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(options)))


def test_totals_match_what_callers_saw(default_model_path):
    finals: list[Final] = []
    with Engine(EngineConfig(default_model_path, n_ctx=1024, parallel=1, max_queue=0, n_threads=2)) as e:
        assert e.info()["totals"]["requests"]["stop"] == 0
        # Two that run to their length, one stopped by its grammar, one whose grammar fails.
        for opts in ({"num_predict": 4, "temperature": 0.0, "ignore_eos": True},
                     {"num_predict": 6, "ignore_eos": True, "seed": 3},
                     {"grammar": 'root ::= "yes"', "num_predict": 8},
                     {"grammar": "root ::= [z-a]", "num_predict": 8}):
            finals.append(submit(e, "Hello there", **opts).result()[1])
        # Cancelled after its first token; meanwhile the only slot is taken
        # and max_queue is 0, so one more is busy.
        first = threading.Event()
        long = e.submit(CompletionRequest(prompt="Count:", options=CompletionOptions.from_dict(
            {"num_predict": 2000, "ignore_eos": True})),
            on_event=lambda ev: first.set() if isinstance(ev, Chunk) else finals.append(ev))
        assert first.wait(60)
        with pytest.raises(Busy):
            submit(e, "Too many", num_predict=2)
        long.cancel()
        with pytest.raises(BadRequest):
            submit(e, "x", grammar="root ::= (")
        with pytest.raises(EngineError):
            submit(e, "", num_predict=2)
        e.embed("some text")
        while len(finals) < 5:
            threading.Event().wait(0.05)
        totals = e.info()["totals"]
    reasons = [f.done_reason for f in finals]
    assert sorted(reasons) == ["cancelled", "error", "length", "length", "stop"]
    assert totals["requests"] == {"stop": 1, "length": 2, "cancelled": 1, "error": 1, "busy": 1,
                                  "bad_request": 2, "input_too_long": 0, "not_ready": 0, "internal": 0}
    assert totals["generated_tokens"] == sum(f.eval_count for f in finals)
    assert totals["prompt_tokens"] == sum(f.prompt_count for f in finals)
    assert totals["prompt_eval_tokens"] == sum(f.prompt_eval_count for f in finals)
    assert totals["cached_tokens"] == sum(f.cached_count for f in finals)
    assert totals["embeddings"] == 1
    assert totals["queue_seconds"]["count"] == 5       # every admitted completion
    assert totals["steps"] == totals["step_seconds"]["count"] == totals["batch_tokens"]["count"] > 0
    assert sum(totals["batch_tokens"]["counts"]) == totals["steps"]


def test_prometheus_text_of_a_runner(default_model_path):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    with Runner.spawn(default_model_path, n_ctx=512, parallel=1, n_threads=2) as r:
        for _ in range(2):
            r.complete("Hi", num_predict=3, temperature=0.0, ignore_eos=True).text()
        with pytest.raises(BadRequest):
            r.complete("Hi", no_such_option=1).text()
        totals = r.info(timeout=30).engine["totals"]
        out = subprocess.run([sys.executable, "-m", "runner.cli", "metrics", "--endpoint", r.endpoint],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(out.stdout) for s in fam.samples}
    assert samples[("llama_runner_requests_total", (("outcome", "length"),))] == 2
    assert samples[("llama_runner_requests_total", (("outcome", "bad_request"),))] == 1
    assert samples[("llama_runner_generated_tokens_total", ())] == 6 == totals["generated_tokens"]
    assert samples[("llama_runner_steps_total", ())] == totals["steps"]
    assert samples[("llama_runner_step_seconds_count", ())] == totals["steps"]
    assert samples[("llama_runner_step_seconds_bucket", (("le", "+Inf"),))] == totals["steps"]
    assert ("llama_runner_slot_kv_cells", (("slot", "0"),)) in samples
    assert samples[("llama_runner_load_seconds", ())] > 0
    assert samples[("llama_runner_host_cache_spare_bytes", ())] >= 0


def test_the_metrics_op_counts_a_known_mix_exactly(default_model_path):
    """Over the wire: completions that end by length, stop, error and
    cancel, one refused busy, one refused as a bad request, one whose prompt
    is too long, and an embedding; then every field of ``metrics`` against
    what the callers received, and the CLI's Prometheus text against it."""
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from runner.engine.requests import InputTooLong

    finals: list[Final] = []
    with Runner.spawn(default_model_path, n_ctx=256, parallel=1, max_queue=0, n_threads=2,
                      cache_ram_mb=0) as r:
        zero = r.metrics(timeout=30)
        assert zero.requests == dict.fromkeys(zero.requests, 0) and zero.steps == 0
        for opts in ({"num_predict": 4, "temperature": 0.0, "ignore_eos": True},
                     {"num_predict": 6, "ignore_eos": True, "seed": 3},
                     {"grammar": 'root ::= "yes"', "num_predict": 8}):
            finals.append(r.complete("Hello there", **opts).text()[1])
        # ends with done_reason "error" at its first token, which the client raises
        with pytest.raises(BadRequest, match="grammar cannot be satisfied"):
            r.complete("Hello there", grammar="root ::= [z-a]", num_predict=8).text()
        n_failed = len(r.tokenize("Hello there", add_special=True))
        r.embed("some text")  # (an embedding leaves its slot empty: before the last completion)
        stream = r.complete("Count:", num_predict=2000, ignore_eos=True)
        assert type(next(stream)) is Chunk
        busy = r.metrics(timeout=30)
        assert (busy.running, busy.queue_depth) == (1, 0)
        with pytest.raises(Busy):
            r.complete("Too many", num_predict=2).text()
        stream.cancel()
        finals.append(list(stream)[-1])
        with pytest.raises(BadRequest):
            r.complete("x", no_such_option=1).text()
        with pytest.raises(InputTooLong):
            r.complete("word " * 400, num_predict=2, truncate=False).text()
        m = r.metrics(timeout=30)
        slots = r.info(timeout=30).engine["slots"]
        out = subprocess.run([sys.executable, "-m", "runner.cli", "metrics", "--endpoint", r.endpoint],
                             capture_output=True, text=True, timeout=60)
    assert sorted(f.done_reason for f in finals) == ["cancelled", "length", "length", "stop"]
    assert m.requests == {"stop": 1, "length": 2, "cancelled": 1, "error": 1, "busy": 1, "bad_request": 1,
                          "input_too_long": 1, "not_ready": 0, "internal": 0}
    assert m.generated_tokens == sum(f.eval_count for f in finals)  # the failed one generated none
    assert m.prompt_tokens == sum(f.prompt_count for f in finals) + n_failed
    assert m.prompt_eval_tokens + m.cached_tokens == m.prompt_tokens
    assert m.cached_tokens >= sum(f.cached_count for f in finals)
    assert m.embeddings == 1
    assert m.queue_seconds.count == 5 == sum(m.queue_seconds.counts)  # every admitted completion
    assert m.steps == m.step_seconds.count == m.batch_tokens.count == sum(m.batch_tokens.counts) > 0
    assert m.batch_tokens.sum >= m.prompt_eval_tokens  # every evaluated prompt input went through a decode
    assert (m.queue_depth, m.running, m.in_flight) == (0, 0, 0)
    assert m.slot_kv_cells == [s["n_inputs"] for s in slots] and m.slot_kv_cells[0] > 0
    assert {k: m.media_cache[k] for k in ("entries", "hits", "misses", "evictions")} == dict.fromkeys(
        ("entries", "hits", "misses", "evictions"), 0)
    assert (m.host_cache["max_bytes"], m.host_cache["saves"], m.host_cache["entries"]) == (0, 0, 0)
    assert m.load_seconds > 0
    # "[z-a]" rejects the model's first pick: at least that one was redrawn
    # off the loop; "yes" (its tokens and the end) adds at most 4.
    redraws = m.grammar_redraw_seconds
    assert 1 <= redraws.count == sum(redraws.counts) <= 5 and redraws.sum > 0

    assert out.returncode == 0, out.stderr
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(out.stdout) for s in fam.samples}
    for outcome, n in m.requests.items():
        assert samples[("llama_runner_requests_total", (("outcome", outcome),))] == n
    for name in ("prompt_tokens", "prompt_eval_tokens", "cached_tokens", "generated_tokens",
                 "embeddings", "steps"):
        assert samples[(f"llama_runner_{name}_total", ())] == getattr(m, name), name
    assert samples[("llama_runner_queue_seconds_count", ())] == 5
    assert samples[("llama_runner_grammar_redraw_seconds_count", ())] == redraws.count
    assert samples[("llama_runner_slot_kv_cells", (("slot", "0"),))] == m.slot_kv_cells[0]
    assert samples[("llama_runner_media_cache_misses_total", ())] == 0
    assert samples[("llama_runner_host_cache_spare_bytes", ())] == m.host_cache["spare_bytes"] == 0  # tier off


def test_an_embedding_runner_refuses_completions(default_model_path):
    with Engine(EngineConfig(default_model_path, n_ctx=512, parallel=2, n_threads=2)) as plain:
        want = plain.embed("a sentence to embed").embedding
    with Engine(EngineConfig(default_model_path, n_ctx=512, parallel=2, n_threads=2, embeddings=True)) as e:
        with pytest.raises(BadRequest, match="embeddings only"):
            submit(e, "Hello", num_predict=2)
        got = e.embed("a sentence to embed").embedding
        assert e.info()["totals"]["requests"]["bad_request"] == 1
    assert got.shape == want.shape and float(abs(got - want).max()) < 1e-3
