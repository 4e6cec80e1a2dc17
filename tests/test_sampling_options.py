"""Every sampler stage of llama.cpp per request (issue 19): the options'
validation, the chain built from them (runner/engine/sampling.py), and what each
stage does to real output on the default model.

The policy part needs no model: option tables, the stage list built for each
combination, and which requests stay on the native chain.  The model part
runs an in-process engine with several requests in flight at once and checks
effects that cannot come out by chance: a banned token never appears, a
top-1 cut in any order is greedy, a seed repeats its text, DRY breaks a loop
that greedy decoding repeats.
"""

from __future__ import annotations

import math
import re

import pytest

from runner.engine.requests import (DEFAULT_SAMPLERS, BadRequest, CompletionOptions, CompletionRequest,
                             Chunk, Final, grammar_problem, logit_bias_pairs, sampler_order)
from runner.engine.sampling import prompt_tokens_to_accept, sampler_stages

# -- validation ---------------------------------------------------------------------


def opts(**kw) -> CompletionOptions:
    return CompletionOptions.from_dict(kw)


@pytest.mark.parametrize("name,value,fragment", [
    ("mirostat", 3, "within [0, 2]"),
    ("mirostat", 1.0, "must be an integer"),
    ("mirostat_tau", -1.0, "within [0.0"),
    ("mirostat_eta", 1.5, "within [0.0, 1.0]"),
    ("dry_multiplier", -0.1, "within [0.0"),
    ("dry_base", 0.5, "within [1.0"),
    ("dry_allowed_length", -1, "within [0"),
    ("dry_penalty_last_n", -2, "within [-1"),
    ("xtc_probability", 1.01, "within [0.0, 1.0]"),
    ("xtc_threshold", math.nan, "finite"),
    ("top_n_sigma", math.inf, "finite"),
    ("adaptive_target", 1.5, "1.0]"),
    ("adaptive_decay", 0.995, "0.99]"),
    ("dynatemp_range", -1.0, "within [0.0"),
    ("min_keep", -1, "within [0"),
    ("min_keep", True, "must be an integer"),
    ("dry_sequence_breakers", [], "non-empty list"),
    ("dry_sequence_breakers", "\n", "non-empty list"),
    ("dry_sequence_breakers", ["a", ""], "item 1"),
    ("dry_sequence_breakers", ["a\x00b"], "without NUL"),
    ("dry_sequence_breakers", ["x"] * 65, "at most 64"),
    ("dry_sequence_breakers", ["y" * 1025], "at most 1024"),
    ("samplers", ["top_k", "bogus"], "item 1: unknown stage"),
    ("samplers", "kpz", "unknown stage code 'z'"),
    ("samplers", 5, "must be a list"),
    ("samplers", ["top_k"] * 33, "at most 32"),
    ("samplers", [1], "unknown stage 1"),
    ("logit_bias", 5, "must be a map"),
    ("logit_bias", [[1, 2, 3]], "item 0 must be a [token, bias] pair"),
    ("logit_bias", [[1]], "item 0"),
    ("logit_bias", {"15": True}, "must be a number or false"),
    ("logit_bias", {"15": "x"}, "must be a number or false"),
    ("logit_bias", {"15": math.nan}, "must be false or within"),
    ("logit_bias", {"15": 1e7}, "must be false or within"),
    ("logit_bias", [[-1, 1.0]], "not a token id"),
    ("logit_bias", [[2**31, 1.0]], "not a token id"),
    ("logit_bias", [["", 1.0]], "must not be empty"),
    ("logit_bias", [[1.5, 1.0]], "must be an id or a text"),
    ("logit_bias", {str(i): 1.0 for i in range(4097)}, "at most 4096"),
])
def test_bad_values_name_the_option(name, value, fragment):
    with pytest.raises(BadRequest) as info:
        opts(**{name: value})
    message = str(info.value)
    assert message.startswith(f"invalid option {name}: ") and fragment in message, message


