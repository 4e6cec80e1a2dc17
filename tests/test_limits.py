"""Stated limits (runner/engine/limits.py), the bound on what the runner buffers, and
preparation on worker threads (docs/protocol.md, "Limits")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import msgpack
import pytest
import zmq

from runner.engine import limits
from runner.engine.grammar import json_schema_to_gbnf
from runner.engine.requests import BadRequest, Busy, CompletionOptions, InputTooLong
from runner.engine.sampling import grammar_for
from runner.process import protocol as P
from runner.process import security
from runner.process.server import Server, WorkBudget

# -- the limits themselves ----------------------------------------------------------


@pytest.mark.parametrize("text,ok,fragment", [
    ("x" * limits.MAX_TEXT_BYTES, True, None),
    ("x" * (limits.MAX_TEXT_BYTES + 1), False, f"{limits.MAX_TEXT_BYTES + 1} characters"),
    # Within the limit in characters, over it in UTF-8 bytes.
    ("é" * (limits.MAX_TEXT_BYTES // 2 + 1), False, f"{limits.MAX_TEXT_BYTES + 2} bytes (UTF-8)"),
])
def test_text_limit_counts_utf8_bytes_and_names_the_field(text, ok, fragment):
    if ok:
        assert len(limits.text_bytes("prompt", text, InputTooLong)) == limits.MAX_TEXT_BYTES
        return
    with pytest.raises(InputTooLong) as info:
        limits.text_bytes("prompt", text, InputTooLong)
    assert str(info.value).startswith("prompt has ") and fragment in str(info.value)


def test_token_limit():
    limits.check_tokens("tokens", limits.MAX_TOKENS)
    with pytest.raises(BadRequest, match=f"^tokens has {limits.MAX_TOKENS + 1} tokens"):
        limits.check_tokens("tokens", limits.MAX_TOKENS + 1)


def _alternatives(n: int) -> str:
    return "root ::= " + " | ".join(f'"w{i}"' for i in range(n)) + "\n"


def test_grammar_limit_names_the_option():
    fits = _alternatives(100)
    assert grammar_for(CompletionOptions(grammar=fits)) == fits
    big = _alternatives(5000)
    assert len(big) > limits.MAX_GRAMMAR_BYTES
    with pytest.raises(BadRequest, match="^invalid option grammar: the grammar has .* over the "
                                         f"limit of {limits.MAX_GRAMMAR_BYTES} bytes"):
        grammar_for(CompletionOptions(grammar=big))


@pytest.mark.parametrize("schema,fragment", [
    ({"enum": list(range(limits.MAX_SCHEMA_ALTERNATIVES + 1))},
     f"#/enum: {limits.MAX_SCHEMA_ALTERNATIVES + 1} alternatives exceed the limit"),
    ({"properties": {"a": {"anyOf": [{"type": "null"}] * (limits.MAX_SCHEMA_ALTERNATIVES + 1)}}},
     "#/properties/a/anyOf: "),
    ({"type": "string", "description": "x" * limits.MAX_SCHEMA_BYTES},
     "the schema as compact JSON has"),
    # Under the schema's own limits, but the grammar it makes is too long.
    ({"enum": ["v" * 40 + str(i) for i in range(limits.MAX_SCHEMA_ALTERNATIVES)]},
     "the grammar made from it has"),
])
def test_schema_limits_name_the_option(schema, fragment):
    with pytest.raises(ValueError, match=fragment):
        json_schema_to_gbnf(schema)
    with pytest.raises(BadRequest) as info:
        grammar_for(CompletionOptions(json_schema=schema))
    assert str(info.value).startswith("invalid option json_schema") and fragment in str(info.value)


def test_schema_at_the_alternatives_limit_converts():
    grammar = json_schema_to_gbnf({"enum": list(range(limits.MAX_SCHEMA_ALTERNATIVES))})
    root = next(line for line in grammar.splitlines() if line.startswith("root ::= "))
    assert root.count(" | ") == limits.MAX_SCHEMA_ALTERNATIVES - 1


@pytest.mark.parametrize("op,field", [("completion", "prompt"), ("detokenize", "tokens")])
def test_token_lists_over_the_limit_are_refused_from_their_header(op, field):
    # An array header announcing MAX_TOKENS + 1 ids and nothing after it: the
    # length is refused before any element is read.
    header = b"\xdd" + (limits.MAX_TOKENS + 1).to_bytes(4, "big")
    data = b"\x83\xa2op" + msgpack.packb(op) + b"\xa2id\x07" + msgpack.packb(field) + header
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(data, 1 << 30)
    assert f"length <= {limits.MAX_TOKENS}" in str(info.value) and f"`$.{field}`" in str(info.value)


def test_router_bounds_what_it_queues_per_connection():
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.ROUTER)
        P.configure_router(sock, 1 << 20)
        assert sock.getsockopt(zmq.RCVHWM) == P.RECEIVE_HIGH_WATER_MARK
        assert sock.getsockopt(zmq.MAXMSGSIZE) == P.HARD_LIMIT_FACTOR << 20
        sock.close(0)
    finally:
        ctx.term()


# -- the work budget ----------------------------------------------------------------

# (steps, expected): "+N" reserves N bytes, "-N" releases them; expected is
# "ok" or "busy" for each reserve.
@pytest.mark.parametrize("steps,expected", [
    (["+10", "+10", "+10"], ["ok", "ok", "busy"]),       # third request over max_requests=2
    (["+60", "+50"], ["ok", "busy"]),                    # 110 bytes over max_bytes=100
    (["+500"], ["ok"]),                                  # alone: always admitted
    (["+500", "+1"], ["ok", "busy"]),
    (["+500", "-500", "+40", "+60"], ["ok", "ok", "ok"]),  # released: room again
    (["+60", "-60", "+60", "+40"], ["ok", "ok", "ok"]),
])
def test_work_budget(steps, expected):
    budget = WorkBudget(max_requests=2, max_bytes=100)
    got = []
    for step in steps:
        size = int(step[1:])
        if step[0] == "-":
            budget.release(size)
            continue
        try:
            budget.reserve(size)
            got.append("ok")
        except Busy as exc:
            assert "wait for a worker" in str(exc)
            got.append("busy")
    assert got == expected


# -- a flood while the I/O thread is busy -------------------------------------------

FLOODER = r"""
import sys, msgpack, zmq
endpoint, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.SNDHWM, 1)        # keep the flood on the runner's side, not here
sock.setsockopt(zmq.SNDTIMEO, 3000)   # a send that waits this long: the runner stopped reading
sock.setsockopt(zmq.LINGER, 0)
sock.connect(endpoint)
sent = 0
for i in range(count):
    try:
        sock.send(msgpack.packb({"op": "tokenize", "id": i, "text": "x" * (size - 64)}))
    except zmq.Again:
        break
    sent += 1
