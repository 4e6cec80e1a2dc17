"""Protocol fuzz (issue 15): random and mutated frames against a real runner.

Frames are random bytes, random MessagePack values, valid requests with
bytes flipped, cut, inserted or fields replaced, deep nesting, lying length
headers, other versions and multi-frame messages, and requests with hostile
ids (duplicates in flight, reuse after completion, ids of every wrong type).
A greedy stream from another client runs meanwhile.

Invariants:

* the runner never dies and keeps answering ``health``;
* every message gets exactly one terminal reply: for a message the decoder
  can read the id of, a reply carrying that id; otherwise one ``error`` with
  ``id: nil``.  A refused message gets ``bad_request`` (``busy`` or
  ``not_ready`` only for well-formed requests);
* the other client's greedy stream is unchanged;
* the runner's memory stays bounded (RSS within a margin of its start).

Counts: ``tests/fuzzconfig.py`` (``RUNNER_FUZZ_SCALE`` for longer runs).
"""

from __future__ import annotations

import json
import os
import threading

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzzconfig import examples
from runner.process import protocol as P
from wire import RawClient

pytestmark = pytest.mark.model

MAX_MESSAGE_BYTES = 1 << 20
HANG_S = 60              # no reply this long: a hang
RSS_MARGIN = 256 << 20   # growth allowed over the whole module (allocator slack, caches)
GREEDY = {"temperature": 0.0, "num_predict": 16, "ignore_eos": True}

# -- frames ------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=16) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(0, 9) | st.binary(max_size=4), inner, max_size=4),
    max_leaves=20)

ids = st.one_of(st.integers(0, 2**63 - 1), st.text(min_size=1, max_size=128))
hostile_ids = st.one_of(
    st.sampled_from([None, True, False, -1, 2**63, 2**64 - 1, "", "x" * 129, 1.0, 1.5, [1], {"id": 1},
                     b"\x01"]),
    st.floats(), st.binary(max_size=8), st.integers(-2**63, -1),
    st.text(min_size=129, max_size=200))

BASE_REQUESTS = [
    {"op": "health"}, {"op": "info"}, {"op": "discover"},
    {"op": "tokenize", "text": "Hello world", "add_special": True, "parse_special": False},
    {"op": "detokenize", "tokens": [9906, 1917]},
    {"op": "embedding", "text": "Hello", "normalize": True},
    {"op": "embedding", "text": ["Hello", "wörld 🐉", "x"], "truncate": True},
    {"op": "rerank", "query": "q", "documents": ["a", "b"]},  # not a reranker: bad_request
    {"op": "completion", "prompt": "Hi", "options": {"num_predict": 1, "lora": [{"id": 0, "scale": 1}]}},
    {"op": "completion", "prompt": "Hi", "options": {"num_predict": 2, "temperature": 0}},
    {"op": "completion", "prompt": [1, 2, 3], "options": {"num_predict": 1}, "add_special": False},
    {"op": "chat", "messages": [{"role": "user", "content": "Hi"}],
     "options": {"num_predict": 2, "temperature": 0}},
    {"op": "chat", "messages": [{"role": "system", "content": "S"},
                                {"role": "user", "content": [{"type": "text", "text": "é"}]}],
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
     "template_kwargs": {"enable_thinking": False}, "reasoning_format": "none",
     "options": {"num_predict": 1}},
    {"op": "cancel", "target": 12345},
    {"op": "load", "n_ctx": 256},
    {"op": "estimate", "n_ctx": 256, "parallel": 2},
    {"op": "metrics"},
]


@st.composite
def mutated(draw) -> bytes:
    """A valid request, then bytes flipped, cut or inserted, or fields replaced."""
    request = dict(draw(st.sampled_from(BASE_REQUESTS)))
    request["id"] = draw(ids)
    how = draw(st.sampled_from(["none", "none", "field", "drop", "extra", "version", "flip", "cut",
                                "insert", "id"]))
    if how == "field":
        key = draw(st.sampled_from(sorted(request)))
        request[key] = draw(msgpack_values)
    elif how == "drop":
        request.pop(draw(st.sampled_from(sorted(request))))
    elif how == "extra":
        request[draw(st.text(max_size=8))] = draw(msgpack_values)
    elif how == "version":
        request["v"] = draw(st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=3), st.none()))
    elif how == "id":
        request["id"] = draw(hostile_ids)
    data = bytearray(msgpack.packb(request))
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif how == "cut":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


