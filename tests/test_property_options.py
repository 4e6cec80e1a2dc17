"""Option-space property test (issue 15): any completion request, beside others.

Every completion option is drawn across its whole range and type -- valid
values (extremes included) and invalid ones (wrong types, out of range, NaN,
unknown names) -- together with text and token prompts (empty, too long,
invalid ids), grammars and JSON schemas (valid, malformed, unsatisfiable,
deep) and media.  One to three such requests run through one real runner
process (parallel 4, 128-token slots) next to a greedy reference stream.

Invariants, for every example:

* the runner process never dies and keeps answering;
* every request gets exactly one terminal reply (no duplicates, no strays);
* a refused request gets one ``error`` whose message names a field that is
  wrong (an option's name, ``prompt``, ``options``, ``media``, ``grammar``,
  ``json_schema``); a request with nothing wrong is never refused;
* an accepted one streams chunks then a ``final`` that honours num_predict,
  and carries logprobs exactly when asked;
* the reference stream's greedy output equals a solo run of it.

Counts: ``tests/fuzzconfig.py`` (``RUNNER_FUZZ_SCALE`` for longer runs).
Examples that once broke an invariant are kept below as ``@example``s.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runner.engine.grammar import JSON_GBNF
from runner.engine.requests import (_NUMBERS, INT32_MAX, MAX_STOP_CHARS, MAX_STOP_STRINGS, BadRequest,
                             CompletionOptions)
from fuzzconfig import examples
from wire import RawClient

INT64_MIN, UINT64_MAX = -2**63, 2**64 - 1

# -- option values ------------------------------------------------------------------

# Text without lone surrogates (they are not UTF-8, so no msgpack str holds one).
unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
odd_text = st.one_of(
    unicode_text,
    st.sampled_from(["\x00", "\n\n", "<|im_end|>", "</s>", "🙂", "🇫🇷", "e\u0301", "\u200b",
                     "\ufeff", "\U0010fffd", " ", "\r\n", "\\u0000", "[img-0]", "<__media__>"]),
)
wrong_type = st.one_of(st.just("1"), st.just([1]), st.just({"a": 1}), st.binary(max_size=4),
                       st.booleans())


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers across [lo, hi], boundaries and small values favoured."""
    return st.one_of(st.sampled_from([lo, hi]), st.integers(lo, min(hi, lo + 16)),
                     st.integers(lo, hi))


def floats(lo: float, hi: float, *, lo_open: bool = False) -> st.SearchStrategy[float]:
    """Finite floats (and integers, which count as floats) across [lo, hi]."""
    return st.one_of(
        st.floats(lo, hi, exclude_min=lo_open, allow_nan=False, allow_infinity=False),
        st.sampled_from([v for v in (lo, hi, 1.0, 0.5, 1e-45, 1e-30, 1e30)
                         if lo <= v <= hi and not (lo_open and v == lo)]),
        st.integers(math.ceil(lo) + (1 if lo_open and float(math.ceil(lo)) == lo else 0),
                    min(math.floor(hi), 2**63 - 1)),
    )


def bad_ints(lo: int, hi: int) -> st.SearchStrategy[Any]:
    outside = [st.integers(hi + 1, UINT64_MAX)] if hi < UINT64_MAX else []
    if lo > INT64_MIN:
        outside.append(st.integers(INT64_MIN, lo - 1))
    return st.one_of(*outside, st.floats(allow_nan=True), wrong_type)


def bad_floats(lo: float, hi: float, *, lo_open: bool = False) -> st.SearchStrategy[Any]:
    outside = [st.sampled_from([math.nan, math.inf, -math.inf]),
               st.floats(min_value=hi, exclude_min=True), st.floats(max_value=lo, exclude_max=not lo_open),
               st.just("0.5"), st.just([0.5]), st.booleans()]
    if hi < 2**64:
        outside.append(st.integers(math.floor(hi) + 1, UINT64_MAX))
    return st.one_of(*outside)


