"""Remote devices through ggml's RPC backend: endpoints, probing, the loopback rule.

``llama-runner rpc-server`` serves this host's ggml devices over TCP (ggml's
own server, ``ggml_backend_rpc_start_server``); a runner given ``--rpc
HOST:PORT`` (or the ``load`` field ``rpc_servers``) adds that server's devices
to its own before loading, and llama.cpp then places layers and their KV
cache on them like on local GPUs (docs/rpc.md).

Two properties of ggml's RPC code shape this module:

* The protocol has no authentication or encryption: whoever reaches the port
  can allocate, read and write the served device's memory and run graphs on
  it.  :func:`check_bind_host` keeps servers on loopback unless told otherwise.
* ggml's client aborts the whole process when it cannot connect.
  :func:`probe` speaks the protocol's first messages itself, with a timeout,
  so that a wrong, busy or dead endpoint in a request fails that request
  instead of the runner.  A connection lost *after* that no longer aborts
  (patches/0003): the decode that meets it raises ``DeviceLostError``, and
  the engine fails its requests and reports itself unhealthy with
  :func:`lost_message` (docs/rpc.md).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_PORT = 50052          # the port llama.cpp's rpc-server uses
PROBE_TIMEOUT = 5.0           # seconds a probe waits for each answer

# Wire format (ggml-rpc.cpp): a request is | cmd u8 | size u64 | payload |,
# a reply is | size u64 | payload |, little-endian, structs packed.
_CMD_GET_DEVICE_MEMORY = 11   # {device u32} -> {free u64, total u64}
_CMD_HELLO = 14               # {conn_caps[24]} -> {major, minor, patch, pad u8; conn_caps[24]}
_CMD_DEVICE_COUNT = 15        # {} -> {count u32}
_CONN_CAPS = 24               # RPC_CONN_CAPS_SIZE: transport capabilities (all zero: plain TCP)


class RpcError(ValueError):
    """An RPC endpoint is malformed, unreachable, busy or incompatible."""


@dataclass(frozen=True)
class RemoteDevice:
    """One device an RPC server offers, as its probe reported it."""

    index: int        # the server's device number
    free: int         # bytes free on it
    total: int        # bytes in total


@dataclass(frozen=True)
class ServerProbe:
    """What an RPC server said to a probe."""

    endpoint: str                      # HOST:PORT probed
    version: tuple[int, int, int]      # its protocol version
    devices: tuple[RemoteDevice, ...]  # the devices it serves, in its order


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); RpcError for anything else.

    ggml splits at the first colon, so IPv6 literals cannot be written.
    """
    if not isinstance(text, str) or text.count(":") != 1:
        raise RpcError(f"RPC endpoint must be HOST:PORT (IPv4 address or name), not {text!r}")
    host, _, port_text = text.partition(":")
    if not host or any(c.isspace() for c in host):
        raise RpcError(f"RPC endpoint {text!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise RpcError(f"RPC endpoint {text!r}: port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise RpcError(f"RPC endpoint {text!r}: port must be 1-65535")
    return host, port


def parse_endpoints(value: str | Iterable[str] | None) -> list[str]:
    """A comma-separated string or a list of ``HOST:PORT`` -> checked list, duplicates refused."""
    if value is None:
        return []
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    items = [p for p in items if p]
    for item in items:
        parse_endpoint(item)
    if len(set(items)) != len(items):
        raise RpcError(f"RPC endpoint given twice: {items}")
    return items


def _exchange(sock: socket.socket, cmd: int, payload: bytes, reply_size: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    head = _recv_exact(sock, 8)
    (size,) = struct.unpack("<Q", head)
    if size != reply_size:
        raise RpcError(f"unexpected reply size {size} to command {cmd} (not a ggml RPC server "
                       "of this protocol version?)")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return bytes(data)


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT) -> ServerProbe:
    """Ask the RPC server at ``endpoint`` for its version and devices.

    Raises RpcError saying what is wrong: nothing listens, the server is busy
    (ggml's server takes one client at a time: another runner holds it), it
    is not an RPC server, or its protocol version differs from this build's.
    """
    from runner import _llama

    host, port = parse_endpoint(endpoint)
    want = tuple(_llama.rpc_protocol_version())
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        raise RpcError(f"RPC server {endpoint}: no answer to connect within {timeout:g} s") from None
    except OSError as exc:
        raise RpcError(f"RPC server {endpoint} unreachable: {exc.strerror or exc}") from None
    try:
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = _exchange(sock, _CMD_HELLO, bytes(_CONN_CAPS), 4 + _CONN_CAPS)
            version = (hello[0], hello[1], hello[2])
            if version[0] != want[0] or version[1] > want[1]:
                raise RpcError(f"RPC server {endpoint} speaks protocol {'.'.join(map(str, version))}, "
                               f"this build {'.'.join(map(str, want))}: run the same llama-runner "
                               "(or llama.cpp) version on both hosts")
            (count,) = struct.unpack("<I", _exchange(sock, _CMD_DEVICE_COUNT, b"", 4))
            devices = []
            for i in range(count):
                free, total = struct.unpack(
                    "<QQ", _exchange(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16))
                devices.append(RemoteDevice(i, free, total))
    except socket.timeout:
        raise RpcError(f"RPC server {endpoint} did not answer within {timeout:g} s: it serves one "
                       "client at a time, is another runner using it?") from None
    except (ConnectionError, OSError) as exc:
        raise RpcError(f"RPC server {endpoint} dropped the connection ({exc}): is it a "
                       "llama-runner rpc-server of this version?") from None
    if not devices:
        raise RpcError(f"RPC server {endpoint} serves no device")
    return ServerProbe(endpoint, version, tuple(devices))


def add_servers(endpoints: Iterable[str], timeout: float = PROBE_TIMEOUT) -> list[str]:
    """Probe each endpoint, then add its devices to this process's ggml
    devices; returns the names of all their devices ("RPC0", ...) in order.

    Every endpoint is probed before any is added, so a bad one fails the
    whole call without leaving the others half added.
    """
    from runner import _llama

    endpoints = parse_endpoints(endpoints)
    added = _llama.rpc_servers()
    if len(set(added) | set(endpoints)) > _llama.rpc_max_servers():
        raise RpcError(f"at most {_llama.rpc_max_servers()} RPC servers per runner")
    for endpoint in endpoints:
        if endpoint not in added:
            probe(endpoint, timeout)
    # A server that dies between its probe and ggml's connect aborts the
    # process: one clear line on stderr for whoever reads it (the runner's
    # parent), no gdb backtrace.
    _llama.set_plain_aborts()
    names: list[str] = []
    for endpoint in endpoints:
        names += _llama.rpc_add_server(endpoint)
        log.info("RPC server %s: devices %s", endpoint, names)
    return names


def lost_message(endpoints: Iterable[str]) -> str:
    """What a runner says once the connection to RPC servers holding part of
    its model was lost: the affected requests' error and ``health``'s."""
    names = ", ".join(endpoints)
    return (f"lost the RPC server {names} holding part of the model (its connection failed: "
            "the server stopped or its host became unreachable); this runner cannot compute "
            "any more: start a new one once the server is back")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IPv4 literal, as ggml's server needs) is a loopback address."""
    try:
        return ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        return False


def check_bind_host(host: str, allow_network: bool) -> None:
    """Refuse to serve on anything but loopback unless ``allow_network``."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise RpcError(f"--host must be an IPv4 address (ggml's RPC server binds no names), "
                       f"not {host!r}") from None
    if not is_loopback(host) and not allow_network:
        raise RpcError(f"refusing to serve on {host}: the RPC protocol has no authentication "
                       "or encryption, so anyone who can reach that address could read and write "
                       "this host's device memory. Keep 127.0.0.1 and reach it through an SSH "
                       "tunnel, or pass --allow-network on a private network you trust "
                       "(docs/rpc.md)")


def check_port_free(host: str, port: int) -> None:
    """RpcError now when the port cannot be bound (ggml would only print it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RpcError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None


def serve(host: str, port: int, devices: list[str] | None = None, n_threads: int | None = None,
          cache_dir: str | None = None, allow_network: bool = False) -> None:
    """Serve this host's devices at ``host:port`` until the process is stopped.

    ``devices`` defaults to what llama.cpp's rpc-server picks: every GPU,
    else the CPU.  The server runs on a thread of its own so that the main
    thread stays interruptible (SIGINT, SIGTERM end the process).
    """
    from runner import _llama

    check_bind_host(host, allow_network)
    check_port_free(host, port)
    _llama.backend_init()
    local = [d for d in _llama.devices() if d["backend"] != "RPC"]
    if devices is None:
        gpus = [d["name"] for d in local if d["type"] in ("gpu", "igpu")]
        devices = gpus or [d["name"] for d in local if d["type"] == "cpu"][:1]
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _llama.rpc_start_server(f"{host}:{port}", devices, n_threads=threads, cache_dir=cache_dir)
        except BaseException as exc:  # it returns only when it could not start
            failure.append(exc)

    thread = threading.Thread(target=run, name="rpc-server", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if failure:
        raise failure[0]