# Nesting the runner's decoder takes whole, and nesting past Python's default
# recursion limit (1000), where it no longer reads the id either: the reply
# has id nil.  In between, the outcome depends on how much stack the decoding
# thread has left (Hypothesis raises the limit in this process), so the fuzz
# stays out of it.
SHALLOW, DEEP = 400, 2_000
NESTED_HEAD = b"\x83\xa2op\xaacompletion\xa2id\x07\xa7options"


def nested(depth: int, container: bytes) -> bytes:
    """``depth`` one-element arrays or maps around nil, inside a request's options."""
    head = NESTED_HEAD
    body = container * depth + b"\xc0"
    if container == b"\x81":  # maps need a key per level
        body = b"\x81\xa1k" * depth + b"\xc0"
    return head + body


lying_lengths = st.sampled_from([
    b"\xdb\xff\xff\xff\xff" + b"abc",                         # str32 of 4 GiB, 3 bytes given
    b"\xdd\xff\xff\xff\xff\xc0",                              # array32 of 2**32-1 items
    b"\xdf\xff\xff\xff\xff\xa2op",                            # map32 of 2**32-1 pairs
    b"\x82\xa2op\xa9tokenize\xa2id\xc6\xff\xff\xff\xf0\x00",  # bin32 id of 4 GiB
    b"\x83\xa2op\xaadetokenize\xa2id\x01\xa6tokens\xdd\x7f\xff\xff\xff",
    b"\xc1", b"", b"\xd4\x01\x00", b"\xc7\x00\x05",           # reserved, empty, ext types
])

frames = st.one_of(
    st.binary(max_size=256),
    msgpack_values.map(msgpack.packb),
    st.dictionaries(st.sampled_from(["op", "id", "v", "text", "prompt", "options", "tokens",
                                     "target"]), msgpack_values, max_size=5).map(msgpack.packb),
    mutated(), mutated(), mutated(),
    st.builds(nested, st.integers(1, SHALLOW) | st.integers(DEEP, 200_000),
              st.sampled_from([b"\x91", b"\x81"])),
    lying_lengths,
)


def expected_id(data: bytes):
    """(the id the runner must answer with, True when it must refuse) -- by the
    protocol's own decoder, which the runner uses."""
    if data.startswith(NESTED_HEAD) and len(data) > DEEP:
        return None, True  # too deep to read the id in the runner (see SHALLOW, DEEP)
    try:
        request = P.decode_request(data, MAX_MESSAGE_BYTES)
    except P.ProtocolError as exc:
        return exc.request_id, True
    return request, False


# -- the runner --------------------------------------------------------------------------

def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Fuzz:
    """A runner, a raw client for the fuzz frames, and a client streaming beside them."""

    def __init__(self, model_path: str) -> None:
        from runner.process.client import Runner

        self.runner = Runner.spawn(model_path, n_ctx=512, parallel=2, n_threads=2,
                                   max_message_bytes=MAX_MESSAGE_BYTES)
        self.raw = RawClient(self.runner.endpoint, hang_s=HANG_S)
        self.reference, _ = self.runner.complete("Tell me about the sea.", **GREEDY).text()
        self.rss_start = rss(self.runner.process.pid)
        self.tally = {"messages": 0, "refused": 0, "answered": 0, "crashes": 0, "hangs": 0,
                      "lost": 0}  # totals over the run (docs/reliability.md)

    def close(self) -> None:
        self.raw.close()
        self.runner.close(timeout=5)