print(sent, flush=True)
sock.close(0)
ctx.term()
"""


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_flood_while_the_io_thread_is_busy_stays_bounded():
    """A client floods 1 MiB requests while the runner's I/O thread is held:
    ZeroMQ stops reading from that connection after RECEIVE_HIGH_WATER_MARK
    messages, so the runner's memory grows by a few MiB, not by the flood,
    and other clients are answered once the I/O thread runs again."""
    message_bytes, n_messages = 1 << 20, 64
    endpoint, directory = security.private_ipc_endpoint()
    server = Server("/nonexistent/model.gguf", endpoint, max_message_bytes=message_bytes)
    thread = threading.Thread(target=server.run)
    thread.start()
    ctx = zmq.Context()
    other = ctx.socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    other.connect(endpoint)
    try:
        other.send(msgpack.packb({"op": "health", "id": 1}))
        assert other.poll(10_000) and msgpack.unpackb(other.recv())["state"] == "launched"
        before = _rss()
        with server._io:  # the I/O thread, once its poll returns, waits here
            flood = subprocess.run([sys.executable, "-c", FLOODER, endpoint, str(n_messages),
                                    str(message_bytes)], capture_output=True, text=True, timeout=120)
            assert flood.returncode == 0, flood.stderr
            grown = _rss() - before
            other.send(msgpack.packb({"op": "health", "id": 2}))
        sent = int(flood.stdout)
        bound = ((P.RECEIVE_HIGH_WATER_MARK + 1) * P.HARD_LIMIT_FACTOR + 8) * message_bytes
        assert sent < n_messages, "the runner never stopped reading the flood"
        assert grown < bound, f"RSS grew by {grown / 2**20:.1f} MiB during the flood"
        assert other.poll(30_000), "another client got no reply after the flood"
        assert msgpack.unpackb(other.recv()) == {
            "type": "health", "id": 2, "state": "launched", "progress": 0.0, "error": None,
            "error_code": None, "protocol": P.PROTOCOL_VERSION, "pid": os.getpid(),
            "max_message_bytes": message_bytes, "host_cache": None}
    finally:
        other.send(msgpack.packb({"op": "shutdown", "id": "bye"}))
        thread.join(30)
        other.close(0)
        ctx.term()
        server.close()
        shutil.rmtree(directory, ignore_errors=True)
    assert not thread.is_alive()


# -- on the default model -------------------------------------------------------------

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def engine(default_model_path):
    from runner.engine.core import Engine, EngineConfig

    e = Engine(EngineConfig(model_path=default_model_path, n_ctx=512, parallel=1, n_threads=2))
    yield e
    e.close()


def test_engine_refuses_text_over_the_limit_before_tokenizing(engine):
    from runner.engine.requests import CompletionRequest

    big = "x" * (limits.MAX_TEXT_BYTES + 1)
    with pytest.raises(InputTooLong, match="^prompt has "):
        engine.submit(CompletionRequest(prompt=big, options=CompletionOptions(truncate=True)))
    with pytest.raises(BadRequest, match="^text has "):
        engine.tokenize(big)
    with pytest.raises(InputTooLong, match="^text has "):
        engine.embed(big)
    with pytest.raises(InputTooLong, match="^prompt has "):
        engine.submit(CompletionRequest(prompt=[1] * (limits.MAX_TOKENS + 1),
                                        options=CompletionOptions(truncate=True)))
    with pytest.raises(BadRequest, match="^tokens has "):
        engine.detokenize([1] * (limits.MAX_TOKENS + 1))


@pytest.mark.parametrize("prompt", [[1, 2, -1], [1, 2.0], [True], [[1]], [1, 1 << 70]])
def test_engine_refuses_bad_token_prompts(engine, prompt):
    from runner.engine.requests import CompletionRequest

    with pytest.raises(BadRequest, match="prompt token ids must be integers"):
        engine.submit(CompletionRequest(prompt=prompt, options=CompletionOptions(**GREEDY)))


class Raw:
    """A bare DEALER: requests sent back to back, replies collected by id."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, message: dict) -> None:
        self.sock.send(msgpack.packb(message))

    def replies_until_first(self, request_id) -> dict:
        assert self.sock.poll(120_000), f"no reply for {request_id!r}"
        reply = msgpack.unpackb(self.sock.recv(), raw=False)
        assert reply["id"] == request_id
        return reply

    def replies_until_terminal(self, ids: set) -> dict:
        """id -> replies, until each id in ``ids`` got a terminal one."""
        got: dict = {i: [] for i in ids}
        open_ids = set(ids)
        while open_ids:
            assert self.sock.poll(120_000), f"no terminal reply for {sorted(open_ids, key=str)}"
            reply = msgpack.unpackb(self.sock.recv(), raw=False)
            got.setdefault(reply["id"], []).append(reply)
            if reply["type"] != "chunk":
                open_ids.discard(reply["id"])
        return got

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture(scope="module")
def runner(default_model_path):
    from runner.process.client import Runner

    r = Runner.spawn(default_model_path, n_ctx=1024, parallel=2, n_threads=2,
                     max_message_bytes=1 << 20)
    yield r
    r.close()


