"""Client of a runner process (docs/protocol.md): spawn one or connect to one.

Threads: one I/O thread (:class:`_Connection`) serves the DEALER socket and
owns its monitor socket.  Callers, from any thread or event loop, hand it
encoded requests through a locked deque and a wake-up pipe (an inproc PAIR
socket would need one socket per calling thread, since it is no more
thread-safe than the DEALER); it routes every reply by request id to the
caller's sink (a :class:`runner.engine.handoff.Handoff` for blocking streams, whose
wake-up runs without the GIL; one ``loop.call_soon_threadsafe`` per burst for
asyncio).  Two ways skip the I/O thread, each under the lock that guards
the socket: a blocking completion that is the only request in flight
receives on its caller's thread (:meth:`_Connection.receive_here`), and
when every request in flight belongs to one asyncio event loop, that loop
reads the socket itself (``loop.add_reader``) and puts the replies straight
into its streams' queues.  When a spawned runner exits, the I/O thread
sees it through a pidfd and fails every pending call at once with
:class:`RunnerGone`, carrying the exit status and the runner's last stderr
error line.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, Callable, Iterable

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from runner.engine.handoff import new_handoff
from runner.engine.requests import BadRequest, Busy, Chunk, EmbeddingResult, Final, InternalError
from runner.process import protocol as P
from runner.process import security

log = logging.getLogger("runner.client")

Sink = Callable[[Any], None]  # receives a reply struct, or an exception to raise
Media = Sequence[bytes] | dict[int, bytes] | None  # media for a completion (see Runner.complete)


_RECV_NOWAIT = int(zmq.NOBLOCK)  # plain ints: enum arithmetic per reply adds up
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_BURST = 64  # replies read before they are handed on (the rest wait for the next look)


class RunnerGone(InternalError):
    """The runner exited or the connection to it was lost."""

    def __init__(self, message: str, returncode: int | None = None, stderr_line: str | None = None):
        super().__init__(message)
        self.returncode = returncode      # exit status (negative: killed by that signal)
        self.stderr_line = stderr_line    # the runner's last stderr error line


class AccessDenied(RunnerGone):
    """The runner refused this client at the security handshake: no CURVE
    keys where the runner requires them (or the reverse), or a client key
    the runner does not admit."""


# Monitor events the I/O thread acts on: a lost connection, and a refused
# handshake (which libzmq follows with EVENT_DISCONNECTED).
_MONITORED = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def describe_exit(returncode: int, stderr_line: str | None) -> str:
    """``runner exited with status -9 (SIGKILL): <line>``."""
    text = f"runner exited with status {returncode}"
    if returncode < 0:
        try:
            text += f" ({signal.Signals(-returncode).name})"
        except ValueError:
            pass
    if stderr_line:
        text += f": {stderr_line}"
    return text


_FAILURE_WORDS = ("error", "exception", "fail", "fatal", "critical", "abort", "assert",
                  "out of memory")


def pick_error_line(lines: Iterable[str]) -> str | None:
    """The line of a runner's stderr that best says why it failed: the last
    one that speaks of a failure (a warning is no explanation for a crash)."""
    found = None
    for line in lines:
        lowered = line.lower()
        if any(word in lowered for word in _FAILURE_WORDS):
            found = line.strip()
    return found


class StallTimer:
    """A load timeout that starts over whenever progress advances."""

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout   # seconds allowed without progress
        self.best = -1.0         # highest progress seen
        self.since = now         # when it was first seen

    def expired(self, progress: float, now: float) -> bool:
        if progress > self.best:
            self.best, self.since = progress, now
            return False
        return now - self.since > self.timeout


class _StderrTail:
    """Reads a runner's stderr on a thread: forwards each line to logging and
    keeps the last ones for error messages."""

    def __init__(self, stream, keep: int = 64) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)  # newest last
        self._stream = stream
        self._thread = threading.Thread(target=self._read, name="runner-stderr", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for raw in self._stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            log.debug("runner: %s", line)
        self._stream.close()

    def error_line(self, wait: float = 1.0) -> str | None:
        """After the runner exited: wait for the end of its stderr, then pick."""
        self._thread.join(wait)
        return pick_error_line(list(self.lines))


class _Ignore:
    """The sink of a reply nobody waits for (a cancel's acknowledgement),
    callable from any thread or loop; it keeps no loop from reading."""

    __slots__ = ()

    def __call__(self, reply: Any) -> None:
        pass

    put = __call__


_IGNORE = _Ignore()


class _Routes:
    """Request id -> sink, with the sinks counted by the event loop they
    belong to (None for blocking callers), so that the I/O thread sees at
    once whether every request in flight is one loop's.  Guarded by
    ``_Connection._io``."""

    __slots__ = ("_sinks", "_loops", "get")

    def __init__(self) -> None:
        self._sinks: dict[Any, Sink] = {}  # request id -> where its replies go
        self._loops: dict[Any, int] = {}   # event loop (None: not an asyncio sink) -> its sinks
        self.get = self._sinks.get         # the sink of a request id, or None

    def __len__(self) -> int:
        return len(self._sinks)

    def __contains__(self, request_id: Any) -> bool:
        return request_id in self._sinks

    def items(self):
        return self._sinks.items()

    def add(self, request_id: Any, sink: Sink) -> None:
        self._sinks[request_id] = sink
        if sink is not _IGNORE:
            key = getattr(sink, "loop", None)
            self._loops[key] = self._loops.get(key, 0) + 1

    def pop(self, request_id: Any) -> Sink | None:
        sink = self._sinks.pop(request_id, None)
        if sink is not None and sink is not _IGNORE:
            key = getattr(sink, "loop", None)
            left = self._loops[key] - 1
            if left:
                self._loops[key] = left
            else:
                del self._loops[key]
        return sink

    def sole_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop of every request in flight; None when there is
        none, or one is a blocking caller's or another loop's."""
        if len(self._loops) == 1:
            for loop in self._loops:
                return loop
        return None

    def foreign(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether a request in flight is not ``loop``'s."""
        loops = self._loops
        return len(loops) > 1 or (len(loops) == 1 and loop not in loops)


class _LoopReader:
    """One spell of an event loop reading the connection's socket itself."""

    __slots__ = ("loop", "fd", "close_fd")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # the loop that reads
        self.fd = -1      # its duplicate of the socket's ZMQ_FD, once it watches it
        self.close_fd: Callable[[], Any] = _nothing  # closes fd (once), see _fd_closer


def _nothing() -> None:
    pass


def _fd_closer(loop: asyncio.AbstractEventLoop, fd: int) -> Callable[[], Any]:
    """What closes a loop's duplicate of ZMQ_FD: called after ``remove_reader``
    or once the loop is closed, and run anyway when the loop is collected
    (a detach scheduled on a loop that never runs again).  A duplicate, not
    the socket's own descriptor: zmq closes that with the socket, and its
    number, reused, would still be in the loop's selector."""
    try:
        return weakref.finalize(loop, os.close, fd)
    except TypeError:  # a loop type without weak references
        return lambda: os.close(fd)


# Event loop types whose add_reader failed (a proactor loop): they never read.
_NO_READER: set[type] = set()


class _Connection:
    """The DEALER socket and the I/O thread that serves it.

    ``_lock`` guards ``_inbox`` and ``_gone`` (with ``_gone_type``) together, so that a call made
    while the runner dies is either failed by the death sweep or refused at
    submission, never left waiting.

    ``_io`` guards the socket, ``_sinks``, ``_direct`` and ``_reader``.  The
    I/O thread holds it except while it waits.  At most one more thread
    reads the socket under it, and the I/O thread then leaves the reading to
    it (it still sends):

    * the caller of a blocking completion that is the only request in
      flight (:meth:`receive_here`), which waits on the socket itself, so a
      token costs one thread wake-up in this process instead of two plus a
      GIL hand-over.  Any other request, a forget, or the runner's death
      ends that mode (the I/O thread clears ``_direct`` and wakes the caller
      through ``_direct_wake``);
    * an asyncio event loop that every request in flight belongs to
      (``_reader``): the I/O thread hands it the socket at the end of a turn
      in which it found the socket empty, and the loop watches a duplicate
      of its ``ZMQ_FD`` with ``add_reader`` and puts each reply into its
      stream's queue on the spot (:meth:`_loop_read`), so a token wakes no
      thread of this process but the loop's own.  The I/O thread takes the
      socket back, without waiting for the loop, as soon as a request of
      another loop or of a blocking caller is in flight, and on a disconnect,
      the runner's death or close; the loop only removes its reader
      afterwards (:meth:`_loop_detach`).

    Nothing is reordered across a hand-over.  Replies the I/O thread routed
    to a loop travel by ``call_soon_threadsafe``, and the loop starts
    reading (:meth:`_loop_attach`) from a callback scheduled after them.  A
    loop's reads are tied to one spell (one :class:`_LoopReader`): a read
    of an ended spell does nothing, and the replies of a spell reach the
    queues before the I/O thread can read again, since it reads only once it
    holds ``_io``.  Nothing waits for a loop while holding ``_io``.
    """

    def __init__(self, endpoint: str, process: subprocess.Popen | None = None,
                 stderr: _StderrTail | None = None, keys: security.ClientKeys | None = None,
                 private_dir: str | None = None) -> None:
        self.endpoint = endpoint
        self._process = process
        self._stderr = stderr
        self._keys = keys                 # CURVE keys, or None for a plain connection
        self._private_dir = private_dir   # the spawned runner's ipc directory, removed once it exits
        self._handshake: str | None = None  # why the last handshake failed, until the disconnect
        self._zmq = zmq.Context()
        self._sock = self._zmq.socket(zmq.DEALER)
        P.configure_dealer(self._sock)
        if keys is not None:
            keys.apply(self._sock)
        self._monitor = self._sock.get_monitor_socket(_MONITORED)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close(0)
            self._zmq.term()
            raise ValueError(f"cannot connect to {endpoint!r}: {exc}") from None
        self._pidfd = None  # readable once the runner exits (Linux 5.3+)
        if process is not None and hasattr(os, "pidfd_open"):
            self._pidfd = os.pidfd_open(process.pid)
        self._wake_pipe = P.WakePipe()  # callers wake the I/O thread through it
        self._lock = threading.RLock()  # reentrant: a stream dropped on this thread may forget()
        self._inbox: collections.deque[tuple] = collections.deque()  # work for the I/O thread
        self._gone: tuple[str, int | None, str | None] | None = None  # why calls now fail
        self._gone_type: type[RunnerGone] = RunnerGone  # what they raise (set with _gone)
        self._io = threading.Lock()     # the socket, _sinks, _direct, _reader (see the class doc)
        self._sinks = _Routes()         # request id -> where its replies go
        self._sock_fd = self._sock.getsockopt(zmq.FD)  # edge-triggered: check ZMQ_EVENTS after use
        self._direct: Any = None        # id of the request whose caller receives on its own thread
        self._direct_wake = P.WakePipe()  # ends a direct caller's wait
        self._direct_polls = 0          # direct callers inside poll() (the pipe stays open for them)
        self._local = threading.local()  # a direct caller's poll object, per thread
        self._reader: _LoopReader | None = None  # the event loop reading the socket, if one does
        self._thread = threading.Thread(target=self._run, name="runner-client-io", daemon=True)
        self._thread.start()

    # -- any thread --------------------------------------------------------------

    def error(self) -> RunnerGone | None:
        with self._lock:
            return None if self._gone is None else self._gone_type(*self._gone)

    def submit(self, request_id: Any, data: bytes, sink: Sink) -> None:
        with self._lock:
            if self._gone is not None:
                raise self._gone_type(*self._gone)
            self._inbox.append(("send", request_id, data, sink))
            self._wake()

    def forget(self, request_id: Any, then_send: bytes | None = None) -> None:
        """Stop routing replies of ``request_id``; optionally send a message after."""
        with self._lock:
            if self._gone is None:
                self._inbox.append(("forget", request_id, then_send))
                self._wake()

    def close(self) -> None:
        with self._lock:
            if self._gone is None:
                self._inbox.append(("close",))
                self._wake()
        self._thread.join()
        with self._lock:  # _gone is set (the thread ended): nobody writes to the pipe now
            self._wake_pipe.close()
        for _ in range(1000):  # a direct caller was woken by the death sweep; let it leave poll()
            with self._io:
                if not self._direct_polls:
                    self._direct_wake.close()
                    break
            time.sleep(0.001)
        if self._pidfd is not None:
            os.close(self._pidfd)
        self._zmq.term()

    def _wake(self) -> None:
        """Wake the I/O thread (with ``_lock`` held, while ``_gone`` is None)."""
        self._wake_pipe.wake()

    # -- the I/O thread ----------------------------------------------------------

    def _run(self) -> None:
        # The socket is watched through its ZMQ_FD (a plain fd to zmq_poll),
        # since a direct caller may use it while this thread waits.
        poller = zmq.Poller()
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_pipe.read_fd, zmq.POLLIN)
        if self._pidfd is not None:
            poller.register(self._pidfd, zmq.POLLIN)
        poll_ms = 100 if self._process is not None and self._pidfd is None else None
        watching = False
        ready: dict = {}
        self._io.acquire()
        try:
            while True:
                if self._direct is None and self._reader is None:
                    self._receive()
                if (self._pidfd in ready if self._pidfd is not None
                        else poll_ms is not None and self._process.poll() is not None):
                    self._runner_exited()
                    return
                if self._monitor in ready:
                    self._on_monitor()
                    if self._gone is not None:
                        return
                if self._wake_pipe.read_fd in ready and self._work():
                    self._die(("client closed", None, None))
                    return
                pending = self._sock.get(_EVENTS) & _POLLIN
                if self._direct is not None:
                    if len(self._sinks) != 1 or self._direct not in self._sinks:
                        self._end_direct()
                    elif pending:
                        self._direct_wake.wake()  # this thread's read of ZMQ_EVENTS took the edge
                        pending = False
                if self._reader is not None:
                    if self._sinks.foreign(self._reader.loop):
                        self._stop_reader()  # another loop may take over just below
                    elif pending:  # this thread's use of the socket took the edge
                        pending = not self._nudge_reader()
                if self._reader is None and self._direct is None and not pending:
                    loop = self._sinks.sole_loop()
                    if loop is not None:
                        self._start_reader(loop)
                if pending:
                    ready = {}
                    continue
                if watching != (self._direct is None and self._reader is None):
                    watching = not watching
                    if watching:
                        poller.register(self._sock_fd, zmq.POLLIN)
                    else:
                        poller.unregister(self._sock_fd)
                self._io.release()
                try:
                    ready = dict(poller.poll(poll_ms))
                finally:
                    self._io.acquire()
        except Exception as exc:  # a bug here must not leave callers waiting
            log.exception("client I/O thread failed")
            self._die((f"client I/O failed: {exc}", None, None))
        finally:
            self._end_direct()
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close()
            self._io.release()

    def _end_direct(self) -> None:
        """Take the socket back from a direct caller or event loop (with ``_io`` held)."""
        if self._direct is not None:
            self._direct = None
            self._direct_wake.wake()
        if self._reader is not None:
            self._stop_reader()

    def _without_io(self, wait: Callable[[], Any]) -> Any:
        """Run ``wait`` (for the runner's exit, up to a second or so) without
        ``_io``, after taking the socket back, so that an event loop about
        to read does not stall on the lock meanwhile (I/O thread only)."""
        self._end_direct()
        self._io.release()
        try:
            return wait()
        finally:
            self._io.acquire()

    # -- an event loop receiving on its own thread ---------------------------------

    def _start_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the socket to ``loop`` (I/O thread, ``_io`` held, every
        request in flight ``loop``'s and the socket drained)."""
        if type(loop) in _NO_READER:
            return
        reader = _LoopReader(loop)
        try:
            loop.call_soon_threadsafe(self._loop_attach, reader)
        except RuntimeError:  # the loop is closed: its replies are dropped as they come
            return
        self._reader = reader

    def _nudge_reader(self) -> bool:
        """Make the reading loop look at the socket, whose edge this thread
        took; False if the loop is closed (then this thread reads again)."""
        try:
            self._reader.loop.call_soon_threadsafe(self._loop_read, self._reader)
        except RuntimeError:
            self._stop_reader()
            return False
        return True

    def _stop_reader(self) -> None:
        """End the reading loop's spell (``_io`` held, any thread); the loop
        removes its reader later, or the descriptor is closed at once if the
        loop is closed."""
        reader, self._reader = self._reader, None
        if reader is None or reader.fd < 0:
            return  # never attached: its _loop_attach will see it is over
        try:
            reader.loop.call_soon_threadsafe(self._loop_detach, reader)
        except RuntimeError:  # closed: its selector is gone with it
            reader.close_fd()

    def _loop_attach(self, reader: "_LoopReader") -> None:
        """On the loop: watch the socket, then read what waits there already."""
        with self._io:
            if self._reader is not reader:
                return  # taken back before this ran
            loop = reader.loop
            fd = os.dup(self._sock_fd)  # ours to close once the loop no longer watches it
            try:
                loop.add_reader(fd, self._loop_read, reader)
            except Exception as exc:  # NotImplementedError: a proactor loop
                os.close(fd)
                log.debug("%s cannot read the socket itself (%r): replies go through the "
                          "I/O thread", type(loop).__name__, exc)
                _NO_READER.add(type(loop))
                self._give_back()
                return
            reader.fd = fd
            reader.close_fd = _fd_closer(loop, fd)
        self._loop_read(reader)

    def _loop_read(self, reader: "_LoopReader") -> None:
        """On the loop (its reader callback): put the replies waiting on the
        socket into their streams' queues."""
        if self._reader is not reader:
            return  # the I/O thread took the socket back; _loop_detach follows
        io = self._io
        io.acquire()
        try:
            if self._reader is not reader:
                return
            try:
                handed = self._take()
            except Exception:  # a bug here must not leave the streams waiting
                log.exception("client event-loop read failed")
                self._give_back()
                return
        finally:
            io.release()
        for _, sink, reply in handed:
            sink.put(reply)  # every sink in flight is this loop's (class doc)
        if len(handed) >= _BURST:  # stopped early: the socket may still hold more
            reader.loop.call_soon(self._loop_read, reader)

    def _loop_detach(self, reader: "_LoopReader") -> None:
        """On the loop, after its spell ended: stop watching the socket."""
        reader.loop.remove_reader(reader.fd)
        reader.close_fd()

    def _give_back(self) -> None:
        """From the reading loop (``_io`` held): end its spell and wake the
        I/O thread, which is not watching the socket."""
        self._stop_reader()
        with self._lock:
            if self._gone is None:
                self._wake()

    # -- a blocking caller receiving on its own thread -----------------------------

    def receive_here(self, request_id: Any, replies: Any) -> None:
        """Receive on the calling thread until ``replies`` has an item, while
        ``request_id`` is the only request in flight; otherwise return at once
        and let the caller wait on ``replies`` as usual."""
        poller = getattr(self._local, "poller", None)
        if poller is None:  # one per thread: both fds belong to this connection
            poller = self._local.poller = select.poll()
            poller.register(self._sock_fd, select.POLLIN)
            poller.register(self._direct_wake.read_fd, select.POLLIN)
        wake_fd = self._direct_wake.read_fd
        io = self._io
        if len(self._sinks) != 1:
            return  # several requests in flight: the I/O thread routes them
        # Only the I/O thread's turn can hold the lock up (it releases it
        # before it waits).  Waiting for the turn to end matters: the
        # handoff wakes this thread while the I/O thread is still in the
        # turn that received its reply.
        io.acquire()
        try:
            if (self._gone is not None or self._inbox or self._reader is not None
                    or len(self._sinks) != 1 or request_id not in self._sinks):
                if self._direct == request_id:
                    # Give the socket back: the I/O thread may not be watching it.
                    self._direct = None
                    with self._lock:
                        if self._gone is None:
                            self._wake()
                return
            self._direct = request_id
            while True:
                self._receive()
                if not replies.empty():
                    return
                self._direct_polls += 1
                io.release()
                try:
                    ready = poller.poll()
                finally:
                    io.acquire()
                    self._direct_polls -= 1
                for fd, _ in ready:
                    if fd == wake_fd:
                        self._direct_wake.clear()
                if self._direct != request_id:
                    return  # the I/O thread took the socket back
        finally:
            io.release()

    def _receive(self) -> None:
        # Replies are handed over after the socket is drained, just before
        # this thread goes back to its poll: a caller woken earlier would
        # only wait for the GIL this thread still holds.
        self._hand(self._take())

    def _take(self) -> list:
        """Read and decode the replies waiting on the socket, up to a burst:
        ``[(request id, sink, reply)]`` in order of arrival (``_io`` held).
        Fewer than ``_BURST`` means the last look at ``ZMQ_EVENTS`` found
        the socket empty, so its ``ZMQ_FD`` signals the next reply."""
        handed = []
        sock = self._sock
        while len(handed) < _BURST and sock.get(_EVENTS) & _POLLIN:
            data = sock.recv(_RECV_NOWAIT)
            while sock.get(_RCVMORE):  # never from a runner; keep the last frame
                data = sock.recv(_RECV_NOWAIT)
            try:
                reply = P.decode_reply(data)
            except Exception as exc:
                log.warning("undecodable reply from the runner: %s", exc)
                continue
            if type(reply) is P.ChunksReply:  # one step's chunks of several requests
                for chunk in reply.chunks:
                    sink = self._sinks.get(chunk.id)
                    if sink is not None:
                        handed.append((chunk.id, sink, chunk))
                continue
            sink = self._sinks.get(reply.id)
            if sink is None:
                if type(reply) is P.ErrorReply and reply.id is None:
                    log.warning("runner refused a message: %s", reply.message)
                continue  # a forgotten request's late reply
            if type(reply) is not P.ChunkReply:
                self._sinks.pop(reply.id)
            handed.append((reply.id, sink, reply))
        return handed

    def _hand(self, handed: list) -> None:
        """Give each reply to its sink.  Replies for streams of one asyncio
        loop go over in one ``call_soon_threadsafe`` (one wake-up of that
        loop per burst, not one per reply)."""
        loops: dict = {}  # loop -> [(put, reply)] for asyncio streams
        for request_id, sink, reply in handed:
            loop = getattr(sink, "loop", None)
            if loop is None:
                self._call_sink(request_id, sink, reply)
            else:
                loops.setdefault(loop, []).append((request_id, sink, reply))
        for loop, items in loops.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError as exc:  # the caller's event loop is closed
                for request_id, _, _ in items:
                    log.debug("dropping replies of %r: %s", request_id, exc)
                    self._sinks.pop(request_id)

    def _call_sink(self, request_id: Any, sink: Sink, item: Any) -> None:
        try:
            sink(item)
        except Exception as exc:  # e.g. the caller's event loop is closed
            log.debug("dropping replies of %r: %s", request_id, exc)
            self._sinks.pop(request_id)

    def _work(self) -> bool:
        """Carry out what callers asked; True when asked to close."""
        self._wake_pipe.clear()
        while True:
            with self._lock:
                if not self._inbox:
                    return False
                item = self._inbox.popleft()
            kind = item[0]
            if kind == "send":
                _, request_id, data, sink = item
                try:
                    self._sock.send(data, zmq.NOBLOCK)
                except zmq.Again:
                    self._call_sink(request_id, sink, Busy(
                        f"{P.HIGH_WATER_MARK} requests already wait for the runner"))
                    continue
                self._sinks.add(request_id, sink)
            elif kind == "forget":
                _, request_id, then_send = item
                self._sinks.pop(request_id)
                if then_send is not None:
                    try:
                        self._sock.send(then_send, zmq.NOBLOCK)
                    except zmq.Again:
                        log.warning("could not send a cancel: the runner is not reading")
            elif kind == "close":
                return True

    def _exit_reason(self) -> tuple[str, int | None, str | None]:
        code = self._process.wait()
        line = self._stderr.error_line() if self._stderr is not None else None
        return describe_exit(code, line), code, line

    def _wait_exit(self) -> None:
        try:
            self._process.wait(1.0)
        except subprocess.TimeoutExpired:
            pass

    def _runner_exited(self) -> None:
        """The spawned runner is gone: remove its ipc directory, fail every call."""
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        self._die(self._without_io(self._exit_reason))

    def _on_monitor(self) -> None:
        lost = False
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            if event["event"] == zmq.EVENT_DISCONNECTED:
                lost = True
                continue
            self._handshake, final = self._handshake_failure(event["event"], event["value"])
            if final:  # libzmq gives up on the connection: so does every call
                self._die((self._handshake, None, None), AccessDenied)
                return
        if not lost:
            return
        if self._process is not None:
            # The runner's exit usually closes the connection a moment before
            # the pidfd reports it: give the exit status a chance to be the reason.
            self._without_io(self._wait_exit)
            if self._process.poll() is not None:
                self._runner_exited()
                return
        kind, why = RunnerGone, "connection to the runner was lost"
        if self._handshake is not None:
            kind, why, self._handshake = AccessDenied, self._handshake, None
        self._end_direct()
        pending, self._sinks = self._sinks, _Routes()
        for request_id, sink in pending.items():
            self._call_sink(request_id, sink, kind(why))

    def _handshake_failure(self, event: int, value: int) -> tuple[str, bool]:
        """What a failed handshake means, and whether libzmq stops retrying
        (it does after a refused key or a protocol error, not after a
        connection dropped mid-handshake, as a wrong server key looks)."""
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the runner refused this client's key (ZAP status {value}): its public key "
                    "is not among the runner's authorized clients", True)
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH and self._keys is None:
                return ("the runner requires CURVE security: pass its public key and an "
                        "authorized client key (Runner.connect(endpoint, keys=ClientKeys.load("
                        "SERVER_KEY, CLIENT_KEY_SECRET)); --server-key and --client-key)", True)
            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                return "this client has CURVE keys but the runner serves without security", True
            return f"the handshake with the runner failed (ZMTP protocol error {value:#x})", True
        if self._keys is not None:
            return ("the CURVE handshake with the runner failed: is the server key the "
                    "runner's public key?", False)
        # libzmq sometimes drops the connection before it reports the
        # mechanism mismatch (seen on a loaded machine): say what is likely.
        return ("the handshake with the runner failed (a runner on a network address "
                "requires CURVE security: pass its public key and an authorized client key)", False)

    def _die(self, reason: tuple[str, int | None, str | None],
             kind: type[RunnerGone] = RunnerGone) -> None:
        self._end_direct()
        with self._lock:
            if self._gone is None:
                self._gone, self._gone_type = reason, kind
            waiting = [item for item in self._inbox if item[0] == "send"]
            self._inbox.clear()
        pending, self._sinks = self._sinks, _Routes()
        for _, request_id, _, sink in waiting:
            pending.add(request_id, sink)
        for request_id, sink in pending.items():
            self._call_sink(request_id, sink, self._gone_type(*self._gone))


class _LoopSink:
    """Where an asyncio caller's replies go: called from another thread, it
    reaches ``put`` through ``call_soon_threadsafe``; the loop itself, when
    it reads the socket, calls ``put`` directly.  It holds no reference to
    the stream, so that dropping the stream cancels the request."""

    __slots__ = ("loop", "put")

    def __init__(self, loop: asyncio.AbstractEventLoop, put: Callable[[Any], None]) -> None:
        self.loop = loop  # the caller's event loop
        self.put = put    # its queue's put_nowait, or a future's setter (call on the loop only)

    def __call__(self, reply: Any) -> None:
        self.loop.call_soon_threadsafe(self.put, reply)


def _put_all(items: list) -> None:
    """On an event loop: hand a burst of replies to their streams' queues."""
    for _, sink, reply in items:
        sink.put(reply)


_FINAL_FIELDS = tuple(f.name for f in dataclasses.fields(Final))  # FinalReply's, less id (tested)


def _to_final(reply: P.FinalReply) -> Final:
    return Final(**{name: getattr(reply, name) for name in _FINAL_FIELDS})


def _event(reply: Any) -> Chunk | Final:
    """A completion reply -> its event; raises for errors (the stream is over)."""
    kind = type(reply)
    if kind is P.ChunkReply:
        return Chunk(text=reply.text, tokens=reply.tokens, logprobs=reply.logprobs)
    if isinstance(reply, BaseException):
        raise reply
    if kind is P.FinalReply:
        if reply.done_reason == "error":
            raise P.error_from_code(reply.error_code, reply.error or "completion failed")
        return _to_final(reply)
    if kind is P.ErrorReply:
        raise P.error_from_code(reply.code, reply.message)
    raise InternalError(f"unexpected {kind.__name__} in a completion stream")


class _StreamBase:
    """What the sync and asyncio completion streams share: cancelling, and
    forgetting the request when closed or dropped."""

    def __init__(self, runner: "Runner", request_id: int) -> None:
        self.id = request_id      # the request id on the wire
        self._runner = runner
        self._done = False        # the Final (or an error) was returned

    def cancel(self) -> None:
        if not self._done:
            self._runner._send_cancel(self.id)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._runner._forget(self.id, cancel=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _join_text(parts: list[str], final: Final | None) -> tuple[str, Final]:
    if final is None:
        raise InternalError("completion ended without a final message")
    return "".join(parts), final


class CompletionStream(_StreamBase):
    """A completion in flight: iterate for :class:`Chunk` events, then the :class:`Final`.

    ``cancel()`` asks the runner to stop (iteration then ends with a Final
    whose ``done_reason`` is "cancelled"); ``close()``, or leaving the loop
    early and dropping the stream, cancels and stops listening.
    """

    def __init__(self, runner: "Runner", request_id: int) -> None:
        super().__init__(runner, request_id)
        self._queue = new_handoff()  # replies, put by the I/O thread (runner.engine.handoff)

    def __iter__(self) -> "CompletionStream":
        return self

    def __next__(self) -> Chunk | Final:
        if self._done:
            raise StopIteration
        if self._queue.empty():
            self._runner._conn.receive_here(self.id, self._queue)
        reply = self._queue.get()
        if type(reply) is not P.ChunkReply:
            self._done = True
        return _event(reply)

    def text(self) -> tuple[str, Final]:
        """Wait for the end; the whole text and the Final."""
        parts, final = [], None
        for event in self:
            if type(event) is Chunk:
                parts.append(event.text)
            else:
                final = event
        return _join_text(parts, final)

    def __enter__(self) -> "CompletionStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncCompletionStream(_StreamBase):
    """The asyncio flavour of :class:`CompletionStream`; cancelling the task
    that awaits it cancels the request."""

    def __init__(self, runner: "Runner", request_id: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(runner, request_id)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = loop

    def sink(self) -> Sink:
        """Where replies go (:class:`_LoopSink`)."""
        return _LoopSink(self._loop, self._queue.put_nowait)

    def __aiter__(self) -> "AsyncCompletionStream":
        return self

    async def __anext__(self) -> Chunk | Final:
        if self._done:
            raise StopAsyncIteration
        try:
            reply = await self._queue.get()
        except asyncio.CancelledError:
            self.close()
            raise
        if type(reply) is not P.ChunkReply:
            self._done = True
        return _event(reply)

    async def text(self) -> tuple[str, Final]:
        parts, final = [], None
        async for event in self:
            if type(event) is Chunk:
                parts.append(event.text)
            else:
                final = event
        return _join_text(parts, final)

    async def aclose(self) -> None:
        self.close()


def _vector(blob: bytes, reply: P.EmbeddingReply) -> np.ndarray:
    """One text's float32 values; under pooling none, rows of n_embd (one per token)."""
    vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return vec.reshape(-1, reply.n_embd) if reply.pooling == "none" and reply.n_embd else vec


def _embedding(reply: P.EmbeddingReply) -> EmbeddingResult:
    return EmbeddingResult(embedding=_vector(reply.embedding, reply),
                           prompt_eval_count=reply.prompt_eval_count)


def _embeddings(reply: P.EmbeddingReply) -> list[EmbeddingResult]:
    return [EmbeddingResult(embedding=_vector(blob, reply), prompt_eval_count=n)
            for blob, n in zip(reply.embeddings or [], reply.token_counts or [])]


class Runner:
    """A connection to a runner process, usable from many threads and tasks at once.

    ``Runner.spawn(...)`` starts a runner and owns it (``close()`` stops it);
    ``Runner.connect(endpoint)`` talks to one that is already running.
    Blocking methods have ``a``-prefixed asyncio twins.
    """

    def __init__(self, endpoint: str, *, process: subprocess.Popen | None = None,
                 private_dir: str | None = None, stderr: _StderrTail | None = None,
                 keys: security.ClientKeys | None = None) -> None:
        self.endpoint = endpoint            # where the runner listens
        self.process = process              # the runner we spawned, or None
        self._private_dir = private_dir     # ipc directory we created, removed on close
        self._stderr = stderr
        self._conn = _Connection(endpoint, process, stderr, keys, private_dir)
        self._ids = itertools.count(1)      # request ids (next() is atomic)
        self.max_message_bytes = P.DEFAULT_MAX_MESSAGE_BYTES  # from the last health reply
        self._closed = False

    # -- construction ------------------------------------------------------------

    @classmethod
    def connect(cls, endpoint: str, *, keys: security.ClientKeys | None = None) -> "Runner":
        """Talk to a running runner (nothing is sent until the first call).

        ``keys`` (``security.ClientKeys.load(server_key, client_key_secret)``)
        connect with CURVE security, which a runner on a non-loopback address
        requires; a runner that refuses them fails calls with :class:`AccessDenied`.
        """
        return cls(endpoint, keys=keys)

    @classmethod
    def spawn(cls, model: str = "default", *, endpoint: str | None = None,
              progress: Callable[[float], Any] | None = None, load_timeout: float = 300.0,
              log_level: str = "WARNING", env: dict[str, str] | None = None,
              max_message_bytes: int | None = None, **load_params: Any) -> "Runner":
        """Start ``llama-runner serve`` for ``model``, load it and wait until it is ready.

        ``load_params`` are the ``load`` request's fields (n_ctx, parallel, ...).
        ``progress(fraction)`` is called while loading; the load fails if its
        progress stalls for ``load_timeout`` seconds.  Any failure, the runner's
        death included, raises with the runner's last stderr error line.
        ``max_message_bytes`` sets the runner's request size limit.
        Without ``endpoint`` the runner listens in a private ipc directory,
        removed once the runner exits; directories that killed clients left
        behind are removed first.
        """
        private_dir = None
        if endpoint is None:
            security.remove_stale_private_dirs()
            endpoint, private_dir = security.private_ipc_endpoint()
        cmd = [sys.executable, "-m", "runner.cli", "--log-level", log_level, "serve",
               "--model", str(model), "--endpoint", endpoint, "--defer-load",
               "--parent-pid", str(os.getpid())]
        if max_message_bytes is not None:
            cmd += ["--max-message-bytes", str(max_message_bytes)]
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env=env, start_new_session=True)
        if private_dir is not None:
            security.record_runner(private_dir, process.pid)
        stderr = _StderrTail(process.stderr)
        runner = cls(endpoint, process=process, private_dir=private_dir, stderr=stderr)
        try:
            runner.load(**load_params)
            runner.wait_ready(progress=progress, load_timeout=load_timeout)
        except BaseException:
            runner.close(timeout=2.0)
            raise
        return runner

    # -- lifecycle ---------------------------------------------------------------

    def load(self, **params: Any) -> None:
        """Start loading the model (answered at once; see :meth:`wait_ready`)."""
        self._call({"op": "load", **params})

    def wait_ready(self, progress: Callable[[float], Any] | None = None,
                   load_timeout: float = 300.0) -> P.HealthReply:
        """Poll ``health`` until ready; raises the load error, or TimeoutError
        when progress stalls for ``load_timeout`` seconds."""
        timer = StallTimer(load_timeout, time.monotonic())
        delay = 0.01
        while True:
            health = self.health(timeout=load_timeout)
            if progress is not None:
                progress(health.progress)
            if health.state == "ready":
                return health
            if health.state == "error":
                raise P.error_from_code(health.error_code, f"load failed: {health.error}")
            if health.state == "stopping":
                raise RunnerGone("the runner is shutting down")
            if timer.expired(health.progress, time.monotonic()):
                raise TimeoutError(f"model load made no progress for {load_timeout:.0f} s "
                                   f"(at {health.progress:.0%})")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Ask the runner to stop (it exits once drained)."""
        self._call({"op": "shutdown", "drain": drain}, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop a spawned runner (shutdown, then SIGTERM, then SIGKILL) and
        release the connection.  Pending calls raise :class:`RunnerGone`."""
        if self._closed:
            return
        self._closed = True
        process = self.process
        if process is not None and process.poll() is None:
            try:
                self.shutdown(drain=True, timeout=min(timeout, 2.0))
                process.wait(timeout)
            except Exception:
                process.terminate()
                try:
                    process.wait(2.0)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._conn.close()
        if self._stderr is not None:
            self._stderr.error_line(wait=1.0)
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    # -- calls -------------------------------------------------------------------

    def health(self, timeout: float | None = None) -> P.HealthReply:
        reply = self._call({"op": "health"}, timeout)
        self.max_message_bytes = reply.max_message_bytes
        return reply

    def complete(self, prompt: str | list[int], *, add_special: bool = True,
                 media: Media = None, **options: Any) -> CompletionStream:
        """Start a completion; iterate the stream for chunks, then the Final.

        ``media``: image/audio bytes, a list (ids 0, 1, ...) or a dict by id,
        placed in the prompt with ``[img-<id>]`` or the projector's marker.
        """
        request_id = next(self._ids)
        stream = CompletionStream(self, request_id)
        self._submit(request_id, self._completion(request_id, prompt, add_special, options, media),
                     stream._queue.put)
        return stream

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None,
             add_generation_prompt: bool = True, template_kwargs: dict | None = None,
             reasoning_format: str = "auto", media: Media = None,
             **options: Any) -> CompletionStream:
        """Start a chat completion: ``messages`` rendered with the model's chat
        template.  The stream is a completion's; its Final's ``message`` holds
        the answer parsed (content, reasoning_content, tool_calls)."""
        request_id = next(self._ids)
        stream = CompletionStream(self, request_id)
        self._submit(request_id, self._chat(messages, tools, add_generation_prompt,
                                            template_kwargs, reasoning_format, options, media),
                     stream._queue.put)
        return stream

    def embed(self, text: str, *, normalize: bool = False, truncate: bool = False,
              timeout: float | None = None) -> EmbeddingResult:
        return _embedding(self._call({"op": "embedding", "text": text, "normalize": normalize,
                                      "truncate": truncate}, timeout))

    def embed_many(self, texts: list[str], *, normalize: bool = False, truncate: bool = False,
                   timeout: float | None = None) -> list[EmbeddingResult]:
        """One result per text, in order; the runner batches them into as few decodes as fit."""
        return _embeddings(self._call({"op": "embedding", "text": list(texts), "normalize": normalize,
                                       "truncate": truncate}, timeout))

    def rerank(self, query: str, documents: list[str], *, truncate: bool = False,
               timeout: float | None = None) -> list[float]:
        """The relevance score of each document for ``query``, in order (a reranker runner)."""
        return self._call({"op": "rerank", "query": query, "documents": list(documents),
                           "truncate": truncate}, timeout).scores

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False,
                 timeout: float | None = None) -> list[int]:
        return self._call({"op": "tokenize", "text": text, "add_special": add_special,
                           "parse_special": parse_special}, timeout).tokens

    def detokenize(self, tokens: list[int], *, timeout: float | None = None) -> str:
        return self._call({"op": "detokenize", "tokens": list(tokens)}, timeout).text

    def info(self, timeout: float | None = None) -> P.InfoReply:
        return self._call({"op": "info"}, timeout)

    def metrics(self, timeout: float | None = None) -> P.MetricsReply:
        """Running totals and gauges of the loaded model (docs/protocol.md, ``metrics``)."""
        return self._call({"op": "metrics"}, timeout)

    def discover(self, timeout: float | None = None) -> list[P.Device]:
        return self._call({"op": "discover"}, timeout).devices

    def estimate(self, *, timeout: float | None = None, **params: Any) -> P.EstimateReply:
        """What ``load(**params)`` would take and where it would go, without loading."""
        return self._call({"op": "estimate", **params}, timeout)

    def save_slot(self, slot: int, name: str, *, timeout: float | None = None) -> P.SlotFileReply:
        """Write slot ``slot`` to the runner's slot directory as ``name`` (docs/protocol.md)."""
        return self._call({"op": "save_slot", "slot": slot, "name": name}, timeout)

    def restore_slot(self, slot: int, name: str, *, timeout: float | None = None) -> P.SlotFileReply:
        """Replace slot ``slot``'s content with the file ``name`` saved by :meth:`save_slot`."""
        return self._call({"op": "restore_slot", "slot": slot, "name": name}, timeout)

    def cancel(self, request_id: int, timeout: float | None = None) -> bool:
        """Cancel one of this client's requests; True if it was still running."""
        return self._call({"op": "cancel", "target": request_id}, timeout).found

    # -- asyncio twins -------------------------------------------------------------

    async def ahealth(self, timeout: float | None = None) -> P.HealthReply:
        reply = await self._acall({"op": "health"}, timeout)
        self.max_message_bytes = reply.max_message_bytes
        return reply

    def acomplete(self, prompt: str | list[int], *, add_special: bool = True,
                  media: Media = None, **options: Any) -> AsyncCompletionStream:
        """Start a completion from a coroutine; ``async for`` over the stream."""
        request_id = next(self._ids)
        stream = AsyncCompletionStream(self, request_id, asyncio.get_running_loop())
        self._submit(request_id, self._completion(request_id, prompt, add_special, options, media),
                     stream.sink())
        return stream

    def achat(self, messages: list[dict], *, tools: list[dict] | None = None,
              add_generation_prompt: bool = True, template_kwargs: dict | None = None,
              reasoning_format: str = "auto", media: Media = None,
              **options: Any) -> AsyncCompletionStream:
        """:meth:`chat` from a coroutine; ``async for`` over the stream."""
        request_id = next(self._ids)
        stream = AsyncCompletionStream(self, request_id, asyncio.get_running_loop())
        self._submit(request_id, self._chat(messages, tools, add_generation_prompt,
                                            template_kwargs, reasoning_format, options, media),
                     stream.sink())
        return stream

    async def aembed(self, text: str, *, normalize: bool = False, truncate: bool = False,
                     timeout: float | None = None) -> EmbeddingResult:
        return _embedding(await self._acall({"op": "embedding", "text": text,
                                             "normalize": normalize, "truncate": truncate}, timeout))

    async def aembed_many(self, texts: list[str], *, normalize: bool = False, truncate: bool = False,
                          timeout: float | None = None) -> list[EmbeddingResult]:
        return _embeddings(await self._acall({"op": "embedding", "text": list(texts),
                                              "normalize": normalize, "truncate": truncate}, timeout))

    async def arerank(self, query: str, documents: list[str], *, truncate: bool = False,
                      timeout: float | None = None) -> list[float]:
        return (await self._acall({"op": "rerank", "query": query, "documents": list(documents),
                                   "truncate": truncate}, timeout)).scores

    async def atokenize(self, text: str, *, add_special: bool = False,
                        parse_special: bool = False, timeout: float | None = None) -> list[int]:
        return (await self._acall({"op": "tokenize", "text": text, "add_special": add_special,
                                   "parse_special": parse_special}, timeout)).tokens

    async def adetokenize(self, tokens: list[int], *, timeout: float | None = None) -> str:
        return (await self._acall({"op": "detokenize", "tokens": list(tokens)}, timeout)).text

    async def ainfo(self, timeout: float | None = None) -> P.InfoReply:
        return await self._acall({"op": "info"}, timeout)

    async def acancel(self, request_id: int, timeout: float | None = None) -> bool:
        return (await self._acall({"op": "cancel", "target": request_id}, timeout)).found

    # -- plumbing ------------------------------------------------------------------

    @staticmethod
    def _completion(request_id: int, prompt: str | list[int], add_special: bool,
                    options: dict, media: Media = None) -> dict:
        request = {"op": "completion", "id": request_id, "prompt": prompt, "options": options,
                   "add_special": add_special, "batch_chunks": True}
        if media:
            items = media.items() if isinstance(media, dict) else enumerate(media)
            request["media"] = [{"id": i, "data": bytes(data)} for i, data in items]
        return request

    @staticmethod
    def _chat(messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
              template_kwargs: dict | None, reasoning_format: str, options: dict,
              media: Media = None) -> dict:
        request = {"op": "chat", "messages": messages, "options": options,
                   "add_generation_prompt": add_generation_prompt,
                   "reasoning_format": reasoning_format, "batch_chunks": True}
        if tools is not None:
            request["tools"] = tools
        if template_kwargs:
            request["template_kwargs"] = template_kwargs
        if media:
            items = media.items() if isinstance(media, dict) else enumerate(media)
            request["media"] = [{"id": i, "data": bytes(data)} for i, data in items]
        return request

    def _submit(self, request_id: int, request: dict, sink: Sink) -> None:
        request["id"] = request_id
        data = P.encode(request)
        if len(data) > self.max_message_bytes:
            raise BadRequest(f"request of {len(data)} bytes exceeds the runner's limit of "
                             f"{self.max_message_bytes}")
        self._conn.submit(request_id, data, sink)

    def _call(self, request: dict, timeout: float | None = None) -> Any:
        request_id = next(self._ids)
        replies: queue.SimpleQueue = queue.SimpleQueue()
        self._submit(request_id, request, replies.put)
        try:
            reply = replies.get(timeout=timeout)
        except queue.Empty:
            self._forget(request_id, cancel=True)
            raise TimeoutError(f"no reply to {request['op']} within {timeout} s") from None
        return _result(reply)

    async def _acall(self, request: dict, timeout: float | None = None) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(reply: Any) -> None:
            if not future.done():
                future.set_result(reply)

        request_id = next(self._ids)
        self._submit(request_id, request, _LoopSink(loop, settle))
        try:
            reply = await asyncio.wait_for(future, timeout)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            self._forget(request_id, cancel=True)
            raise
        return _result(reply)

    def _send_cancel(self, request_id: int) -> None:
        cancel_id = next(self._ids)
        self._conn.submit(cancel_id, P.encode({"op": "cancel", "id": cancel_id,
                                               "target": request_id}), _IGNORE)

    def _forget(self, request_id: int, cancel: bool) -> None:
        data = None
        if cancel:
            data = P.encode({"op": "cancel", "id": next(self._ids), "target": request_id})
        self._conn.forget(request_id, data)


def _result(reply: Any) -> Any:
    if isinstance(reply, BaseException):
        raise reply
    if type(reply) is P.ErrorReply:
        raise P.error_from_code(reply.code, reply.message)
    return reply
