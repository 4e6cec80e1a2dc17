"""Speculative decoding by prompt lookup.

Without a model: the lookup (runner.engine.speculative) proposes what followed the
longest earlier match, and the scheduler places proposals only in the room a
step has left (over the recording fake KV of tests/test_slots.py), trims them
on rollback, and cuts rejected ones from the slot.  With the default model:
greedy and seeded output is token-identical with speculation on and off, and
stop strings, num_predict and end of generation inside an accepted run end the
request exactly where they would without it."""

from __future__ import annotations

import pytest

from runner.engine.speculative import NgramLookup, next_cap, wait_after

from test_scheduler import make, run_decode, seq, shape


# -- the lookup ------------------------------------------------------------------


@pytest.mark.parametrize("history, n_max, want", [
    # the last 4 tokens (2 3 4 5) occurred at 1..4: propose what followed,
    # at most n_max tokens and at most the 4 tokens of matched context
    ([1, 2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 5], 3, [6, 7, 8]),
    ([1, 2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 5], 8, [6, 7, 8, 2]),
    # the match extends back past the 4-gram: 6 tokens of context (8 1 2 3 4 5)
    # propose 6 tokens
    ([8, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 8, 1, 2, 3, 4, 5], 16,
     [10, 11, 12, 13, 14, 15]),
    # a 3-token match proposes at most 3
    ([1, 2, 3, 10, 11, 12, 13, 14, 9, 1, 2, 3], 8, [10, 11, 12]),
    # the longest suffix wins over a more recent shorter one: "2 3 4" occurs
    # after 9 too, but "1 2 3 4" only at the start
    ([1, 2, 3, 4, 10, 11, 12, 9, 2, 3, 4, 13, 1, 2, 3, 4], 2, [10, 11]),
    # the most recent earlier occurrence of the same length wins
    ([5, 6, 7, 1, 5, 6, 7, 2, 5, 6, 7], 4, [2, 5, 6]),
    # one or two tokens of matched context propose nothing
    ([5, 6, 1, 5, 6], 4, []),
    ([7, 9, 7], 4, []),
    # nothing occurred before: no proposal
    ([1, 2, 3], 4, []),
    # the continuation stops at the end of the history (overlapping repeats)
    ([7, 7, 7, 7], 4, [7]),
    # a media row (anything not an int) is never matched, nor proposed ...
    ([1, ("img", 0), 2, 9, 1, ("img", 0), 2], 4, []),
    ([1, 2, 3, 4, ("img", 0), 1, 2, 3], 4, [4]),
    ([1, 2, 3, ("img", 0), 1, 2, 3], 4, []),
    # ... and ends a match: 4 tokens of context here, not 6
    ([5, ("img", 0), 1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 5, ("img", 0), 1, 2, 3, 4], 8, [9, 9, 9, 9]),
])
def test_lookup_proposes_as_much_of_the_earlier_continuation_as_the_match_is_long(history, n_max,
                                                                                  want):
    assert NgramLookup.build(history).propose(n_max) == want


def test_a_copy_in_progress_proposes_longer_runs():
    # The answer copies the prompt: each accepted run lengthens the match,
    # so the next proposal may be as long as everything copied so far.
    prompt = list(range(100, 160))
    look = NgramLookup.build(prompt + [100, 101, 102])
    sizes = []
    while (copied := len(look.history) - len(prompt)) < 40:
        draft = look.propose(16)
        sizes.append(len(draft))
        assert draft == prompt[copied:copied + len(draft)]
        look.extend(prompt[copied:copied + len(draft) + 1])  # all accepted, and the next token
    assert sizes == [3, 7, 15, 16]


def test_lookup_extends_incrementally_like_a_rebuild():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7]
    grown = NgramLookup.build(tokens[:5])
    grown.sync(tokens[5:12])
    grown.sync(tokens[5:])
    whole = NgramLookup.build(tokens)
    assert grown.history == whole.history and grown.index == whole.index