GRAMMARS = {
    "valid": ['root ::= "yes" | "no"', "root ::= [a-z]+", 'root ::= "a" root | "b"',
              'root ::= "Faces: 😀😃" [0-9]*', JSON_GBNF, 'root ::= ( "x" ){2,5}', ""],
    "malformed": ["root ::= (", "root ::= undefined-rule", 'other ::= "x"', "root ::= [",
                  'root ::= "unterminated', "::=", "root ::= x{3,1}"],
    "unsatisfiable": ["root ::= [z-a]", 'root ::= [^\\x00-\\U0010FFFF]'],
}
SCHEMAS = {
    "valid": [{}, {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
              {"type": "string", "maxLength": 5}, {"enum": ["x", "y", 3, None]},
              {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}, {"const": "ok"},
              {"anyOf": [{"type": "null"}, {"type": "number"}]}],
    "unsupported": [{"type": "string", "pattern": "a+"}, {"not": {}}, {"type": "spaceship"},
                    {"$ref": "#/$defs/missing"}, {"type": "object", "properties": []},
                    {"enum": []}, {"minItems": -1, "type": "array"}],
}


def deep_parens(n: int) -> str:
    return "root ::= " + "(" * n + '"a"' + ")" * n


def ref_chain(n: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def nested_schema(n: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(n):
        schema = {"type": "array", "items": schema}
    return schema


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False)
    | unicode_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(unicode_text, inner, max_size=4),
    max_leaves=12)
random_schemas = st.dictionaries(
    st.sampled_from(["type", "properties", "items", "enum", "const", "anyOf", "oneOf", "allOf",
                     "required", "additionalProperties", "minItems", "maxItems", "minLength",
                     "maxLength", "$ref", "$defs", "format"]) | unicode_text,
    json_values, max_size=4)


@dataclasses.dataclass(frozen=True)
class Field:
    """How to draw one option: values the runner must accept, values it must refuse."""

    valid: st.SearchStrategy     # accepted (None = the default, always accepted)
    invalid: st.SearchStrategy   # refused with a message naming the option


def number_field(name: str) -> Field:
    """Values across the option's whole range (runner.engine.requests._NUMBERS), and outside it."""
    spec = _NUMBERS[name]
    if spec.kind is int:
        return Field(ints(spec.lo, spec.hi), bad_ints(spec.lo, spec.hi))
    valid = floats(spec.lo, spec.hi, lo_open=spec.lo_open)
    invalid = bad_floats(spec.lo, spec.hi, lo_open=spec.lo_open)
    if spec.least:  # the gap between lo and least (temperature)
        valid = valid.filter(lambda v: not spec.lo < v < spec.least)
        invalid = st.one_of(invalid, st.floats(spec.lo, spec.least, exclude_min=True, exclude_max=True))
    return Field(valid, invalid)


FIELDS: dict[str, Field] = {
    **{name: number_field(name) for name in _NUMBERS},
    "num_predict": Field(st.one_of(st.integers(0, 12), st.just(-1), st.integers(13, INT32_MAX)),
                         bad_ints(-1, INT32_MAX)),
    "stop": Field(st.one_of(st.lists(odd_text.filter(lambda s: 0 < len(s) <= MAX_STOP_CHARS), max_size=4),
                            odd_text.filter(lambda s: 0 < len(s) <= MAX_STOP_CHARS)),
                  st.one_of(st.just(""), st.just(["a", ""]), st.just(["x"] * (MAX_STOP_STRINGS + 1)),
                            st.just(["y" * (MAX_STOP_CHARS + 1)]), st.just(5), st.just([1]),
                            st.just({"a": "b"}))),
    "grammar": Field(st.sampled_from(GRAMMARS["valid"]),
                     st.one_of(st.integers(INT64_MIN, UINT64_MAX), st.just(["root ::= [a]"]), st.just({}), st.booleans())),
    "json_schema": Field(st.sampled_from(SCHEMAS["valid"]),
                         st.one_of(st.integers(INT64_MIN, UINT64_MAX), st.just([]), st.just("string"), st.booleans(),
                                   st.just(nested_schema(70)), st.just({"a": math.nan}))),
    "logprobs": Field(st.booleans(), st.one_of(st.integers(0, 1), st.just("yes"))),
    "truncate": Field(st.booleans(), st.one_of(st.integers(0, 1), st.none().map(lambda _: "no"))),
    "shift": Field(st.booleans(), st.one_of(st.integers(0, 1), st.just("true"))),
    "ignore_eos": Field(st.booleans(), st.one_of(st.integers(0, 1), st.just([]))),
    "speculative": Field(st.booleans(), st.one_of(st.integers(0, 1), st.just("on"))),
    "backend_sampling": Field(st.booleans(), st.one_of(st.integers(0, 1), st.just("graph"), st.just([]))),
    # This runner loads no adapter: only the empty list is valid; any id is refused.
    "lora": Field(st.just([]), st.one_of(
        st.lists(st.fixed_dictionaries({"id": st.integers(-2, 3), "scale": st.floats(-2, 2)}),
                 min_size=1, max_size=3),
        st.just({"id": 0}), st.just([{"id": "0"}]), st.just([{"id": 0, "scale": math.inf}]),
        st.just([{"id": 0, "x": 1}]), st.just("0:1"))),
    "dry_sequence_breakers": Field(
        st.lists(odd_text.filter(lambda s: 0 < len(s) <= MAX_STOP_CHARS and "\x00" not in s),
                 min_size=1, max_size=4),
        st.one_of(st.just([]), st.just([""]), st.just("\n"), st.just([1]), st.just(["a\x00"]),
                  st.just(["b"] * 65))),
    "logit_bias": Field(
        st.one_of(
            st.dictionaries(st.integers(0, 49151).map(str),
                            st.one_of(floats(-100.0, 100.0), st.just(False)), max_size=4),
            st.lists(st.tuples(st.one_of(st.integers(0, 49151), odd_text.filter(bool).map(lambda s: s[:20])),
                               st.one_of(floats(-1e6, 1e6), st.just(False))).map(list), max_size=4)),
        st.one_of(st.just(5), st.just("x"), st.just({"1": True}), st.just({"1": "2"}),
                  st.just([[1, 2, 3]]), st.just([[-1, 1.0]]), st.just({"1": math.nan}),
                  st.just({"1": 1e9}), st.just([[1.5, 0.0]]))),
    "samplers": Field(
        st.one_of(st.lists(st.sampled_from(["penalties", "dry", "top_n_sigma", "top-k", "TOPK", "typ_p",
                                            "nucleus", "min_p", "xtc", "temp", "temperature", "infill",
                                            "adaptive_p"]), max_size=10),
                  st.text(alphabet="edskypmxtia", max_size=12)),
        st.one_of(st.just(["top_k", "nope"]), st.just("kq"), st.just(3), st.just([None]),
                  st.just(["t"] * 40))),
}
UNKNOWN_NAMES = ["Temperature", "no_such_option", "format", "num_ctx", "", "stop "]

# Grammar and schema texts whose outcome depends on llama.cpp / the converter:
# accepted, or refused naming the field, either is fine -- never anything else.
CONTENT_GRAMMARS = st.one_of(
    st.sampled_from(GRAMMARS["malformed"] + GRAMMARS["unsatisfiable"]),
    unicode_text.map(lambda s: "root ::= " + s), unicode_text,
    st.integers(1, 20_000).map(deep_parens))
CONTENT_SCHEMAS = st.one_of(st.sampled_from(SCHEMAS["unsupported"]), random_schemas,
                            st.integers(100, 3000).map(ref_chain))


@dataclasses.dataclass(frozen=True)
class Case:
    """One completion request and what was put wrong in it on purpose."""

    prompt: Any                           # text, token ids, or a wrong type
    options: Any                          # the options map as sent (or a wrong type)
    bad_options: frozenset = frozenset()  # option names given a refused value
    content: frozenset = frozenset()      # "grammar"/"json_schema" with a text of unknown fate
    add_special: bool = True              # the request's add_special
    media: tuple = ()                     # media items sent (this runner has no projector)

    def message(self, request_id: int) -> dict:
        msg = {"op": "completion", "id": request_id, "prompt": self.prompt,
               "options": self.options, "add_special": self.add_special}
        if self.media:
            msg["media"] = [{"id": i, "data": data} for i, data in enumerate(self.media)]
        return msg


@st.composite
def option_maps(draw, clean: bool | None = None) -> tuple[dict, frozenset, frozenset]:
    """An options map; the names given invalid values; the content-dependent
    fields.  ``clean``: no invalid value (None: drawn)."""
    if clean is None:
        clean = draw(st.booleans())
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=7))
    options: dict = {}
    bad: set[str] = set()
    content: set[str] = set()
    for name in names:
        kind = draw(st.sampled_from(["valid"] * 6 + ["default"] + ([] if clean else ["invalid"] * 2)
                                    + (["content"] * 2 if name in ("grammar", "json_schema") else [])))
        if kind == "valid":
            options[name] = draw(FIELDS[name].valid)
        elif kind == "default":
            options[name] = None
        elif kind == "content":
            options[name] = draw(CONTENT_GRAMMARS if name == "grammar" else CONTENT_SCHEMAS)
            content.add(name)
        else:
            options[name] = draw(FIELDS[name].invalid)
            bad.add(name)
    if not clean and draw(st.integers(0, 7)) == 0:
        name = draw(st.sampled_from(UNKNOWN_NAMES))
        options[name] = draw(st.integers(0, 3))
        bad.add(name)
    if options.get("grammar") and options.get("json_schema") is not None:
        bad |= {"grammar", "json_schema"}  # both given: refused whatever their values
    return options, frozenset(bad), frozenset(content)