@pytest.fixture
def raw(runner):
    client = Raw(runner.endpoint)
    yield client
    client.close()


def test_a_completion_cancelled_while_it_is_prepared_ends_with_its_final(raw):
    # A prompt large enough to take a while to tokenize, then its cancel at once:
    # whether the cancel finds it queued, tokenizing or generating, it ends
    # with exactly one final, "cancelled".
    raw.send({"op": "completion", "id": "big", "prompt": "word " * 200_000,
              "options": {"truncate": True, "num_predict": 2000, "ignore_eos": True, **GREEDY}})
    raw.send({"op": "cancel", "id": "c", "target": "big"})
    got = raw.replies_until_terminal({"big", "c"})
    assert got["c"] == [{"type": "cancel", "id": "c", "found": True}]
    terminal = [r for r in got["big"] if r["type"] != "chunk"]
    assert len(terminal) == 1 and terminal[0]["type"] == "final"
    assert terminal[0]["done_reason"] == "cancelled"


def test_the_io_thread_answers_while_a_large_prompt_is_tokenized(raw):
    # A prompt of ~200k tokens without truncate: refused once tokenized.  The
    # health request behind it on the same socket is answered first: the
    # prompt is tokenized on a worker thread.  (When the I/O thread tokenized
    # it, the refusal came first, and every stream waited meanwhile.)
    raw.send({"op": "completion", "id": "big", "prompt": "word " * 200_000, "options": GREEDY})
    raw.send({"op": "health", "id": "h"})
    first = raw.replies_until_first("h")
    assert first["type"] == "health" and first["state"] == "ready"
    refused = raw.replies_until_first("big")
    assert (refused["type"], refused["code"]) == ("error", "input_too_long")
    assert "does not fit" in refused["message"]