@pytest.mark.parametrize("cap, proposed, accepted, want", [
    (4, 4, 4, 8),      # all accepted: twice as many next
    (8, 3, 3, 16),     # a short proposal (room, history) all accepted: the cap still grows
    (64, 64, 64, 64),  # at most MAX_DRAFT
    (8, 8, 2, 3),      # two accepted: three next
    (8, 3, 0, 1),
    (8, 0, 0, 8),      # nothing proposed: unchanged
])
def test_the_proposal_cap_adapts_to_acceptance(cap, proposed, accepted, want):
    assert next_cap(cap, proposed, accepted) == want


@pytest.mark.parametrize("misses, want", [(0, 0), (1, 1), (2, 3), (3, 7), (4, 15), (5, 16), (60, 16)])
def test_rejected_proposals_back_off(misses, want):
    assert wait_after(misses) == want


# -- the scheduler -----------------------------------------------------------------


def _generating(sched, kv, rid, prompt, next_token, **options):
    """A sequence admitted, its prompt decoded, ``next_token`` sampled."""
    return _all_generating(sched, kv, [(rid, prompt, next_token, options)])[0]


def _all_generating(sched, kv, specs):
    """Sequences admitted together, their prompts decoded, each with a token sampled."""
    made = [seq(rid, prompt, speculative=True, **options) for rid, prompt, _, options in specs]
    sched.waiting.extend(made)
    sched.admit(lambda: True)
    while any(s.prefilling for s in made):
        run_decode(sched, sched.schedule(), kv)
    for s, (_, _, token, _) in zip(made, specs):
        s.generated.append(token)
        s.next_token = token
    return made


def _decode_with_drafts(sched, plan, kv, n_decoded=None):
    """run_decode for plans whose generating entries carry proposals."""
    n = plan.n_inputs() if n_decoded is None else n_decoded
    done = 0
    for e in plan.entries:
        items = ([e.seq.next_token, *e.draft] if e.generating
                 else e.seq.inputs[e.start:e.start + e.n_inputs])
        cells = kv.kv.setdefault(e.seq.slot.id, {})
        for i, item in enumerate(items[:max(0, n - done)]):
            cells[e.start + i] = item
        done += len(items)
    sched.update(plan, n)


def test_proposals_follow_the_generating_token_and_are_recorded():
    sched, cache, kv = make(parallel=1, n_batch=16)
    a = _generating(sched, kv, "a", [1, 2, 3, 4, 5, 6, 1, 2], 3)
    plan = sched.schedule()
    # "1 2 3" occurred at the start: its 3 tokens of context propose 3
    assert shape(plan) == [("a", 8, 4, True, True)]
    assert plan.entries[0].draft == [4, 5, 6]
    _decode_with_drafts(sched, plan, kv)
    assert a.slot.inputs == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]
    # the target accepted two proposals: the rest leave the slot and the KV
    sched.keep_accepted(plan.entries[0], 2)
    assert a.slot.inputs == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5]
    assert kv.calls[-1] == ("rm", a.slot.id, 11, -1)
    assert sorted(kv.kv[a.slot.id]) == list(range(11))


