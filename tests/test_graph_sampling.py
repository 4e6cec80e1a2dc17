"""Sampling inside the decode graph (llama.cpp's backend sampling), on the
CPU backend with the default model: the binding's attach/detach rules, the
graph's picks against the CPU chains', and the engine's ``backend_sampling``
beside requests that must stay on the CPU."""

from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.engine.core import Engine, EngineConfig
from runner.engine.requests import BadRequest, Chunk, CompletionOptions, CompletionRequest, Final

pytestmark = pytest.mark.model

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "日本語の文章を書いてください。😀 emoji and ünïcödé",
    "def fibonacci(n):",
]


def _prompt_rows(llama, model, ctx, batch, prompts):
    batch.clear()
    rows = []
    for seq, text in enumerate(prompts):
        rows.append(batch.add_tokens(model.tokenize(text, add_special=True), 0, seq, output_last=True))
    ctx.decode(batch)
    return rows


def _generate(llama, model, ctx, samplers, prompts, steps):
    """Tokens per sequence: the prompt's pick, then ``steps`` native steps."""
    batch = llama.Batch(512)
    try:
        rows = _prompt_rows(llama, model, ctx, batch, prompts)
        first = llama.sample_batch(ctx, samplers, rows, 2)
        assert all(isinstance(t, int) for t in first), first
        positions = [len(model.tokenize(p, add_special=True)) for p in prompts]
        sampled, rc = llama.decode_steps(ctx, batch, samplers, list(range(len(prompts))), positions,
                                         first, [steps] * len(prompts), [False] * len(prompts), steps)
        assert rc == 0
        return [[f, *run] for f, run in zip(first, sampled)]
    finally:
        batch.close()


def test_attach_rules(llama, model, make_ctx):
    plain = make_ctx(n_seq_max=2)
    ctx = make_ctx(n_seq_max=2, graph_sampling=True)
    assert ctx.graph_sampling and not plain.graph_sampling
    with llama.Sampler(model, native=False, temperature=0.0) as s:
        with pytest.raises(ValueError, match="graph_sampling"):
            s.attach(plain, 0)
        with pytest.raises(ValueError, match="outside"):
            s.attach(ctx, 2)
    with llama.Sampler(model, temperature=0.8, top_k=40) as native:  # the one-pass chain
        with pytest.raises(ValueError, match="llama.cpp's chain"):
            native.attach(ctx, 0)
    with llama.Sampler(model, native=False, temperature=0.0, grammar='root ::= "a"') as g:
        with pytest.raises(ValueError, match="grammar"):
            g.attach(ctx, 0)
    a = llama.Sampler(model, native=False, temperature=0.0)
    b = llama.Sampler(model, native=False, temperature=0.0)
    assert a.attach(ctx, 0) is True and a.attached
    assert ctx.n_graph_samplers == 1
    with pytest.raises(ValueError, match="attached already"):
        b.attach(ctx, 0)
    a.close()  # takes the chain back: the sequence is free again
    assert ctx.n_graph_samplers == 0 and not a.attached
    assert b.attach(ctx, 0)
    with pytest.raises(ValueError, match="attached before"):
        b.attach(ctx, 1)
    b.close()
    assert ctx.n_graph_samplers == 0


@pytest.mark.parametrize("opts", [
    dict(temperature=0.0),
    dict(temperature=0.0, repeat_penalty=1.3, repeat_last_n=64),
    dict(temperature=0.0, repeat_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.4),
], ids=["greedy", "repeat-penalty", "all-penalties"])
def test_graph_greedy_equals_the_cpu_chain(llama, model, make_ctx, opts):
    """Greedy picks are the same whichever side samples, the penalties
    included: the graph's stages compute what the CPU's compute."""
    cpu_ctx = make_ctx(n_seq_max=len(PROMPTS))
    cpu = [llama.Sampler(model, **opts) for _ in PROMPTS]
    want = _generate(llama, model, cpu_ctx, cpu, PROMPTS, 24)
    ctx = make_ctx(n_seq_max=len(PROMPTS), graph_sampling=True)
    graph = [llama.Sampler(model, native=False, **opts) for _ in PROMPTS]
    for seq, s in enumerate(graph):
        assert s.attach(ctx, seq)
    got = _generate(llama, model, ctx, graph, PROMPTS, 24)
    assert got == want
    for s in cpu + graph:
        s.close()
    assert ctx.n_graph_samplers == 0


@pytest.fixture(scope="module")
def context_pair(llama, model):
    """A plain context and a graph-sampling one, reused across examples
    (cleared before each) so that the property test spends its time on
    decodes rather than on context set-up."""
    cpu_ctx = llama.Context(model, n_ctx=512, n_seq_max=2, n_threads=2)
    ctx = llama.Context(model, n_ctx=512, n_seq_max=2, n_threads=2, graph_sampling=True)
    yield cpu_ctx, ctx
    cpu_ctx.close()
    ctx.close()