def test_requests_past_the_byte_budget_get_busy_and_every_one_an_answer(runner, raw):
    # Budget: PENDING_BYTES_FACTOR (4) messages of the runner's max_message_bytes
    # (1 MiB).  Twelve requests of almost 1 MiB each, sent back to back.
    n = 12
    text = "word " * ((1 << 20) // 5 - 40)
    for i in range(n):
        raw.send({"op": "tokenize", "id": i, "text": text})
    raw.send({"op": "health", "id": "h"})
    got = raw.replies_until_terminal(set(range(n)) | {"h"})
    assert got["h"][0]["state"] == "ready"
    kinds = [tuple(r["type"] if r["type"] != "error" else r["code"] for r in got[i]) for i in range(n)]
    assert all(len(k) == 1 for k in kinds), kinds
    assert kinds[0] == ("tokenize",)
    assert ("busy",) in kinds and set(kinds) <= {("tokenize",), ("busy",)}
    busy = next(r for i in range(n) for r in got[i] if r["type"] == "error")
    assert "wait for a worker" in busy["message"]


# -- grammars whose check of the vocabulary would stall every stream ------------------

SLOW_GRAMMAR = 'root ::= ("a"? ){300} "b"'  # 27 bytes; a minute or so a check on the development VM


def _largest_alternatives() -> str:
    n = 100
    while len(_alternatives(n + 100)) <= limits.MAX_GRAMMAR_BYTES:
        n += 100
    return _alternatives(n)


def test_a_grammar_too_slow_to_check_is_refused_before_it_is_queued(default_model_path):
    from runner import _llama
    from runner.engine.sampling import make_sampler

    model = _llama.Model(default_model_path)
    with pytest.raises(BadRequest, match=r"^invalid option grammar: checking the vocabulary against "
                                         r"its grammar would take about [0-9.]+ s for each token"):
        make_sampler(model, CompletionOptions(grammar=SLOW_GRAMMAR), 512)
    # Ordinary grammars, the largest within MAX_GRAMMAR_BYTES among them, pass
    # and are timed well under the bound.
    for options in (CompletionOptions(grammar=_largest_alternatives()), CompletionOptions(json_schema={}),
                    CompletionOptions(json_schema={"type": "object", "properties": {
                        "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}})):
        sampler = make_sampler(model, options, 512)
        assert sampler.has_grammar
        assert sampler.grammar_check_seconds() < limits.MAX_GRAMMAR_CHECK_S / 2
        sampler.close()
    plain = make_sampler(model, CompletionOptions(), 512)
    assert plain.grammar_check_seconds() == 0.0


def test_a_slow_grammar_is_a_bad_request_and_other_streams_go_on(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from tiny_model import write_tiny_llama

    from runner.process.client import Runner

    tiny = str(write_tiny_llama(tmp_path / "tiny.gguf"))
    with Runner.spawn(tiny, n_ctx=1024, parallel=2, n_threads=1) as runner:
        other = runner.complete("Hello", num_predict=64, temperature=0.0, ignore_eos=True)
        with pytest.raises(BadRequest, match="^invalid option grammar: .*the request would wait"):
            runner.complete("hello", grammar=SLOW_GRAMMAR, num_predict=8).text()
        _, final = other.text()
        assert final.done_reason == "length" and final.eval_count == 64