def test_speculation_yields_to_other_work():
    # draft_room 16: two generating tokens and a 4-input prompt chunk (6
    # inputs, under half of it) leave 10, shared by the two
    sched, cache, kv = make(parallel=3, n_batch=16, prefill_budget=4)
    a, b = _all_generating(sched, kv, [
        ("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4], 5, {"draft_max": 8}),
        ("b", [11, 12, 13, 14, 15, 16, 17, 18, 19, 11, 12, 13, 14], 15, {"draft_max": 8})])
    c = seq("c", range(100, 120))
    sched.waiting.append(c)
    sched.admit(lambda: True)
    plan = sched.schedule()
    drafts = {e.seq.id: e.draft for e in plan.entries if e.generating}
    assert drafts == {"a": [6, 7, 8, 9, 1], "b": [16, 17, 18, 19, 11]}
    assert plan.n_inputs() == 16
    assert shape(plan)[-1] == ("c", 0, 4, False, False)
    # 6 inputs of other work are half of draft_room 12: no proposals at all
    sched.draft_room = 12
    plan2 = sched.schedule()
    assert all(not e.draft for e in plan2.entries) and plan2.n_inputs() == 6
    # under half of 13: the 7 left are shared
    sched.draft_room = 13
    plan3 = sched.schedule()
    assert sorted(len(e.draft) for e in plan3.entries if e.generating) == [3, 4]
    assert plan3.n_inputs() == 13


def test_eight_generating_streams_verify_no_proposals():
    # at the default draft_room 16, 8 generating tokens make a step that is
    # compute-bound on a CPU already: nobody proposes; with 7, each does
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4]
    for n, want in ((8, 0), (7, 9)):
        sched, cache, kv = make(parallel=n, n_batch=64)
        _all_generating(sched, kv, [(str(i), prompt, 5, {}) for i in range(n)])
        plan = sched.schedule()
        assert sched.draft_room == 16
        assert sum(len(e.draft) for e in plan.entries) == want


def test_a_sequence_backing_off_proposes_nothing_for_its_wait():
    sched, cache, kv = make(parallel=1, n_batch=16)
    a = _generating(sched, kv, "a", [1, 2, 3, 4, 5, 6, 1, 2], 3)
    a.draft_wait = 2
    for left in (1, 0):
        plan = sched.schedule()
        assert shape(plan) == [("a", 8, 1, True, True)] and a.draft_wait == left
    assert sched.schedule().entries[0].draft == [4, 5, 6]


def test_the_cap_bounds_a_draft_model_not_prompt_lookup():
    sched, cache, kv = make(parallel=1, n_batch=16)
    a = _generating(sched, kv, "a", [1, 2, 3, 4, 5, 6, 1, 2], 3)
    a.draft_cap = 1  # after a proposal with nothing accepted (next_cap)
    assert sched.schedule().entries[0].draft == [4, 5, 6]
    sched.draft_model = True
    e = sched.schedule().entries[0]
    assert (e.draft_limit, e.draft, e.n_inputs) == (1, [], 1)  # the drafter fills draft


def test_proposals_respect_num_predict_and_the_slot():
    sched, cache, kv = make(parallel=1, n_batch=32, slot_ctx=12)
    a = _generating(sched, kv, "a", [1, 2, 3, 4, 5, 6, 1, 2], 3, draft_max=16)
    a.lookup = None
    plan = sched.schedule()
    # slot_ctx 12 holds 8 inputs: the token and at most 3 proposals
    assert plan.entries[0].n_inputs == 4
    sched2, _, kv2 = make(parallel=1, n_batch=32)
    b = _generating(sched2, kv2, "b", [1, 2, 3, 4, 5, 6, 1, 2], 3)
    b.n_predict = 3  # as Engine.submit sets it from num_predict
    plan = sched2.schedule()
    # 1 token generated, 2 to go: one proposal verifies both
    assert plan.entries[0].draft == [4]


def test_a_halved_batch_cuts_proposals_and_keeps_the_decoded_rows():
    sched, cache, kv = make(parallel=1, n_batch=16)
    a = _generating(sched, kv, "a", [1, 2, 3, 4, 5, 6, 1, 2], 3)
    plan = sched.schedule()
    _decode_with_drafts(sched, plan, kv, n_decoded=2)
    e = plan.entries[0]
    assert (e.n_inputs, e.draft, e.wants_output) == (2, [4], True)
    assert a.slot.inputs == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4]


# -- on the default model ------------------------------------------------------------

GREEDY = dict(temperature=0.0, repeat_penalty=1.0)
RECORD = ('{"id": 7, "name": "Ada Lovelace", "born": 1815, "fields": ["mathematics", '
          '"computing"], "city": "London"}')
