"""The runner process: one :class:`~runner.engine.core.Engine` behind a ZeroMQ ROUTER.

Threads and what they own:

* the **I/O thread** (the main thread, :meth:`Server.run`) owns the ROUTER
  socket, the in-flight registry (:class:`Job` by ``(peer, id)``) and the
  per-peer send backlogs.  Nothing else touches them, so none is locked;
* the engine's delivery thread produces completion events, the **load
  thread** loads the model, and **worker threads** run every call whose cost
  grows with the request (preparing a completion: options, tokenizing,
  grammar, media; embedding, tokenize, detokenize, info, discover), so that
  the I/O thread only decodes, routes and sends.  They never send: they
  post replies to the :class:`Outbox`, which wakes the I/O thread.  What
  waits for them is bounded by a :class:`WorkBudget`.

Every accepted request gets exactly one terminal reply (``final``, ``error``
or its op's result), preceded for completions by ``chunk`` replies.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import select
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import msgspec
import zmq

from runner.engine.media import MediaItem
from runner.process import chatparse
from runner.process import protocol as P
from runner.process import security
from runner.process.chat import ChatRequest, ChatTemplates
from runner.engine.requests import (BadRequest, Busy, Chunk, CompletionOptions, CompletionRequest,
                             EngineError,
                             Final, NotReady)

log = logging.getLogger("runner.server")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Outbox:
    """Replies made on other threads, waiting for the I/O thread.

    :meth:`post` may be called from any thread and never blocks; only the I/O
    thread calls :meth:`drain`.  A pipe wakes the I/O thread's poll; the
    ``_armed`` flag keeps it to one write per batch of posts.  Signals are
    routed to the same pipe (``signal.set_wakeup_fd``) so they wake the poll too.
    """

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()  # append/popleft are atomic
        self._armed = False  # a wake-up byte is in the pipe, or about to be
        self._pipe = P.WakePipe()
        self.write_fd = self._pipe.write_fd  # also the signal wake-up fd

    def fileno(self) -> int:
        return self._pipe.read_fd

    def post(self, item: Any) -> None:
        self._items.append(item)
        if not self._armed:
            self._armed = True
            self.wake()

    def post_quiet(self, item: Any) -> None:
        """Queue without waking the I/O thread: the poster promises a
        :meth:`wake_pending` soon (the engine calls it after each burst of
        events), so that one wake-up carries a whole step's chunks."""
        self._items.append(item)

    def wake_pending(self) -> None:
        if self._items and not self._armed:
            self._armed = True
            self.wake()

    def wake(self) -> None:
        # os.write releases the GIL, so the woken I/O thread often takes it
        # and sends before the loop thread starts its next decode.  That is
        # cheaper than the I/O thread running during the decode: writing
        # while keeping the GIL made parallel 1 about 3% slower (median of 8
        # paired rounds), and so did waiting for the send.
        self._pipe.wake()

    def drain(self) -> list:
        # Order matters: empty the pipe, disarm, then take the items.  A post
        # that lands after the disarm writes a new byte; one before it is taken.
        self._pipe.clear()
        self._armed = False
        return self.take()

    def take(self) -> list:
        """The items posted so far, without touching the pipe: a byte already
        written still wakes the I/O thread, which then finds less to do."""
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items

    def close(self) -> None:
        self._pipe.close()


_SEND_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_SEND_LAST = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


class PeerSender:
    """Sends replies to ROUTER peers; never drops one without saying so.

    ROUTER_MANDATORY makes a full peer queue (high-water mark) an ``EAGAIN``
    and an unknown peer an ``EHOSTUNREACH``.  A full queue parks the peer's
    replies in a backlog that :meth:`flush` retries; a peer that is gone, or
    whose backlog passes ``max_backlog`` messages (it stopped reading), is
    reported to the caller, which cancels its requests.  A dropped peer's
    later replies are refused too, until it sends a new request
    (:meth:`forgive`).  Owned by the I/O thread.
    """

    def __init__(self, sock: zmq.Socket, max_backlog: int = 100_000,
                 max_backlog_bytes: int = 256 << 20) -> None:
        self.sock = sock
        self.max_backlog = max_backlog  # replies parked per peer before giving up on it
        self.max_backlog_bytes = max_backlog_bytes  # bytes parked per peer before giving up on it
        self.backlogs: dict[bytes, collections.deque[bytes]] = {}  # peer -> unsent replies, in order
        self.backlog_bytes: dict[bytes, int] = {}  # peer -> bytes in its backlog
        self.dropped: set[bytes] = set()  # peers given up on for not reading

    def forgive(self, peer: bytes) -> None:
        """The peer sent a request: it reads again, or never stopped."""
        if self.dropped:
            self.dropped.discard(peer)

    def send(self, peer: bytes, data: bytes) -> bool:
        """Queue or send one reply; False when the peer is gone (reply dropped)."""
        backlog = self.backlogs.get(peer)
        if backlog is not None:
            parked = self.backlog_bytes[peer] + len(data)
            if len(backlog) >= self.max_backlog or parked > self.max_backlog_bytes:
                log.warning("peer %s stopped reading (%d replies, %d bytes unsent); dropping it",
                            peer.hex(), len(backlog), parked - len(data))
                del self.backlogs[peer]
                del self.backlog_bytes[peer]
                self.dropped.add(peer)
                return False
            backlog.append(data)
            self.backlog_bytes[peer] = parked
            return True
        if peer in self.dropped:
            return False
        sent = self._try(peer, data)
        if sent is None:
            self.backlogs[peer] = collections.deque([data])
            self.backlog_bytes[peer] = len(data)
            return True
        return sent

    def _try(self, peer: bytes, data: bytes) -> bool | None:
        """True: sent; None: peer queue full; False: peer gone."""
        try:
            # Two sends with plain-int flags: send_multipart's enum arithmetic
            # costs more than the sends themselves for a small chunk.  ZeroMQ
            # queues a multipart message whole or not at all, so an EAGAIN on
            # the identity frame leaves nothing half sent; the routing frame
            # is accepted whenever the peer's queue has room.
            self.sock.send(peer, _SEND_MORE)
            self.sock.send(data, _SEND_LAST, copy=len(data) < 65536)
            return True
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise

    def flush(self) -> list[bytes]:
        """Retry the backlogs; returns the peers found gone."""
        gone = []
        for peer, backlog in list(self.backlogs.items()):
            while backlog:
                sent = self._try(peer, backlog[0])
                if sent is None:
                    break
                if sent is False:
                    gone.append(peer)
                    break
                self.backlog_bytes[peer] -= len(backlog.popleft())
            if not backlog or peer in gone:
                del self.backlogs[peer]
                del self.backlog_bytes[peer]
        return gone

    @property
    def backlogged(self) -> bool:
        return bool(self.backlogs)


