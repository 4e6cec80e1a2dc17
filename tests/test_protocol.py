"""The wire layer without a model: message validation, reply encoding as seen
by a plain msgpack peer, the outbox and per-peer sender, and the client's
small policies (stall timer, stderr error line).  A runner :class:`Server`
without a loaded model is driven over ipc for the refusal paths."""

from __future__ import annotations

import os
import select
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from runner.engine.requests import BadRequest, Busy, Cancelled, InputTooLong, InternalError, NotReady
from runner.process import protocol as P
from runner.process import security
from runner.process.client import StallTimer, describe_exit, pick_error_line
from runner.process.server import Job, Outbox, PeerSender, Server


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# -- requests: accepted ------------------------------------------------------

@pytest.mark.parametrize("message, expected", [
    ({"op": "health", "id": 1}, P.Health(id=1)),
    ({"op": "health", "id": "abc", "v": 1}, P.Health(id="abc")),
    ({"op": "completion", "id": 7, "prompt": "hi"}, P.Completion(id=7, prompt="hi")),
    ({"op": "completion", "id": 7, "prompt": [1, 2, 3], "options": {"num_predict": 4},
      "add_special": False},
     P.Completion(id=7, prompt=[1, 2, 3], options={"num_predict": 4}, add_special=False)),
    ({"op": "load", "id": 2, "n_ctx": 2048, "parallel": 4, "type_k": "q8_0",
      "tensor_split": [1, 0.5], "lora_paths": ["a.gguf"]},
     P.Load(id=2, n_ctx=2048, parallel=4, type_k="q8_0", tensor_split=[1.0, 0.5],
            lora_paths=["a.gguf"])),
    ({"op": "cancel", "id": 3, "target": 1}, P.Cancel(id=3, target=1)),
    ({"op": "detokenize", "id": 4, "tokens": [0, 5]}, P.Detokenize(id=4, tokens=[0, 5])),
    ({"op": "shutdown", "id": 5, "drain": False}, P.Shutdown(id=5, drain=False)),
])
def test_plain_msgpack_requests_decode_typed(message, expected):
    assert P.decode_request(pack(message)) == expected


# -- requests: refused, with the id when it can be read -----------------------

@pytest.mark.parametrize("data, request_id, fragment", [
    (b"\xc1garbage", None, "not a MessagePack map"),
    (b"", None, "not a MessagePack map"),
    (pack([1, 2, 3]), None, "not a MessagePack map"),
    (pack({"op": "bogus", "id": 9}), 9, "unknown op 'bogus'"),
    (pack({"id": 9}), 9, "invalid request"),
    (pack({"op": "health"}), None, "missing required field `id`"),
    (pack({"op": "health", "id": 1.5}), None, "`id`"),
    (pack({"op": "health", "id": -1}), None, "`id`"),
    (pack({"op": "health", "id": "x" * 200}), None, "`id`"),
    (pack({"op": "health", "id": 1, "v": 2}), 1, "`v`"),
    (pack({"op": "health", "id": 1, "extra": 1}), 1, "unknown field `extra`"),
    (pack({"op": "completion", "id": 1, "prompt": 5}), 1, "`prompt`"),
    (pack({"op": "completion", "id": 1, "prompt": [-1]}), 1, "`prompt[0]`"),
    (pack({"op": "completion", "id": 1, "prompt": "x", "options": []}), 1, "`options`"),
    (pack({"op": "load", "id": 1, "n_ctx": "big"}), 1, "`n_ctx`"),
    (pack({"op": "load", "id": 1, "parallel": 0}), 1, "`parallel`"),
    (pack({"op": "load", "id": 1, "type_k": "q3"}), 1, "`type_k`"),
    (pack({"op": "load", "id": 1, "flash_attn": True}), 1, "`flash_attn`"),
    (pack({"op": "embedding", "id": 1, "text": b"bytes"}), 1, "`text`"),
    # A header announcing a million elements (within MAX_TOKENS) with nothing after it.
    (b"\x83\xa2op\xaadetokenize\xa2id\x01\xa6tokens\xdd\x00\x0f\xff\xff", None, "truncated"),
    (b"\xdf\xff\xff\xff\xff", None, "truncated"),
    # Nesting deep enough to exhaust the decoder's recursion.
    (b"\x84\xa2op\xaacompletion\xa2id\x01\xa6prompt\xa1x\xa7options\x81\xa1x"
     + b"\x91" * 200_000 + b"\x90", None, "nesting too deep"),
])
def test_bad_messages_become_error_replies(data, request_id, fragment):
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(data)
    reply = info.value.reply()
    assert reply.code == "bad_request"
    assert reply.id == request_id
    assert fragment in reply.message