# Repeats its input: the answer copies the record, so lookup proposals are accepted.
# The answer copies the record and ends (end of generation) well inside 80 tokens.
REWRITE = ("<|im_start|>user\nRewrite this JSON with the key \"city\" renamed to \"town\". Reply "
           "with the JSON only.\n{\"name\": \"Alice Smith\", \"age\": 31, \"email\": "
           "\"alice@example.com\", \"city\": \"Paris\", \"tags\": [\"admin\", \"editor\"]}"
           "<|im_end|>\n<|im_start|>assistant\n")
COPY = (f"<|im_start|>user\nRepeat this JSON record exactly, with nothing else:\n{RECORD}"
        f"<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def engine(default_model_path):
    from runner.engine.core import Engine, EngineConfig

    e = Engine(EngineConfig(default_model_path, n_ctx=3072, parallel=3, n_threads=2))
    yield e
    e.close()


def _run(engine, prompt, **options):
    from runner.engine.requests import Chunk, CompletionOptions, CompletionRequest

    events = list(engine.submit(CompletionRequest(prompt=prompt,
                                                  options=CompletionOptions.from_dict(options))))
    chunks = [e for e in events if isinstance(e, Chunk)]
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.tokens], events[-1]


def _pair(engine, prompt, **options):
    """The same request without and with speculation, after a run that puts
    the prompt in a slot, so both find the same cached prefix (a prompt
    evaluated in one batch and one found cached can differ in the last bits
    of its logits)."""
    _run(engine, prompt, **{**options, "num_predict": 1})
    off = _run(engine, prompt, **options)
    on = _run(engine, prompt, speculative=True, **options)
    return off, on


def _check_slot(engine, prompt_tokens, tokens, final):
    """The slot holds exactly what was decoded: the prompt and the returned
    tokens (the last one, never decoded, may be missing), no rejected proposal."""
    held = engine.slots.slots[final.slot].inputs
    whole = prompt_tokens + tokens
    assert held == whole[:len(held)] and len(held) >= len(whole) - 1
    assert engine.ctx.seq_pos_max(final.slot) == len(held) - 1


def test_greedy_output_is_identical_and_proposals_are_accepted(engine):
    (t0, k0, f0), (t1, k1, f1) = _pair(engine, COPY, num_predict=40, **GREEDY)
    assert k1 == k0 and t1 == t0 and f1.done_reason == f0.done_reason
    assert f0.draft_proposed == f0.draft_accepted == 0
    assert 0 < f1.draft_accepted <= f1.draft_proposed
    assert f1.eval_count == f0.eval_count == len(k0)
    _check_slot(engine, engine.tokenize(COPY, add_special=True, parse_special=True), k1, f1)


def test_seeded_sampling_with_default_options_is_identical(engine):
    # Default options (temperature 0.8, top-k 40, top-p 0.9, repeat penalty
    # 1.1): each returned token is the sampler's draw given the tokens before
    # it, so a seed gives the same text either way.  Sampled answers copy
    # the record less often: with seed 1234 the answer is prose (no
    # proposals), with seed 2 it copies part of the record (proposals).
    proposed = accepted = 0
    for seed in (1234, 2):
        (t0, k0, f0), (t1, k1, f1) = _pair(engine, COPY, num_predict=40, seed=seed)
        assert k1 == k0 and t1 == t0
        proposed += f1.draft_proposed
        accepted += f1.draft_accepted
    assert 0 < accepted <= proposed


@pytest.mark.parametrize("num_predict", [1, 2, 5, 13])
def test_num_predict_inside_an_accepted_run(engine, num_predict):
    (t0, k0, f0), (t1, k1, f1) = _pair(engine, COPY, num_predict=num_predict, **GREEDY)
    assert k1 == k0 and len(k1) == num_predict == f1.eval_count
    assert f1.done_reason == f0.done_reason == "length"


