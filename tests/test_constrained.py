"""Constrained output with the options users send: default sampling options,
grammars that can never match, grammars that finish under ``ignore_eos``.

Each of these used to end the whole process (a C++ exception or a ggml abort
inside llama.cpp's grammar sampler).  The engine cases run in-process — a
regression would kill the test run, which is the point — and the process case
checks that the other streams of a runner carry on.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time

import pytest

from runner.engine.core import Engine, EngineConfig
from runner.engine.requests import BadRequest, Chunk, CompletionOptions, CompletionRequest, Final
from runner.process.client import Runner

pytestmark = pytest.mark.model

# Grammars whose first character can never match.
UNSATISFIABLE = [
    "root ::= [z-a]",             # an empty range
    'root ::= [^\\x00-\\U0010FFFF]',  # the complement of everything
    'root ::= "a" [z-a]',         # satisfiable for one character only
]


@pytest.fixture(scope="module")
def engine(default_model_path):
    e = Engine(EngineConfig(default_model_path, n_ctx=2048, parallel=4, n_threads=2))
    yield e
    e.close()


@pytest.fixture
def after_hello(llama, model, make_ctx):
    """A context that decoded "Hello", and the batch row of its logits."""
    ctx = make_ctx(n_ctx=256)
    batch = llama.Batch(16)
    batch.add_tokens(model.tokenize("Hello", add_special=True), 0, 0, output_last=True)
    ctx.decode(batch)
    yield ctx, len(batch) - 1
    batch.close()


def run(engine, prompt, **options):
    handle = engine.submit(CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(options)))
    events = list(handle)
    assert isinstance(events[-1], Final) and not any(isinstance(e, Final) for e in events[:-1])
    return "".join(e.text for e in events if isinstance(e, Chunk)), events[-1]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_schema_with_default_options(engine, temperature):
    # Default repeat_penalty (1.1) and repeat_last_n (64): the prompt goes
    # into the penalties, not into the grammar.
    text, final = run(engine, "Give JSON:", json_schema={"type": "object"}, num_predict=80,
                      temperature=temperature, seed=3)
    assert final.done_reason in ("stop", "length"), final
    if final.done_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.lstrip().startswith("{")


def test_grammar_with_every_penalty(engine):
    grammar = 'root ::= "yes" | "no" | "maybe"'
    text, final = run(engine, "Is the sky blue? Answer:", grammar=grammar, repeat_penalty=1.5,
                      frequency_penalty=0.5, presence_penalty=0.5, repeat_last_n=-1, num_predict=10)
    assert final.done_reason == "stop" and text in ("yes", "no", "maybe")


@pytest.mark.parametrize("grammar", UNSATISFIABLE)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_unsatisfiable_grammar_fails_that_request_only(engine, grammar, temperature):
    other = engine.submit(CompletionRequest(prompt="Count: one, two,", options=CompletionOptions.from_dict(
        {"num_predict": 24, "temperature": 0.0})))
    text, final = run(engine, "Say something:", grammar=grammar, num_predict=8, temperature=temperature)
    assert final.done_reason == "error" and final.error_code == "bad_request"
    assert "grammar" in final.error
    assert len(text) <= 1  # at most the "a" of the third grammar
    _, other_final = other.result()
    assert other_final.done_reason in ("stop", "length") and other_final.eval_count > 0


def test_finished_grammar_ends_under_ignore_eos(engine):
    # Unlimited num_predict: once "done" is generated only end tokens are
    # allowed; with ignore_eos they used to be generated forever.
    text, final = run(engine, "Say done:", grammar='root ::= "done"', ignore_eos=True,
                      temperature=0.0)
    assert text == "done" and final.done_reason == "stop"


def test_grammar_with_logprobs_stops_and_seed(engine):
    grammar = 'root ::= [0-9]+ ","'
    text, final = run(engine, "Numbers:", grammar=grammar, logprobs=True, top_logprobs=2,
                      stop=["7"], seed=11, temperature=1.0, num_predict=12)
    assert final.done_reason in ("stop", "length")
    assert "7" not in text and all(c.isdigit() or c == "," for c in text)


def test_engine_serves_after_failures(engine):
    text, final = run(engine, "The capital of France is", num_predict=4, temperature=0.0)
    assert final.eval_count == 4 and text


def test_bad_grammar_reason_is_reported(engine):
    with pytest.raises(BadRequest) as info:
        engine.submit(CompletionRequest(prompt="x", options=CompletionOptions.from_dict(
            {"grammar": 'root ::= undefined-rule'})))
    assert "undefined-rule" in str(info.value)  # llama.cpp's reason, not only "failed to parse"
    with pytest.raises(BadRequest) as info:
        engine.submit(CompletionRequest(prompt="x", options=CompletionOptions.from_dict(
            {"grammar": 'root ::= "a" )'})))
    assert "expecting" in str(info.value)


def test_sampler_guards_directly(llama, model, after_hello):
    ctx, row = after_hello
    for temp in (0.0, 1.0):
        with llama.Sampler(model, temperature=temp, grammar="root ::= [z-a]") as s:
            assert s.has_grammar
            with pytest.raises(llama.NoTokenError):
                s.sample(ctx, row)
    with llama.Sampler(model, temperature=0.0, grammar='root ::= "ab"') as s:
        eos = model.eos_token if hasattr(model, "eos_token") else None
        # Prompt tokens go to the penalties only: any token is accepted.
        for tok in model.tokenize("}}}]]] not json", add_special=False):
            s.accept(tok)
        tok = s.sample(ctx, row)
        assert model.token_to_piece(tok).decode() in ("a", "ab")
        if eos is not None:
            assert not s.allows(eos)


def test_runner_survives_constrained_requests(default_model_path):
    with Runner.spawn(default_model_path, n_ctx=1024, parallel=2, n_threads=2) as r:
        # The client raises the error that ends a completion.
        with pytest.raises(BadRequest, match="grammar cannot be satisfied"):
            list(r.complete("Say:", grammar="root ::= [z-a]", num_predict=4))
        events = list(r.complete("Give JSON:", json_schema={"type": "object"}, num_predict=40))
        assert events[-1].done_reason in ("stop", "length")
        assert r.health(timeout=10).state == "ready"


# -- constrained output with the other options (issue 19) ------------------------------

ORDER = {"type": "object", "properties": {
    "item": {"type": "string", "pattern": "^[a-z]{2,8}$"},
    "count": {"type": "integer", "minimum": 1, "maximum": 20},
    "tags": {"type": "array", "items": {"enum": ["new", "sale", "gift"]}, "maxItems": 3}},
    "required": ["item", "count", "tags"], "additionalProperties": False}

# Every stage family beside the schema; each several times in flight at once.
WITH_SCHEMA = [
    {},                                                             # the defaults
    {"temperature": 0.0},
    {"repeat_penalty": 1.5, "frequency_penalty": 0.5, "presence_penalty": 0.5, "repeat_last_n": -1},
    {"mirostat": 1}, {"mirostat": 2, "mirostat_tau": 3.0},
    {"dry_multiplier": 0.8, "dry_penalty_last_n": -1},
    {"xtc_probability": 0.5, "xtc_threshold": 0.1},
    {"top_n_sigma": 1.0}, {"typical_p": 0.8, "min_keep": 2}, {"dynatemp_range": 0.5},
    {"samplers": "mta", "min_p": 0.05, "adaptive_target": 0.3},
    {"samplers": ["temperature", "top_k"], "temperature": 1.5},
    {"logit_bias": {"new": -3.0}, "logprobs": True, "top_logprobs": 3},
    {"stop": ["sale"]},
]


def test_schema_with_every_sampler_stage_at_once(engine):
    import jsonschema

    jobs = [(o, seed) for o in WITH_SCHEMA for seed in (5, 6)]
    handles = [engine.submit(CompletionRequest(prompt="An order as JSON:", options=CompletionOptions.from_dict(
        {**o, "json_schema": ORDER, "seed": seed, "num_predict": 120}))) for o, seed in jobs]
    for (o, seed), h in zip(jobs, handles):
        events = list(h)
        text = "".join(e.text for e in events if isinstance(e, Chunk))
        final = events[-1]
        assert final.done_reason == "stop", (o, final, text)
        if "stop" in o and "sale" in text:
            pytest.fail(f"a stop string was returned: {text!r}")
        if "stop" in o and not text.rstrip().endswith("}"):
            continue  # cut at "sale": what came before is a prefix of valid output
        jsonschema.validate(json.loads(text), ORDER)
        chunks = [e for e in events if isinstance(e, Chunk)]
        if o.get("logprobs"):
            assert all(c.logprobs and len(c.logprobs) == len(c.tokens) for c in chunks)
            assert all(len(entry["top"]) == 3 for c in chunks for entry in c.logprobs)


def test_seeded_schema_output_repeats(engine):
    def once(seed):
        return run(engine, "An order as JSON:", json_schema=ORDER, seed=seed, num_predict=120,
                   dry_multiplier=0.5, xtc_probability=0.3)[0]

    assert once(42) == once(42)


@pytest.mark.parametrize("options,field", [
    ({"grammar": 'root ::= "a"{3,1}'}, "grammar"),                        # used to exhaust memory
    ({"json_schema": {"type": "array", "minItems": 3, "maxItems": 2}}, "json_schema"),
    ({"json_schema": {"type": "string", "minLength": 4, "maxLength": 1}}, "json_schema"),
    ({"json_schema": {"$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}},
                      "$ref": "#/$defs/A"}}, "json_schema"),              # left recursion
    ({"json_schema": {"type": "string", "pattern": "^(a$"}}, "json_schema"),
])
def test_impossible_grammars_are_refused_naming_the_field(engine, options, field):
    with pytest.raises(BadRequest) as info:
        engine.submit(CompletionRequest(prompt="x", options=CompletionOptions.from_dict(options)))
    assert str(info.value).startswith(f"invalid option {field}: ")
    test_engine_serves_after_failures(engine)


# A short grammar whose check of the whole vocabulary takes about half a
# second on the development VM (runner.engine.limits.MAX_GRAMMAR_CHECK_S): many
# optional repeats in a row.
DEEP_GRAMMAR = 'root ::= ("a"? ){60} "b"'


def test_a_deferred_pick_resolves_to_the_token_sampling_gives(llama, model, after_hello):
    ctx, row = after_hello
    grammar = 'root ::= "zq" [a-z]*'  # the model's first choice after "Hello" breaks it
    for temp, native in ((0.0, True), (0.8, True), (0.0, False), (0.8, False)):
        with llama.Sampler(model, temperature=temp, seed=7, grammar=grammar, native=native) as now, \
                llama.Sampler(model, temperature=temp, seed=7, grammar=grammar, native=native) as later:
            assert now.native_chain == native and not now.native
            expected = now.sample(ctx, row)
            assert later.sample(ctx, row, defer=True) is llama.DEFERRED
            assert later.pending
            with pytest.raises(ValueError, match="deferred"):
                later.sample(ctx, row, defer=True)
            assert later.resolve() == expected
            assert not later.pending
            with pytest.raises(ValueError, match="no deferred pick"):
                later.resolve()
            # Both accepted the token: the grammar moved on alike.
            assert later.allows(expected) == now.allows(expected)
    # Without a grammar, or when the grammar takes the first choice,
    # nothing is deferred.
    with llama.Sampler(model, temperature=0.0) as plain:
        assert isinstance(plain.sample(ctx, row, defer=True), int)
    with llama.Sampler(model, temperature=0.0, grammar=grammar) as g:
        with pytest.raises(ValueError, match="no deferred pick"):
            g.resolve()
    # An unsatisfiable grammar fails in resolve, as sample would.
    with llama.Sampler(model, temperature=0.0, grammar="root ::= [z-a]") as never:
        assert never.sample(ctx, row, defer=True) is llama.DEFERRED
        with pytest.raises(llama.NoTokenError):
            never.resolve()
    # reset() forgets a deferred pick: the sampler samples again.
    with llama.Sampler(model, temperature=0.0, grammar=grammar) as again:
        assert again.sample(ctx, row, defer=True) is llama.DEFERRED
        again.reset()
        assert not again.pending
        assert isinstance(again.sample(ctx, row), int)
    # Closed while deferred: freed at once, resolve refuses.
    closed = llama.Sampler(model, temperature=0.0, grammar=grammar)
    assert closed.sample(ctx, row, defer=True) is llama.DEFERRED
    closed.close()
    assert closed.closed
    with pytest.raises(llama.ClosedError):
        closed.resolve()


def test_closing_a_sampler_during_its_resolve_frees_it_afterwards(llama, model, after_hello):
    ctx, row = after_hello
    for _ in range(3):
        s = llama.Sampler(model, temperature=0.0, grammar=DEEP_GRAMMAR)
        assert s.sample(ctx, row, defer=True) is llama.DEFERRED
        outcome = []

        def resolve():
            try:
                outcome.append(s.resolve())
            except llama.ClosedError as exc:
                outcome.append(exc)

        t = threading.Thread(target=resolve)
        t.start()
        s.close()  # before, during or after the resolve: never a crash
        assert s.closed
        t.join()
        assert len(outcome) == 1
        with pytest.raises(llama.ClosedError):
            s.sample(ctx, row)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from tiny_model import write_tiny_llama

    path = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    e = Engine(EngineConfig(str(path), n_ctx=2048, parallel=4, n_threads=1))
    yield e
    e.close()


def _submit(engine, events, name, prompt, **options):
    def sink(event):
        events.append((name, event))
    return engine.submit(CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(options)),
                         on_event=sink)


def _wait(pred, what, limit=60.0):
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def test_streams_go_on_while_a_grammar_checks_the_vocabulary(tiny_engine):
    # Default options on both.  The random model's first choice almost never
    # fits the grammar, so each of its tokens needs a check of the whole
    # vocabulary; that runs off the loop, and the plain stream finishes all
    # its tokens before the grammar stream's first one comes back.  (Before
    # that check ran off the loop, both streams' first tokens came in one
    # step, after it.)
    events: list = []
    submitted = tiny_engine._resolver.submitted
    _submit(tiny_engine, events, "grammar", "Hello", grammar=DEEP_GRAMMAR, num_predict=3)
    _submit(tiny_engine, events, "plain", "Hello", num_predict=48, ignore_eos=True)
    _wait(lambda: sum(isinstance(e, Final) for _, e in events) == 2, "both finals")
    order = [(n, type(e).__name__) for n, e in events]
    plain_last = max(i for i, x in enumerate(order) if x == ("plain", "Chunk"))
    grammar_first = order.index(("grammar", "Chunk")) if ("grammar", "Chunk") in order else len(order)
    assert plain_last < grammar_first, order
    finals = {n: e for n, e in events if isinstance(e, Final)}
    assert finals["plain"].done_reason == "length" and finals["plain"].eval_count == 48
    assert finals["grammar"].done_reason in ("length", "stop"), finals["grammar"]
    text = "".join(e.text for n, e in events if n == "grammar" and isinstance(e, Chunk))
    assert re.fullmatch(r"a*b?", text), text
    assert tiny_engine._resolver.submitted > submitted


def test_a_request_cancelled_while_its_grammar_pick_is_pending(tiny_engine):
    events: list = []
    handle = _submit(tiny_engine, events, "grammar", "Hello", grammar=DEEP_GRAMMAR, num_predict=8)
    _wait(lambda: tiny_engine._pending, "a deferred pick")
    handle.cancel()
    _wait(lambda: any(isinstance(e, Final) for _, e in events), "the final")
    final = [e for _, e in events if isinstance(e, Final)]
    assert len(final) == 1 and final[0].done_reason == "cancelled"
    # Its resolve finishes (and frees the sampler) on its own; the engine
    # serves the next request, with a grammar too.
    text, final = run(tiny_engine, "Hi", grammar='root ::= "ok" | "no"', num_predict=4)
    assert final.done_reason == "stop" and text in ("ok", "no")
    _wait(lambda: not tiny_engine._pending, "no pending pick")


def test_closing_the_engine_while_a_grammar_pick_is_pending(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from tiny_model import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny.gguf")
    engine = Engine(EngineConfig(str(path), n_ctx=512, parallel=2, n_threads=1))
    events: list = []
    _submit(engine, events, "grammar", "Hello", grammar=DEEP_GRAMMAR, num_predict=8)
    _wait(lambda: engine._pending, "a deferred pick")
    engine.close()  # waits for the resolve before the model is freed
    finals = [e for _, e in events if isinstance(e, Final)]
    assert len(finals) == 1 and finals[0].done_reason == "cancelled"


@pytest.mark.parametrize("native", [True, False])
def test_grammar_draws_follow_the_distribution_restricted_to_what_it_allows(llama, model, make_ctx, native):
    # A first pick the grammar accepts is kept, a rejected one is drawn again
    # from the allowed tokens: together the draws follow the chain's
    # distribution over the allowed tokens alone, native chain or llama.cpp's.
    np = pytest.importorskip("numpy")
    ctx = make_ctx(n_ctx=256)
    batch = llama.Batch(16)
    try:
        batch.add_tokens(model.tokenize("The letters are", add_special=True), 0, 0, output_last=True)
        ctx.decode(batch)
        row = len(batch) - 1
        logits = np.array(ctx.logits(row), dtype=np.float64)
        allowed = [t for t in range(model.n_vocab) if model.token_to_piece(t) in (b"a", b"b", b"c", b"d")]
        assert len(allowed) == 4
        p = np.exp(logits[allowed] - logits[allowed].max())
        p /= p.sum()
        n = 600
        counts = dict.fromkeys(allowed, 0)
        for seed in range(n):  # (reset() would restart llama.cpp's generator too)
            with llama.Sampler(model, temperature=1.0, top_k=40, top_p=1.0, min_p=0.0, seed=seed,
                               grammar='root ::= "a" | "b" | "c" | "d"', native=native) as s:
                counts[s.sample(ctx, row)] += 1
        seen = np.array([counts[t] for t in allowed]) / n
        assert np.abs(seen - p).sum() / 2 < 0.07, (seen, p)
    finally:
        batch.close()
