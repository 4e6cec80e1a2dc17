"""The engine on the real default model."""

from __future__ import annotations

import json
import threading

import pytest

from runner.engine.core import Engine, EngineConfig
from runner.engine.requests import (
    BadRequest, Busy, Chunk, CompletionOptions, CompletionRequest, Final, InputTooLong,
)

pytestmark = pytest.mark.model

GREEDY = dict(temperature=0.0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def engine(default_model_path):
    e = Engine(EngineConfig(default_model_path, n_ctx=4096, parallel=4, n_threads=2))
    yield e
    e.close()


@pytest.fixture
def small_engine(default_model_path):
    made = []

    def make(**kw):
        kw.setdefault("n_threads", 2)
        e = Engine(EngineConfig(default_model_path, **kw))
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def submit(engine, prompt, **options):
    return engine.submit(CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(options)))


def run(engine, prompt, **options):
    events = list(submit(engine, prompt, **options))
    chunks = [e for e in events if isinstance(e, Chunk)]
    final = events[-1]
    assert isinstance(final, Final) and all(not isinstance(e, Final) for e in events[:-1])
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.tokens], final


def test_basic_completion(engine):
    text, tokens, final = run(engine, "The capital of France is", num_predict=16, **GREEDY)
    assert "Paris" in text
    assert final.done_reason == "length" and final.eval_count == 16 == len(tokens)
    assert final.prompt_eval_count + final.cached_count == final.prompt_count
    assert final.prompt_eval_duration > 0 and final.eval_duration > 0


def test_parallel_plus_one_requests(engine):
    handles = [submit(engine, f"Write a sentence about the number {i}.", num_predict=24, ignore_eos=True, **GREEDY)
               for i in range(5)]
    results = [h.result() for h in handles]
    assert all(f.done_reason == "length" and f.eval_count == 24 for _, f in results)
    assert len({f.slot for _, f in results}) == 4


def test_greedy_alone_equals_beside_others(engine):
    prompt = "List three colours of the rainbow:"
    alone, _, _ = run(engine, prompt, num_predict=32, **GREEDY)
    others = [submit(engine, p, num_predict=48, **GREEDY) for p in
              ("Tell me about cats.", "What is 2 + 2?", "Name a famous painter.")]
    beside = submit(engine, prompt + " ", num_predict=1, **GREEDY)  # vary the cache state
    beside.result()
    together, _, _ = run(engine, prompt, num_predict=32, **GREEDY)
    for h in others:
        h.result()
    assert together == alone


def test_seed_determinism(engine):
    opts = dict(temperature=0.9, top_k=50, top_p=0.95, seed=1234, num_predict=24)
    a, _, _ = run(engine, "Invent a name for a dragon:", **opts)
    other = submit(engine, "Something else entirely", num_predict=40, temperature=0.7)
    b, _, _ = run(engine, "Invent a name for a dragon:", **opts)
    other.result()
    assert a == b


def test_stop_string_spanning_tokens(engine):
    prompt = "The capital of France is"
    text, tokens, _ = run(engine, prompt, num_predict=24, **GREEDY)
    # Build a stop string from the end of one token and the start of the next.
    pieces = [engine.model.token_to_piece(t).decode("utf-8", "replace") for t in tokens]
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    cut = text.index(stop)
    text2, tokens2, final = run(engine, prompt, num_predict=24, stop=[stop], **GREEDY)
    assert final.done_reason == "stop"
    assert text2 == text[:cut]
    assert stop not in text2


def test_stop_string_trims_the_slot(small_engine):
    engine = small_engine(n_ctx=1024, parallel=1)
    prompt = engine.tokenize("Count: one, two, three, four,", add_special=True)
    text, tokens, _ = run(engine, prompt, num_predict=12, **GREEDY)
    stop = engine.model.token_to_piece(tokens[4]).decode()
    assert stop.strip()
    text2, tokens2, final = run(engine, prompt, num_predict=12, stop=[stop], **GREEDY)
    assert final.done_reason == "stop"
    slot = engine.info()["slots"][0]
    # The slot holds the prompt and the tokens before the stop string only.
    assert slot["n_inputs"] == len(prompt) + len(tokens2)


def test_emoji_never_split(engine):
    grammar = 'root ::= "Faces: 😀😃😄🙂 and flags: 🇫🇷🇯🇵"'
    events = list(submit(engine, "Emoji:", num_predict=40, grammar=grammar, **GREEDY))
    chunks = [e.text for e in events if isinstance(e, Chunk)]
    assert "".join(chunks) == "Faces: 😀😃😄🙂 and flags: 🇫🇷🇯🇵"
    assert all("\ufffd" not in c for c in chunks)
    n_tokens = sum(len(e.tokens) for e in events if isinstance(e, Chunk))
    assert n_tokens > len(chunks)  # some emoji took several tokens


