"""Who may connect (runner/process/security.py): endpoint policy, CURVE keys, ipc
modes and private directories; then real runner processes behind CURVE."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys

import msgpack
import pytest
import zmq
import zmq.auth

from polling import wait_until
from runner.process import security
from runner.process.client import AccessDenied, Runner, RunnerGone
from runner.process.security import ClientKeys, InsecureEndpoint, ServerKeys

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0, "ignore_eos": True}


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- endpoint policy ---------------------------------------------------------------------

@pytest.mark.parametrize("endpoint, kind", [
    ("ipc:///tmp/x/runner.sock", "ipc"),
    ("ipc://relative.sock", "ipc"),
    ("ipc://*", "ipc"),
    ("ipc://@name", "abstract"),
    ("tcp://127.0.0.1:5555", "loopback"),
    ("tcp://127.0.0.1:*", "loopback"),
    ("tcp://127.9.8.7:5555", "loopback"),
    ("tcp://localhost:5555", "loopback"),
    ("tcp://[::1]:5555", "loopback"),
    ("tcp://[::ffff:127.0.0.1]:5555", "loopback"),
    ("tcp://0.0.0.0:*", "network"),
    ("tcp://*:5555", "network"),
    ("tcp://[::]:5555", "network"),
    ("tcp://10.0.0.1:5555", "network"),
    ("tcp://128.0.0.1:5555", "network"),
    ("tcp://eth0:5555", "network"),
    ("tcp://lo:5555", "network"),  # interface names are not resolved: refused, not guessed
    ("tcp://example.com:5555", "network"),
    ("tcp://127.0.0.1;10.0.0.1:5555", "network"),
])
def test_endpoint_kinds(endpoint, kind):
    assert security.endpoint_kind(endpoint) == kind


@pytest.mark.parametrize("endpoint", ["inproc://x", "ws://127.0.0.1:5555", "udp://*:5555",
                                      "127.0.0.1:5555"])
def test_other_transports_are_refused(endpoint):
    with pytest.raises(InsecureEndpoint, match="ipc://"):
        security.check_endpoint(endpoint, curve=True)


def test_network_tcp_needs_curve():
    with pytest.raises(InsecureEndpoint, match="reachable from other machines.*--curve-dir"):
        security.check_endpoint("tcp://0.0.0.0:*", curve=False)
    assert security.check_endpoint("tcp://0.0.0.0:*", curve=True) == "network"
    assert security.check_endpoint("tcp://127.0.0.1:*", curve=False) == "loopback"
    assert security.check_endpoint("ipc:///tmp/x.sock", curve=False) == "ipc"


def test_abstract_ipc_needs_a_flag_or_curve():
    with pytest.raises(InsecureEndpoint, match="any local user.*--allow-abstract-ipc"):
        security.check_endpoint("ipc://@name", curve=False)
    assert security.check_endpoint("ipc://@name", curve=False, allow_abstract_ipc=True) == "abstract"
    assert security.check_endpoint("ipc://@name", curve=True) == "abstract"


def test_ipc_socket_is_0600_under_umask_000(tmp_path):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        with umask(0):
            bound = security.bind(sock, f"ipc://{tmp_path}/runner.sock")
            assert os.umask(0) == 0  # restored
        assert bound == f"ipc://{tmp_path}/runner.sock"
        assert stat.S_ISSOCK(os.lstat(tmp_path / "runner.sock").st_mode)
        assert mode(tmp_path / "runner.sock") == 0o600
    finally:
        sock.close(0)
        ctx.term()


def test_private_ipc_endpoint_is_0700_under_umask_000():
    with umask(0):
        endpoint, directory = security.private_ipc_endpoint()
    try:
        assert endpoint == f"ipc://{directory}/runner.sock"
        assert os.path.basename(directory).startswith(f"llama-runner-{os.getpid()}-")
        assert mode(directory) == 0o700
    finally:
        os.rmdir(directory)


# -- keys ---------------------------------------------------------------------------------

def test_create_keys_under_umask_000(tmp_path):
    d = tmp_path / "keys"
    with umask(0):
        written = security.create_keys(str(d), ["alice", "bob"])
    names = sorted(os.path.relpath(p, d) for p in written)
    assert names == sorted(["server.key", "server.key_secret", "alice.key", "alice.key_secret",
                            "authorized_clients/alice.key", "bob.key", "bob.key_secret",
                            "authorized_clients/bob.key"])
    assert mode(d) == 0o700 and mode(d / "authorized_clients") == 0o700
    for path in written:
        assert mode(path) == 0o600, path
    server = ServerKeys.load(str(d))
    alice = ClientKeys.load(str(d / "server.key"), str(d / "alice.key_secret"))
    assert alice.server_public == server.public
    assert zmq.auth.load_certificate(d / "authorized_clients" / "alice.key")[0] == alice.public
    assert len(server.secret) == len(alice.secret) == 40

    # More clients later: the runner's pair is kept, a name is never reused.
    assert [os.path.basename(p) for p in security.create_keys(str(d), ["carol"])] == [
        "carol.key", "carol.key_secret", "carol.key"]
    assert ServerKeys.load(str(d)).public == server.public
    with pytest.raises(ValueError, match="alice already has keys"):
        security.create_keys(str(d), ["dave", "alice"])
    assert not (d / "dave.key").exists()  # refused before writing anything
    for bad in ("server", "../x", "", "a/b"):
        with pytest.raises(ValueError, match="--client"):
            security.create_keys(str(d), [bad])


def test_server_keys_refuse_unusable_directories(tmp_path):
    with pytest.raises(ValueError, match="--curve-dir: cannot read a key"):
        ServerKeys.load(str(tmp_path))
    security.create_keys(str(tmp_path), [])
    with pytest.raises(ValueError, match="holds no client keys"):
        ServerKeys.load(str(tmp_path))
    (tmp_path / "authorized_clients").rmdir()
    with pytest.raises(ValueError, match="no .*authorized_clients directory"):
        ServerKeys.load(str(tmp_path))
    security.create_keys(str(tmp_path), ["alice"])
    os.chmod(tmp_path / "server.key_secret", 0o644)
    with pytest.raises(ValueError, match="readable by others.*chmod 600"):
        ServerKeys.load(str(tmp_path))


def test_client_keys_need_a_secret_and_real_keys(tmp_path):
    security.create_keys(str(tmp_path), ["alice"])
    with pytest.raises(ValueError, match="--client-key: .* holds no secret key"):
        ClientKeys.load(str(tmp_path / "server.key"), str(tmp_path / "alice.key"))
    (tmp_path / "short.key").write_text('curve\n    public-key = "abc"\n')
    with pytest.raises(ValueError, match="--server-key: .* not a 40-character"):
        ClientKeys.load(str(tmp_path / "short.key"), str(tmp_path / "alice.key_secret"))
    with pytest.raises(ValueError, match="--server-key: cannot read"):
        ClientKeys.load(str(tmp_path / "missing.key"), str(tmp_path / "alice.key_secret"))


# -- stale private directories ----------------------------------------------------------------

def test_stale_private_dirs_are_those_whose_creator_and_runner_are_gone(tmp_path):
    dead, alive = dead_pid(), os.getpid()

    def private(name, runner=None):
        path = tmp_path / name
        path.mkdir(mode=0o700)
        (path / "runner.sock").write_bytes(b"")
        if runner is not None:
            security.record_runner(str(path), runner)
        return path

    cases = {
        private(f"llama-runner-{dead}-abc_1"): True,                   # serve's own, or never started
        private(f"llama-runner-{dead}-abc_2", runner=dead): True,      # client and runner killed
        private(f"llama-runner-{dead}-abc_3", runner=alive): False,    # the runner still serves
        private(f"llama-runner-{alive}-abc_4"): False,                 # its creator is starting one
        private(f"llama-runner-{alive}-abc_5", runner=dead): False,    # its creator sees it die
        private("llama-runner-abc12345"): False,                       # not our naming
        private(f"other-{dead}-abc"): False,
    }
    (tmp_path / f"llama-runner-{dead}-file").write_bytes(b"")         # not a directory
    os.symlink(tmp_path / f"llama-runner-{dead}-abc_1", tmp_path / f"llama-runner-{dead}-link")

    removed = security.remove_stale_private_dirs([str(tmp_path)])
    assert sorted(removed) == sorted(str(p) for p, stale in cases.items() if stale)
    for path, stale in cases.items():
        assert path.exists() != stale, path
    assert (tmp_path / f"llama-runner-{dead}-file").exists()
    assert os.path.islink(tmp_path / f"llama-runner-{dead}-link")


def test_a_zombie_runner_counts_as_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_until(lambda: open(f"/proc/{proc.pid}/stat", "rb").read().rpartition(b")")[2].split()[0] == b"Z")
    try:
        assert not security._alive(proc.pid)
        assert security._alive(os.getpid())
    finally:
        proc.wait()


# -- real runner processes ------------------------------------------------------------------------

def serve_cmd(model: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "runner.cli", "serve", "--model", model, *args]


@contextlib.contextmanager
def serving(cmd: list[str], **popen):
    """A runner started by hand; yields (process, bound endpoint)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **popen)
    try:
        words = proc.stdout.readline().split()
        assert words[:1] == ["endpoint"], "the runner did not start"
        yield proc, words[1]
    finally:
        proc.kill()
        proc.wait()


