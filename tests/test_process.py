"""Real runner processes on the default model, driven through the client and
through a bare ZeroMQ socket speaking plain msgpack."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from handserve import deferred_runner
from polling import drain, wait_until
from runner.engine.requests import BadRequest, Chunk, Final, InputTooLong, InternalError
from runner.process import protocol as P
from runner.process.client import Runner, RunnerGone

pytestmark = pytest.mark.model

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0, "ignore_eos": True}
LONG = {"num_predict": 2000, "ignore_eos": True, "temperature": 0.0}  # runs until stopped


def idle(runner: Runner) -> bool:
    info = runner.info(timeout=30)
    return info.in_flight == 0 and not any(s["in_use"] for s in info.engine["slots"])


@pytest.fixture(scope="module")
def runner(default_model_path):
    r = Runner.spawn(default_model_path, n_ctx=1024, parallel=2, n_threads=2,
                     max_message_bytes=1 << 20)
    yield r
    r.close()


class RawClient:
    """A DEALER socket and the plain ``msgpack`` package: a foreign client."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, message) -> None:
        self.sock.send(message if isinstance(message, bytes) else msgpack.packb(message))

    def recv(self) -> dict:
        assert self.sock.poll(30_000), "no reply from the runner"
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def ask(self, message) -> dict:
        self.send(message)
        return self.recv()

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def raw(runner):
    client = RawClient(runner.endpoint)
    yield client
    client.close()


# -- serving ----------------------------------------------------------------------

def test_parallel_plus_one_completions_through_one_client(runner):
    prompts = ["The capital of France is", "One, two, three,", "Water boils at"]
    results: dict[int, tuple[str, Final]] = {}

    def run(i):
        results[i] = runner.complete(prompts[i], num_predict=12, **GREEDY).text()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2]
    for text, final in results.values():
        assert final.done_reason == "length" and final.eval_count == 12 and text
        assert final.slot in (0, 1)
    alone, _ = runner.complete(prompts[0], num_predict=12, **GREEDY).text()
    assert results[0][0] == alone


def test_asyncio_flavour(runner):
    async def main():
        streams = [runner.acomplete(p, num_predict=8, **GREEDY) for p in ("Hello", "Bonjour", "Hola")]
        done = await asyncio.gather(*(s.text() for s in streams))
        tokens = await runner.atokenize("Hello world")
        text = await runner.adetokenize(tokens)
        vector = await runner.aembed("Hello", normalize=True)
        return done, text, vector

    done, text, vector = asyncio.run(main())
    assert [f.eval_count for _, f in done] == [8, 8, 8]
    assert text == "Hello world"
    assert abs(float(np.linalg.norm(vector.embedding)) - 1.0) < 1e-4


