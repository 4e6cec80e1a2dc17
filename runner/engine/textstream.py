"""Incremental detokenization: token pieces in, text safe to stream out.

The engine feeds the raw bytes of each generated token (``token_to_piece``)
to a :class:`TextStream` and forwards whatever :meth:`TextStream.feed`
returns. Two things are held back until resolved:

* an incomplete UTF-8 sequence at the end of the bytes seen so far;
* the longest tail of the decoded text that is a prefix of a stop string.

Stop strings are matched with an Aho-Corasick automaton over the decoded
characters, so each feed costs O(len(piece) + longest stop) whatever the
length of the output, and the result does not depend on how the bytes were
split into pieces: generation stops at the first character that completes any
stop string, and output ends just before the longest stop string ending there.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

__all__ = ["TextStream"]


class _StopMatcher:
    """Aho-Corasick automaton over a set of non-empty stop strings.

    State 0 is the root (nothing matched). For every state ``s``:
    ``depth[s]`` is the length of the string it spells, which is the longest
    suffix of the text read so far that is a prefix of some stop string;
    ``found[s]`` is the length of the longest stop string that is a suffix of
    it (0 for none).
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.goto: list[dict[str, int]] = [{}]  # state -> char -> next state (trie edges)
        self.fail: list[int] = [0]  # state -> state of its longest proper suffix in the trie
        self.depth: list[int] = [0]  # state -> length of the string it spells
        self.found: list[int] = [0]  # state -> longest stop string ending here, 0 if none
        for stop in stops:
            state = 0
            for ch in stop:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[state][ch] = nxt
                    self.goto.append({})
                    self.fail.append(0)
                    self.depth.append(self.depth[state] + 1)
                    self.found.append(0)
                state = nxt
            self.found[state] = len(stop)
        self._link()
        self.first = frozenset(self.goto[0])  # characters that can start a stop string

    def _link(self) -> None:
        """Fill failure links breadth-first; inherit matches along them."""
        queue = list(self.goto[0].values())
        for state in queue:
            for ch, nxt in self.goto[state].items():
                f = self.fail[state]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[nxt] = self.goto[f].get(ch, 0)
                if not self.found[nxt]:
                    self.found[nxt] = self.found[self.fail[nxt]]
                queue.append(nxt)

    def step(self, state: int, ch: str) -> int:
        goto, fail = self.goto, self.fail
        while state and ch not in goto[state]:
            state = fail[state]
        return goto[state].get(ch, 0)


class TextStream:
    """Turns a sequence of token pieces into streamable text, honouring stop strings.

    One instance per request. Not thread-safe; owned by the engine's delivery thread.

    Byte handling: an incomplete UTF-8 sequence at the tail is held until the
    next piece completes it. Invalid bytes in the middle of the stream become
    U+FFFD (``errors='replace'``). An incomplete sequence still pending when
    :meth:`finish` is called is dropped.

    Stop handling: once a stop string is complete, :attr:`stopped` is True,
    :attr:`stop` names it, the text before it is returned and everything from
    its first character on is discarded. :attr:`n_feeds_to_trim` then says how
    many of the last fed pieces hold any byte of the stop string: the piece
    that completed it and every piece back to the one where it begins
    (inclusive). The engine drops that many trailing tokens from the slot.
    Empty stop strings are ignored.
    """

    def __init__(self, stop: Iterable[str] = ()) -> None:
        stops = [s for s in stop if s]
        self._matcher = _StopMatcher(stops) if stops else None  # None: nothing to hold back
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")  # holds split UTF-8
        self._state = 0  # automaton state after the last decoded character
        self._pending = ""  # decoded text held back: a possible stop-string prefix
        self._pending_feeds: list[int] = []  # feed index where each pending char's first byte came
        self._carry_feed = 0  # feed index where the decoder's buffered bytes began
        self._carrying = False  # the decoder holds the start of a split UTF-8 character
        self._n_feeds = 0  # pieces fed so far
        self._closed = False  # finish() called or a stop string found
        self.stopped = False  # a stop string was found
        self.stop: str | None = None  # the stop string found, if any
        self.n_feeds_to_trim = 0  # trailing pieces holding part of the stop string (after a stop)

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that can be emitted now."""
        if self._closed:
            raise RuntimeError("feed() after the stream stopped or finished")
        index = self._n_feeds
        self._n_feeds += 1
        if not self._carrying and piece.isascii():
            # Most pieces: nothing split is pending and every byte is a character.
            text = piece.decode("ascii")
            first_feed = index
        else:
            carried = self._carrying
            # The first new character starts in an earlier piece if bytes were carried over.
            first_feed = self._carry_feed if carried else index
            text = self._decoder.decode(piece)
            self._carrying = bool(self._decoder.getstate()[0])
            if self._carrying and (text or not carried):
                self._carry_feed = index  # a new incomplete sequence starts in this piece
        if not text:
            return ""
        matcher = self._matcher
        if matcher is None:
            return text
        if not self._state and matcher.first.isdisjoint(text):
            return text  # nothing is held back, and no stop string can start in it
        return self._scan(text, first_feed, index)

    def finish(self) -> str:
        """End of generation: return the held-back text, dropping an incomplete UTF-8 tail."""
        if self._closed:
            return ""
        self._closed = True
        self._decoder.reset()
        self._carrying = False
        out, self._pending, self._pending_feeds = self._pending, "", []
        return out

    def _scan(self, text: str, first_feed: int, index: int) -> str:
        """Run the new characters through the stop matcher; emit what cannot be a stop."""
        matcher = self._matcher
        assert matcher is not None
        window = self._pending + text
        base = len(self._pending)
        state = self._state
        for i, ch in enumerate(text):
            state = matcher.step(state, ch)
            length = matcher.found[state]
            if length:
                start = base + i + 1 - length
                feeds = self._pending_feeds + [first_feed] + [index] * (len(text) - 1)
                self.stopped = True
                self.stop = window[start:base + i + 1]
                self.n_feeds_to_trim = index - feeds[start] + 1
                self._closed = True
                self._pending, self._pending_feeds = "", []
                return window[:start]
        self._state = state
        hold = matcher.depth[state]
        cut = len(window) - hold
        if hold:
            feeds = self._pending_feeds + [first_feed] + [index] * (len(text) - 1)
            self._pending_feeds = feeds[cut:]
        else:
            self._pending_feeds = []
        self._pending = window[cut:]
        return window[:cut]