@settings(max_examples=20, deadline=None, derandomize=True)
@given(repeat=st.sampled_from([1.0, 1.05, 1.3, 2.0]), last_n=st.sampled_from([-1, 0, 8, 64]),
       freq=st.sampled_from([0.0, 0.3, 1.5]), presence=st.sampled_from([0.0, -0.5, 0.8]),
       bias=st.lists(st.tuples(st.integers(0, 49151), st.sampled_from([-5.0, 3.0, -1e6])), max_size=4))
def test_graph_greedy_matches_the_native_chain_for_any_penalties(llama, model, context_pair, repeat, last_n,
                                                                  freq, presence, bias):
    """Two implementations of the penalties and the bias -- the native
    chain on the CPU and llama.cpp's graph stages -- pick the same greedy
    tokens.  (Derandomized: the examples are the same in every run.)"""
    window = 512 if last_n < 0 else last_n
    opts = dict(temperature=0.0, repeat_penalty=repeat, repeat_last_n=window, frequency_penalty=freq,
                presence_penalty=presence, logit_bias=dict(bias) or None)
    prompts = PROMPTS[:2]
    cpu_ctx, ctx = context_pair
    cpu_ctx.clear()
    ctx.clear()
    cpu = [llama.Sampler(model, **opts) for _ in prompts]
    graph = [llama.Sampler(model, native=False, **opts) for _ in prompts]
    try:
        for seq, s in enumerate(graph):
            assert s.attach(ctx, seq)
        assert _generate(llama, model, ctx, graph, prompts, 8) == \
            _generate(llama, model, cpu_ctx, cpu, prompts, 8)
    finally:
        for s in cpu + graph:
            s.close()
    assert ctx.n_graph_samplers == 0


def test_graph_draws_are_seeded_and_follow_the_bias(llama, model, make_ctx):
    opts = dict(temperature=0.8, top_k=40, top_p=0.9, repeat_penalty=1.1)
    runs = []
    for _ in range(2):
        ctx = make_ctx(n_seq_max=len(PROMPTS), graph_sampling=True)
        samplers = [llama.Sampler(model, native=False, seed=100 + i, **opts) for i in range(len(PROMPTS))]
        for seq, s in enumerate(samplers):
            s.attach(ctx, seq)
        runs.append(_generate(llama, model, ctx, samplers, PROMPTS, 16))
        for s in samplers:
            s.close()
        ctx.close()
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) == len(PROMPTS)  # four prompts, four seeds: four texts
    # A bias of +100 on one token makes it every pick of a sampled chain.
    target = model.tokenize(" banana")[0]
    ctx = make_ctx(n_seq_max=2, graph_sampling=True)
    s = llama.Sampler(model, native=False, seed=5, logit_bias=[(target, 100.0)], **opts)
    s.attach(ctx, 0)
    got = _generate(llama, model, ctx, [s], PROMPTS[:1], 6)
    assert got == [[target] * 7]
    s.close()


def test_graph_rows_beside_cpu_rows_in_one_step(llama, model, make_ctx):
    """A step whose rows are sampled partly in the graph and partly on the
    CPU: the CPU rows still read their logits (llama.cpp copies them for a
    batch with any sequence that lacks a graph sampler)."""
    ctx = make_ctx(n_seq_max=4, graph_sampling=True)
    ref_ctx = make_ctx(n_seq_max=4)
    ref = _generate(llama, model, ref_ctx, [llama.Sampler(model, temperature=0.0) for _ in PROMPTS],
                    PROMPTS, 12)
    samplers = []
    for seq in range(4):
        if seq % 2:
            s = llama.Sampler(model, native=False, temperature=0.0)
            assert s.attach(ctx, seq)
        else:
            s = llama.Sampler(model, temperature=0.0, repeat_penalty=1.0)  # native argmax on the CPU
        samplers.append(s)
    assert _generate(llama, model, ctx, samplers, PROMPTS, 12) == ref


@pytest.fixture(scope="module")
def graph_engine(default_model_path):
    e = Engine(EngineConfig(default_model_path, n_ctx=4096, parallel=4, n_threads=2,
                            backend_sampling=True))
    yield e
    e.close()


def test_engine_greedy_text_matches_the_native_engine(graph_engine, default_model_path):
    greedy = dict(temperature=0.0, num_predict=24)
    got = [graph_engine.complete(p, **greedy)[0] for p in PROMPTS[:2]]
    with Engine(EngineConfig(default_model_path, n_ctx=4096, parallel=4, n_threads=2)) as native:
        want = [native.complete(p, **greedy)[0] for p in PROMPTS[:2]]
    assert got == want
    assert graph_engine.ctx.n_graph_samplers == 0  # every request's chain was taken back