good_prompts = st.one_of(
    st.sampled_from(["Hello", "The capital of France is", "Count: 1, 2, 3,", "<|im_start|>user\nHi"]),
    odd_text.filter(bool).map(lambda s: s[:80]),
    st.integers(20, 90).map(lambda n: "word " * n),                   # near or past the slot
    st.lists(st.integers(0, 49151), min_size=1, max_size=24),         # token ids
    st.lists(st.integers(0, 49151), min_size=100, max_size=200),      # too long unless truncate
)
bad_prompts = st.one_of(
    st.lists(st.integers(0, INT32_MAX), min_size=1, max_size=4),      # ids past the vocabulary
    st.sampled_from(["", []]),
    st.lists(st.integers(INT64_MIN, UINT64_MAX), min_size=1, max_size=3),  # outside TokenId
    st.sampled_from([None, 42, {"text": "x"}, [1.5], ["a"], [True]]),  # not a prompt
)


@st.composite
def cases(draw) -> Case:
    clean = draw(st.booleans())
    options, bad, content = draw(option_maps(clean))
    if clean:
        return Case(prompt=draw(good_prompts), options=options, content=content,
                    add_special=draw(st.booleans()))
    if draw(st.integers(0, 24)) == 0:
        options, bad = draw(st.sampled_from([5, "temperature=0", [1, 2]])), frozenset({"options"})
    media = tuple(draw(st.lists(st.binary(min_size=0, max_size=16), max_size=2))) \
        if draw(st.integers(0, 12)) == 0 else ()
    return Case(prompt=draw(st.one_of(good_prompts, bad_prompts)), options=options,
                bad_options=bad, content=content,
                add_special=draw(st.booleans()), media=media)


