"""Bounds on what one request may make the runner do (docs/protocol.md, "Limits").

Each bound caps the work or memory one request can cost the runner:
tokenizing text, parsing a GBNF grammar, converting a JSON schema, sampling
under a grammar.  A request past a bound is refused before that work starts,
with ``bad_request`` (``input_too_long`` for a prompt or an embedding's text)
naming the field; nothing is cut silently.  The bounds are above what
ordinary use needs; the work they still allow runs on worker threads, off the
threads that serve the other streams, except sampling (see MAX_GRAMMAR_BYTES).
"""

from __future__ import annotations

from runner.engine.requests import BadRequest

MAX_TEXT_BYTES = 8 << 20
"""UTF-8 bytes of one text input: a completion's ``prompt``, ``tokenize``'s and
``embedding``'s ``text``."""

MAX_TOKENS = 1 << 20
"""Token ids in one list: a completion's ``prompt`` given as ids, ``detokenize``'s ``tokens``."""

MAX_GRAMMAR_BYTES = 32 << 10
"""UTF-8 bytes of a GBNF ``grammar``, given or converted from a ``json_schema``.
(llama.cpp bounds the repetitions ``{m,n}`` itself.)  Sampling under a grammar
of this size takes up to about half a second for each token that the model's
first choice does not satisfy (on a worker thread: runner.engine.executor.PickResolver)."""

MAX_GRAMMAR_CHECK_S = 5.0
"""Seconds one check of the whole vocabulary against a request's grammar, in
its first state, may take (``Sampler.grammar_check_seconds``, timed on the
worker thread before the request is queued, given up once past the bound).
That check runs whenever the model's first choice breaks the grammar, on a
worker thread (runner.engine.executor.PickResolver): the request waits for it, the
other streams do not, but the thread is held that long.  Timed on the 2-core
development VM: the largest grammar of plain alternatives MAX_GRAMMAR_BYTES
allows 1.1 s, the JSON grammar 0.01 s; a short grammar of many optional
repeats, ``root ::= ("a"? ){N} "b"``, 0.2-0.7 s at N = 50, 3-5 s at 100,
about 20 s at 200 and minutes at 1000 (the cost sits in the few tokens that
go deep, such as "aaaa").  A grammar that grows costly only after some text
is not caught here, and one whose first chunk of 4,096 tokens takes minutes
holds its worker thread that long before it is refused."""

MAX_SCHEMA_BYTES = 64 << 10
"""Bytes of a ``json_schema`` written as compact JSON."""

MAX_SCHEMA_REFS = 256
"""``$ref`` entries in one ``json_schema``: llama.cpp's converter recurses
into each one it follows, so a long chain of them could exhaust the stack of
the thread that converts it."""

MAX_SCHEMA_ALTERNATIVES = 1_000
"""Values in one ``enum``, or subschemas in one ``anyOf`` / ``oneOf``, of a
``json_schema``: each becomes an alternative the grammar sampler tracks."""


def utf8(what: str, text: str, limit: int, error: type = BadRequest) -> bytes:
    """``text`` as UTF-8, or ``error`` saying that ``what`` (the field) is over
    ``limit`` bytes (judged from the length first: a huge string is not encoded)."""
    if len(text) > limit:
        raise error(f"{what} has {len(text)} characters, over the limit of {limit} bytes")
    data = text.encode("utf-8")
    if len(data) > limit:
        raise error(f"{what} has {len(data)} bytes (UTF-8), over the limit of {limit} bytes")
    return data


def text_bytes(field: str, text: str, error: type = BadRequest) -> bytes:
    """A text input as UTF-8, within MAX_TEXT_BYTES."""
    return utf8(field, text, MAX_TEXT_BYTES, error)


def check_tokens(field: str, n: int, error: type = BadRequest) -> None:
    """A token list's length within MAX_TOKENS."""
    if n > MAX_TOKENS:
        raise error(f"{field} has {n} tokens, over the limit of {MAX_TOKENS}")


MAX_EMBED_TEXTS = 2048
"""Texts in one ``embedding`` request, documents in one ``rerank`` request
(each text is bounded by the embedding limit, min(n_batch, slot context)
tokens, and MAX_TEXT_BYTES)."""


def check_count(field: str, n: int, limit: int) -> None:
    """A list's length within ``limit`` (``bad_request`` naming the field)."""
    if n > limit:
        raise BadRequest(f"{field} has {n} items, over the limit of {limit}")