def test_two_clients_at_once(runner):
    other = Runner.connect(runner.endpoint)
    texts = {runner: "the first client's text", other: "a different text for the second one"}
    expected = {c: runner.tokenize(t) for c, t in texts.items()}
    errors = []

    def hammer(client):
        try:  # both clients number their requests 1, 2, 3...: replies must not cross
            for _ in range(50):
                assert client.tokenize(texts[client], timeout=30) == expected[client]
            _, final = client.complete(texts[client], num_predict=6, **GREEDY).text()
            assert final.eval_count == 6
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(c,)) for c in (runner, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    other.close()
    assert errors == []


def test_cancel_mid_stream_frees_the_slot(runner):
    stream = runner.complete("Count to a thousand:", **LONG)
    first = [next(stream) for _ in range(3)]
    assert all(type(e) is Chunk for e in first)
    stream.cancel()
    rest = list(stream)
    assert type(rest[-1]) is Final and rest[-1].done_reason == "cancelled"
    assert all(type(e) is Chunk for e in rest[:-1])
    # Chunks stream as they are made (the runner batches one step's chunks
    # into one wake-up of its I/O thread, never holds them to the end).
    assert rest[-1].eval_count < LONG["num_predict"]
    wait_until(lambda: idle(runner))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a core to spare")
def test_chunks_stream_from_a_delivery_thread(spawn):
    """With a core to spare the engine delivers on its own thread, which
    must wake the runner's I/O thread as well as the inline path does."""
    r = spawn(n_threads=1, parallel=1)
    assert r.info().engine["delivery"] == "thread"
    stream = r.complete("Count to a thousand:", **LONG)
    assert type(next(stream)) is Chunk
    stream.cancel()
    final = list(stream)[-1]
    assert final.done_reason == "cancelled" and final.eval_count < LONG["num_predict"]


# -- a lone blocking stream receives on its caller's thread ------------------------

def test_a_lone_stream_receives_on_its_own_thread_and_gives_way_to_other_calls(runner):
    wait_until(lambda: idle(runner))
    stream = runner.complete("Count to a thousand:", **{**LONG, "num_predict": 300})
    events = [next(stream) for _ in range(3)]
    assert runner._conn._direct == stream.id  # the caller waits on the socket itself
    answers = []

    def other_calls():
        for i in range(20):
            answers.append(runner.tokenize(f"word {i}", timeout=10))

    thread = threading.Thread(target=other_calls, daemon=True)
    thread.start()
    events += list(stream)
    thread.join(60)
    assert len(answers) == 20 and all(answers)
    final = events[-1]
    assert type(final) is Final and final.done_reason == "length" and final.eval_count == 300
    assert sum(len(e.tokens) for e in events[:-1]) == 300
    # The I/O thread serves the socket again once the stream is over.
    assert runner.tokenize("after the stream", timeout=10)
    assert runner._conn._direct is None


def test_runner_death_reaches_a_lone_stream(spawn):
    r = spawn(parallel=1)
    stream = r.complete("Count to a thousand:", **LONG)
    assert type(next(stream)) is Chunk and type(next(stream)) is Chunk
    assert r._conn._direct == stream.id
    os.kill(r.process.pid, signal.SIGKILL)
    _, error = drain(stream, 30.0)
    assert isinstance(error, RunnerGone) and error.returncode == -signal.SIGKILL


def test_closing_the_client_ends_a_lone_stream(runner):
    wait_until(lambda: idle(runner))
    other = Runner.connect(runner.endpoint)
    stream = other.complete("Count to a thousand:", **LONG)
    assert type(next(stream)) is Chunk and type(next(stream)) is Chunk
    assert other._conn._direct == stream.id
    closer = threading.Timer(0.2, other.close)
    closer.start()
    _, error = drain(stream, 30.0)
    assert isinstance(error, RunnerGone) and "client closed" in str(error)
    closer.join(30)
    assert not closer.is_alive()
    wait_until(lambda: idle(runner))  # the runner cancelled the vanished client's request


def test_closing_the_iterator_cancels(runner):
    stream = runner.complete("Count to a thousand:", **LONG)
    assert type(next(stream)) is Chunk
    stream.close()
    wait_until(lambda: idle(runner))


def test_cancelling_the_task_cancels(runner):
    async def consume(started):
        async for _ in runner.acomplete("Count to a thousand:", **LONG):
            started.set()

    async def main():
        started = asyncio.Event()
        task = asyncio.ensure_future(consume(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_until(lambda: idle(runner))


def test_a_client_that_goes_away_has_its_requests_cancelled(runner):
    gone = RawClient(runner.endpoint)
    gone.send({"op": "completion", "id": 1, "prompt": "Count to a thousand:", "options": LONG})
    assert gone.recv()["type"] == "chunk"
    gone.close()
    wait_until(lambda: idle(runner))


def test_errors_are_raised_with_their_codes(runner):
    with pytest.raises(InputTooLong):
        list(runner.complete(list(range(1, 600))))  # longer than the 512-token slot
    with pytest.raises(BadRequest, match="unknown option"):
        list(runner.complete("x", no_such_option=1))
    with pytest.raises(BadRequest, match="temperature"):
        list(runner.complete("x", temperature=-1.0))
    with pytest.raises(BadRequest, match="already loaded"):
        runner.load(n_ctx=512)
    with pytest.raises(BadRequest):
        runner.detokenize([10**9])
    with pytest.raises(BadRequest, match="exceeds the runner's limit"):
        runner.tokenize("x" * (2 << 20))  # refused by the client, never sent


def test_logprobs_travel_with_the_chunks(runner):
    chunks = [e for e in runner.complete("Hi", num_predict=3, logprobs=True, top_logprobs=2,
                                         **GREEDY) if type(e) is Chunk]
    entries = [entry for c in chunks for entry in c.logprobs]
    assert len(entries) == 3 and all(e["logprob"] <= 0 and len(e["top"]) == 2 for e in entries)


def test_embedding_and_info(runner):
    result = runner.embed("Hello there", normalize=True)
    assert result.embedding.dtype == np.float32 and result.embedding.shape == (576,)
    info = runner.info()
    assert info.state == "ready" and info.protocol == P.PROTOCOL_VERSION
    assert info.build["llama_version"] and info.devices and info.devices[0].total > 0
    assert info.engine["model"]["n_embd"] == 576
    assert info.metadata["general.architecture"] == "llama"
    assert [s["id"] for s in info.engine["slots"]] == [0, 1]
    assert all({"n_inputs", "last_used", "in_use"} <= set(s) for s in info.engine["slots"])


def test_ipc_directory_is_private(runner):
    assert runner.endpoint.startswith("ipc://")
    directory = os.path.dirname(runner.endpoint[len("ipc://"):])
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


# -- a foreign client and bad input -------------------------------------------------------

def test_foreign_msgpack_client(raw):
    health = raw.ask({"op": "health", "id": "h"})
    assert health["type"] == "health" and health["id"] == "h" and health["state"] == "ready"
    tokens = raw.ask({"op": "tokenize", "id": 1, "text": "Hello world"})["tokens"]
    assert raw.ask({"op": "detokenize", "id": 2, "tokens": tokens})["text"] == "Hello world"
    raw.send({"op": "completion", "id": 3, "prompt": "Hello", "options": {"num_predict": 5}})
    replies = [raw.recv()]
    while replies[-1]["type"] == "chunk":
        replies.append(raw.recv())
    assert {r["id"] for r in replies} == {3}
    final = replies[-1]
    assert final["type"] == "final" and final["done_reason"] == "length" and final["eval_count"] == 5
    assert sum(len(r["tokens"]) for r in replies[:-1]) == 5
    embedding = raw.ask({"op": "embedding", "id": 4, "text": "Hello"})
    assert isinstance(embedding["embedding"], bytes) and len(embedding["embedding"]) == 576 * 4
    assert np.isfinite(np.frombuffer(embedding["embedding"], "<f4")).all()
    devices = raw.ask({"op": "discover", "id": 5})["devices"]
    assert devices and {"name", "type", "free", "total"} <= set(devices[0])


@pytest.mark.parametrize("message, fragment", [
    (b"\x00\xffnot msgpack at all", "not a MessagePack map"),
    ({"op": "completion", "id": 1, "prompt": {"not": "a prompt"}}, "`prompt`"),
    ({"op": "completion", "id": 1, "prompt": "x", "options": {"top_k": "many"}}, "top_k"),
    ({"op": "tokenize", "id": 1, "text": 12}, "`text`"),
    ({"op": "teleport", "id": 1}, "unknown op"),
    ({"op": "tokenize", "id": 1, "text": "x" * (1 << 20)}, "exceeds the limit"),
    (b"\x83\xa2op\xaadetokenize\xa2id\x01\xa6tokens\xdd\x00\x0f\xff\xff", "truncated"),
])
def test_bad_messages_get_error_replies_and_do_not_disturb_others(runner, raw, message, fragment):
    stream = runner.complete("Tell me a story.", num_predict=12, **GREEDY)
    next(stream)
    reply = raw.ask(message)
    assert reply["type"] == "error" and reply["code"] == "bad_request"
    assert fragment in reply["message"]
    text, final = stream.text()
    assert final.done_reason == "length" and final.eval_count == 12
    assert raw.ask({"op": "health", "id": 9})["state"] == "ready"


def test_message_over_the_hard_limit_drops_only_its_sender(runner, raw):
    raw.send(b"\x00" * ((1 << 20) * P.HARD_LIMIT_FACTOR + 1))  # MAXMSGSIZE: disconnected
    _, final = runner.complete("Still there?", num_predict=4, **GREEDY).text()
    assert final.eval_count == 4
    fresh = RawClient(runner.endpoint)
    try:
        assert fresh.ask({"op": "health", "id": 1})["state"] == "ready"
    finally:
        fresh.close()


# -- lifecycle -----------------------------------------------------------------------------

def test_sigkill_runner_fails_every_pending_call(spawn):
    r = spawn(parallel=1)
    outcomes: list[BaseException | None] = []
    started = threading.Event()

    def stream_one():
        try:
            for _ in r.complete("Count to a thousand:", **LONG):
                started.set()
            outcomes.append(None)
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=stream_one) for _ in range(3)]  # 1 runs, 2 wait
    for t in threads:
        t.start()
    started.wait(60)
    os.kill(r.process.pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert len(outcomes) == 3
    for exc in outcomes:
        assert isinstance(exc, RunnerGone) and exc.returncode == -signal.SIGKILL
        assert "SIGKILL" in str(exc)
    with pytest.raises(RunnerGone, match="status -9"):
        r.tokenize("after death")


PARENT = r"""
import sys, time
from runner.process.client import Runner
r = Runner.spawn(sys.argv[1], n_ctx=256, n_threads=1)
print(r.process.pid, r.endpoint, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def test_runner_exits_within_2s_when_its_parent_is_killed(default_model_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, default_model_path],
                              stdout=subprocess.PIPE, text=True)
    try:
        pid_text, endpoint = parent.stdout.readline().split()
        pid = int(pid_text)
        assert not _gone(pid)
        parent.kill()
        killed = time.monotonic()
        parent.wait()
        while not _gone(pid) and time.monotonic() - killed < 10:
            time.sleep(0.01)
        elapsed = time.monotonic() - killed
        assert _gone(pid), "the runner outlived its parent"
        assert elapsed < 2.0, f"the orphaned runner took {elapsed:.2f} s to exit"
    finally:
        parent.kill()
        parent.wait()
    shutil.rmtree(os.path.dirname(endpoint[len("ipc://"):]), ignore_errors=True)


def test_sigterm_drains_in_flight_requests(spawn):
    r = spawn(parallel=1)
    stream = r.complete("Tell me a story.", num_predict=48, **GREEDY)
    assert type(next(stream)) is Chunk
    os.kill(r.process.pid, signal.SIGTERM)
    rest = list(stream)
    assert rest[-1].done_reason == "length" and rest[-1].eval_count == 48
    assert r.process.wait(60) == 0


def test_shutdown_request_drains_and_exits_zero(spawn):
    r = spawn()
    stream = r.complete("Tell me a story.", num_predict=16, **GREEDY)
    assert type(next(stream)) is Chunk  # running, not queued (queued ones end "cancelled")
    r.shutdown()
    _, final = stream.text()
    assert final.done_reason == "length" and final.eval_count == 16
    assert r.process.wait(60) == 0


def test_missing_model_is_reported_with_the_runners_error_line():
    with pytest.raises(RunnerGone) as info:
        Runner.spawn("/nonexistent/model.gguf")
    assert info.value.returncode == 1
    assert "model file not found: /nonexistent/model.gguf" in str(info.value)


def test_corrupt_model_load_error_reaches_the_client(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 4096)
    with pytest.raises(InternalError, match="load failed"):
        Runner.spawn(str(bad))


@pytest.mark.parametrize("params, fragment", [
    ({"n_ctx": -1}, "n_ctx"),
    ({"flash_attn": "sometimes"}, "flash_attn"),
    ({"no_such_param": 1}, "no_such_param"),
    ({"n_ctx": 2, "parallel": 4}, "load failed"),  # refused by the engine, seen through health
])
def test_bad_load_parameters(default_model_path, params, fragment):
    with pytest.raises(BadRequest, match=fragment):
        Runner.spawn(default_model_path, **params)


def test_discover_and_load_on_a_runner_started_by_hand(default_model_path):
    with deferred_runner(default_model_path) as (proc, endpoint):
        with Runner.connect(endpoint) as r:
            assert r.health(timeout=60).state == "launched"
            assert r.discover(timeout=60)[0].total > 0
            r.load(n_ctx=512, n_threads=2)
            seen = []
            assert r.wait_ready(progress=seen.append).state == "ready"
            assert seen[-1] == 1.0
            _, final = r.complete("Hi", num_predict=3).text()
            assert final.eval_count == 3
            r.shutdown()
        assert proc.wait(60) == 0


def test_cli_generate_and_embed_through_a_runner(runner, capsys):
    from runner.cli import main

    assert main(["generate", "--endpoint", runner.endpoint, "-p", "The capital of France is",
                 "-n", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["embed", "--endpoint", runner.endpoint, "hello"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 576