def test_oversize_message_is_refused_before_decoding():
    data = pack({"op": "tokenize", "id": 1, "text": "x" * 2000})
    with pytest.raises(P.ProtocolError, match="exceeds the limit of 1000"):
        P.decode_request(data, max_bytes=1000)
    assert P.decode_request(data, max_bytes=len(data)).id == 1


# -- replies as a foreign client sees them -------------------------------------

def test_replies_are_plain_msgpack_maps():
    vector = np.arange(4, dtype=np.float32) / 3
    cases = [
        (P.ChunkReply(id=1, text="hé", tokens=[5, 6]),
         {"type": "chunk", "id": 1, "text": "hé", "tokens": [5, 6]}),
        (P.ErrorReply(id=None, code="busy", message="full"),
         {"type": "error", "id": None, "code": "busy", "message": "full"}),
        (P.CancelReply(id="a", found=True), {"type": "cancel", "id": "a", "found": True}),
        (P.EmbeddingReply(id=2, embedding=vector.astype("<f4").tobytes(), prompt_eval_count=3),
         {"type": "embedding", "id": 2, "embedding": vector.astype("<f4").tobytes(),
          "prompt_eval_count": 3}),
    ]
    for reply, expected in cases:
        assert msgpack.unpackb(P.encode(reply), raw=False) == expected
        assert P.decode_reply(P.encode(reply)) == reply
    final = msgpack.unpackb(P.encode(P.FinalReply(id=1, done_reason="stop", eval_count=3)))
    assert final["type"] == "final" and final["eval_count"] == 3 and final["error"] is None
    embedding = msgpack.unpackb(P.encode(cases[3][0]))["embedding"]
    assert isinstance(embedding, bytes)
    np.testing.assert_array_equal(np.frombuffer(embedding, "<f4"), vector)


def test_client_ignores_unknown_reply_fields():
    data = pack({"type": "cancel", "id": 1, "found": False, "added_in_v2": [1]})
    assert P.decode_reply(data) == P.CancelReply(id=1, found=False)


@pytest.mark.parametrize("code, cls", [
    ("bad_request", BadRequest), ("input_too_long", InputTooLong), ("busy", Busy),
    ("not_ready", NotReady), ("cancelled", Cancelled), ("internal", InternalError),
    ("from_the_future", InternalError), (None, InternalError),
])
def test_error_codes_map_to_exceptions(code, cls):
    exc = P.error_from_code(code, "why")
    assert type(exc) is cls and str(exc) == "why"


@pytest.mark.parametrize("exc, code", [
    (Busy("x"), "busy"), (InputTooLong("x"), "input_too_long"), (ValueError("x"), "bad_request"),
    (KeyError("x"), "internal"), (RuntimeError(), "internal"),
])
def test_exceptions_map_to_error_codes(exc, code):
    assert P.error_reply(3, exc).code == code


# -- outbox and per-peer sender ----------------------------------------------------

def test_outbox_keeps_order_per_thread_and_loses_nothing():
    box = Outbox()
    n_threads, n_items = 4, 2000

    def produce(t):
        for i in range(n_items):
            box.post((t, i))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    got = []
    poller = zmq.Poller()
    poller.register(box.fileno(), zmq.POLLIN)
    while len(got) < n_threads * n_items:
        assert poller.poll(10_000), "a post did not wake the reader"
        got.extend(box.drain())
    for th in threads:
        th.join()
    for t in range(n_threads):
        assert [i for (tt, i) in got if tt == t] == list(range(n_items))
    box.close()