def test_defaults_are_llama_server_s_for_the_added_stages():
    o = CompletionOptions()
    assert (o.mirostat, o.mirostat_tau, o.mirostat_eta) == (0, 5.0, 0.1)
    assert (o.dry_multiplier, o.dry_base, o.dry_allowed_length, o.dry_penalty_last_n) == (0.0, 1.75, 2, 64)
    assert o.dry_sequence_breakers == ["\n", ":", '"', "*"]
    assert (o.xtc_probability, o.xtc_threshold, o.top_n_sigma) == (0.0, 0.1, -1.0)
    assert (o.adaptive_target, o.adaptive_decay, o.min_keep) == (-1.0, 0.9, 0)
    assert o.samplers is None and o.logit_bias is None
    assert CompletionOptions().dry_sequence_breakers is not o.dry_sequence_breakers


@pytest.mark.parametrize("value,pairs", [
    ({"15": -5, "Hello": False}, [(15, -5.0), ("Hello", -math.inf)]),
    ({15: 2.5}, [(15, 2.5)]),                              # msgpack can send integer keys
    ([[15, 1], ["Hi", False], ["0", 3]], [(15, 1.0), ("Hi", -math.inf), (0, 3.0)]),
    ({"٣": 1.0}, [("٣", 1.0)]),                            # non-ASCII digits are text
    ({"-5": 1.0}, [("-5", 1.0)]),                          # not an id: a text
    ([], []), ({}, []),
])
def test_logit_bias_shapes(value, pairs):
    assert logit_bias_pairs(value) == pairs
    opts(logit_bias=value)


@pytest.mark.parametrize("value,names", [
    (["top_k", "temperature"], ("top_k", "temperature")),
    (["Top-K", "topk", "TEMP", "nucleus", "typ", "min-p", "top_n_sigma", "XTC", "dry"],
     ("top_k", "top_k", "temperature", "top_p", "typ_p", "min_p", "top_n_sigma", "xtc", "dry")),
    ("edskypmxt", DEFAULT_SAMPLERS),
    ("kta", ("top_k", "temperature", "adaptive_p")),
    ("", ()), ([], ()),
])
def test_sampler_order_spellings(value, names):
    assert sampler_order(value) == names


def test_grammar_problems_are_found_outside_literals():
    assert grammar_problem('root ::= "a"{3,1}') == "repetition {3,1} has a maximum below its minimum"
    assert grammar_problem('root ::= x{ 2 , 1 }\nx ::= "x"').startswith("repetition { 2 , 1 }")
    assert grammar_problem('root ::= "{3,1}" [{2,1}] # {5,1}\n') is None
    assert grammar_problem('root ::= "a"{1,3} "b"{2,} "c"{4}') is None
    with pytest.raises(BadRequest, match="invalid option grammar: repetition"):
        opts(grammar='root ::= "a"{2,1}')


# -- the chain built --------------------------------------------------------------------

SLOT = 512


def stages(**kw):
    return sampler_stages(opts(**kw), SLOT, [])


def test_default_order_with_every_stage_on():
    got = stages(dry_multiplier=0.8, top_n_sigma=1.5, typical_p=0.9, min_p=0.05, xtc_probability=0.5,
                 dynatemp_range=0.2, min_keep=3, repeat_last_n=-1, dry_penalty_last_n=-1)
    assert got == [
        ("penalties", SLOT, 1.1, 0.0, 0.0),
        ("dry", 0.8, 1.75, 2, SLOT, ["\n", ":", '"', "*"]),
        ("top_n_sigma", 1.5), ("top_k", 40), ("typical", 0.9, 3), ("top_p", 0.9, 3),
        ("min_p", 0.05, 3), ("xtc", 0.5, 0.1, 3), ("temp", 0.8, 0.2, 1.0), ("dist",)]