def refused(cmd: list[str]) -> str:
    """Run a serve command that must refuse to start; its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    return proc.stderr


def test_serving_all_interfaces_without_keys_is_refused(default_model_path):
    err = refused(serve_cmd(default_model_path, "--endpoint", "tcp://0.0.0.0:*", "--defer-load"))
    assert "tcp://0.0.0.0:* is reachable from other machines" in err
    assert "llama-runner keys DIR --client NAME, then serve --curve-dir DIR" in err


def test_curve_dir_without_authorized_clients_is_refused(default_model_path, tmp_path):
    security.create_keys(str(tmp_path), [])
    err = refused(serve_cmd(default_model_path, "--endpoint", "tcp://0.0.0.0:*", "--defer-load",
                            "--curve-dir", str(tmp_path)))
    assert "holds no client keys" in err


@pytest.fixture(scope="module")
def curve_runner(default_model_path, tmp_path_factory):
    """A runner on all interfaces behind CURVE; yields (endpoint, keys dir)."""
    keys = tmp_path_factory.mktemp("curve")
    security.create_keys(str(keys), ["alice"])
    zmq.auth.create_certificates(str(keys), "stranger")  # a key pair nobody authorized
    cmd = serve_cmd(default_model_path, "--endpoint", "tcp://0.0.0.0:*", "--curve-dir", str(keys),
                    "--ctx", "512", "--threads", "2")
    with serving(cmd) as (proc, endpoint):
        assert endpoint.startswith("tcp://0.0.0.0:")
        yield endpoint.replace("0.0.0.0", "127.0.0.1"), keys
        assert proc.poll() is None  # whatever the strangers did, it still runs


def alice(keys) -> ClientKeys:
    return ClientKeys.load(str(keys / "server.key"), str(keys / "alice.key_secret"))


def test_an_authorized_curve_client_completes(curve_runner):
    endpoint, keys = curve_runner
    with Runner.connect(endpoint, keys=alice(keys)) as r:
        assert r.wait_ready(load_timeout=120).state == "ready"
        text, final = r.complete("The capital of France is", num_predict=6, **GREEDY).text()
        assert final.eval_count == 6 and text


@pytest.mark.parametrize("who, message", [
    ("no keys", "requires CURVE security"),
    ("unauthorized key", "refused this client's key"),
    ("wrong server key", "is the server key the runner's"),
])
def test_clients_without_the_right_keys_get_no_reply(curve_runner, who, message):
    endpoint, keys = curve_runner
    keys_for = {
        "no keys": None,
        "unauthorized key": ClientKeys.load(str(keys / "server.key"), str(keys / "stranger.key_secret")),
        "wrong server key": ClientKeys.load(str(keys / "stranger.key"), str(keys / "alice.key_secret")),
    }
    with Runner.connect(endpoint, keys=keys_for[who]) as r:
        for _ in range(2):  # refused again, not left waiting
            with pytest.raises(AccessDenied, match=message):
                r.info(timeout=30)
    with Runner.connect(endpoint, keys=alice(keys)) as r:  # the runner is unharmed
        assert r.health(timeout=30).state in ("loading", "ready")
        r.wait_ready(load_timeout=120)
        assert r.complete("Hi", num_predict=2, **GREEDY).text()[1].eval_count == 2


def test_a_plain_zeromq_client_gets_nothing_from_a_curve_runner(curve_runner):
    endpoint, _ = curve_runner
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for request in ({"op": "health", "id": 1}, {"op": "shutdown", "id": 2, "drain": False}):
            sock.send(msgpack.packb(request))
        assert not sock.poll(500)
    finally:
        sock.close(0)
        ctx.term()


def test_cli_generate_with_keys(curve_runner, capsys):
    from runner.cli import main

    endpoint, keys = curve_runner
    with Runner.connect(endpoint, keys=alice(keys)) as r:
        r.wait_ready(load_timeout=120)
    assert main(["generate", "--endpoint", endpoint, "--server-key", str(keys / "server.key"),
                 "--client-key", str(keys / "alice.key_secret"), "-p", "Hello", "-n", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["info", "--endpoint", endpoint, "--server-key", str(keys / "server.key"),
                 "--client-key", str(keys / "stranger.key_secret")]) == 1
    assert "refused this client's key" in capsys.readouterr().err
    assert main(["info", "--endpoint", endpoint, "--server-key", str(keys / "server.key")]) == 1
    assert "--server-key and --client-key go together" in capsys.readouterr().err


def test_abstract_ipc_is_refused_unless_allowed(default_model_path):
    name = f"ipc://@llama-runner-test-{os.getpid()}"
    assert "any local user can connect" in refused(
        serve_cmd(default_model_path, "--endpoint", name, "--defer-load"))
    cmd = serve_cmd(default_model_path, "--endpoint", name, "--defer-load", "--allow-abstract-ipc")
    with serving(cmd) as (proc, endpoint):
        assert endpoint == name
        with Runner.connect(endpoint) as r:
            assert r.health(timeout=60).state == "launched"
            r.shutdown()
        assert proc.wait(60) == 0


def test_runner_ipc_modes_under_umask_000(default_model_path, tmp_path):
    path = tmp_path / "runner.sock"
    with serving(serve_cmd(default_model_path, "--endpoint", f"ipc://{path}", "--defer-load"),
                 umask=0) as (proc, endpoint):
        assert mode(path) == 0o600
    with serving(serve_cmd(default_model_path, "--defer-load"), umask=0) as (proc, endpoint):
        socket_path = endpoint[len("ipc://"):]
        directory = os.path.dirname(socket_path)
        assert os.path.basename(directory).startswith(f"llama-runner-{proc.pid}-")
        assert mode(directory) == 0o700 and mode(socket_path) == 0o600
        with Runner.connect(endpoint) as r:
            r.shutdown()
        assert proc.wait(60) == 0
        assert not os.path.exists(directory)


def test_a_spawned_runner_found_gone_takes_its_directory(default_model_path):
    r = Runner.spawn(default_model_path, n_ctx=256, n_threads=1)
    try:
        directory = os.path.dirname(r.endpoint[len("ipc://"):])
        with open(os.path.join(directory, "pid")) as f:
            assert int(f.read()) == r.process.pid
        os.kill(r.process.pid, signal.SIGKILL)
        with pytest.raises(RunnerGone, match="SIGKILL"):
            r.health(timeout=60)
        assert not os.path.exists(directory)
    finally:
        r.close()


KILLED_CLIENT = r"""
import sys, time
from runner.process.client import Runner
r = Runner.spawn(sys.argv[1], n_ctx=256, n_threads=1)
print(r.endpoint, r.process.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_clients_directory_goes_on_the_next_spawn(default_model_path):
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, default_model_path],
                              stdout=subprocess.PIPE, text=True)
    try:
        endpoint, runner_pid = client.stdout.readline().split()
    finally:
        client.kill()
        client.wait()
    directory = os.path.dirname(endpoint[len("ipc://"):])
    wait_until(lambda: not security._alive(int(runner_pid)))  # it follows its parent
    assert os.path.isdir(directory)  # nobody was left to remove it
    r = Runner.spawn(default_model_path, n_ctx=256, n_threads=1)
    try:
        assert not os.path.exists(directory)
    finally:
        r.close()