@pytest.fixture
def router_dealer():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 4)
    router.bind("inproc://sender-test")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 4)
    dealer.connect("inproc://sender-test")
    dealer.send(b"hello")
    peer, _ = router.recv_multipart()
    yield router, dealer, peer
    dealer.close(0)
    router.close(0)
    ctx.term()


def test_sender_parks_replies_for_a_full_peer_and_flushes_them_in_order(router_dealer):
    router, dealer, peer = router_dealer
    sender = PeerSender(router)
    for i in range(50):
        assert sender.send(peer, b"%d" % i)
    assert sender.backlogged
    received = []
    deadline = time.monotonic() + 30
    while len(received) < 50 and time.monotonic() < deadline:
        assert sender.flush() == []  # as the runner's loop does every few ms while backlogged
        if dealer.poll(5):
            received.append(dealer.recv())
    assert received == [b"%d" % i for i in range(50)]
    assert not sender.backlogged


def test_sender_reports_unknown_and_stuck_peers(router_dealer):
    router, dealer, peer = router_dealer
    assert PeerSender(router).send(b"\0nobody", b"x") is False
    sender = PeerSender(router, max_backlog=10)
    results = [sender.send(peer, b"x") for _ in range(30)]
    assert False not in results[:10] and not any(results[30 - results[::-1].index(True):])
    assert results.count(True) < 30 and peer in sender.dropped
    sender.forgive(peer)  # it sent a new request
    assert sender.send(peer, b"x") is True


def test_sender_drops_a_peer_whose_backlog_passes_its_byte_bound(router_dealer):
    """Large replies to a client that stopped reading are bounded in bytes
    too, not only in count."""
    router, dealer, peer = router_dealer
    sender = PeerSender(router, max_backlog_bytes=1 << 20)
    big = b"x" * (256 << 10)
    results = [sender.send(peer, big) for _ in range(200)]
    assert False in results and peer in sender.dropped
    parked = sum(len(d) for d in sender.backlogs.get(peer, ()))
    assert parked <= 1 << 20 and peer not in sender.backlog_bytes


# -- client policies -----------------------------------------------------------------

def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _stream_job(server: Server, peer: bytes, request_id) -> tuple:
    key = (peer, request_id)
    server._jobs[key] = Job(peer, request_id, "completion")
    return key


def test_engine_thread_sends_a_step_and_wakes_the_io_thread_for_requests():
    # The I/O thread is not running: the test is that thread, and the engine's.
    endpoint, directory = security.private_ipc_endpoint()
    server = Server("/nonexistent/model.gguf", endpoint)
    ctx = zmq.Context.instance()
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.ROUTING_ID, b"client")
    client.connect(endpoint)
    try:
        client.send(pack({"op": "health", "id": 0}))  # the router learns the peer
        assert server._sock.poll(10_000, zmq.POLLIN)
        server._receive()
        assert client.poll(10_000) and msgpack.unpackb(client.recv())["type"] == "health"
        key = _stream_job(server, b"client", 7)
        box = server._outbox
        for i in range(3):
            box.post_quiet((key, P.ChunkReply(id=7, text=str(i), tokens=[i]), False))
        assert not _readable(box.fileno())  # quiet posts wake nobody
        server._send_from_engine()
        for i in range(3):
            assert client.poll(10_000)
            assert msgpack.unpackb(client.recv()) == {"type": "chunk", "id": 7, "text": str(i), "tokens": [i]}
        assert not _readable(box.fileno())  # sent, and nothing came in: no wake-up

        # A request that reaches the socket while the engine's thread holds
        # it: ZMQ_FD signals once, so that thread must wake the I/O thread.
        client.send(pack({"op": "health", "id": 1}))
        assert server._sock.poll(10_000, zmq.POLLIN)
        box.post_quiet((key, P.ChunkReply(id=7, text="x", tokens=[9]), False))
        server._send_from_engine()
        assert client.poll(10_000) and msgpack.unpackb(client.recv())["text"] == "x"
        assert _readable(box.fileno())
        assert box.drain() == []

        # While the I/O thread holds the socket, the step is left to it.
        box.post_quiet((key, P.ChunkReply(id=7, text="y", tokens=[10]), False))
        with server._io:
            server._send_from_engine()
        assert _readable(box.fileno())
        assert [reply.text for _, reply, _ in box.drain()] == ["y"]
        assert not client.poll(0)
    finally:
        client.close(0)
        server.close()
        os.rmdir(directory)