@pytest.mark.parametrize("kw,expected", [
    # Stages turned off by their options are left out.
    (dict(repeat_penalty=1.0, top_k=0, top_p=1.0), [("temp", 0.8, 0.0, 1.0), ("dist",)]),
    (dict(xtc_probability=0.9, xtc_threshold=0.6, repeat_penalty=1.0, top_k=0, top_p=1.0),
     [("temp", 0.8, 0.0, 1.0), ("dist",)]),
    # Greedy: the temperature stage keeps one token, greedy picks it.
    (dict(temperature=0.0, repeat_penalty=1.0), [("top_k", 40), ("top_p", 0.9, 0), ("temp", 0.0, 0.0, 1.0),
                                                 ("greedy",)]),
    # The order given, each stage as often as listed.
    (dict(samplers="tkk", repeat_penalty=1.0), [("temp", 0.8, 0.0, 1.0), ("top_k", 40), ("top_k", 40),
                                                ("dist",)]),
    (dict(samplers=["min_p", "temperature", "adaptive_p"], min_p=0.1, adaptive_target=0.4),
     [("min_p", 0.1, 0), ("temp", 0.8, 0.0, 1.0), ("adaptive_p", 0.4, 0.9)]),
    (dict(samplers=[], temperature=0.0), [("dist",)]),    # nothing listed: llama-server draws
    (dict(samplers=["infill", "temp"]), [("infill",), ("temp", 0.8, 0.0, 1.0), ("dist",)]),
    # Mirostat replaces the listed stages; the penalties window is capped at the slot.
    (dict(mirostat=1, temperature=0.7), [("temp", 0.7, 0.0, 1.0), ("mirostat", 5.0, 0.1, 100)]),
    (dict(mirostat=2, mirostat_tau=3.0, mirostat_eta=0.2, samplers="k"),
     [("temp", 0.8, 0.0, 1.0), ("mirostat_v2", 3.0, 0.2)]),
    (dict(repeat_last_n=10**6, samplers="e"), [("penalties", SLOT, 1.1, 0.0, 0.0), ("dist",)]),
    (dict(dry_multiplier=1.0, dry_penalty_last_n=0, samplers="d"), [("dist",)]),
])
def test_stage_tables(kw, expected):
    assert stages(**kw) == expected


def test_logit_bias_comes_first():
    got = sampler_stages(opts(mirostat=2), SLOT, [(5, -math.inf)])
    assert got[0] == ("logit_bias", [(5, -math.inf)]) and got[-1][0] == "mirostat_v2"


@pytest.mark.parametrize("kw,n", [
    ({}, 64),                                             # repeat_penalty 1.1 by default
    (dict(repeat_penalty=1.0), 0),
    (dict(repeat_penalty=1.0, dry_multiplier=0.5), 64),
    (dict(repeat_penalty=1.0, dry_multiplier=0.5, dry_penalty_last_n=-1), SLOT),
    (dict(repeat_last_n=8, dry_multiplier=0.5, dry_penalty_last_n=200), 200),
    (dict(repeat_last_n=-1), SLOT),
    (dict(repeat_last_n=0, presence_penalty=1.0), 0),
])
def test_prompt_tokens_the_sampler_sees(kw, n):
    assert prompt_tokens_to_accept(opts(**kw), SLOT) == n


# -- with the model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(default_model_path):
    from runner.engine.core import Engine, EngineConfig

    e = Engine(EngineConfig(default_model_path, n_ctx=2048, parallel=4, n_threads=2))
    yield e
    e.close()


def run_all(engine, jobs):
    """Submit every (prompt, options) at once; their (text, tokens, final) in order."""
    handles = [engine.submit(CompletionRequest(prompt=p, options=CompletionOptions.from_dict(o)))
               for p, o in jobs]
    out = []
    for h in handles:
        events = list(h)
        final = events[-1]
        assert isinstance(final, Final) and final.done_reason in ("stop", "length"), final
        chunks = [e for e in events if isinstance(e, Chunk)]
        out.append(("".join(c.text for c in chunks), [t for c in chunks for t in c.tokens], final))
    return out


PROMPT = "The capital of France is"
GREEDY = {"temperature": 0.0, "num_predict": 12, "repeat_penalty": 1.0}


def test_native_only_where_its_stages_suffice(model):
    from runner.engine.sampling import make_sampler

    assert make_sampler(model, opts(), SLOT).native
    assert make_sampler(model, opts(samplers="edskypmxt"), SLOT).native
    assert make_sampler(model, opts(logit_bias={"1": 1.0, "Paris": False}), SLOT).native
    for kw in (dict(mirostat=2), dict(dry_multiplier=0.5), dict(xtc_probability=0.5),
               dict(top_n_sigma=1.0), dict(samplers="kt"),
               dict(dynatemp_range=0.5), dict(min_keep=5), dict(typical_p=0.5)):
        with make_sampler(model, opts(**kw), SLOT) as s:
            assert not s.native, kw