# -- policy only: validation never raises anything but a named BadRequest --------------

# Refused only by a runner: a well-formed ``lora`` list names adapters, and
# whether they are loaded is known at submission (runner.engine.lora), not
# to CompletionOptions.validate.
CHECKED_AT_SUBMIT = frozenset({"lora"})


@settings(max_examples=examples(400), deadline=None)
@given(option_maps())
def test_options_validate_or_name_the_bad_field(drawn):
    options, bad, content = drawn
    try:
        CompletionOptions.from_dict(options)
    except BadRequest as exc:
        assert bad or content, f"valid options refused: {exc}"
        assert any(name in str(exc) for name in bad | content), \
            f"{exc} names none of {sorted(bad | content)}"
    else:
        assert not bad - CHECKED_AT_SUBMIT, f"accepted options with bad {sorted(bad)}: {options!r:.300}"


# -- through a real runner -----------------------------------------------------------

REF_PROMPT = "Once upon a time, in a small village by the sea,"
REF_OPTIONS = {"temperature": 0.0, "num_predict": 16, "ignore_eos": True}
MAX_CHUNKS = 1000      # more chunks than this from one request: it does not end
UNBOUNDED_AFTER = 12   # requests asking for more tokens than this are cancelled once
                       # the reference ends (num_predict -1 or large, which would
                       # otherwise run until shift ends them: never)