@dataclasses.dataclass(eq=False)
class Job:
    """A request the runner is working on.  The I/O thread owns it; the worker
    preparing a completion reads ``cancelled`` and sets ``handle``."""

    peer: bytes                         # ROUTER identity of the client that sent it
    id: Any                             # the client's request id
    op: str                             # the request's op
    size: int = 0                       # bytes of the request message (its WorkBudget share)
    handle: Any = None                  # engine Handle (completions, once prepared)
    future: Future | None = None        # the worker-thread call (every op but completions' generation)
    cancelled: bool = False             # a cancel was asked for
    batch_chunks: bool = False          # completions: the client reads `chunks` replies


class WorkBudget:
    """Requests handed to the worker threads and not yet done there: how many,
    and their size as received.  Bounds what the runner holds for requests it
    has accepted but not started, in messages and in bytes.

    :meth:`reserve` (I/O thread) raises :class:`Busy` past either bound, except
    when nothing is reserved, so that one request of the largest accepted size
    always gets through.  :meth:`release` may be called from any thread, once
    per reservation: by the worker when the call ends, or by the I/O thread
    when it cancels a call that never started.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests  # reservations at once
        self.max_bytes = max_bytes        # their bytes at once
        self._lock = threading.Lock()     # guards the two counts below
        self.requests = 0                 # reservations held
        self.bytes = 0                    # bytes they hold

    def reserve(self, size: int) -> None:
        with self._lock:
            if self.requests and (self.requests >= self.max_requests
                                  or self.bytes + size > self.max_bytes):
                raise Busy(f"server busy: {self.requests} requests of {self.bytes} bytes wait "
                           f"for a worker (limits {self.max_requests} requests, "
                           f"{self.max_bytes} bytes)")
            self.requests += 1
            self.bytes += size

    def release(self, size: int) -> None:
        with self._lock:
            self.requests -= 1
            self.bytes -= size


# Requests larger than this (as received) are prepared on their own, smaller
# pool of worker threads, which run at a lower CPU priority: tokenizing megabytes
# of text then delays other large requests, not every other request, and yields
# the cores to the decode threads.
HEAVY_REQUEST_BYTES = 64 << 10
HEAVY_NICE = 10  # added to the heavy workers' nice value (Linux: per thread)


def _lower_priority() -> None:
    """Initializer of the heavy pool's threads."""
    if sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + HEAVY_NICE)
        except OSError as exc:
            log.debug("could not lower a worker's priority: %s", exc)


def _cancelled_reply(job: Job) -> P.Reply:
    """The terminal reply of a job cancelled before it produced one: a
    completion ends with its final, like one cancelled while generating."""
    if job.op in ("completion", "chat"):
        return P.FinalReply(id=job.id, done_reason="cancelled")
    return P.ErrorReply(id=job.id, code="cancelled", message="request cancelled")


class ParentWatch:
    """Notices that the process which started the runner is gone.

    Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) wakes the I/O
    loop at once, and the loop compares ``os.getppid()`` with the expected pid
    at every turn (at least every 250 ms).  The signal only prompts that
    check: it is tied to the *thread* that forked the runner, so it also fires
    when that thread ends while its process lives on.
    """

    def __init__(self, pid: int | None) -> None:
        self.pid = pid or None  # expected parent pid; None: not watched

    def arm(self) -> None:
        """Install the signal (main thread only)."""
        if self.pid is None:
            return
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # wakes the poll, nothing more
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1), 0, 0, 0) != 0:
                    log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
            except (OSError, AttributeError) as exc:
                log.warning("no parent-death signal: %s", exc)

    def gone(self) -> bool:
        return self.pid is not None and os.getppid() != self.pid