def test_end_of_generation_and_stop_string_inside_an_accepted_run(engine):
    # The answer copies most of the record and ends with an end-of-generation
    # token well inside the limit.
    (t0, k0, f0), (t1, k1, f1) = _pair(engine, REWRITE, num_predict=80, **GREEDY)
    assert f0.done_reason == f1.done_reason == "stop" and f0.eval_count < 80
    assert k1 == k0 and t1 == t0 and f1.draft_accepted > 0
    _check_slot(engine, engine.tokenize(REWRITE, add_special=True, parse_special=True), k1, f1)
    # A stop string inside the copied text ends both at the same place.
    assert "Smith" in t0
    (s0, _, g0), (s1, _, g1) = _pair(engine, REWRITE, num_predict=80, stop=["Smith"], **GREEDY)
    assert s1 == s0 == t0[:t0.index("Smith")]
    assert g1.done_reason == g0.done_reason == "stop"


def test_several_speculating_streams_at_once(engine):
    import threading

    prompts = [COPY, COPY.replace("Ada Lovelace", "Alan Turing"), COPY.replace("London", "Zürich 🚀")]
    results = [None] * 3

    def one(i):
        results[i] = _run(engine, prompts[i], num_predict=30, speculative=True, draft_max=8,
                          **GREEDY)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for prompt, (text, tokens, final) in zip(prompts, results):
        assert final.done_reason in ("length", "stop") and final.eval_count == len(tokens) > 0
        assert final.draft_accepted <= final.draft_proposed
        assert text == engine.detokenize(tokens)
        _check_slot(engine, engine.tokenize(prompt, add_special=True, parse_special=True),
                    tokens, final)


# -- a draft model -------------------------------------------------------------------


def test_a_draft_model_proposes_and_output_is_identical(default_model_path):
    from runner.engine.core import Engine, EngineConfig

    # The model as its own draft: greedy proposals are what the model picks.
    with Engine(EngineConfig(default_model_path, n_ctx=1024, parallel=2, n_threads=2,
                             draft_model=default_model_path)) as e:
        (t0, k0, f0), (t1, k1, f1) = _pair(e, REWRITE, num_predict=40, **GREEDY)
        assert k1 == k0 and t1 == t0 and f1.done_reason == f0.done_reason
        assert f1.draft_proposed > 0 and f1.draft_accepted >= f1.draft_proposed * 0.8
        _check_slot(e, e.tokenize(REWRITE, add_special=True, parse_special=True), k1, f1)
        # requests without the option do not speculate
        assert f0.draft_proposed == 0


def test_a_tiny_draft_model_with_the_default_vocabulary(default_model_path, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from tiny_model import write_tiny_llama

    from runner.engine.core import Engine, EngineConfig

    tiny = str(write_tiny_llama(tmp_path / "draft.gguf"))
    with Engine(EngineConfig(default_model_path, n_ctx=1024, parallel=2, n_threads=2,
                             draft_model=tiny)) as e:
        (t0, k0, f0), (t1, k1, f1) = _pair(e, REWRITE, num_predict=24, seed=5)
        assert k1 == k0 and t1 == t0
        assert f1.draft_proposed > 0 and 0 <= f1.draft_accepted <= f1.draft_proposed


def test_a_draft_model_with_another_vocabulary_is_refused(default_model_path, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from tiny_model import write_tiny_llama

    from runner.engine.core import Engine, EngineConfig
    from runner.engine.requests import BadRequest
    from runner.model.gguf import read_gguf

    tokens = list(read_gguf(default_model_path).fields["tokenizer.ggml.tokens"].value)
    tokens[1000] = "zzzz-not-in-the-model"
    other = str(write_tiny_llama(tmp_path / "other.gguf", n_layer=1,
                                 tokenizer_replace={"tokenizer.ggml.tokens": tokens}))
    with pytest.raises(BadRequest, match="token 1000 is '\\(\\)' in the model and "
                                         "'zzzz-not-in-the-model' in the draft"):
        Engine(EngineConfig(default_model_path, n_ctx=512, n_threads=2, draft_model=other))
    with pytest.raises(BadRequest):
        Engine(EngineConfig(default_model_path, n_ctx=512, n_threads=2,
                            draft_model=str(tmp_path / "missing.gguf")))