def test_json_schema_output(engine):
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    }, "required": ["name", "age", "pets"]}
    text, _, final = run(engine, "Describe a person as JSON:", num_predict=200, json_schema=schema, **GREEDY)
    data = json.loads(text)
    assert set(data) == {"name", "age", "pets"} and isinstance(data["age"], int)
    assert final.done_reason == "stop"


def test_any_json_format(engine):
    text, _, _ = run(engine, "Give me a JSON object:", num_predict=120, json_schema={}, **GREEDY)
    assert isinstance(json.loads(text), dict)


def test_cancellation_frees_the_slot(small_engine):
    engine = small_engine(n_ctx=1024, parallel=1)
    first = submit(engine, "Tell me a very long story.", num_predict=500, temperature=0.8, ignore_eos=True)
    it = iter(first)
    assert isinstance(next(it), Chunk)
    queued = submit(engine, "Hello", num_predict=4, **GREEDY)
    first.cancel()
    rest = list(it)
    assert isinstance(rest[-1], Final) and rest[-1].done_reason == "cancelled"
    text, final = queued.result()
    assert final.done_reason == "length" and final.eval_count == 4


def test_cancel_queued_request(small_engine):
    engine = small_engine(n_ctx=1024, parallel=1)
    running = submit(engine, "Tell me a long story.", num_predict=200, temperature=0.8, ignore_eos=True)
    queued = submit(engine, "Never runs", num_predict=4)
    queued.cancel()
    _, final = queued.result()
    assert final.done_reason == "cancelled" and final.eval_count == 0
    running.cancel()
    assert running.result()[1].done_reason == "cancelled"


def test_busy_when_queue_is_full(small_engine):
    engine = small_engine(n_ctx=1024, parallel=1, max_queue=1)
    a = submit(engine, "One", num_predict=300, temperature=0.8, ignore_eos=True)
    b = submit(engine, "Two", num_predict=4)
    with pytest.raises(Busy):
        submit(engine, "Three", num_predict=4)
    a.cancel()
    b.result()
    a.result()


def test_cache_hit_evaluates_only_the_tail(small_engine):
    engine = small_engine(n_ctx=2048, parallel=2)
    system = engine.tokenize("You are a helpful assistant. " * 30, add_special=True)
    _, out_tokens, first = run(engine, system, num_predict=8, **GREEDY)
    assert first.cached_count == 0 and first.prompt_eval_count == len(system)
    follow = system + out_tokens + engine.tokenize(" Next question:")
    _, _, second = run(engine, follow, num_predict=8, **GREEDY)
    # The whole previous conversation is reused; only the new text is evaluated
    # (and the last generated token, which was returned but never decoded).
    assert first.done_reason == "length"
    assert second.cached_count == len(system) + len(out_tokens) - 1
    assert second.prompt_eval_count == len(follow) - second.cached_count
    assert second.slot == first.slot


def test_fully_cached_prompt_still_evaluates_one(engine):
    prompt = engine.tokenize("Exactly the same prompt twice.", add_special=True)
    run(engine, prompt, num_predict=2, **GREEDY)
    _, _, final = run(engine, prompt, num_predict=2, **GREEDY)
    assert final.prompt_eval_count == 1 and final.cached_count == len(prompt) - 1


def test_input_too_long(small_engine):
    engine = small_engine(n_ctx=512, parallel=2)
    long_prompt = list(range(1000, 1300))  # 300 tokens > slot of 256
    with pytest.raises(InputTooLong):
        submit(engine, long_prompt, num_predict=4)
    text, _, final = run(engine, long_prompt, num_predict=4, truncate=True, **GREEDY)
    assert final.done_reason == "length" and final.prompt_count < 256


def test_generation_past_the_slot_with_shift(small_engine):
    engine = small_engine(n_ctx=256, parallel=1)
    _, tokens, final = run(engine, "Once upon a time", num_predict=400, ignore_eos=True,
                           temperature=0.8, seed=3)
    assert final.done_reason == "length" and final.eval_count == 400 == len(tokens)
    _, tokens, final = run(engine, "Once upon a time", num_predict=400, ignore_eos=True,
                           shift=False, temperature=0.8, seed=3)
    assert final.done_reason == "length" and final.eval_count < 256


