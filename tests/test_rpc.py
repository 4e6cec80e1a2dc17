"""ggml's RPC backend (issue 20): rpc-server processes on 127.0.0.1 serving
their CPU, runners placing the default model's layers across them and their
own CPU, and what happens when a server is wrong, busy or killed (the
runner fails the affected requests and reports itself unhealthy; a pool
replaces it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from runner.engine.requests import BadRequest
from runner.model import rpc
from polling import drain, wait_until

GREEDY = {"temperature": 0.0, "seed": 1}
PROMPTS = ["The capital of France is", "Écris un haïku sur la mer 🌊 et les 東京 lights:"]


# -- pure: endpoints and the loopback rule ------------------------------------

@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:50052", ("127.0.0.1", 50052)),
    ("gpu-box:1", ("gpu-box", 1)),
    ("10.0.0.7:65535", ("10.0.0.7", 65535)),
])
def test_parse_endpoint_accepts_host_and_port(text, want):
    assert rpc.parse_endpoint(text) == want


@pytest.mark.parametrize("text, why", [
    ("127.0.0.1", "HOST:PORT"),
    ("", "HOST:PORT"),
    (":50052", "no host"),
    ("127.0.0.1:0", "1-65535"),
    ("127.0.0.1:65536", "1-65535"),
    ("127.0.0.1:http", "not a number"),
    ("[::1]:50052", "HOST:PORT"),
    ("host name:1", "no host"),
])
def test_parse_endpoint_refuses_with_the_reason(text, why):
    with pytest.raises(rpc.RpcError, match=why):
        rpc.parse_endpoint(text)


def test_parse_endpoints_splits_commas_and_refuses_duplicates():
    assert rpc.parse_endpoints("a:1, b:2,") == ["a:1", "b:2"]
    assert rpc.parse_endpoints(None) == []
    with pytest.raises(rpc.RpcError, match="twice"):
        rpc.parse_endpoints(["a:1", "a:1"])


@pytest.mark.parametrize("host, allow, ok", [
    ("127.0.0.1", False, True),
    ("127.0.0.2", False, True),
    ("0.0.0.0", False, False),
    ("192.168.1.20", False, False),
    ("0.0.0.0", True, True),
    ("192.168.1.20", True, True),
])
def test_bind_host_is_loopback_unless_allowed(host, allow, ok):
    if ok:
        rpc.check_bind_host(host, allow)
    else:
        with pytest.raises(rpc.RpcError, match="no authentication"):
            rpc.check_bind_host(host, allow)


def test_bind_host_must_be_an_ipv4_literal():
    with pytest.raises(rpc.RpcError, match="IPv4"):
        rpc.check_bind_host("localhost", True)


def test_rpc_server_command_refuses_a_network_address(capsys):
    from runner.cli import build_parser, main

    assert main(["rpc-server", "--host", "0.0.0.0", "--port", str(_free_port())]) == 1
    err = capsys.readouterr().err
    assert "no authentication" in err and "--allow-network" in err
    help_text = build_parser()._subparsers._group_actions[0].choices["rpc-server"].format_help()
    assert "--allow-network" in help_text and "authentication" in help_text


def test_the_layer_plan_puts_remote_devices_first_as_llama_cpp_does(default_model_path):
    """llama.cpp lists RPC devices before local GPUs in the model's devices,
    and tensor_split follows that order: so does the plan, whatever order
    discover lists them in (local backends register first)."""
    from runner.model.gguf import read_gguf
    from runner.model.memory import Device, plan_layers

    devices = [Device("CPU", "cpu", "cpu", 8 << 30, 8 << 30),
               Device("CUDA0", "gpu", "gpu", 4 << 30, 8 << 30),
               Device("RPC0", "127.0.0.1:50052", "gpu", 4 << 30, 8 << 30)]
    plan = plan_layers(read_gguf(default_model_path), devices)
    assert [u.device.id for u in plan.usage] == ["RPC0", "CUDA0", "CPU"]
    assert plan.fully_offloaded and len(plan.tensor_split) == 2
    layers = {u.device.id: u.layers for u in plan.usage}
    assert layers["RPC0"] and layers["CUDA0"] and max(layers["RPC0"]) < min(layers["CUDA0"])


# -- probing (no model) --------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_of_a_closed_port_says_unreachable(llama):
    with pytest.raises(rpc.RpcError, match="unreachable"):
        rpc.probe(f"127.0.0.1:{_free_port()}", timeout=5)


def test_probe_of_a_silent_listener_times_out_saying_busy(llama):
    """ggml's server serves one client at a time: the next one is accepted by
    the kernel and then gets no answer.  A silent listener looks the same."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        endpoint = "127.0.0.1:%d" % listener.getsockname()[1]
        with pytest.raises(rpc.RpcError, match="one client at a time"):
            rpc.probe(endpoint, timeout=0.5)