def test_logit_bias_ids_and_texts(engine, model):
    (base, base_toks, _), = run_all(engine, [(PROMPT, GREEDY)])
    first = base_toks[0]
    word = model.token_to_piece(first).decode()
    forced = model.tokenize(" banana")[0]
    (by_id, id_toks, _), (by_text, text_toks, _), (pushed, push_toks, _) = run_all(engine, [
        (PROMPT, {**GREEDY, "logit_bias": {str(first): False}}),
        (PROMPT, {**GREEDY, "logit_bias": [[word, False]]}),
        (PROMPT, {**GREEDY, "logit_bias": [[forced, 100.0]], "num_predict": 3}),
    ])
    assert first not in id_toks and by_id != base
    assert first not in text_toks and by_text != base
    assert push_toks == [forced] * 3
    with pytest.raises(BadRequest, match=r"invalid option logit_bias: token id \d+ is outside the vocabulary"):
        engine.submit(CompletionRequest(prompt=PROMPT, options=opts(logit_bias={str(model.n_vocab): 1.0})))


def test_top_one_in_any_order_is_greedy(engine):
    # One token left by any of these, wherever it sits in the chain: the greedy text.
    (base, _, _), *rest = run_all(engine, [
        (PROMPT, GREEDY),
        (PROMPT, {**GREEDY, "temperature": 1.5, "top_k": 1, "samplers": "tk", "seed": 1}),
        (PROMPT, {**GREEDY, "temperature": 1.0, "top_n_sigma": 1e-6, "samplers": ["top_n_sigma"],
                  "seed": 2}),
        (PROMPT, {**GREEDY, "temperature": 0.0, "mirostat": 2, "seed": 3}),
        (PROMPT, {**GREEDY, "temperature": 0.0, "dry_multiplier": 0.0, "samplers": ["temperature"]}),
    ])
    assert base and all(text == base for text, _, _ in rest), [r[0] for r in rest]


def test_xtc_at_certainty_moves_off_the_top_choice(engine):
    # probability 1, threshold 0: every token above the least likely kept one
    # is removed, so the greedy pick after XTC is never the plain argmax.
    (base, base_toks, _), (xtc, xtc_toks, _) = run_all(engine, [
        (PROMPT, GREEDY),
        (PROMPT, {**GREEDY, "xtc_probability": 1.0, "xtc_threshold": 0.0, "top_k": 5, "seed": 4}),
    ])
    assert xtc_toks[0] != base_toks[0]


def test_dry_breaks_a_loop_greedy_repeats(engine):
    prompt = "one two three four " * 6 + "one two"
    job = {**GREEDY, "num_predict": 24}
    (plain, _, _), (dry, _, _) = run_all(engine, [
        (prompt, job),
        (prompt, {**job, "dry_multiplier": 4.0, "dry_allowed_length": 1, "dry_penalty_last_n": -1}),
    ])
    def most_repeated_trigram(text: str) -> int:
        words = text.split()
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        return max(grams.count(g) for g in grams)

    assert most_repeated_trigram(plain) >= 6  # "four one two" over and over, without DRY
    assert most_repeated_trigram(dry) <= 2, dry


def test_seeds_repeat_for_every_stage_family(engine):
    families = [dict(mirostat=1), dict(mirostat=2, mirostat_tau=3.0), dict(dry_multiplier=0.8),
                dict(xtc_probability=0.5), dict(top_n_sigma=2.0), dict(typical_p=0.7),
                dict(dynatemp_range=0.5), dict(samplers="mta", min_p=0.05, adaptive_target=0.3),
                dict(logit_bias={"13": -2.0}, samplers=["top_p", "temp"], top_p=0.8, temperature=1.2)]
    jobs = [(PROMPT, {**f, "seed": 1234, "num_predict": 10}) for f in families]
    first = run_all(engine, jobs)
    again = run_all(engine, jobs[::-1])[::-1]  # other batch neighbours, other slots
    for family, a, b in zip(families, first, again):
        assert a[1] == b[1], family


def test_dry_breakers_reach_llama_cpp(engine):
    # Any text works as a breaker, odd Unicode included; a lone breaker too.
    text, _, final = run_all(engine, [(PROMPT, {**GREEDY, "dry_multiplier": 1.0,
                                                "dry_sequence_breakers": ["🙂", "e\u0301", "\n\n", "x" * 100]})])[0]
    assert final.eval_count == 12 and re.search(r"\S", text)