def test_a_steps_chunks_for_one_client_go_as_one_message(bare_server):
    """Completions sent with batch_chunks get their step's chunks in one
    `chunks` message; a final flushes the chunks gathered before it; a
    completion without the flag still gets one `chunk` per message."""
    server = bare_server.server
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.ROUTING_ID, b"batched")
    client.connect(bare_server.endpoint)
    client.send(pack({"op": "health", "id": 0}))
    assert client.poll(10_000) and msgpack.unpackb(client.recv())["type"] == "health"
    with server._io:
        keys = []
        for rid, batched in (("a", True), ("b", True), ("c", False)):
            keys.append((b"batched", rid))
            server._jobs[keys[-1]] = Job(b"batched", rid, "completion", batch_chunks=batched)
        a, b, c = keys
        items = [(a, P.ChunkReply(id="a", text="1", tokens=[1]), False),
                 (c, P.ChunkReply(id="c", text="2", tokens=[2]), False),
                 (b, P.ChunkReply(id="b", text="3", tokens=[3]), False),
                 (b, P.FinalReply(id="b", done_reason="stop"), True),
                 (a, P.ChunkReply(id="a", text="4", tokens=[4]), False)]
        server._deliver(items)
    got = []
    while len(got) < 4:
        assert client.poll(10_000), f"only {got} came"
        got.append(msgpack.unpackb(client.recv()))
    try:
        # c is not batched: its chunk goes at once; b's final flushes a's and
        # b's chunks first (one message); a's later chunk goes alone at the end.
        assert got[0] == {"type": "chunk", "id": "c", "text": "2", "tokens": [2]}
        assert got[1] == {"type": "chunks", "id": None, "chunks": [
            {"type": "chunk", "id": "a", "text": "1", "tokens": [1]},
            {"type": "chunk", "id": "b", "text": "3", "tokens": [3]}]}
        assert got[2]["type"] == "final" and got[2]["id"] == "b"
        assert got[3] == {"type": "chunk", "id": "a", "text": "4", "tokens": [4]}
        assert not client.poll(100)
    finally:
        with server._io:
            for key in (a, c):
                server._jobs.pop(key, None)
        client.close(0)


def test_engine_thread_sends_while_the_io_thread_serves_requests(bare_server):
    """Chunks sent from an engine-like thread keep their order and lose
    nothing while the I/O thread answers requests on the same socket."""
    server = bare_server.server
    streamer = zmq.Context.instance().socket(zmq.DEALER)
    streamer.setsockopt(zmq.ROUTING_ID, b"streamer")
    streamer.connect(bare_server.endpoint)
    streamer.send(pack({"op": "health", "id": 0}))  # the router learns the peer
    assert streamer.poll(10_000) and msgpack.unpackb(streamer.recv())["type"] == "health"
    n_chunks = 3000
    with server._io:
        key = _stream_job(server, b"streamer", "s")

    def engine():
        for i in range(n_chunks):
            server._outbox.post_quiet((key, P.ChunkReply(id="s", text="", tokens=[i]), False))
            if i % 3 == 2:
                server._send_from_engine()
        server._send_from_engine()

    thread = threading.Thread(target=engine)
    thread.start()
    try:
        for i in range(300):
            assert bare_server({"op": "health", "id": i})["id"] == i
        got = []
        while len(got) < n_chunks:
            assert streamer.poll(10_000), f"chunk {len(got)} never came"
            got.extend(msgpack.unpackb(streamer.recv())["tokens"])
        assert got == list(range(n_chunks))
    finally:
        thread.join()
        with server._io:
            del server._jobs[key]
        streamer.close(0)


def test_stall_timer_restarts_on_progress():
    timer = StallTimer(timeout=10.0, now=0.0)
    steps = [(0.0, 0.0, False), (0.0, 9.0, False), (0.1, 15.0, False), (0.1, 24.0, False),
             (0.1, 25.5, True), (0.2, 26.0, False), (0.15, 36.5, True)]
    for progress, now, expired in steps:
        assert timer.expired(progress, now) is expired, (progress, now)


