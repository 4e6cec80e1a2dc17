"""Native runs of generation steps (_llama.decode_steps, ext/sampler.pxi)
against the same steps taken one decode and one sample_batch at a time, on
the default model."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.model

PROMPTS = ["The quick brown fox", "ünïcödé 🐉 数据", "1, 2, 3, 4,"]


def prefilled(llama, model, make_ctx, n_seqs):
    """A context with each prompt decoded as its own sequence; per sequence
    its next position and the first token sampled greedily."""
    ctx = make_ctx(n_ctx=2048, n_seq_max=4, kv_unified=True)
    batch = llama.Batch(256)
    rows, positions = [], []
    for s in range(n_seqs):
        tokens = model.tokenize(PROMPTS[s % len(PROMPTS)] + f" {s}", add_special=True)
        rows.append(batch.add_tokens(tokens, 0, s, output_last=True))
        positions.append(len(tokens))
    ctx.decode(batch)
    first = [llama.argmax(ctx.logits(r)) for r in rows]
    batch.close()
    return ctx, positions, first


def samplers(llama, model, n_seqs):
    """Greedy, the default chain with penalties, greedy with penalties, seeded."""
    out = []
    for s in range(n_seqs):
        if s % 3 == 0:
            out.append(llama.Sampler(model, temperature=0.0))
        elif s % 3 == 1:
            out.append(llama.Sampler(model, temperature=0.8, top_k=40, top_p=0.9,
                                     repeat_penalty=1.1, seed=40 + s))
        else:
            out.append(llama.Sampler(model, temperature=0.0, repeat_penalty=1.3))
    return out


def one_at_a_time(llama, model, ctx, positions, first, steps, eog_stops):
    """The same steps with ctx.decode and sample_batch, stopping as
    decode_steps does (after the step where some sequence ends)."""
    n = len(first)
    ss = samplers(llama, model, n)
    batch = llama.Batch(64)
    cur, pos = list(first), list(positions)
    out = [[] for _ in range(n)]
    for _ in range(steps):
        batch.clear()
        for i in range(n):
            batch.add(cur[i], pos[i], i, True)
        ctx.decode(batch)
        toks = llama.sample_batch(ctx, ss, list(range(n)))
        ended = False
        for i, t in enumerate(toks):
            out[i].append(t)
            ended |= eog_stops and model.is_eog(t)
            cur[i], pos[i] = t, pos[i] + 1
        if ended:
            break
    for s in ss:
        s.close()
    batch.close()
    return out


@pytest.mark.parametrize("n_seqs", [1, 3])
def test_a_native_run_equals_the_steps_one_at_a_time(llama, model, make_ctx, n_seqs):
    steps = 24
    ctx, positions, first = prefilled(llama, model, make_ctx, n_seqs)
    expected = one_at_a_time(llama, model, ctx, positions, first, steps, eog_stops=False)
    ctx, positions, first = prefilled(llama, model, make_ctx, n_seqs)
    ss = samplers(llama, model, n_seqs)
    batch = llama.Batch(64)
    got, rc = llama.decode_steps(ctx, batch, ss, list(range(n_seqs)), positions, first,
                                 [1000] * n_seqs, [False] * n_seqs, steps)
    assert rc == 0
    assert got == expected
    assert all(len(run) == steps for run in got)
    # and the KV memory holds what was decoded: the next step goes on from there
    pos = [p + steps for p in positions]
    more, _ = llama.decode_steps(ctx, batch, ss, list(range(n_seqs)), pos, [r[-1] for r in got],
                                 [1000] * n_seqs, [False] * n_seqs, 1)
    assert all(len(r) == 1 for r in more)
    for s in ss:
        s.close()
    batch.close()


def test_a_run_stops_at_a_budget_and_at_an_interrupt(llama, model, make_ctx):
    ctx, positions, first = prefilled(llama, model, make_ctx, 2)
    ss = [llama.Sampler(model, temperature=0.0) for _ in range(2)]
    batch = llama.Batch(8)
    got, rc = llama.decode_steps(ctx, batch, ss, [0, 1], positions, first, [50, 5], [False, False], 40)
    assert rc == 0 and [len(r) for r in got] == [5, 5]  # the second sequence's 5th token ends the run
    stop = llama.StepInterrupt()
    stop.set()
    assert stop.is_set()
    pos = [p + 5 for p in positions]
    again, rc = llama.decode_steps(ctx, batch, ss, [0, 1], pos, [r[-1] for r in got], [50, 50],
                                   [False, False], 40, stop)
    assert rc == 0 and [len(r) for r in again] == [1, 1]  # the step in progress is finished
    stop.clear()
    assert not stop.is_set()
    for s in ss:
        s.close()
    batch.close()


CHAT = "<|im_start|>user\nSay yes or no: is the sky blue?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("stop_on_eog", [True, False])
def test_a_run_stops_after_an_end_of_generation_only_when_asked(llama, model, make_ctx, stop_on_eog):
    """The default (instruct) model answers this chat turn in a word and an
    end token: the run ends at that step when the sequence's stop flag is
    set, and goes on past it to the budget when it is clear (ignore_eos)."""
    ctx = make_ctx(n_ctx=512)
    tokens = model.tokenize(CHAT, add_special=True, parse_special=True)
    batch = llama.Batch(128)
    batch.add_tokens(tokens, 0, 0, output_last=True)
    ctx.decode(batch)
    first = llama.argmax(ctx.logits(len(tokens) - 1))
    s = llama.Sampler(model, temperature=0.0)
    got, rc = llama.decode_steps(ctx, batch, [s], [0], [len(tokens)], [first], [40], [stop_on_eog], 40)
    run = got[0]
    assert rc == 0
    ends = [i for i, t in enumerate(run) if model.is_eog(t)]
    assert ends, "the model no longer ends this turn within 40 tokens"
    if stop_on_eog:
        assert ends == [len(run) - 1] and len(run) < 40
    else:
        assert len(run) == 40
    s.close()
    batch.close()


def test_bad_calls_are_refused_before_any_decode(llama, model, make_ctx):
    ctx, positions, first = prefilled(llama, model, make_ctx, 2)
    batch = llama.Batch(8)
    greedy = llama.Sampler(model, temperature=0.0)
    other = llama.Sampler(model, temperature=0.0)
    chain = llama.Sampler(model, temperature=0.8, top_k=40, seed=1, native=False)

    def call(ss, ids=(0, 1), positions=positions, tokens=first, budgets=(5, 5), steps=4, b=batch):
        return llama.decode_steps(ctx, b, list(ss), list(ids), list(positions), list(tokens),
                                  list(budgets), [True] * len(ids), steps)

    with pytest.raises(ValueError, match="native"):
        call([greedy, chain])
    with pytest.raises(ValueError, match="twice"):
        call([greedy, greedy])
    with pytest.raises(ValueError, match="differ in length"):
        call([greedy], ids=(0, 1))
    with pytest.raises(ValueError, match="vocabulary"):
        call([greedy, other], tokens=(first[0], model.n_vocab))
    with pytest.raises(ValueError, match="sequence id"):
        call([greedy, other], ids=(0, 99))
    with pytest.raises(ValueError, match="max_steps"):
        call([greedy, other], steps=0)
    with pytest.raises(ValueError, match="budgets"):
        call([greedy, other], budgets=(5, 0))
    with pytest.raises(ValueError, match="batch"):
        call([greedy, other], b=llama.Batch(1))
    closed = llama.Sampler(model, temperature=0.0)
    closed.close()
    with pytest.raises(llama.ClosedError):
        call([greedy, closed])
    for s in (greedy, other, chain):
        s.close()
    batch.close()


@pytest.mark.parametrize("grammar", ['root ::= [^\\x00]*', 'root ::= "zq" [a-z]*'])
def test_a_grammar_rides_a_native_run(llama, model, make_ctx, grammar):
    """A sampler with a grammar in a native run: each pick the grammar takes
    goes on as in steps one at a time (sample_batch with defer); the first
    pick it rejects ends the run as DEFERRED, and resolve() then gives the
    token the one-at-a-time path gives."""
    def pair():
        return [llama.Sampler(model, temperature=0.0, repeat_penalty=1.1),
                llama.Sampler(model, temperature=0.8, top_k=40, top_p=0.9, repeat_penalty=1.1, seed=5,
                              grammar=grammar)]

    ctx, positions, first = prefilled(llama, model, make_ctx, 2)
    ss = pair()
    assert not ss[1].native and ss[1].native_chain
    batch = llama.Batch(64)
    sampled, rc = llama.decode_steps(ctx, batch, ss, [0, 1], positions, first, [8, 8], [True, True], 8)
    batch.close()
    assert rc == 0

    ctx, positions, first = prefilled(llama, model, make_ctx, 2)
    ref_ss = pair()
    batch = llama.Batch(64)
    cur, pos, ref = list(first), list(positions), [[], []]
    for _ in range(8):
        batch.clear()
        for i in range(2):
            batch.add(cur[i], pos[i], i, True)
        ctx.decode(batch)
        toks = llama.sample_batch(ctx, ref_ss, [0, 1], 1, True)
        for i, t in enumerate(toks):
            ref[i].append(t)
        if any(t is llama.DEFERRED or model.is_eog(t) for t in toks):
            break
        cur = toks
        pos = [p + 1 for p in pos]
    batch.close()
    assert sampled == ref
    if sampled[1][-1] is llama.DEFERRED:
        assert grammar.startswith('root ::= "zq"') and ss[1].pending and len(sampled[1]) == 1
        token = ss[1].resolve()
        assert token == ref_ss[1].resolve()
        assert model.token_to_piece(token).decode() in ("z", "zq")
    else:
        assert len(sampled[1]) == 8 or model.is_eog(sampled[1][-1])