def test_probe_of_something_else_says_so(llama):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        endpoint = "127.0.0.1:%d" % listener.getsockname()[1]

        def answer_garbage():
            conn, _ = listener.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        t = threading.Thread(target=answer_garbage)
        t.start()
        with pytest.raises(rpc.RpcError, match="unexpected reply size|dropped"):
            rpc.probe(endpoint, timeout=5)
        t.join()


# -- rpc-server processes --------------------------------------------------------

class RpcServer:
    """A `llama-runner rpc-server` child serving its CPU on 127.0.0.1."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runner.cli", "rpc-server", "--port", str(self.port),
             "--threads", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(self._answers, timeout=60, interval=0.1)

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"rpc-server exited: {self.process.stderr.read().decode()}")
        try:
            rpc.probe(self.endpoint, timeout=5)
        except rpc.RpcError:
            return False
        return True

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stderr.close()


@pytest.fixture
def rpc_servers(llama):
    """A factory of rpc-server processes, killed after the test."""
    made: list[RpcServer] = []

    def make(n: int, port: int | None = None) -> list[RpcServer]:
        servers = [RpcServer(port) for _ in range(n)]
        made.extend(servers)
        return servers

    yield make
    for server in made:
        server.kill()


def test_probe_reports_version_and_free_memory(rpc_servers, llama):
    (server,) = rpc_servers(1)
    found = rpc.probe(server.endpoint)
    assert found.version == tuple(llama.rpc_protocol_version())
    (dev,) = found.devices
    assert dev.index == 0 and 0 < dev.free <= dev.total


def test_discover_lists_the_remote_devices_with_their_memory(rpc_servers):
    servers = rpc_servers(2)
    out = subprocess.run(
        [sys.executable, "-m", "runner.cli", "discover", "--json", "--rpc",
         ",".join(s.endpoint for s in servers)],
        capture_output=True, text=True, check=True).stdout
    remote = [d for d in json.loads(out) if d["backend"] == "RPC"]
    assert [d["description"] for d in remote] == [s.endpoint for s in servers]
    assert [d["name"] for d in remote] == ["RPC0", "RPC1"]
    assert all(d["free"] > 0 and d["total"] >= d["free"] for d in remote)


def _tokens(runner, prompt: str, n: int) -> tuple[list[int], object]:
    tokens, final = [], None
    for event in runner.complete(prompt, num_predict=n, **GREEDY):
        if hasattr(event, "tokens"):
            tokens += event.tokens
        else:
            final = event
    return tokens, final


def test_layers_split_across_two_servers_and_the_cpu_give_the_local_tokens(rpc_servers, spawn):
    """30 layers: the first 10 stay on the runner's CPU, the last 20 and the
    output layer go to RPC0 and RPC1 (llama.cpp puts remote devices first and
    splits by free memory).  Greedy output is token for token the local one."""
    servers = rpc_servers(2)
    local = spawn(n_ctx=1024)
    want = [_tokens(local, p, 48) for p in PROMPTS]
    local.close()

    split = spawn(n_ctx=1024, n_gpu_layers=21, rpc_servers=[s.endpoint for s in servers])
    got = [_tokens(split, p, 48) for p in PROMPTS]
    for (want_tokens, want_final), (got_tokens, got_final) in zip(want, got):
        assert got_final.done_reason == want_final.done_reason != "error"
        assert got_tokens == want_tokens and len(got_tokens) > 0

    placement = split.info(timeout=60).engine["layer_devices"]
    layers = placement["layers"]
    assert len(layers) == 30 and placement["output"] in ("RPC0", "RPC1")
    assert layers[:10] == ["CPU"] * 10
    assert set(layers[10:]) == {"RPC0", "RPC1"}
    assert layers[10:] == sorted(layers[10:])  # contiguous runs, RPC0 first
    engine = split.info(timeout=60).engine
    assert engine["config"]["rpc_servers"] == [s.endpoint for s in servers]
    # The load's plan counted the remote devices, ahead of the CPU as llama.cpp orders them.
    assert [d["name"] for d in engine["placement"]["devices"]] == ["RPC0", "RPC1", "CPU"]
    names = {d.name: d for d in split.discover(timeout=60)}
    assert names["RPC0"].description == servers[0].endpoint and names["RPC0"].free > 0


def test_a_bad_rpc_endpoint_fails_the_load_with_the_reason(spawn):
    """The runner answers health with bad_request and the reason (it does not
    die: ggml would abort on the connect the probe saves it from)."""
    port = _free_port()
    with pytest.raises(BadRequest, match=f"127.0.0.1:{port} unreachable"):
        spawn(rpc_servers=[f"127.0.0.1:{port}"])


def test_a_busy_server_fails_the_second_runners_load_with_the_reason(rpc_servers, spawn):
    """ggml's server takes one client at a time: a second runner's load is
    refused after the probe's timeout instead of waiting forever."""
    (server,) = rpc_servers(1)
    first = spawn(n_gpu_layers=4, rpc_servers=[server.endpoint])
    with pytest.raises(BadRequest, match="one client at a time"):
        spawn(rpc_servers=[server.endpoint])
    text, final = first.complete("Hello", num_predict=4, **GREEDY).text()
    assert final.done_reason == "length"