def test_bad_requests(engine):
    with pytest.raises(BadRequest):
        submit(engine, "", num_predict=4)
    with pytest.raises(BadRequest):
        submit(engine, [engine.model.n_vocab + 1], num_predict=4)
    with pytest.raises(BadRequest):
        submit(engine, "x", grammar="root ::= (")
    with pytest.raises(BadRequest):
        CompletionOptions.from_dict({"temperature": "hot"})
    with pytest.raises(BadRequest):
        CompletionOptions.from_dict({"no_such_option": 1})
    # The engine still serves.
    # ignore_eos: a sampled end-of-generation first token would make this flaky.
    assert run(engine, "Still alive?", num_predict=2, ignore_eos=True)[2].eval_count == 2


def test_logprobs(engine):
    events = list(submit(engine, "The capital of France is", num_predict=4, logprobs=True,
                         top_logprobs=3, **GREEDY))
    lps = [lp for e in events if isinstance(e, Chunk) for lp in (e.logprobs or [])]
    assert len(lps) == 4
    for lp in lps:
        assert lp["logprob"] <= 0 and len(lp["top"]) == 3
        assert lp["top"][0]["token"] == lp["token"]  # greedy picks the best


def test_embeddings(engine):
    a = engine.embed("The cat sat on the mat.", normalize=True)
    b = engine.embed("The cat sat on the mat.", normalize=True)
    c = engine.embed("Quantum chromodynamics describes quarks.", normalize=True)
    assert a.embedding.shape == (576,) and a.prompt_eval_count > 0
    assert float(a.embedding @ b.embedding) == pytest.approx(1.0, abs=1e-4)
    assert float(a.embedding @ c.embedding) < 0.999
    # Embedding requests leave no cached prompt behind.
    assert all(s["n_inputs"] == 0 or not s["in_use"] for s in engine.info()["slots"])


def test_many_threads_submit(engine):
    results = []

    def worker(i):
        results.append(engine.complete(f"Thread {i} says", num_predict=8, ignore_eos=True, **GREEDY)[1])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(f.eval_count == 8 for f in results)


def test_long_prompt_does_not_stall_a_generating_stream(small_engine):
    engine = small_engine(n_ctx=4096, parallel=2, n_batch=512, prefill_budget=128)
    gen = submit(engine, "Count slowly:", num_predict=60, ignore_eos=True, **GREEDY)
    it = iter(gen)
    next(it)
    long = submit(engine, list(range(1000, 3000)), num_predict=1, **GREEDY)
    list(it)
    long.result()
    steps = list(engine.timings)
    # While both ran, no step mixed more than the budget of prompt inputs with generation.
    mixed = [s for s in steps if s.n_generating and s.n_tokens > s.n_generating]
    assert mixed and max(s.n_tokens - s.n_generating for s in mixed) <= 128


@pytest.mark.parametrize("mode", ["thread", "inline"])
def test_delivery_modes(small_engine, mode):
    engine = small_engine(n_ctx=1024, parallel=2, delivery=mode)
    assert engine.delivery_mode == mode
    prompt = engine.tokenize("Count: one, two, three, four,", add_special=True)
    text, tokens, final = run(engine, prompt, num_predict=12, **GREEDY)
    stop = engine.model.token_to_piece(tokens[4]).decode()
    text2, tokens2, final2 = run(engine, prompt, num_predict=12, stop=[stop], **GREEDY)
    assert final2.done_reason == "stop" and text2 == text[:text.index(stop)]
    follow = prompt + tokens2 + engine.tokenize(" five")
    _, _, final3 = run(engine, follow, num_predict=2, **GREEDY)
    assert final3.cached_count == len(prompt) + len(tokens2)


@pytest.mark.parametrize("unified", [False, True])
def test_multi_policy_forks_a_shared_prefix(small_engine, unified):
    engine = small_engine(n_ctx=1024, parallel=2, cache_policy="multi", kv_unified=unified)
    system = engine.tokenize("System: answer briefly and politely. " * 8, add_special=True)
    a = system + engine.tokenize(" User: name a fruit.")
    b = system + engine.tokenize(" User: name a colour.")
    run(engine, a, num_predict=6, **GREEDY)
    text_b, _, final_b = run(engine, b, num_predict=12, **GREEDY)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared >= len(system)
    assert final_b.cached_count == shared   # forked from the slot that ran a
    cold = small_engine(n_ctx=1024, parallel=2, kv_unified=unified)
    text_cold, _, final_cold = run(cold, b, num_predict=12, **GREEDY)
    assert final_cold.cached_count == 0
    assert text_b == text_cold