def test_engine_mixes_graph_and_cpu_requests(graph_engine):
    """Default options, a JSON schema, log-probabilities and a custom
    sampler order at once, plus more requests than slots: the first runs in
    the graph, the others on the CPU, and every one completes."""
    results: dict[int, tuple] = {}
    errors = []
    requests = [
        dict(num_predict=32),                                           # defaults: in the graph
        dict(num_predict=32, seed=3),
        dict(num_predict=24, json_schema={"type": "object", "properties": {"a": {"type": "integer"}},
                                          "required": ["a"]}),
        dict(num_predict=8, logprobs=True, top_logprobs=3),
        dict(num_predict=16, samplers=["top_k", "temperature"]),
        dict(num_predict=16, temperature=0.0, repeat_penalty=1.2),       # greedy with penalties: graph
        dict(num_predict=0),
        dict(num_predict=16, speculative=True, temperature=0.0),
        dict(num_predict=8, min_p=1.0),                                 # CPU: the graph's min-p drops all
    ]

    def run(i, opts):
        try:
            handle = graph_engine.submit(CompletionRequest(
                prompt=PROMPTS[i % len(PROMPTS)] + " " * (i % 3),
                options=CompletionOptions.from_dict(opts)))
            events = list(handle)
            text = "".join(e.text for e in events if isinstance(e, Chunk))
            results[i] = (text, events[-1], [lp for e in events if isinstance(e, Chunk)
                                             for lp in (e.logprobs or [])])
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append((i, exc))

    threads = [threading.Thread(target=run, args=(i, o)) for i, o in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(results) == len(requests)
    for i, (text, final, _) in results.items():
        assert isinstance(final, Final)
        assert final.done_reason in ("length", "stop"), (i, final)
    obj = json.loads(results[2][0])
    assert isinstance(obj["a"], int)
    assert len(results[3][2]) == results[3][1].eval_count > 0
    assert results[6][1].eval_count == 0
    greedy, _ = graph_engine.complete(PROMPTS[8 % len(PROMPTS)] + " " * (8 % 3), num_predict=8,
                                      temperature=0.0)
    assert results[8][0] == greedy  # min-p 1 keeps the best token only
    assert graph_engine.ctx.n_graph_samplers == 0


def test_engine_cancel_and_reuse_of_slots(graph_engine):
    """Cancelled streams give their chains back; the slots serve graph
    requests again afterwards."""
    handles = [graph_engine.submit(CompletionRequest(
        prompt=p, options=CompletionOptions.from_dict(dict(num_predict=400)))) for p in PROMPTS]
    for h in handles:  # each stream under way: its chain is in the graph
        assert isinstance(next(iter(h)), Chunk)
    assert graph_engine.ctx.n_graph_samplers == len(PROMPTS)
    for h in handles:
        h.cancel()
    for h in handles:
        _, final = h.result()
        assert final.done_reason in ("cancelled", "length", "stop")
    assert graph_engine.ctx.n_graph_samplers == 0
    text, final = graph_engine.complete(PROMPTS[0], num_predict=8, seed=1)
    assert final.eval_count == 8


def test_runner_process_with_backend_sampling(spawn):
    """The load field through the process: default options from several
    asyncio streams, an empty prompt and odd Unicode; the runner answers
    health afterwards."""
    import asyncio

    runner = spawn(backend_sampling=True, parallel=3, n_ctx=1536)
    runner.wait_ready()

    async def main():
        streams = [runner.acomplete(p, num_predict=12) for p in ["", *PROMPTS]]
        return await asyncio.gather(*(s.text() for s in streams), return_exceptions=True)

    empty, *done = asyncio.run(main())
    assert isinstance(empty, BadRequest)  # refused alone; the others run
    assert all(final.done_reason in ("length", "stop") for _, final in done), done  # a draw may end it
    assert runner.health().state == "ready"


def test_requests_choose_where_they_sample(graph_engine, default_model_path):
    """The completion option: false keeps a request on the CPU under a load
    that samples in the graph, true puts one in the graph under a load that
    does not (greedy text is the same either way), and nil takes the load's."""
    def first_chunk(engine, **opts):
        handle = engine.submit(CompletionRequest(prompt=PROMPTS[1], options=CompletionOptions.from_dict(
            dict(num_predict=400, **opts))))
        assert isinstance(next(iter(handle)), Chunk)
        return handle

    def settle(*handles):
        for h in handles:
            h.cancel()
            assert h.result()[1].done_reason in ("cancelled", "length", "stop")

    cpu = first_chunk(graph_engine, backend_sampling=False)
    assert graph_engine.ctx.n_graph_samplers == 0
    load_default = first_chunk(graph_engine)
    assert graph_engine.ctx.n_graph_samplers == 1
    settle(cpu, load_default)

    plain = Engine(EngineConfig(default_model_path, n_ctx=1024, parallel=2, n_threads=2))
    try:
        h = first_chunk(plain)
        assert plain.ctx.n_graph_samplers == 0
        g = first_chunk(plain, backend_sampling=True)
        assert plain.ctx.n_graph_samplers == 1
        settle(h, g)
        assert plain.ctx.n_graph_samplers == 0
        texts = [plain.complete(PROMPTS[2], num_predict=16, temperature=0.0, repeat_penalty=1.3,
                                backend_sampling=choice)[0] for choice in (None, True, False)]
        assert texts[0] == texts[1] == texts[2] != ""
    finally:
        plain.close()
    with pytest.raises(BadRequest, match="backend_sampling"):
        CompletionOptions.from_dict({"backend_sampling": "yes"})