class Session:
    """The runner under test, respawned if an example kills it, and tallies."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        self.runner = None
        self.client: RawClient | None = None
        self.ids = itertools.count(1)
        self.tally = {"requests": 0, "accepted": 0, "refused": 0, "crashes": 0, "hangs": 0,
                      "lost": 0}  # totals over the run (docs/reliability.md)
        self.start()

    def start(self) -> None:
        from runner.process.client import Runner

        self.runner = Runner.spawn(self.model_path, n_ctx=512, parallel=4, n_threads=2)
        self.client = RawClient(self.runner.endpoint, hang_s=120)
        info = self.runner.info()
        self.n_vocab = info.engine["model"]["n_vocab"]
        self.slot_ctx = info.engine["slot_ctx"]
        if not hasattr(self, "reference"):
            self.reference = self.complete_alone(REF_PROMPT, REF_OPTIONS)

    def alive(self) -> bool:
        return self.runner.process.poll() is None

    def ensure(self) -> None:
        """A fresh runner when the last example killed this one."""
        if not self.alive():
            self.close()
            self.start()

    def complete_alone(self, prompt: Any, options: dict) -> tuple[str, dict]:
        rid = next(self.ids)
        self.client.send({"op": "completion", "id": rid, "prompt": prompt, "options": options})
        self.client.settle()
        replies = self.client.ledger.closed[("other", rid)]
        return "".join(r["text"] for r in replies[:-1]), replies[-1]

    def tokens(self, text: str, add_special: bool) -> list[int]:
        reply = self.client.ask({"op": "tokenize", "id": next(self.ids), "text": text,
                                 "add_special": add_special, "parse_special": True})
        assert reply["type"] == "tokenize", reply
        return reply["tokens"]

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.runner is not None:
            self.runner.close(timeout=5)


@pytest.fixture(scope="module")
def session(default_model_path):
    s = Session(default_model_path)
    yield s
    s.close()
    report = os.environ.get("RUNNER_FUZZ_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"suite": "property_options", **s.tally}) + "\n")


def _is_token_list(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(type(t) is int for t in prompt)


def problems(case: Case, s: Session) -> tuple[list[tuple[str, tuple[str, ...]]], bool]:
    """What the runner may refuse ``case`` for: (code, fragments one of which the
    message holds) -- and whether it must refuse (False: may also accept)."""
    must: list[tuple[str, tuple[str, ...]]] = []
    prompt = case.prompt
    if not (isinstance(prompt, str) or _is_token_list(prompt)) or (
            _is_token_list(prompt) and not all(0 <= t <= INT32_MAX for t in prompt)):
        must.append(("bad_request", ("prompt",)))
    if case.bad_options:
        must.append(("bad_request", tuple(case.bad_options)))
    if case.media:
        must.append(("bad_request", ("media",)))
    options = case.options if isinstance(case.options, dict) else {}
    truncate = options.get("truncate") is True
    if isinstance(prompt, str) and not case.media:
        n = len(s.tokens(prompt, case.add_special))
    elif _is_token_list(prompt):
        n = len(prompt)
        if not all(0 <= t < s.n_vocab for t in prompt):
            must.append(("bad_request", ("prompt",)))
    else:
        n = 1
    if n == 0:
        must.append(("bad_request", ("prompt",)))
    if n >= s.slot_ctx and not truncate:
        must.append(("input_too_long", ("prompt",)))
    may = [("bad_request", (name,)) for name in case.content]
    return must + may, bool(must)


def num_predict(case: Case) -> int:
    value = case.options.get("num_predict") if isinstance(case.options, dict) else None
    return value if type(value) is int else -1  # an invalid one: refused, treated as unbounded


def check_accepted(case: Case, replies: list[dict], allowed: list) -> None:
    *chunks, final = replies
    assert final["type"] == "final", final
    assert all(r["type"] == "chunk" for r in chunks), [r["type"] for r in chunks]
    if final["done_reason"] == "error":  # only a grammar that can produce nothing may do this
        assert final["error_code"] == "bad_request" and case.content, final
        assert any(name in final["error"] for name in case.content), final
        return
    assert final["done_reason"] in ("stop", "length", "cancelled"), final
    n = num_predict(case)
    if 0 <= n <= UNBOUNDED_AFTER:
        assert final["eval_count"] <= n, final
    if n == 0:
        assert not chunks, chunks
    options = case.options
    want = options.get("logprobs") is True or (options.get("top_logprobs") or 0) > 0
    for chunk in chunks:
        if want:
            assert len(chunk["logprobs"]) == len(chunk["tokens"]), chunk
            top = options.get("top_logprobs") or 0
            assert all(len(e.get("top", [])) == top for e in chunk["logprobs"]), chunk
        else:
            assert "logprobs" not in chunk, chunk


def check_refused(case: Case, reply: dict, allowed: list) -> None:
    assert reply["type"] == "error", reply
    fits = [fragments for code, fragments in allowed if code == reply["code"]]
    assert fits, f"refused with {reply['code']}, expected one of {allowed}: {reply['message']}"
    assert any(f in reply["message"] for fragments in fits for f in fragments), \
        f"{reply['message']!r} names none of {fits}"


def run_beside_reference(s: Session, batch: list[Case]) -> None:
    s.ensure()
    # A fresh connection per example: requests left running by an example
    # that failed are cancelled by the runner when it finds their client gone.
    s.client.close()
    s.client = client = RawClient(s.runner.endpoint, hang_s=120)
    expected = [problems(case, s) for case in batch]  # before anything is in flight
    ref = next(s.ids)
    client.send({"op": "completion", "id": ref, "prompt": REF_PROMPT, "options": REF_OPTIONS})
    ids = []
    for case in batch:
        ids.append(next(s.ids))
        client.send(case.message(ids[-1]))
    s.tally["requests"] += len(batch)
    unbounded = {("other", rid) for rid, case in zip(ids, batch)
                 if not 0 <= num_predict(case) <= UNBOUNDED_AFTER}

    def on_reply(reply: dict) -> None:
        replies = client.ledger.open.get(("other", reply.get("id")))
        if replies is not None and len(replies) > MAX_CHUNKS:
            raise AssertionError(f"request {reply['id']} sent {len(replies)} chunks and goes on")
        if reply.get("id") == ref and reply["type"] != "chunk":
            for key in unbounded & set(client.ledger.open):
                client.send({"op": "cancel", "id": next(s.ids), "target": key[1]})

    try:
        client.settle(on_reply)
    except AssertionError:
        if s.alive():
            s.tally["hangs"] += 1
            raise
    if not s.alive():
        s.tally["crashes"] += 1
        s.runner.close(timeout=1)
        raise AssertionError(f"the runner died (status {s.runner.process.returncode}): "
                             f"{s.runner._stderr.error_line(wait=1.0) if s.runner._stderr else ''}")
    assert client.ledger.strays == [], client.ledger.strays

    ref_replies = client.ledger.closed[("other", ref)]
    text = "".join(r["text"] for r in ref_replies[:-1])
    assert ref_replies[-1]["type"] == "final", ref_replies[-1]
    assert ref_replies[-1]["eval_count"] == REF_OPTIONS["num_predict"], ref_replies[-1]
    assert text == s.reference[0], "the reference stream's greedy output changed beside these requests"
    for case, rid, (allowed, must_refuse) in zip(batch, ids, expected):
        replies = client.ledger.closed[("other", rid)]
        if replies[-1]["type"] == "error":
            assert len(replies) == 1, replies
            s.tally["refused"] += 1
            check_refused(case, replies[0], allowed)
        else:
            s.tally["accepted"] += 1
            assert not must_refuse, f"accepted although {allowed}: {case!r:.400}"
            check_accepted(case, replies, allowed)
    assert s.client.ask({"op": "health", "id": next(s.ids)})["state"] == "ready"


@pytest.mark.model
@settings(max_examples=examples(15), deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(cases(), min_size=1, max_size=3))
# Found by this test or the probe of issue 15; each once broke an invariant.
@example(batch=[  # JSON mode with the default repeat_penalty: SIGABRT in llama.cpp's grammar
    Case(prompt="Give JSON:", options={"json_schema": {"type": "object"}, "temperature": 0,
                                       "num_predict": 8})])
@example(batch=[  # a grammar that can match nothing: SIGABRT / ggml abort
    Case(prompt="Hi", options={"grammar": "root ::= [z-a]", "num_predict": 4},
         content=frozenset({"grammar"}))])
@example(batch=[  # grammar + ignore_eos: end tokens with no text, forever
    Case(prompt="Yes or no?", options={"grammar": 'root ::= "yes" | "no"', "ignore_eos": True})])
@example(batch=[  # a float32 temperature of ~0: inf - inf in the softmax, an internal error
    Case(prompt="word " * 75, options={"temperature": 1e-45, "grammar": "root ::= [a-z]+",
                                       "truncate": True}, bad_options=frozenset({"temperature"}))])
@example(batch=[  # a double that is 0 as float32: the sampler's own error, not the option's
    Case(prompt="Hello", options={"repeat_penalty": 5e-324},
         bad_options=frozenset({"repeat_penalty"}))])
@example(batch=[  # llama.cpp zeroes the whole penalty window up front: 8 GiB
    Case(prompt="Hello", options={"repeat_last_n": INT32_MAX, "num_predict": 2})])
@example(batch=[  # 20,000 nested groups overflowed the grammar parser's stack: SIGSEGV
    Case(prompt="Hi", options={"grammar": deep_parens(20_000), "num_predict": 2},
         content=frozenset({"grammar"}))])
@example(batch=[  # a $ref chain deeper than Python's recursion limit: an internal error
    Case(prompt="Hi", options={"json_schema": ref_chain(3000), "num_predict": 2},
         content=frozenset({"json_schema"}))])
def test_any_requests_beside_a_greedy_stream(session, batch):
    run_beside_reference(session, batch)


def _doc_rows() -> dict[str, list[str]]:
    """The options table of docs/protocol.md: name -> [type, accepted, default]."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    table = text.split("| option | type | accepted | default |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_protocol_doc_lists_every_option_with_its_range_and_default():
    from runner.engine.requests import _num

    rows = _doc_rows()
    fields = {f.name: f for f in dataclasses.fields(CompletionOptions)}
    assert list(rows) == list(fields)
    defaults = CompletionOptions()
    for name, (_, accepted, default) in rows.items():
        value = getattr(defaults, name)
        shown = {None: "nil", True: "true", False: "false"}.get(value, value) \
            if not isinstance(value, (list, int, float)) or isinstance(value, bool) else value
        assert default == str(shown), name
        spec = _NUMBERS.get(name)
        if spec is not None:
            low = "(" if spec.lo_open else "["
            assert accepted.startswith(f"{low}{_num(spec.lo)}, {_num(spec.hi)}]"), name
