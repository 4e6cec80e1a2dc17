"""A foreign client for the reliability suites: a DEALER socket and the plain
``msgpack`` package, with a ledger that checks the one-terminal-reply promise.

:class:`Ledger` records every reply by request id: a reply to an id that
already had its terminal reply, or to an id never sent, is a broken promise
and fails the test the moment it arrives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import zmq

TERMINAL = frozenset({"final", "error", "health", "load", "embedding", "rerank", "tokenize", "detokenize",
                      "discover", "estimate", "info", "metrics", "cancel", "slot_file",
                      "shutdown"})  # every reply type but "chunk" and "chunks" (tests/test_load_shape.py)


_OWN_ID = object()  # RawClient.send: the id is the message's own


class NoReply(AssertionError):
    """The runner did not answer within the hang bound."""


@dataclasses.dataclass
class Ledger:
    """Replies by request id, for one connection."""

    open: dict[Any, list[dict]] = dataclasses.field(default_factory=dict)  # id -> replies so far
    closed: dict[Any, list[dict]] = dataclasses.field(default_factory=dict)  # id -> all its replies
    strays: list[dict] = dataclasses.field(default_factory=list)  # replies no open id explains

    def sent(self, request_id: Any) -> None:
        key = _key(request_id)
        assert key not in self.open, f"test bug: id {request_id!r} reused while open"
        self.closed.pop(key, None)  # an id may be reused once its request ended
        self.open[key] = []

    def record(self, reply: dict) -> bool:
        """File one reply; True when it ended its request."""
        key = _key(reply.get("id"))
        replies = self.open.get(key)
        if replies is None:
            self.strays.append(reply)
            return False
        replies.append(reply)
        if reply.get("type") in TERMINAL:
            self.closed[key] = self.open.pop(key)
            return True
        return False


def _key(request_id: Any) -> Any:
    return ("str", request_id) if isinstance(request_id, str) else ("other", request_id)


class RawClient:
    """One DEALER connection speaking plain msgpack."""

    def __init__(self, endpoint: str, hang_s: float = 120.0) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.hang_ms = int(hang_s * 1000)  # no reply this long = a hang
        self.ledger = Ledger()

    def send(self, message: Any, request_id: Any = _OWN_ID, track: bool = True) -> None:
        """Send a map (packed here) or raw bytes.  With ``track``, the ledger
        expects a terminal reply carrying ``request_id`` (default: the map's id)."""
        data = message if isinstance(message, bytes) else msgpack.packb(message)
        if track:
            self.ledger.sent(message.get("id") if request_id is _OWN_ID else request_id)
        self.sock.send(data)

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self) -> dict:
        if not self.sock.poll(self.hang_ms):
            raise NoReply(f"no reply from the runner within {self.hang_ms / 1000:.0f} s "
                          f"(open: {list(self.ledger.open)[:8]})")
        return msgpack.unpackb(self.sock.recv(), raw=False, strict_map_key=False)

    def pump(self) -> dict:
        """Receive one reply and file it."""
        reply = self.recv()
        self.ledger.record(reply)
        return reply

    def settle(self, on_reply=None) -> None:
        """Receive until every tracked request has its terminal reply."""
        while self.ledger.open:
            reply = self.pump()
            if on_reply is not None:
                on_reply(reply)

    def ask(self, message: dict) -> dict:
        """Send one request and return its terminal reply."""
        self.send(message)
        key = _key(message["id"])
        while key in self.ledger.open:
            self.pump()
        return self.ledger.closed[key][-1]

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
