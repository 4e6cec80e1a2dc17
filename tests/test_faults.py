"""Faults (issue 15): processes stopped, killed or frozen mid-stream; streams
that fill their slots; loads that fail half-way.

tests/test_process.py already covers a SIGKILLed runner (every pending call
fails with the exit status), a SIGKILLed parent (the runner exits), a client
that closes its socket mid-stream, SIGTERM draining and a corrupt model file;
these are the faults it does not.  Every wait here is a hang bound, not a
timing assertion: a fault must end in an error or a terminal reply, never in a
wait that does not end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from polling import drain, wait_until
from runner.engine.requests import Chunk, EngineError, Final
from runner.process import protocol as P
from runner.process.client import Runner, RunnerGone
from runner.process.security import private_ipc_endpoint

pytestmark = pytest.mark.model

LONG = {"num_predict": 100_000, "ignore_eos": True, "temperature": 0.0}  # runs until stopped
HANG_S = 3 * P.HEARTBEAT_TIMEOUT_MS / 1000  # a fault not noticed in this long is a hang


def idle(runner: Runner) -> bool:
    info = runner.info(timeout=30)
    return info.in_flight == 0 and not any(s["in_use"] for s in info.engine["slots"])


# -- a frozen runner --------------------------------------------------------------------

def test_a_stopped_runner_fails_the_stream_within_the_heartbeat_window(spawn):
    """SIGSTOP: the process lives but answers nothing, ZMTP pings included; the
    client's heartbeat drops the connection and the stream fails."""
    r = spawn(parallel=2)
    stream = r.complete("Count to a thousand:", **LONG)
    assert type(next(stream)) is Chunk
    other = r.complete("Tell me a story.", **LONG)
    assert type(next(other)) is Chunk
    os.kill(r.process.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    _, error = drain(stream, HANG_S)
    _, other_error = drain(other, HANG_S)
    took = time.monotonic() - stopped
    for exc in (error, other_error):
        assert isinstance(exc, RunnerGone) and "lost" in str(exc), exc
    print(f"stream failed {took:.1f} s after SIGSTOP (heartbeat timeout "
          f"{P.HEARTBEAT_TIMEOUT_MS / 1000:.0f} s)")
    # Resumed, the runner has cancelled the lost connection's requests and
    # serves a new client.
    os.kill(r.process.pid, signal.SIGCONT)
    with Runner.connect(r.endpoint) as fresh:
        wait_until(lambda: idle(fresh))
        _, final = fresh.complete("Still there?", num_predict=3, temperature=0.0).text()
        assert final.eval_count == 3


CLIENT = r"""
import sys
from runner.process.client import Runner
r = Runner.connect(sys.argv[1])
stream = r.complete("Count to a thousand:", num_predict=100000, ignore_eos=True, temperature=0.0)
next(stream)
print("streaming", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP])
def test_a_client_killed_or_frozen_mid_stream_has_its_request_cancelled(spawn, fault):
    """A client process killed (its socket closed by the kernel) or frozen
    (silent: the runner's heartbeat drops it) while streaming: the runner
    cancels its request, frees the slot, and the other client is served."""
    r = spawn(parallel=2)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, r.endpoint], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "streaming"
        beside = r.complete("Tell me a story.", num_predict=24, temperature=0.0, ignore_eos=True)
        assert type(next(beside)) is Chunk
        os.kill(client.pid, fault)
        _, final = beside.text()
        assert final.done_reason == "length" and final.eval_count == 24
        wait_until(lambda: idle(r), timeout=HANG_S)
    finally:
        client.kill()
        client.wait()


# -- slots that fill up -----------------------------------------------------------------

def test_more_streams_than_slots_each_filling_its_slot(spawn):
    """Five streams on four slots, each asking for more than its slot holds:
    shifting ones run to num_predict, the others end when their slot is full,
    the queued one starts when a slot frees; every stream gets its final."""
    r = spawn(n_ctx=1024, parallel=4)
    slot_ctx = r.info().engine["slot_ctx"]
    prompts = ["Count to a thousand:", "Tell me a story.", "word " * 40, "Say hi.",
               "One, two, three,"]
    streams = []
    for i, prompt in enumerate(prompts):
        options = {"num_predict": slot_ctx + 40, "temperature": 0.0, "ignore_eos": True,
                   "shift": i % 2 == 0, "num_keep": 4 if i % 3 else 0}
        streams.append((options, r.complete(prompt, **options)))
    for options, stream in streams:
        events, error = drain(stream, 600)
        assert error is None, error
        final = events[-1]
        assert type(final) is Final, final
        tokens = sum(len(e.tokens) for e in events[:-1])
        assert final.done_reason == "length" and final.eval_count == tokens
        if options["shift"]:
            assert final.eval_count == options["num_predict"]
        else:
            # The last token is sampled from the last cell's logits: it needs no cell.
            assert final.prompt_count + final.eval_count == slot_ctx + 1 < options["num_predict"]
    wait_until(lambda: idle(r))
    _, final = r.complete("After the crowd", num_predict=4, temperature=0.0).text()
    assert final.eval_count == 4


def test_a_full_queue_refuses_with_busy_and_loses_nothing(spawn):
    """parallel 1 and max_queue 2: of eight streams three are taken, five get
    ``busy`` at once, and the three end with their finals."""
    r = spawn(n_ctx=256, parallel=1, max_queue=2)
    streams = [r.complete(f"Stream {i}:", num_predict=100, temperature=0.0, ignore_eos=True)
               for i in range(8)]
    outcomes = [drain(s, 300) for s in streams]
    finals = [events[-1] for events, error in outcomes if error is None]
    busy = [error for _, error in outcomes if error is not None]
    assert len(finals) == 3 and all(f.eval_count == 100 for f in finals)
    assert len(busy) == 5 and all(isinstance(e, EngineError) and e.code == "busy" for e in busy)


# -- loads that fail half-way ----------------------------------------------------------

def test_a_model_cut_in_the_middle_fails_its_load_with_the_reason(default_model_path, tmp_path):
    """The header and metadata are whole, the tensor data stops half-way."""
    cut = tmp_path / "cut.gguf"
    with open(default_model_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(os.path.getsize(default_model_path) // 2))
    with pytest.raises(EngineError, match="load failed") as info:
        Runner.spawn(str(cut), n_ctx=256, n_threads=2)
    message = str(info.value)
    assert message != "load failed: failed to load model", message  # it says why
    print(message)


def test_a_lora_llama_cpp_refuses_fails_the_load_with_its_own_reason(default_model_path, tmp_path):
    """An adapter whose header passes the checks made before the load (a
    llama adapter, written for the benchmarks' tiny llama) but whose tensors
    do not fit the default model: llama.cpp refuses it after the context
    exists.  That context is closed first, so the model's close does not
    replace the reason with "still has open contexts"; the load fails with
    bad_request naming the file."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from lora_models import write_lora
    from tiny_model import write_tiny_llama

    adapter = write_lora(write_tiny_llama(tmp_path / "tiny.gguf"), tmp_path / "tiny-lora.gguf", seed=1)
    with pytest.raises(EngineError, match=f"load failed: LoRA adapter {adapter} cannot be used with "
                                          "this model: .*has incorrect shape") as info:
        Runner.spawn(str(default_model_path), n_ctx=256, n_threads=2, lora_paths=[str(adapter)])
    assert info.value.code == "bad_request"


def test_shutdown_during_a_load_exits_cleanly(default_model_path):
    """A load under way when ``shutdown`` arrives stops at its next progress
    report; the runner exits 0 and no call hangs."""
    endpoint, directory = private_ipc_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "serve", "--model",
                             default_model_path, "--endpoint", endpoint, "--defer-load"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().split() == ["endpoint", endpoint]
        with Runner.connect(endpoint) as r:
            r.load(n_ctx=256, n_threads=2)
            r.shutdown(timeout=30)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_runner_killed_during_its_load_fails_the_wait(default_model_path):
    """SIGKILL right after ``load``: waiting for the load raises instead of
    polling ``health`` forever (a connected client sees the connection drop)."""
    endpoint, directory = private_ipc_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "serve", "--model",
                             default_model_path, "--endpoint", endpoint, "--defer-load"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().split() == ["endpoint", endpoint]
        with Runner.connect(endpoint) as r:
            r.load(n_ctx=256, n_threads=2)
            proc.kill()
            outcome: list = []

            def wait() -> None:
                try:
                    outcome.append(r.wait_ready(load_timeout=HANG_S))
                except BaseException as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=wait, daemon=True)
            thread.start()
            thread.join(2 * HANG_S)
            assert outcome, "wait_ready neither returned nor raised"
            assert isinstance(outcome[0], (RunnerGone, TimeoutError)), outcome[0]
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
