"""Host buffers for the host tier's states, their pages touched off the loop thread.

Writing a state into fresh memory faults every page of it in, and on the
shared VM that is most of the cost: a 44 MiB state took ~140 ms to copy
into a fresh ``bytes`` and ~3 ms into memory already touched (see
docs/design.md).  A save runs on the engine's loop thread and stalls every
other sequence for its length, so the tier copies only into memory a helper
thread touched before:

* **the spare**: one buffer the helper thread allocates and touches ahead of
  the next save, at the size the tier asks for with :meth:`HostBuffers.prepare`
  (the largest state a free slot would save); :meth:`HostBuffers.take` hands
  it out;
* buffers the tier drops (evicted or replaced entries) are released on the
  helper thread too (freeing a large buffer unmaps its pages).

Buffers are 1-D ``numpy.uint8`` arrays that own their memory, so a spare
larger than the state is cut back in place (``realloc``) without a copy.

Locking: ``_cond`` guards ``_spare``, ``_want`` and ``_trash``; the helper
thread allocates and touches a spare without holding it.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["HostBuffers", "touched"]

PAGE = 4096  # bytes between two touches: every page of a buffer, whatever its page size


def touched(size: int) -> np.ndarray:
    """A buffer of ``size`` bytes whose pages are all mapped (one write per page)."""
    buf = np.empty(size, dtype=np.uint8)
    buf[::PAGE] = 0
    return buf


class HostBuffers:
    """The spare buffer and the release of dropped ones (see the module docstring).

    With ``thread=False`` (tests) :meth:`prepare` makes the spare and
    :meth:`discard` drops buffers at once, on the caller's thread.
    """

    def __init__(self, *, thread: bool = True) -> None:
        self._cond = threading.Condition()
        self._spare: np.ndarray | None = None  # touched buffer ready for the next save
        self._want = 0                         # size the spare should have; 0: none
        self._trash: list[np.ndarray] = []     # dropped buffers the helper thread releases
        self._closed = False                   # close() was called: the helper thread stops
        self.made = 0                          # spares made (helper thread writes)
        self.taken = 0                         # spares handed out by take() (caller writes)
        self._thread = None                    # the helper thread (None: inline mode)
        if thread:
            self._thread = threading.Thread(target=self._run, name="host-cache-buffers", daemon=True)
            self._thread.start()

    @property
    def spare_bytes(self) -> int:
        """Bytes held or being made for the spare (count them with the tier's)."""
        with self._cond:
            return max(self._want, 0 if self._spare is None else len(self._spare))

    def prepare(self, size: int) -> None:
        """Have a touched spare of at least ``size`` bytes ready for the next
        :meth:`take`.  A spare already that large is kept (0: make none now)."""
        with self._cond:
            self._want = max(0, size)
            if self._spare is not None and len(self._spare) < self._want:
                self._trash.append(self._spare)
                self._spare = None
            self._cond.notify()
        if self._thread is None:
            self._work()

    def take(self) -> np.ndarray | None:
        """The spare, or None when none is ready; spent either way (call
        :meth:`prepare` again).  Resize it in place with ``resize(n,
        refcheck=False)``: cutting frees the tail without a copy; growing
        zero-fills the new bytes, faulting their pages in."""
        with self._cond:
            spare, self._spare, self._want = self._spare, None, 0
        if spare is not None:
            self.taken += 1
        return spare

    def discard(self, buf) -> None:
        """Release ``buf`` (no longer used by the caller) on the helper thread."""
        with self._cond:
            self._trash.append(buf)
            self._cond.notify()
        if self._thread is None:
            self._work()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # -- the helper thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._trash and not self._need():
                    self._cond.wait()
                if self._closed:
                    self._trash.clear()
                    self._spare = None
                    return
            self._work()

    def _need(self) -> int:
        """Size of the spare to make now (0: none); ``_cond`` held."""
        return self._want if self._want and self._spare is None else 0

    def _work(self) -> None:
        with self._cond:
            trash, self._trash = self._trash, []
            size = self._need()
        del trash  # the last references: freed here, off the loop thread
        if not size:
            return
        buf = touched(size)
        with self._cond:
            if self._want == size and self._spare is None:
                self._spare = buf
                self.made += 1
                buf = None
        # a spare no longer wanted (prepare or take since) is freed here
