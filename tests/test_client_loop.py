"""An asyncio event loop reading the client's socket itself
(runner/process/client.py, ``_Connection._reader``): real runner processes on the
tiny model (benchmarks/tiny_model.py) and the default model, consumed by
asyncio tasks, blocking threads and several loops at once, with streams
cancelled, the runner killed and the client closed mid-stream.

Order checks use ``parallel=1`` runners: there every request decodes alone,
so a seeded stream repeats its reference token for token, and a reply lost
or reordered in a hand-over between the loop and the I/O thread shows."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from polling import wait_until
from runner.engine.requests import Chunk, Final
from runner.process.client import _NO_READER, Runner, RunnerGone, _IGNORE, _LoopSink, _Routes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from tiny_model import write_tiny_llama  # noqa: E402

# Default sampling options, reproducible.  ignore_eos: which seeded stream
# meets an end token depends on the CPU's float rounding (one of five
# prompts here ended after 244 tokens on a 2026-12-03 VM, before and after
# that day's changes), and the streams must run their length.
SEEDED = {"seed": 11, "ignore_eos": True}
FOREVER = {"num_predict": -1, "ignore_eos": True}  # until cancelled (the context shifts)
HANG = 120.0           # a deadline against hanging the suite, never a timing check


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, default_model_path):
    return str(write_tiny_llama(tmp_path_factory.mktemp("loop-models") / "tiny.gguf"))


@pytest.fixture(scope="module")
def tiny(tiny_path):
    """Eight streams at once on the tiny model."""
    r = Runner.spawn(tiny_path, n_ctx=8 * 1024, parallel=8, n_threads=1)
    yield r
    r.close()


@pytest.fixture(scope="module")
def tiny1(tiny_path):
    """One stream at a time (the rest queue in the runner): order checks."""
    r = Runner.spawn(tiny_path, n_ctx=4096, parallel=1, n_threads=1, cache_ram_mb=0)
    yield r
    r.close()


def reading(runner: Runner) -> bool:
    """The running loop reads the runner's socket itself (it watches its fd)."""
    reader = runner._conn._reader
    return reader is not None and reader.loop is asyncio.get_running_loop() and reader.fd >= 0