@pytest.fixture(scope="module")
def fuzz(default_model_path):
    f = Fuzz(default_model_path)
    yield f
    alive = f.runner.process.poll() is None
    f.close()
    report = os.environ.get("RUNNER_FUZZ_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(json.dumps({"suite": "protocol_fuzz", **f.tally}) + "\n")
    assert alive


class Beside:
    """A greedy stream on the runner's own client, run on a thread while frames fly."""

    def __init__(self, fuzz: Fuzz) -> None:
        self.result: list = []
        self.thread = threading.Thread(target=self._run, args=(fuzz,), daemon=True)
        self.thread.start()

    def _run(self, fuzz: Fuzz) -> None:
        try:
            self.result.append(fuzz.runner.complete("Tell me about the sea.", **GREEDY).text()[0])
        except BaseException as exc:
            self.result.append(exc)

    def check(self, fuzz: Fuzz) -> None:
        self.thread.join(120)
        assert self.result, "the stream beside the fuzz did not end"
        assert self.result[0] == fuzz.reference, f"the stream beside the fuzz changed: {self.result[0]!r}"


def fresh_connection(fuzz: Fuzz) -> None:
    """A new raw connection: what an example that failed left in flight is
    cancelled by the runner, and its ledger is forgotten."""
    fuzz.raw.close()
    fuzz.raw = RawClient(fuzz.runner.endpoint, hang_s=HANG_S)


def answer(fuzz: Fuzz, data: bytes) -> None:
    """Send one frame; check its one terminal reply."""
    want, refuse = expected_id(data)
    raw = fuzz.raw
    fuzz.tally["messages"] += 1
    if refuse:
        raw.send(data, request_id=want)
    else:
        if isinstance(want, P.Shutdown):
            return  # a valid shutdown would end the run; the lifecycle tests cover it
        raw.send(data, request_id=want.id)
        if isinstance(want, P.Completion):  # bounded: cancel at once (it may already be done)
            raw.send({"op": "cancel", "id": "fuzz-cancel", "target": want.id})
        want = want.id
    try:
        raw.settle()
    except AssertionError:
        fuzz.tally["hangs" if fuzz.runner.process.poll() is None else "crashes"] += 1
        raise
    assert raw.ledger.strays == [], raw.ledger.strays
    key = ("str", want) if isinstance(want, str) else ("other", want)
    reply = raw.ledger.closed[key][-1]
    if refuse:
        fuzz.tally["refused"] += 1
        assert reply["type"] == "error" and reply["code"] == "bad_request", reply
        assert reply["message"]
    else:
        fuzz.tally["answered"] += 1
        if reply["type"] == "error":
            assert reply["code"] in ("bad_request", "input_too_long", "busy", "cancelled"), reply
        if reply["type"] == "final":
            assert reply["done_reason"] in ("stop", "length", "cancelled"), reply


@settings(max_examples=examples(25), deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(frames, min_size=1, max_size=8))
@example(batch=[nested(200_000, b"\x91"), nested(200_000, b"\x81")])
@example(batch=[b"\x83\xa2op\xaacompletion\xa2id\x01\xa7options\x81\xa6grammar\xcd\x01\x00"])
def test_random_and_mutated_frames(fuzz, batch):
    fresh_connection(fuzz)
    beside = Beside(fuzz)
    for data in batch:
        answer(fuzz, data)
    beside.check(fuzz)
    assert fuzz.runner.process.poll() is None
    assert fuzz.raw.ask({"op": "health", "id": "h"})["state"] == "ready"
    assert rss(fuzz.runner.process.pid) < fuzz.rss_start + RSS_MARGIN


@settings(max_examples=examples(15), deadline=None, suppress_health_check=list(HealthCheck))
@given(parts=st.lists(st.one_of(st.binary(max_size=32), msgpack_values.map(msgpack.packb)),
                      min_size=2, max_size=5))
def test_multi_frame_messages_get_one_error(fuzz, parts):
    fresh_connection(fuzz)
    fuzz.raw.ledger.sent(None)
    fuzz.raw.send_frames(parts)
    fuzz.raw.settle()
    fuzz.tally["messages"] += 1
    fuzz.tally["refused"] += 1
    reply = fuzz.raw.ledger.closed[("other", None)][-1]
    assert reply["type"] == "error" and reply["code"] == "bad_request"
    assert f"got {len(parts)}" in reply["message"]
    assert fuzz.raw.ledger.strays == []


@settings(max_examples=examples(20), deadline=None, suppress_health_check=list(HealthCheck))
@given(request_id=hostile_ids, op=st.sampled_from(["health", "tokenize", "completion", "cancel"]))
def test_ids_of_the_wrong_type_get_one_error_with_a_nil_id(fuzz, request_id, op):
    fresh_connection(fuzz)
    message = {"op": op, "id": request_id, "text": "x", "prompt": "x", "target": 1}
    message = {k: v for k, v in message.items()
               if k in {"op", "id"} | {"tokenize": {"text"}, "completion": {"prompt"},
                                        "cancel": {"target"}}.get(op, set())}
    fuzz.raw.send(message, request_id=None)
    fuzz.raw.settle()
    fuzz.tally["messages"] += 1
    fuzz.tally["refused"] += 1
    reply = fuzz.raw.ledger.closed[("other", None)][-1]
    assert reply["type"] == "error" and reply["code"] == "bad_request" and "id" in reply["message"]
    assert fuzz.raw.ledger.strays == []


LONG = {"num_predict": 400, "ignore_eos": True, "temperature": 0.0}


def test_a_duplicate_id_in_flight_is_refused_and_the_first_request_goes_on(fuzz):
    raw = fuzz.raw
    replies: list[dict] = []
    raw.send({"op": "completion", "id": 7, "prompt": "Count to a hundred:", "options": LONG},
             track=False)
    first = raw.recv()
    assert first["id"] == 7 and first["type"] == "chunk", first
    for dup in ({"op": "completion", "id": 7, "prompt": "x", "options": {"num_predict": 1}},
                {"op": "tokenize", "id": 7, "text": "x"},
                {"op": "embedding", "id": 7, "text": "x"}):
        raw.send(dup, track=False)
    raw.send({"op": "cancel", "id": 8, "target": 7}, track=False)
    while True:
        reply = raw.recv()
        replies.append(reply)
        if reply["id"] == 7 and reply["type"] == "final":
            break
    errors = [r for r in replies if r["type"] == "error"]
    assert len(errors) == 3 and all(r["id"] == 7 and r["code"] == "bad_request"
                                    and "already in flight" in r["message"] for r in errors), errors
    cancels = [r for r in replies if r["type"] == "cancel"]
    assert [(r["id"], r["found"]) for r in cancels] == [(8, True)]
    assert replies[-1]["done_reason"] == "cancelled"
    assert {r["type"] for r in replies} <= {"chunk", "error", "cancel", "final"}
    # Once the final is out, the id is free again.
    assert raw.ask({"op": "tokenize", "id": 7, "text": "again"})["type"] == "tokenize"


def test_ids_are_reused_after_completion_and_scoped_per_client(fuzz):
    raw, other = fuzz.raw, RawClient(fuzz.runner.endpoint)
    try:
        for _ in range(3):
            for client in (raw, other):  # the same id on two connections at once
                client.send({"op": "completion", "id": "same", "prompt": "Hi",
                             "options": {"num_predict": 3, "temperature": 0}})
            for client in (raw, other):
                client.settle()
                replies = client.ledger.closed[("str", "same")]
                assert replies[-1]["type"] == "final" and replies[-1]["eval_count"] == 3
                assert client.ledger.strays == []
    finally:
        other.close()


def test_a_cancel_naming_another_clients_request_finds_nothing(fuzz):
    raw, other = fuzz.raw, RawClient(fuzz.runner.endpoint)
    try:
        other.send({"op": "completion", "id": 1, "prompt": "Count to a hundred:", "options": LONG})
        assert other.pump()["type"] == "chunk"
        assert raw.ask({"op": "cancel", "id": 2, "target": 1}) == {"type": "cancel", "id": 2,
                                                                    "found": False}
        assert other.ask({"op": "cancel", "id": 3, "target": 1})["found"] is True
        other.settle()
        assert other.ledger.closed[("other", 1)][-1]["done_reason"] == "cancelled"
    finally:
        other.close()