@pytest.mark.parametrize("lines, expected", [
    ([], None),
    (["", "  "], None),
    (["loading", "done"], None),
    (["WARNING runner.llama: pooling_type is [-1]"], None),
    (["ggml.c:123: GGML_ASSERT(n > 0) failed", "Aborted"], "Aborted"),
    (["llama-runner: error: model file not found: /x", "exiting"],
     "llama-runner: error: model file not found: /x"),
    (["ERROR runner.process.server: loading m failed: bad", "INFO bye"],
     "ERROR runner.process.server: loading m failed: bad"),
    (["Traceback (most recent call last):", "  File x", "MemoryError: out of memory"],
     "MemoryError: out of memory"),
])
def test_pick_error_line(lines, expected):
    assert pick_error_line(lines) == expected


def test_describe_exit_names_the_signal():
    assert describe_exit(-9, None) == "runner exited with status -9 (SIGKILL)"
    assert describe_exit(1, "bad") == "runner exited with status 1: bad"


# -- a runner without a model, over ipc -------------------------------------------------

@pytest.fixture
def bare_server():
    """A Server that never loads, run on a thread (no signals, no parent watch)."""
    endpoint, directory = security.private_ipc_endpoint()
    server = Server("/nonexistent/model.gguf", endpoint, max_message_bytes=4096)
    thread = threading.Thread(target=server.run)
    thread.start()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)

    def ask(data, n_replies=1):
        sock.send(data if isinstance(data, bytes) else pack(data))
        replies = []
        for _ in range(n_replies):
            assert sock.poll(10_000), "no reply"
            replies.append(msgpack.unpackb(sock.recv(), raw=False))
        return replies[0] if n_replies == 1 else replies

    ask.sock = sock
    ask.server = server
    ask.endpoint = endpoint
    try:
        yield ask
    finally:
        sock.send(pack({"op": "shutdown", "id": "bye"}))  # no-op if the test shut it down
        thread.join(30)
        sock.close(0)
        server.close()
        os.rmdir(directory)
    assert not thread.is_alive()


def test_bare_runner_answers_health_and_refuses_work(bare_server):
    ask = bare_server
    health = ask({"op": "health", "id": 1})
    assert health["type"] == "health" and health["state"] == "launched" and health["id"] == 1
    assert health["max_message_bytes"] == 4096 and health["protocol"] == P.PROTOCOL_VERSION
    for op, extra in [("completion", {"prompt": "x"}), ("embedding", {"text": "x"}),
                      ("tokenize", {"text": "x"}), ("detokenize", {"tokens": [1]})]:
        reply = ask({"op": op, "id": op, **extra})
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "not_ready", op)
    assert ask({"op": "cancel", "id": 2, "target": 99}) == {"type": "cancel", "id": 2, "found": False}


def test_bare_runner_survives_bad_messages(bare_server):
    ask = bare_server
    for data in [b"\x00\x01garbage", pack({"op": "nope", "id": 5}), b"\xdd\xff\xff\xff\xff",
                 pack({"op": "tokenize", "id": 6, "text": "x" * 5000}),
                 pack({"op": "load", "id": 7, "parallel": -3})]:
        reply = ask(data)
        assert reply["type"] == "error" and reply["code"] == "bad_request"
    assert ask({"op": "health", "id": 8})["state"] == "launched"


def test_bare_runner_refuses_multipart_messages(bare_server):
    bare_server.sock.send_multipart([b"", pack({"op": "health", "id": 1})])
    assert bare_server.sock.poll(10_000)
    reply = msgpack.unpackb(bare_server.sock.recv())
    assert reply["type"] == "error" and "expected 1 frame, got 2" in reply["message"]
    assert bare_server({"op": "health", "id": 2})["type"] == "health"


def test_shutdown_stops_the_bare_runner(bare_server):
    reply = bare_server({"op": "shutdown", "id": "s"})
    assert reply == {"type": "shutdown", "id": "s", "drain": True}


@pytest.mark.parametrize("command", ["serve", "generate", "embed", "tokenize", "info", "discover"])
def test_every_subcommand_has_help(command, capsys):
    from runner.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: llama-runner {command}")