async def until(condition, timeout: float = HANG) -> None:
    """Poll ``condition`` between loop iterations; fail after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met"
        await asyncio.sleep(0.002)


def prompts(n: int) -> list[list[int]]:
    """Token prompts that differ from their first token on (passed without
    BOS, no request reuses another's cache: each decodes its prompt whole)."""
    return [[1000 + 37 * i + k for k in range(12)] for i in range(n)]


def seeded(runner: Runner, prompt: list[int], num_predict: int):
    return runner.complete(prompt, add_special=False, num_predict=num_predict, **SEEDED)


def aseeded(runner: Runner, prompt: list[int], num_predict: int):
    return runner.acomplete(prompt, add_special=False, num_predict=num_predict, **SEEDED)


def tokens_of(events) -> list[int]:
    return [t for e in events if type(e) is Chunk for t in e.tokens]


def check(events) -> Final:
    """Chunks, then one Final that counts every token the chunks carried."""
    assert events and type(events[-1]) is Final
    assert all(type(e) is Chunk for e in events[:-1])
    final = events[-1]
    assert final.done_reason in ("length", "stop", "cancelled"), final
    assert len(tokens_of(events)) == final.eval_count
    return final


async def collect(stream, after_first=None) -> list:
    events = []
    async for event in stream:
        events.append(event)
        if len(events) == 1 and after_first is not None:
            await after_first()
    return events


def open_fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


# -- the routing table (no model) ----------------------------------------------------

def test_routes_count_sinks_by_loop():
    a, b = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        routes = _Routes()
        assert routes.sole_loop() is None and not routes.foreign(a)
        steps = [  # (action, id, sink) -> sole loop, foreign to a
            ("add", 1, _LoopSink(a, print), a, False),
            ("add", 2, _IGNORE, a, False),              # a cancel's acknowledgement belongs to all
            ("add", 3, _LoopSink(a, print), a, False),
            ("add", 4, _LoopSink(b, print), None, True),
            ("pop", 4, None, a, False),
            ("add", 5, print, None, True),              # a blocking caller's sink
            ("pop", 1, None, None, True),
            ("pop", 5, None, a, False),
            ("pop", 3, None, None, False),              # only the acknowledgement is left
            ("pop", 99, None, None, False),             # unknown ids are ignored
            ("pop", 2, None, None, False),
            ("add", 6, _LoopSink(b, print), b, True),
        ]
        for action, request_id, sink, sole, foreign in steps:
            if action == "add":
                routes.add(request_id, sink)
            else:
                routes.pop(request_id)
            assert routes.sole_loop() is sole, (action, request_id)
            assert routes.foreign(a) is foreign, (action, request_id)
        assert len(routes) == 1 and 6 in routes and routes.get(6).loop is b
    finally:
        a.close()
        b.close()


# -- many streams on one loop -----------------------------------------------------------

def test_many_streams_with_default_options_on_one_loop(tiny):
    async def main():
        streams = [tiny.acomplete(f"Story {i}: the", num_predict=200) for i in range(12)]  # 8 run, 4 wait
        first = asyncio.ensure_future(collect(streams[0]))
        await until(lambda: reading(tiny))
        words = await tiny.atokenize("asked on the loop that reads")  # keeps the loop reading
        assert reading(tiny)
        done = [await first] + list(await asyncio.gather(*(collect(s) for s in streams[1:])))
        assert reading(tiny)  # it keeps the socket while nothing else is in flight
        return done, words

    done, words = asyncio.run(asyncio.wait_for(main(), HANG))
    assert words == tiny.tokenize("asked on the loop that reads")
    for events in done:
        assert check(events).done_reason in ("length", "stop")
    assert tiny._conn._reader is None  # the blocking tokenize took the socket back


def test_a_busy_loop_reads_the_backlog_in_bursts(tiny):
    """The loop blocks while eight streams go on: far more replies than one
    burst wait on the socket; it reads them a burst at a time and then
    follows the streams as before."""
    async def main():
        streams = [tiny.acomplete(f"Backlog {i}:", **FOREVER) for i in range(8)]
        firsts = [await s.__anext__() for s in streams]
        await until(lambda: reading(tiny))
        time.sleep(1.0)  # a loop busy elsewhere (not a timing check)
        more = [[await s.__anext__() for _ in range(40)] for s in streams]
        for stream in streams:
            stream.cancel()
        rests = await asyncio.gather(*(collect(s) for s in streams))
        return [[f] + m + r for f, m, r in zip(firsts, more, rests)]

    for events in asyncio.run(asyncio.wait_for(main(), HANG)):
        assert check(events).done_reason == "cancelled"
    wait_until(lambda: tiny.info().in_flight == 0)


def test_many_streams_on_the_default_model(spawn):
    r = spawn(n_ctx=2048, parallel=4)

    async def main():
        streams = [r.acomplete(p, num_predict=24) for p in
                   ("The capital of France is", "One, two, three,", "Water boils at",
                    "A haiku about rain:", "def fib(n):", "Dear diary,")]
        return await asyncio.gather(*(collect(s) for s in streams))

    for events in asyncio.run(asyncio.wait_for(main(), HANG)):
        assert check(events).done_reason in ("length", "stop")


# -- hand-overs between the loop and the I/O thread ---------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_switches_between_asyncio_and_blocking_use_lose_nothing(tiny1, seed):
    """Seeded streams on the loop while random blocking calls (from a thread
    and from the loop's own thread), cancels and closes come and go: each
    stream is its reference, or a prefix of it where it was stopped."""
    rng = random.Random(seed)
    cases = prompts(5)
    refs = [tokens_of(seeded(tiny1, p, 300)) for p in cases]
    assert all(len(ref) == 300 for ref in refs)
    stops = {i: rng.choice(["none", "none", "cancel", "aclose"]) for i in range(len(cases))}

    async def one(i, stream):
        events = []
        async for event in stream:
            events.append(event)
            if len(events) == 20 and stops[i] == "cancel":
                stream.cancel()
            if len(events) == 20 and stops[i] == "aclose":
                await stream.aclose()
                break
        return events

    async def switcher(streams_done):
        switches = 0
        while not streams_done.done():
            await until(lambda: reading(tiny1) or streams_done.done())
            if streams_done.done():
                break
            kind = rng.choice(["thread", "loop thread", "thread stream", "atokenize", "stall"])
            if kind == "stall":  # the loop is busy: replies pile up, then come in bursts
                time.sleep(0.03)
            elif kind == "thread":
                await asyncio.to_thread(tiny1.tokenize, f"switch {switches}")
            elif kind == "loop thread":  # a blocking call on the loop's own thread
                assert tiny1.tokenize(f"switch {switches}", timeout=HANG)
            elif kind == "thread stream":  # waits behind the loop's streams (parallel 1)
                text, final = await asyncio.to_thread(
                    lambda: tiny1.complete(f"Blocking {switches}", num_predict=4).text())
                assert final.eval_count <= 4
            else:
                assert await tiny1.atokenize(f"switch {switches}")
            switches += 1
        return switches

    async def main():
        streams = [aseeded(tiny1, p, 300) for p in cases]
        streams_done = asyncio.ensure_future(
            asyncio.gather(*(one(i, s) for i, s in enumerate(streams))))
        switches = await switcher(streams_done)
        return await streams_done, switches

    results, switches = asyncio.run(asyncio.wait_for(main(), HANG))
    assert switches >= 1
    for i, events in enumerate(results):
        got = tokens_of(events)
        if stops[i] == "aclose":
            assert got == refs[i][:len(got)] and len(events) == 20
            continue
        final = check(events)
        if stops[i] == "cancel":
            assert final.done_reason in ("cancelled", "length") and got == refs[i][:len(got)]
        else:
            assert final.done_reason == "length" and got == refs[i]
    wait_until(lambda: tiny1.info().in_flight == 0)


def test_a_blocking_stream_and_loop_streams_share_the_client(tiny1):
    """A blocking stream receiving on its own thread gives way to the loop's
    requests, and the loop reads again once the blocking stream is over."""
    cases = prompts(3)
    refs = [tokens_of(seeded(tiny1, p, 200)) for p in cases]
    blocking = seeded(tiny1, cases[0], 200)
    head = [next(blocking)]
    while tiny1._conn._direct != blocking.id and len(head) < 100:
        head.append(next(blocking))  # until it finds its queue empty and reads itself
    assert tiny1._conn._direct == blocking.id  # the lone blocking stream reads itself

    async def main():
        streams = [aseeded(tiny1, p, 200) for p in cases[1:]]  # queued behind it in the runner
        await until(lambda: tiny1._conn._direct is None)  # the I/O thread took the socket back
        assert tiny1._conn._reader is None
        rest = await asyncio.to_thread(lambda: list(blocking))
        await until(lambda: reading(tiny1))
        return rest, await asyncio.gather(*(collect(s) for s in streams))

    rest, done = asyncio.run(asyncio.wait_for(main(), HANG))
    assert tokens_of(head + rest) == refs[0]
    for events, ref in zip(done, refs[1:]):
        check(events)
        assert tokens_of(events) == ref


def test_two_loops_in_two_threads(tiny):
    """Requests of two loops in flight: the I/O thread routes them all; once
    one loop is left, it reads again."""
    both_submitted = threading.Barrier(2)
    both_streaming = threading.Barrier(2)
    outcomes: dict[int, object] = {}

    def run(k):
        async def main():
            streams = [tiny.acomplete(f"Loop {k} story {i}:", **FOREVER) for i in range(3)]
            await asyncio.to_thread(both_submitted.wait, HANG)
            firsts = [await s.__anext__() for s in streams]
            await asyncio.to_thread(both_streaming.wait, HANG)
            assert tiny._conn._reader is None  # both loops have requests in flight
            for stream in streams:
                stream.cancel()
            rests = await asyncio.gather(*(collect(s) for s in streams))
            return [[first] + rest for first, rest in zip(firsts, rests)]

        try:
            outcomes[k] = asyncio.run(asyncio.wait_for(main(), HANG))
        except BaseException as exc:
            outcomes[k] = exc
            both_submitted.abort()
            both_streaming.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
    for k in range(2):
        assert isinstance(outcomes.get(k), list), outcomes.get(k)
        for events in outcomes[k]:
            assert check(events).done_reason == "cancelled"

    async def alone():
        stream = tiny.acomplete("One loop again:", num_predict=100)
        await until(lambda: reading(tiny))
        return await collect(stream)

    check(asyncio.run(asyncio.wait_for(alone(), HANG)))
    wait_until(lambda: tiny.info().in_flight == 0)


# -- stopping streams ---------------------------------------------------------------------

def test_cancel_aclose_and_task_cancel_mid_stream(tiny):
    async def main():
        cancelled = tiny.acomplete("Cancelled:", **FOREVER)
        closed = tiny.acomplete("Closed:", **FOREVER)
        kept = tiny.acomplete("Kept:", num_predict=300)
        task_stream = tiny.acomplete("Task:", **FOREVER)
        task = asyncio.ensure_future(collect(task_stream))
        assert type(await cancelled.__anext__()) is Chunk
        assert type(await closed.__anext__()) is Chunk
        await until(lambda: reading(tiny))
        cancelled.cancel()
        await closed.aclose()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert reading(tiny)  # cancels and forgets keep the socket on the loop
        rest = await collect(cancelled)
        final = rest[-1]
        assert type(final) is Final and final.done_reason == "cancelled"
        assert [e async for e in closed] == []
        return await collect(kept)

    check(asyncio.run(asyncio.wait_for(main(), HANG)))
    wait_until(lambda: tiny.info().in_flight == 0)


# -- the runner dies, the client closes -----------------------------------------------------

def test_sigkill_reaches_every_asyncio_stream(tiny_path):
    r = Runner.spawn(tiny_path, n_ctx=4096, parallel=2, n_threads=1)
    try:
        async def main():
            streams = [r.acomplete(f"Doomed {i}:", **FOREVER) for i in range(4)]  # 2 wait
            tasks = [asyncio.ensure_future(collect(s)) for s in streams]
            await until(lambda: reading(r))
            reader = r._conn._reader
            os.kill(r.process.pid, signal.SIGKILL)
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            # The loop let go of the socket before the streams heard of the death.
            assert not reader.close_fd.alive
            return outcomes

        outcomes = asyncio.run(asyncio.wait_for(main(), HANG))
        for exc in outcomes:
            assert isinstance(exc, RunnerGone) and exc.returncode == -signal.SIGKILL, exc
        assert r._conn._reader is None
        with pytest.raises(RunnerGone, match="SIGKILL"):
            r.tokenize("after death")
    finally:
        r.close()


@pytest.mark.parametrize("where", ["other thread", "loop thread"])
def test_close_with_asyncio_streams_in_flight(tiny_path, where):
    r = Runner.spawn(tiny_path, n_ctx=4096, parallel=2, n_threads=1)
    closer = None
    try:
        async def main():
            nonlocal closer
            streams = [r.acomplete(f"Closing {i}:", num_predict=2000, ignore_eos=True)
                       for i in range(3)]
            tasks = [asyncio.ensure_future(collect(s)) for s in streams]
            await until(lambda: reading(r))
            if where == "loop thread":
                r.close()  # blocks the loop until the runner is gone
            else:
                closer = threading.Thread(target=r.close)
                closer.start()
            return await asyncio.gather(*tasks, return_exceptions=True)

        outcomes = asyncio.run(asyncio.wait_for(main(), HANG))
    finally:
        if closer is not None:
            closer.join(HANG)
            assert not closer.is_alive()
        r.close()
    for outcome in outcomes:  # drained to the end, or cut off: never left waiting
        assert isinstance(outcome, (list, RunnerGone)), outcome
        if isinstance(outcome, list):
            check(outcome)
    assert r._conn._reader is None


# -- loops that end, loops that cannot read ------------------------------------------------

def test_a_closed_loop_leaves_the_socket_and_its_descriptor(tiny):
    async def one(i):
        stream = tiny.acomplete(f"Round {i}:", num_predict=30)
        await until(lambda: reading(tiny))
        return await collect(stream)

    check(asyncio.run(asyncio.wait_for(one(0), HANG)))
    assert tiny.tokenize("warm")
    before = open_fds()
    for i in range(6):
        check(asyncio.run(asyncio.wait_for(one(i), HANG)))  # the loop keeps the socket as it closes
        if i % 2:
            assert tiny.tokenize(f"after round {i}")  # a blocking call takes it back from a closed loop
    assert tiny.tokenize("done")
    assert tiny._conn._reader is None
    assert open_fds() == before  # every loop's duplicate of the socket's fd was closed


class _NoReaderLoop(asyncio.SelectorEventLoop):
    """A loop whose add_reader is missing, as on a proactor loop."""

    def add_reader(self, fd, callback, *args):
        raise NotImplementedError


def test_a_loop_without_add_reader_is_served_by_the_io_thread(tiny):
    async def main():
        streams = [tiny.acomplete(f"Proactor {i}:", num_predict=80) for i in range(3)]
        return await asyncio.gather(*(collect(s) for s in streams))

    loop = _NoReaderLoop()
    try:
        done = loop.run_until_complete(asyncio.wait_for(main(), HANG))
        assert _NoReaderLoop in _NO_READER
        done += loop.run_until_complete(asyncio.wait_for(main(), HANG))
    finally:
        _NO_READER.discard(_NoReaderLoop)
        loop.close()
    for events in done:
        check(events)
    assert tiny._conn._reader is None
