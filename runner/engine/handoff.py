"""Handing items from one thread to a thread that waits for them.

``queue.SimpleQueue.put`` wakes the waiting thread while the putter holds the
GIL.  The woken thread, often scheduled at once on the same core, finds the
GIL taken and sleeps again: two context switches per item, paid on the
critical thread (the client's I/O thread, the engine's delivery thread).  A
:class:`Handoff` keeps the items in a deque and wakes the reader through an
eventfd, whose write syscall runs without the GIL, so the reader can take it
as soon as it runs.  Measured with 8 reader threads woken once per 0.3 ms
"step": 1.58 s against 1.75 s for 3,000 steps (about 7 us less per item on
the loaded 2-core VM).  Where eventfd is missing (macOS), it is a
SimpleQueue.
"""

from __future__ import annotations

import collections
import os
import queue
from typing import Any

__all__ = ["Doorbell", "Handoff", "new_handoff"]


class Handoff:
    """A single-reader queue: any thread may :meth:`put`; one thread at a
    time may :meth:`get`.  Items are never lost; a wake-up may be spurious
    (the reader loops)."""

    __slots__ = ("_items", "_fd")

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()  # handed over, not yet taken
        self._fd = os.eventfd(0, os.EFD_CLOEXEC)  # counts puts since the reader last woke

    def put(self, item: Any) -> None:
        self._items.append(item)
        os.eventfd_write(self._fd, 1)  # releases the GIL around the syscall

    def get(self) -> Any:
        items = self._items
        while not items:
            os.eventfd_read(self._fd)  # blocks without the GIL until a put
        return items.popleft()

    def empty(self) -> bool:
        return not self._items

    def __del__(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def new_handoff() -> "Handoff | queue.SimpleQueue":
    """A Handoff where the platform has eventfd, else a SimpleQueue (same
    put / get / empty)."""
    return Handoff() if hasattr(os, "eventfd") else queue.SimpleQueue()


class Doorbell:
    """Wakes one waiting thread; any thread may :meth:`ring`, and native code
    may write an 8-byte 1 to :attr:`fd` without the GIL (``Context.decode``'s
    ``doorbell``).  An eventfd where the platform has one, else a pipe.
    Rings before the wait are not lost; several may wake the waiter once."""

    __slots__ = ("fd", "_read_fd")

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self.fd = self._read_fd = os.eventfd(0, os.EFD_CLOEXEC)
        else:  # the write end never blocks: a full pipe already wakes the reader
            self._read_fd, self.fd = os.pipe()
            os.set_blocking(self.fd, False)

    def ring(self) -> None:
        try:
            os.write(self.fd, (1).to_bytes(8, "little"))
        except BlockingIOError:
            pass

    def wait(self) -> None:
        """Block (without the GIL) until rung since the last wait."""
        os.read(self._read_fd, 4096 if self._read_fd != self.fd else 8)

    def close(self) -> None:
        fds = {self.fd, self._read_fd}
        self.fd = self._read_fd = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
