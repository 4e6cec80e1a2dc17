"""Who may connect to a runner (docs/protocol.md, Transport).

* ``ipc://PATH`` is open to this user only: the socket file is created mode
  0600 whatever the umask, and private endpoints live in a 0700 directory.
  Abstract-namespace ipc (``ipc://@name``) has no file mode at all, so any
  local user could connect: it needs CURVE or an explicit permission.
* ``tcp://`` on a loopback address (127.0.0.0/8, ::1, localhost) is open to
  the local machine, as ipc to other users would be with a shared path.
* Any other ``tcp://`` address (``0.0.0.0``, ``*``, an interface, a public
  address) is refused unless the runner serves it with ZeroMQ's CURVE
  security: the runner holds a key pair, and a ZAP handler
  (:class:`zmq.auth.thread.ThreadAuthenticator`) admits only clients whose
  public key lies in its authorized-clients directory.  Key files are
  ``zmq.auth`` certificates (:func:`create_keys`).

Private ipc directories are named ``llama-runner-<creator pid>-<random>``
and record the runner's pid in a ``pid`` file, so that one left behind by a
killed process can be recognised and removed (:func:`remove_stale_private_dirs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import shutil
import stat
import tempfile
from typing import Iterator

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("runner.security")

ZAP_DOMAIN = "llama-runner"            # the ZAP domain the runner's socket and handler share
SERVER_KEY = "server"                  # server.key (public) and server.key_secret in a curve dir
AUTHORIZED_DIR = "authorized_clients"  # public keys (*.key) of the clients a runner admits
PRIVATE_PREFIX = "llama-runner-"       # private ipc directories: llama-runner-<pid>-<random>
_PRIVATE_NAME = re.compile(r"llama-runner-(\d+)-[A-Za-z0-9_]+")
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class InsecureEndpoint(ValueError):
    """An endpoint the runner will not serve as asked (see the module doc)."""


# -- endpoints ---------------------------------------------------------------------

def endpoint_kind(endpoint: str) -> str:
    """``ipc``, ``abstract`` (``ipc://@name``), ``loopback`` (tcp on a loopback
    address) or ``network`` (any other tcp address: wildcards, interface names
    and host names included).  Other transports raise InsecureEndpoint."""
    transport, sep, address = endpoint.partition("://")
    if not sep:
        raise InsecureEndpoint(f"endpoint {endpoint!r} is not of the form ipc://PATH or "
                               "tcp://HOST:PORT")
    if transport == "ipc":
        return "abstract" if address.startswith("@") else "ipc"
    if transport != "tcp":
        raise InsecureEndpoint(f"endpoint {endpoint!r}: only ipc:// and tcp:// are served")
    host = address.rpartition(":")[0]
    if host == "localhost":
        return "loopback"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "network"  # "*", an interface name, a host name, a source;address pair
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return "loopback" if ip.is_loopback else "network"


def check_endpoint(endpoint: str, *, curve: bool, allow_abstract_ipc: bool = False) -> str:
    """Refuse an endpoint that would let strangers in; returns its kind."""
    kind = endpoint_kind(endpoint)
    if kind == "network" and not curve:
        raise InsecureEndpoint(
            f"{endpoint} is reachable from other machines and the runner has no "
            "authentication without keys: serve it with CURVE (llama-runner keys DIR --client "
            "NAME, then serve --curve-dir DIR; clients pass --server-key DIR/server.key "
            "--client-key DIR/NAME.key_secret), or bind tcp://127.0.0.1:PORT or ipc://PATH")
    if kind == "abstract" and not (curve or allow_abstract_ipc):
        raise InsecureEndpoint(
            f"{endpoint} is an abstract ipc socket, which any local user can connect to: use "
            "ipc://PATH, serve it with --curve-dir, or pass --allow-abstract-ipc")
    return kind


@contextlib.contextmanager
def _owner_only_umask() -> Iterator[None]:
    """Files and directories created meanwhile are this user's only (0600, 0700)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind ``sock``; an ipc socket file is created mode 0600 whatever the
    umask.  Returns the endpoint as bound.

    The umask is process-wide: call this before starting threads that create
    files (the runner binds before its worker, load and engine threads exist).
    """
    with _owner_only_umask():
        sock.bind(endpoint)
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    if endpoint_kind(bound) == "ipc":
        os.chmod(bound[len("ipc://"):], 0o600)  # the umask already did; stated, not assumed
    return bound


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ``ipc://`` endpoint (None for tcp and abstract ipc)."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return endpoint[len("ipc://"):]
    return None


# -- CURVE keys ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ServerKeys:
    """What a runner needs to serve CURVE: its key pair and whom to admit."""

    public: bytes          # the runner's public key (Z85, 40 bytes); clients need it
    secret: bytes          # the runner's secret key (Z85)
    authorized_dir: str    # directory of the admitted clients' public keys (*.key)

    @classmethod
    def load(cls, curve_dir: str) -> "ServerKeys":
        """``DIR/server.key_secret`` and ``DIR/authorized_clients/`` (see :func:`create_keys`)."""
        secret_file = os.path.join(curve_dir, SERVER_KEY + ".key_secret")
        authorized = os.path.join(curve_dir, AUTHORIZED_DIR)
        public, secret = _load(secret_file, "--curve-dir")
        if secret is None:
            raise ValueError(f"--curve-dir: {secret_file} holds no secret key")
        _check_private(secret_file, "--curve-dir")
        if not os.path.isdir(authorized):
            raise ValueError(f"--curve-dir: no {authorized} directory (the public keys of the "
                             "clients to admit; llama-runner keys DIR --client NAME makes one)")
        if not zmq.auth.load_certificates(authorized):
            raise ValueError(f"--curve-dir: {authorized} holds no client keys (*.key), so no "
                             "client could connect; llama-runner keys DIR --client NAME adds one")
        return cls(public=public, secret=secret, authorized_dir=authorized)

    def serve(self, context: zmq.Context, sock: zmq.Socket) -> ThreadAuthenticator:
        """Make ``sock`` (not yet bound) a CURVE server that admits only the
        authorized clients; returns the started ZAP handler, to stop after
        the socket is closed."""
        auth = ThreadAuthenticator(context, log=logging.getLogger("runner.security.zap"))
        auth.start()
        auth.configure_curve(domain=ZAP_DOMAIN, location=self.authorized_dir)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never admit all
        return auth


@dataclasses.dataclass(frozen=True)
class ClientKeys:
    """What a client needs to reach a CURVE runner."""

    server_public: bytes   # the runner's public key (Z85, 40 bytes)
    public: bytes          # this client's public key (Z85); the runner must list it
    secret: bytes          # this client's secret key (Z85)

    @classmethod
    def load(cls, server_key_file: str, client_key_file: str) -> "ClientKeys":
        """The runner's ``server.key`` and this client's ``NAME.key_secret``."""
        server_public, _ = _load(server_key_file, "--server-key")
        public, secret = _load(client_key_file, "--client-key")
        if secret is None:
            raise ValueError(f"--client-key: {client_key_file} holds no secret key (pass the "
                             "NAME.key_secret file)")
        return cls(server_public=server_public, public=public, secret=secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (not yet connected) a CURVE client of the runner."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def _load(path: str, field: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{field}: cannot read a key from {path}: {exc}") from None
    for key in (public, secret):
        if key is not None and len(key) != 40:
            raise ValueError(f"{field}: {path} holds a key of {len(key)} characters, not a "
                             "40-character Z85 CURVE key")
    return public, secret


def _check_private(path: str, field: str) -> None:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise ValueError(f"{field}: {path} is readable by others (mode {mode:o}); "
                         f"chmod 600 {path}")


def create_keys(directory: str, clients: list[str]) -> list[str]:
    """Create a runner's key pair in ``directory`` (unless it has one) and a
    key pair for each client name, whose public key is also placed in
    ``directory/authorized_clients``.  Returns the files written.

    Files are ``zmq.auth`` certificates: ``NAME.key`` holds the public key,
    ``NAME.key_secret`` both.  Everything is created readable by this user
    only.  A client needs ``server.key`` and its own ``NAME.key_secret``.
    """
    for name in clients:
        if not _CLIENT_NAME.fullmatch(name) or name == SERVER_KEY:
            raise ValueError(f"--client: {name!r} is not a key name (letters, digits, '_', "
                             f"'.', '-'; not {SERVER_KEY!r})")
        if os.path.exists(os.path.join(directory, name + ".key_secret")):
            raise ValueError(f"--client: {name} already has keys in {directory}")
    authorized = os.path.join(directory, AUTHORIZED_DIR)
    written = []
    with _owner_only_umask():
        os.makedirs(authorized, mode=0o700, exist_ok=True)
        if not os.path.exists(os.path.join(directory, SERVER_KEY + ".key_secret")):
            written += zmq.auth.create_certificates(directory, SERVER_KEY)
        for name in clients:
            public, secret = zmq.auth.create_certificates(directory, name)
            shutil.copyfile(public, os.path.join(authorized, name + ".key"))
            written += [public, secret, os.path.join(authorized, name + ".key")]
    os.chmod(directory, 0o700)
    os.chmod(authorized, 0o700)
    return written


# -- private ipc directories ---------------------------------------------------------

def private_ipc_endpoint() -> tuple[str, str]:
    """A fresh ``ipc://`` endpoint inside a new directory only this user can enter.

    Returns ``(endpoint, directory)``; whoever creates it removes the
    directory, and records the runner's pid in it (:func:`record_runner`)
    once the runner is another process.
    """
    prefix = f"{PRIVATE_PREFIX}{os.getpid()}-"
    directory = tempfile.mkdtemp(prefix=prefix)
    if len(directory) > 90:  # sockaddr_un holds ~107 bytes; a long TMPDIR would not fit
        os.rmdir(directory)
        directory = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(directory, 0o700)  # mkdtemp already does; stated, not assumed
    return f"ipc://{os.path.join(directory, 'runner.sock')}", directory


def record_runner(directory: str, pid: int) -> None:
    """Write the pid of the runner listening in a private directory."""
    with open(os.path.join(directory, "pid"), "w", encoding="ascii") as f:
        f.write(f"{pid}\n")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie does not (a runner whose killed parent
    left it to an init that does not reap stays one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass          # someone else's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def _recorded_runner(directory: str) -> int | None:
    try:
        with open(os.path.join(directory, "pid"), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def remove_stale_private_dirs(roots: list[str] | None = None) -> list[str]:
    """Remove this user's private ipc directories whose creator and runner
    are both gone (a killed client leaves its directory behind); returns
    those removed.  ``roots``: where to look (the temporary directory and
    /tmp, where :func:`private_ipc_endpoint` creates them)."""
    if roots is None:
        roots = list(dict.fromkeys([tempfile.gettempdir(), "/tmp"]))
    removed = []
    uid = os.getuid()
    for root in roots:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            match = _PRIVATE_NAME.fullmatch(name)
            if match is None:
                continue
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            if _alive(int(match.group(1))):
                continue  # its creator may still be starting the runner
            runner = _recorded_runner(path)
            if runner is not None and _alive(runner):
                continue
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                log.info("removed stale runner directory %s", path)
                removed.append(path)
    return removed