def test_a_server_killed_mid_stream_fails_the_streams_and_leaves_the_runner_unhealthy(
        rpc_servers, spawn):
    """ggml's RPC client used to abort the process on a lost connection
    (patches/0003 makes it fail the operations instead).  Both streams end
    with an error naming the lost server, the runner stays up and says it
    is unhealthy, and refuses new work with the same reason; nothing waits
    forever, and it still shuts down cleanly."""
    from runner.engine.requests import InternalError, NotReady
    from runner.process.client import RunnerGone

    servers = rpc_servers(2)
    lost = servers[1].endpoint  # layers 21-29 and the output layer
    runner = spawn(n_ctx=2048, parallel=2, n_gpu_layers=21,
                   rpc_servers=[s.endpoint for s in servers])
    streams = [runner.complete(p, num_predict=900, **GREEDY) for p in PROMPTS]
    for stream in streams:
        next(iter(stream))  # generating
    servers[1].kill()
    for stream in streams:
        events, error = drain(stream, 180)
        assert not any(getattr(e, "done_reason", None) == "length" for e in events), \
            "finished despite the kill"
        assert isinstance(error, InternalError) and not isinstance(error, RunnerGone), repr(error)
        assert f"lost the RPC server {lost}" in str(error), error
    assert runner.returncode is None, "the runner died"

    health = runner.health(timeout=30)
    assert (health.state, health.error_code) == ("error", "internal")
    assert f"lost the RPC server {lost}" in health.error
    for _ in range(2):  # each refused at once, not queued behind a broken model
        _, error = drain(runner.complete("Hello", num_predict=4, **GREEDY), 60)
        assert isinstance(error, NotReady) and f"lost the RPC server {lost}" in str(error), repr(error)
    assert runner.tokenize("Hello", timeout=30)  # what needs no device still works
    info = runner.info(timeout=60)
    assert info.state == "error"
    assert info.engine["totals"]["requests"].get("not_ready") == 2
    devices = {d.name: d for d in runner.discover(timeout=60)}
    assert devices["RPC1"].total == 0 and devices["RPC0"].total > 0  # the lost one reads as empty
    with pytest.raises(BadRequest, match="cannot compute any more"):
        runner.load(n_ctx=512)

    runner.close(timeout=60)
    assert runner.returncode == 0


def test_a_pool_replaces_a_runner_that_lost_a_server(rpc_servers):
    """RunnerPool treats a runner that lost a server like a dead one: after
    the failed stream it asks the runner's health, stops it, and the next
    request starts a new runner (here once the server is back)."""
    from runner.engine.requests import InternalError
    from runner.process.pool import RunnerPool

    servers = rpc_servers(2)
    endpoints = [s.endpoint for s in servers]
    load = {"n_ctx": 1024, "n_threads": 2, "n_gpu_layers": 21, "rpc_servers": endpoints}
    with RunnerPool(load=load) as pool:
        stream = pool.complete("default", PROMPTS[0], num_predict=900, **GREEDY)
        next(stream)
        first = pool.state()["models"]["default"]["pid"]
        servers[1].kill()
        _, error = drain(stream, 180)
        assert isinstance(error, InternalError) and "lost the RPC server" in str(error), repr(error)
        wait_until(lambda: any(e["event"] == "unhealthy" for e in pool.events()), timeout=120)
        event = next(e for e in pool.events() if e["event"] == "unhealthy")
        assert f"lost the RPC server {servers[1].endpoint}" in event["detail"]
        wait_until(lambda: not os.path.exists(f"/proc/{first}"), timeout=120)  # stopped and reaped

        rpc_servers(1, port=servers[1].port)  # the server is back
        text, final = pool.complete("default", "Hello", num_predict=4, **GREEDY).text()
        assert final.done_reason == "length" and text
        assert pool.state()["models"]["default"]["pid"] != first
        assert [e["event"] for e in pool.events()].count("ready") == 2