def _failure(request_id: Any, exc: BaseException) -> P.ErrorReply:
    """The error reply for an exception raised while serving a request.  An
    unexpected one (code ``internal``) is logged with its traceback, so call
    this inside the ``except`` block."""
    reply = P.error_reply(request_id, exc)
    if reply.code == "internal":
        log.exception("request %r failed", request_id)
    return reply


_FINAL_FIELDS = tuple(f.name for f in dataclasses.fields(Final))  # FinalReply's, less id (tested)


def _final_reply(request_id: Any, final: Final) -> P.FinalReply:
    fields = {name: getattr(final, name) for name in _FINAL_FIELDS}
    fields["error_code"] = P.known_code(final.error_code)
    return P.FinalReply(id=request_id, **fields)


def _slot_reply(request_id: Any, result) -> P.SlotFileReply:
    """An Engine.save_slot / restore_slot result (runner.engine.core.SlotFileResult) on the wire."""
    return P.SlotFileReply(id=request_id, slot=result.slot, name=result.name,
                           n_inputs=result.n_inputs, n_bytes=result.n_bytes,
                           loop_seconds=result.loop_seconds, seconds=result.seconds)


def _from_llama(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised while handling, a failure of a
    llama.cpp call (the binding's LlamaError; the engine wraps an adapter,
    projector or draft model llama.cpp refuses in a BadRequest)."""
    from runner import _llama

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, _llama.LlamaError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _devices() -> list[P.Device]:
    from runner import _llama

    return [msgspec.convert(d, P.Device) for d in _llama.devices()]


class Server:
    """The runner: a ROUTER socket, a registry of jobs and (once loaded) an engine.

    Load state (``_state``, ``_progress``, ``_error``, ``_error_code``,
    ``engine``) is written by the load thread under ``_state_lock`` and read
    by the I/O thread.  The socket, the jobs and the sender are guarded by
    ``_io``: the I/O thread holds it except while it waits, and the engine's
    thread takes it, when it is free, to send a step's replies itself
    (:meth:`_send_from_engine`).  The load thread only reads ``_stopping``
    (a bool) to abort a load.
    """

    def __init__(self, model_path: str, endpoint: str, *, load: P.Load | None = None,
                 parent_pid: int | None = None,
                 max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES,
                 drain_timeout: float = 60.0, workers: int = 4, max_pending: int = 256,
                 max_pending_bytes: int | None = None,
                 curve: security.ServerKeys | None = None, allow_abstract_ipc: bool = False) -> None:
        self.model_path = model_path          # the model this runner serves
        self.max_message_bytes = max_message_bytes  # larger requests get bad_request
        self.drain_timeout = drain_timeout    # seconds in-flight requests get on SIGTERM
        # Requests waiting for or running on worker threads before "busy", in
        # number and in bytes (default: PENDING_BYTES_FACTOR times max_message_bytes).
        self._budget = WorkBudget(max_pending, max_pending_bytes
                                  or P.PENDING_BYTES_FACTOR * max_message_bytes)
        self._initial_load = load             # load parameters to start with (None: wait)
        self._parent = ParentWatch(parent_pid)

        security.check_endpoint(endpoint, curve=curve is not None,
                                allow_abstract_ipc=allow_abstract_ipc)
        self._zmq = zmq.Context()
        self._sock = self._zmq.socket(zmq.ROUTER)
        self._auth = None                     # the ZAP handler admitting CURVE clients
        try:
            P.configure_router(self._sock, max_message_bytes)
            if curve is not None:
                self._auth = curve.serve(self._zmq, self._sock)
            self.endpoint = security.bind(self._sock, endpoint)  # as bound
        except BaseException:
            self._sock.close(0)
            if self._auth is not None:
                self._auth.stop()
            self._zmq.term()
            raise
        self._io = threading.Lock()          # the socket, _jobs, _sender (see the class doc)
        self._closed = False                  # the socket is closed (under _io)
        self._outbox = Outbox()
        self._sender = PeerSender(self._sock)
        self._jobs: dict[tuple[bytes, Any], Job] = {}  # in flight, by (peer, request id)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="runner-worker")
        self._heavy_pool = ThreadPoolExecutor(  # requests over HEAVY_REQUEST_BYTES
            max(1, workers // 2), thread_name_prefix="runner-heavy", initializer=_lower_priority)

        self._state_lock = threading.Lock()
        self._state = "launched"              # launched | loading | ready | error
        self._progress = 0.0                  # load progress 0..1
        self._error: str | None = None        # why the load failed
        self._error_code: str | None = None
        self.engine = None                    # Engine once loaded
        self._templates: ChatTemplates | None = None  # its chat templates (under _state_lock)
        self._load_thread: threading.Thread | None = None

        self._signal: int | None = None       # last SIGTERM/SIGINT not yet acted on
        self._stopping = False                # no new work accepted
        self._stop_deadline = 0.0             # monotonic time to cancel what still runs
        self._cancelled_all = False           # that cancel happened
        self._closer: threading.Thread | None = None  # closes the engine while draining
        self.abrupt = False                   # ended without draining (parent gone, 2nd ^C)

        # op -> handler(peer, request, size of the message in bytes)
        self._handlers: dict[type, Callable[[bytes, Any, int], None]] = {
            P.Health: self._health, P.Discover: self._discover, P.Load: self._load,
            P.Estimate: self._estimate,
            P.Completion: self._completion, P.Chat: self._chat, P.Embedding: self._embedding, P.Rerank: self._rerank,
            P.Tokenize: self._tokenize, P.Detokenize: self._detokenize, P.Cancel: self._cancel,
            P.Info: self._info, P.Metrics: self._metrics, P.SaveSlot: self._save_slot, P.RestoreSlot: self._restore_slot,
            P.Shutdown: self._shutdown,
        }

    # -- the I/O loop ----------------------------------------------------------

    def run(self) -> int:
        """Serve until shut down; returns the exit status."""
        if threading.current_thread() is threading.main_thread():
            self._install_signals()
            self._parent.arm()
        if self._parent.gone():
            log.error("parent %d exited before the runner started", self._parent.pid)
            self.abrupt = True
            return 1
        if self._initial_load is not None:
            self._start_load(self._initial_load)
        # The wait is on the socket's ZMQ_FD rather than zmq_poll, which
        # would read the socket while the engine's thread may be sending on
        # it.  ZMQ_FD is edge-triggered: whoever touches the socket then
        # checks ZMQ_EVENTS, and a request seen there is never left waiting
        # (this thread does not wait; the engine's thread wakes it).
        poller = select.poll()
        poller.register(self._sock.getsockopt(zmq.FD), select.POLLIN)
        outbox = self._outbox.fileno()
        poller.register(outbox, select.POLLIN)
        ready: list = []
        with self._io:
            while True:
                self._receive()
                if any(fd == outbox for fd, _ in ready):
                    self._deliver(self._outbox.drain())
                for peer in self._sender.flush():
                    self._peer_gone(peer)
                if self._signal is not None:
                    signum, self._signal = self._signal, None
                    if self._stopping and signum == signal.SIGINT:
                        log.warning("second interrupt: exiting without draining")
                        return self._abort(130)
                    self._begin_stop(signal.Signals(signum).name, drain=True)
                if self._parent.gone():
                    log.error("parent process %d is gone; exiting", self._parent.pid)
                    return self._abort(1)
                if self._stopping and self._stopped():
                    return 0
                if self._sock.get(_EVENTS) & _POLLIN:
                    ready = []  # more requests than one turn takes
                    continue
                self._io.release()
                try:
                    ready = poller.poll(5 if self._sender.backlogged else 250)
                finally:
                    self._io.acquire()

    def close(self) -> None:
        """Release the socket and the wake-up pipe, after :meth:`run` returned
        (by then no thread posts to the outbox, or the process is exiting)."""
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
        with self._io:
            self._closed = True
            self._sock.close(0 if self.abrupt else None)
        if self._auth is not None:
            self._auth.stop()
        self._zmq.term()
        self._outbox.close()
        path = security.ipc_path(self.endpoint)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _install_signals(self) -> None:
        def on_signal(signum, frame):
            self._signal = signum  # acted on by the loop, which the wake-up fd wakes

        signal.set_wakeup_fd(self._outbox.write_fd, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _receive(self) -> None:
        for _ in range(256):  # then let replies out
            if not self._sock.get(_EVENTS) & _POLLIN:
                return
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
            peer, body = frames[0], frames[1:]
            self._sender.forgive(peer)
            if len(body) != 1:
                self._send(peer, P.ErrorReply(id=None, code="bad_request",
                                              message=f"expected 1 frame, got {len(body)}"))
                continue
            try:
                request = P.decode_request(body[0], self.max_message_bytes)
            except P.ProtocolError as exc:
                log.debug("refused a message from %s: %s", peer.hex(), exc)
                self._send(peer, exc.reply())
                continue
            try:
                self._handlers[type(request)](peer, request, len(body[0]))
            except Exception as exc:
                self._send(peer, _failure(request.id, exc))

    def _send_from_engine(self) -> None:
        """The engine's thread, after each step (``Engine.on_delivered``).

        When the I/O thread is waiting, this thread sends the step's replies
        itself: at one stream with every core decoding, the I/O thread's
        wake-up per token is what the runner costs the decode.  When the I/O
        thread is busy, it is woken to send them after its turn.
        """
        if not self._io.acquire(blocking=False):
            self._outbox.wake_pending()
            return
        try:
            if self._closed:
                return
            self._deliver(self._outbox.take())
            if self._sender.backlogged or self._sock.get(_EVENTS) & _POLLIN:
                # A backlog needs the I/O thread's short poll; a request may
                # have arrived while this thread held the socket, and ZMQ_FD
                # does not signal it twice.
                self._outbox.wake()
        except Exception:  # never into the engine's loop
            log.exception("sending replies from the engine's thread failed")
            self._outbox.wake()
        finally:
            self._io.release()

    def _deliver(self, items: list) -> None:
        """Send replies posted by other threads: (job key, reply, terminal).
        Chunks for clients that read ``chunks`` replies are gathered per
        client and sent as one message, before that client's next terminal
        reply (a request's chunks always precede its final)."""
        gathered: dict[bytes, list] = {}  # peer -> its chunks not yet sent
        for key, reply, terminal in items:
            job = self._jobs.get(key)
            if job is None:
                continue  # already answered (cancelled before it ran)
            if job.batch_chunks and type(reply) is P.ChunkReply:
                gathered.setdefault(job.peer, []).append(reply)
                continue
            if terminal and gathered and job.peer in gathered:
                self._send_chunks(job.peer, gathered.pop(job.peer))
            if terminal:
                self._finish(key, job)
                # A worker op's result arriving after a cancel becomes the
                # cancel's error; a completion (prepared by a worker job)
                # ends with a final, its own or a cancelled one.
                if job.cancelled and job.future is not None and type(reply) is not P.FinalReply:
                    reply = _cancelled_reply(job)
            self._send(job.peer, reply)
        for peer, chunks in gathered.items():
            self._send_chunks(peer, chunks)

    def _send_chunks(self, peer: bytes, chunks: list) -> None:
        self._send(peer, chunks[0] if len(chunks) == 1 else P.ChunksReply(id=None, chunks=chunks))

    def _send(self, peer: bytes, reply: P.Reply) -> None:
        try:
            data = P.encode(reply)
        except (TypeError, ValueError, OverflowError) as exc:
            log.exception("could not encode a %s reply", type(reply).__name__)
            data = P.encode(P.ErrorReply(id=reply.id, code="internal",
                                         message=f"reply could not be encoded: {exc}"))
        if not self._sender.send(peer, data):
            self._peer_gone(peer)

    def _peer_gone(self, peer: bytes) -> None:
        """The client went away: its requests are cancelled, their replies dropped."""
        for key, job in list(self._jobs.items()):
            if job.peer == peer and not job.cancelled:
                log.info("client %s is gone; cancelling its %s request %r", peer.hex(), job.op, job.id)
                self._cancel_job(key, job, reply=False)

    def _finish(self, key: tuple, job: Job) -> None:
        del self._jobs[key]

    # -- stopping --------------------------------------------------------------

    def _begin_stop(self, reason: str, drain: bool) -> None:
        if self._stopping:
            if not drain:
                self._stop_deadline = time.monotonic()
            return
        log.info("stopping (%s)%s", reason, ", draining" if drain else "")
        self._stopping = True
        self._stop_deadline = time.monotonic() + (self.drain_timeout if drain else 0.0)
        self._closer = threading.Thread(target=self._close_engine, args=(drain,),
                                        name="runner-closer", daemon=True)
        self._closer.start()

    def _close_engine(self, drain: bool) -> None:
        if self._load_thread is not None:
            self._load_thread.join()  # the progress callback asks the load to stop
        self._heavy_pool.shutdown(wait=True, cancel_futures=not drain)
        self._pool.shutdown(wait=True, cancel_futures=not drain)
        if self.engine is not None:
            self.engine.close(drain=drain, timeout=self.drain_timeout + 5.0)

    def _stopped(self) -> bool:
        """Drain progress; True once everything is answered and the engine closed."""
        now = time.monotonic()
        if not self._cancelled_all and now >= self._stop_deadline:
            self._cancelled_all = True
            if self._jobs:
                log.warning("cancelling %d requests still running", len(self._jobs))
            for key, job in list(self._jobs.items()):
                self._cancel_job(key, job)
        if not self._jobs and not self._closer.is_alive() and not self._sender.backlogged:
            return True
        if now > self._stop_deadline + 10.0:
            log.error("gave up waiting: %d requests unanswered, engine %s",
                      len(self._jobs), "still closing" if self._closer.is_alive() else "closed")
            return True
        return False

    def _abort(self, code: int) -> int:
        """Exit without draining: cancel everything, give the engine a second."""
        self.abrupt = True
        self._stopping = True
        for key, job in list(self._jobs.items()):
            self._cancel_job(key, job, reply=False)
        engine = self.engine
        if engine is not None:
            closer = threading.Thread(target=engine.close, kwargs={"drain": False, "timeout": 1.0},
                                      daemon=True)
            closer.start()
            closer.join(1.5)
        self._heavy_pool.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return code

    # -- loading ---------------------------------------------------------------

    def _start_load(self, params: P.Load) -> None:
        with self._state_lock:
            self._state, self._progress = "loading", 0.0
            self._error = self._error_code = None
        self._load_thread = threading.Thread(target=self._load_model, args=(params,),
                                             name="runner-load", daemon=True)
        self._load_thread.start()

    def _on_progress(self, fraction: float) -> bool:
        with self._state_lock:
            self._progress = min(max(float(fraction), 0.0), 1.0)
        return not self._stopping  # False aborts the load

    def _load_model(self, params: P.Load) -> None:
        from runner import _llama
        from runner.engine.core import Engine
        from runner.engine.requests import EngineError
        from runner.model.placement import config_from_load

        t0 = time.perf_counter()
        mark = _llama.error_mark()
        try:
            engine = Engine(config_from_load(self.model_path, params), progress=self._on_progress)
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            # llama.cpp's last line says why only when llama.cpp failed, and
            # only if it logged it during this load: the runner's own checks
            # (BadRequest, ModelFileError) carry their reason already.
            line = _llama.last_error_line() if _from_llama(exc) and _llama.error_mark() > mark else ""
            if line and line not in message:
                message = f"{message} (llama.cpp: {line})"
            code = P.known_code(exc.code) if isinstance(exc, EngineError) else "internal"
            log.error("loading %s failed: %s", self.model_path, message)
            with self._state_lock:
                self._state, self._error, self._error_code = "error", message, code
            return
        # Chunks wait in the outbox until the engine has delivered the whole
        # step; then that thread sends them, or wakes the I/O thread once.
        engine.on_delivered = self._send_from_engine
        with self._state_lock:
            self.engine = engine
            self._state, self._progress = "ready", 1.0
        log.info("loaded %s in %.2f s", self.model_path, time.perf_counter() - t0)

    def _ready_engine(self):
        if self._stopping:
            raise NotReady("the runner is shutting down")
        with self._state_lock:
            engine, state = self.engine, self._state
        if engine is None:
            raise NotReady(f"no model loaded (state {state})")
        return engine

    # -- handlers (I/O thread) ---------------------------------------------------

    def _new_key(self, peer: bytes, request_id: Any) -> tuple:
        key = (peer, request_id)
        if key in self._jobs:
            raise BadRequest(f"request id {request_id!r} is already in flight")
        return key

    def _public_state(self) -> tuple[str, float, str | None, str | None, Any]:
        """(state, progress, error, error_code, engine) as ``health`` reports
        them: a loaded engine that can no longer compute (a lost remote
        device) is in state ``error`` with the reason."""
        with self._state_lock:
            state, progress, error, code = self._state, self._progress, self._error, self._error_code
            engine = self.engine
        if engine is not None:
            failure = engine.failure()
            if failure is not None:
                state, error, code = "error", failure, "internal"
        return ("stopping" if self._stopping else state), progress, error, code, engine

    def _health(self, peer: bytes, req: P.Health, size: int) -> None:
        state, progress, error, code, engine = self._public_state()
        self._send(peer, P.HealthReply(
            id=req.id, state=state, progress=progress,
            error=error, error_code=code, pid=os.getpid(), max_message_bytes=self.max_message_bytes,
            host_cache=engine.host_cache.info() if engine is not None else None))

    def _load(self, peer: bytes, req: P.Load, size: int) -> None:
        if self._stopping:
            raise NotReady("the runner is shutting down")
        with self._state_lock:
            state = self._state
        if state == "loading":
            raise Busy("the model is already loading")
        if state == "ready":
            failure = self.engine.failure()
            if failure is not None:
                raise BadRequest(f"the model is loaded but cannot compute any more ({failure})")
            raise BadRequest("the model is already loaded")
        self._start_load(req)
        self._send(peer, P.LoadReply(id=req.id, state="loading"))

    def _completion(self, peer: bytes, req: P.Completion, size: int) -> None:
        engine = self._ready_engine()

        def build() -> tuple[CompletionRequest, None]:
            return CompletionRequest(
                prompt=req.prompt, options=CompletionOptions.from_dict(req.options),
                add_special=req.add_special,
                media=[MediaItem(m.id, m.data) for m in req.media]), None

        self._start_generation(peer, req, size, engine, build)

    def _chat(self, peer: bytes, req: P.Chat, size: int) -> None:
        """A completion whose prompt is the chat rendered with the model's
        template (on the worker thread, like tokenizing); the final carries
        the answer parsed for reasoning and tool calls."""
        engine = self._ready_engine()
        templates = self._chat_templates(engine)

        def build() -> tuple[CompletionRequest, chatparse.ChatFormat]:
            rendered = templates.render(ChatRequest(
                messages=req.messages, tools=req.tools,
                add_generation_prompt=req.add_generation_prompt,
                template_kwargs=req.template_kwargs))
            request = CompletionRequest(
                prompt=rendered.prompt, options=CompletionOptions.from_dict(req.options),
                add_special=True, media=[MediaItem(m.id, m.data) for m in req.media])
            return request, chatparse.detect(rendered.source, rendered.prompt, rendered.has_tools,
                                             reasoning=req.reasoning_format == "auto")

        self._start_generation(peer, req, size, engine, build)

    def _chat_templates(self, engine) -> ChatTemplates:
        """The loaded model's templates (read from its metadata once; each
        compiled by the first request that needs it, on a worker thread)."""
        with self._state_lock:
            if self._templates is None:
                self._templates = ChatTemplates(engine.model)
            return self._templates

    def _start_generation(self, peer: bytes, req: P.Request, size: int, engine,
                          build: Callable[[], tuple[CompletionRequest, Any]]) -> None:
        """Prepared on a worker thread, like every op whose cost grows with the
        request: ``build`` (options, template), then tokenizing, grammar and
        schema conversion, media decoding in ``submit``.  This thread owes its
        time to every other stream.  A cancel that arrives meanwhile is applied
        by whichever of the two threads sees both the handle and the flag."""

        def prepare(job: Job) -> P.Reply | None:
            try:
                request, chat_format = build()
            except EngineError as exc:
                engine.totals.refused(exc.code)
                raise
            if job.cancelled:
                engine.totals.finished("cancelled", 0, 0, 0, 0)
                return _cancelled_reply(job)
            # The engine's events may reach the outbox before submit returns;
            # they wait there for the I/O thread, which knows the job already.
            job.handle = engine.submit(request, on_event=self._event_sink((job.peer, job.id),
                                                                          chat_format))
            if job.cancelled:
                job.handle.cancel()
            return None  # the engine's final ends it

        try:
            self._start_work(peer, req, size, prepare)
        except EngineError as exc:  # busy, a reused id, shutting down
            engine.totals.refused(exc.code)
            raise

    def _event_sink(self, key: tuple, chat_format: chatparse.ChatFormat | None = None
                    ) -> Callable[[Any], None]:
        post, post_quiet = self._outbox.post, self._outbox.post_quiet
        request_id = key[1]

        def on_event(event) -> None:  # the engine's delivery thread; never blocks
            if type(event) is Chunk:
                # Each Chunk owns its token list (the engine starts a new one).
                post_quiet((key, P.ChunkReply(id=request_id, text=event.text, tokens=event.tokens,
                                              logprobs=event.logprobs), False))
            else:
                post((key, _final_reply(request_id, event), True))

        if chat_format is None:
            return on_event
        texts: list[str] = []  # the answer so far, parsed when it ends

        def on_chat_event(event) -> None:  # the engine's delivery thread
            if type(event) is Chunk:
                texts.append(event.text)
                on_event(event)
                return
            reply = _final_reply(request_id, event)
            if event.done_reason != "error":
                reply.message = chatparse.parse("".join(texts), chat_format)
            post((key, reply, True))

        return on_chat_event

    def _embedding(self, peer: bytes, req: P.Embedding, size: int) -> None:
        import numpy as np

        engine = self._ready_engine()

        def run(job: Job) -> P.Reply:
            many = not isinstance(req.text, str)
            results = engine.embed_many(req.text if many else [req.text], normalize=req.normalize,
                                        truncate=req.truncate)
            blobs = [np.ascontiguousarray(r.embedding, dtype="<f4").tobytes() for r in results]
            counts = [r.prompt_eval_count for r in results]
            return P.EmbeddingReply(id=req.id, embedding=blobs[0], prompt_eval_count=sum(counts),
                                    embeddings=blobs if many else None,
                                    token_counts=counts if many else None,
                                    n_embd=int(results[0].embedding.shape[-1]),
                                    pooling=engine.ctx.pooling)

        self._start_work(peer, req, size, run)

    def _rerank(self, peer: bytes, req: P.Rerank, size: int) -> None:
        engine = self._ready_engine()

        def run(job: Job) -> P.Reply:
            scores, n = engine.rerank(req.query, req.documents, truncate=req.truncate)
            return P.RerankReply(id=req.id, scores=scores, prompt_eval_count=n)

        self._start_work(peer, req, size, run)

    def _tokenize(self, peer: bytes, req: P.Tokenize, size: int) -> None:
        engine = self._ready_engine()
        self._start_work(peer, req, size, lambda job: P.TokenizeReply(id=req.id, tokens=engine.tokenize(
            req.text, add_special=req.add_special, parse_special=req.parse_special)))

    def _detokenize(self, peer: bytes, req: P.Detokenize, size: int) -> None:
        engine = self._ready_engine()
        self._start_work(peer, req, size, lambda job: P.DetokenizeReply(
            id=req.id, text=engine.detokenize(req.tokens)))

    def _discover(self, peer: bytes, req: P.Discover, size: int) -> None:
        self._start_work(peer, req, size, lambda job: P.DiscoverReply(id=req.id, devices=_devices()))

    def _estimate(self, peer: bytes, req: P.Estimate, size: int) -> None:
        def run(job: Job) -> P.Reply:
            from runner.model.gguf import GGUFError
            from runner.model.placement import config_from_load, estimate_load

            try:
                report = estimate_load(config_from_load(self.model_path, req),
                                       [msgspec.to_builtins(d) for d in _devices()])
            except (OSError, GGUFError) as exc:
                raise BadRequest(f"cannot estimate {self.model_path}: {exc}") from None
            return P.EstimateReply(id=req.id, **report)

        self._start_work(peer, req, size, run)

    def _info(self, peer: bytes, req: P.Info, size: int) -> None:
        from runner import __version__

        in_flight = len(self._jobs)
        state, _, _, _, engine = self._public_state()

        def run(job: Job) -> P.Reply:
            from runner import _llama

            return P.InfoReply(id=req.id, protocol=P.PROTOCOL_VERSION, version=__version__,
                               pid=os.getpid(), state=state, build=_llama.build_info(),
                               devices=_devices(), engine=engine.info() if engine else None,
                               metadata=engine.model.metadata() if engine else None,
                               in_flight=in_flight)

        self._start_work(peer, req, size, run)

    def _metrics(self, peer: bytes, req: P.Metrics, size: int) -> None:
        engine = self._ready_engine()
        in_flight = len(self._jobs)
        self._start_work(peer, req, size, lambda job: P.MetricsReply(
            id=req.id, in_flight=in_flight, **engine.metrics()))

    def _save_slot(self, peer: bytes, req: P.SaveSlot, size: int) -> None:
        engine = self._ready_engine()
        self._start_work(peer, req, size, lambda job: _slot_reply(
            req.id, engine.save_slot(req.slot, req.name)))

    def _restore_slot(self, peer: bytes, req: P.RestoreSlot, size: int) -> None:
        engine = self._ready_engine()
        self._start_work(peer, req, size, lambda job: _slot_reply(
            req.id, engine.restore_slot(req.slot, req.name)))

    def _cancel(self, peer: bytes, req: P.Cancel, size: int) -> None:
        key = (peer, req.target)
        job = self._jobs.get(key)
        found = job is not None and not job.cancelled
        if found:
            self._cancel_job(key, job)
        self._send(peer, P.CancelReply(id=req.id, found=found))

    def _shutdown(self, peer: bytes, req: P.Shutdown, size: int) -> None:
        self._send(peer, P.ShutdownReply(id=req.id, drain=req.drain))
        self._begin_stop("shutdown request", drain=req.drain)

    # -- jobs on worker threads --------------------------------------------------

    def _start_work(self, peer: bytes, req: P.Request, size: int,
                    fn: Callable[[Job], P.Reply | None]) -> None:
        """Run ``fn(job)`` on a worker thread; its reply (None: the job goes on,
        answered by other means) or its exception is the job's terminal reply.
        Refused with ``busy`` past the :class:`WorkBudget`."""
        if self._stopping and not isinstance(req, (P.Info, P.Discover, P.Estimate)):
            raise NotReady("the runner is shutting down")
        key = self._new_key(peer, req.id)
        job = Job(peer, req.id, req.__struct_config__.tag, size,
                  batch_chunks=type(req) in (P.Completion, P.Chat) and req.batch_chunks)
        pool = self._heavy_pool if size > HEAVY_REQUEST_BYTES else self._pool
        self._budget.reserve(size)
        self._jobs[key] = job  # before the call starts: it may post replies at once
        try:
            job.future = pool.submit(self._work, key, job, fn)
        except RuntimeError:  # the pool is shut down: the runner is stopping
            del self._jobs[key]
            self._budget.release(size)
            raise NotReady("the runner is shutting down") from None

    def _work(self, key: tuple, job: Job, fn: Callable[[Job], P.Reply | None]) -> None:
        try:
            reply = fn(job)
        except Exception as exc:
            reply = _failure(job.id, exc)
        finally:
            self._budget.release(job.size)
        if reply is not None:
            self._outbox.post((key, reply, True))

    def _cancel_job(self, key: tuple, job: Job, reply: bool = True) -> None:
        """Ask a job to stop.  A completion ends with a ``cancelled`` final; a
        worker job that never started is answered here; a running one when it ends."""
        if job.cancelled:
            return
        job.cancelled = True
        if job.handle is not None:
            job.handle.cancel()
        elif job.future is not None and job.future.cancel():  # it never started
            self._budget.release(job.size)
            self._finish(key, job)
            if reply:
                self._send(job.peer, _cancelled_reply(job))


def serve(model: str, endpoint: str | None = None, load: P.Load | None = None, *,
          parent_pid: int | None = None, max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES,
          drain_timeout: float = 60.0, workers: int = 4,
          curve: security.ServerKeys | None = None, allow_abstract_ipc: bool = False) -> int:
    """Run a runner in this process until it is shut down; returns the exit status.

    ``endpoint`` None binds a fresh private ``ipc://`` endpoint.  The bound
    endpoint is printed on stdout (``endpoint <address>``), which also tells a
    harness the port of ``tcp://127.0.0.1:*``.  After an abrupt stop (the
    parent died) the process exits here, without waiting for other threads.
    ``curve`` serves CURVE security (required on non-loopback tcp; see
    :mod:`runner.process.security`).
    """
    from runner.model.models import resolve_model

    path = str(resolve_model(model))
    private_dir = None
    if endpoint is None:
        security.remove_stale_private_dirs()
        endpoint, private_dir = security.private_ipc_endpoint()
    try:
        server = Server(path, endpoint, load=load, parent_pid=parent_pid,
                        max_message_bytes=max_message_bytes, drain_timeout=drain_timeout,
                        workers=workers, curve=curve, allow_abstract_ipc=allow_abstract_ipc)
    except BaseException as exc:
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)
        if isinstance(exc, zmq.ZMQError):
            raise RuntimeError(f"cannot bind {endpoint}: {exc}") from None
        raise
    print(f"endpoint {server.endpoint}", flush=True)
    try:
        code = server.run()
    finally:
        server.close()
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)
    if server.abrupt:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
