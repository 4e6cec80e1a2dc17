"""Prompt lookup: proposals for speculative decoding from the text so far.

A speculating sequence (option ``speculative``) proposes, each step, tokens
that continue the most recent earlier occurrence of its last n tokens in the
prompt and the tokens generated so far (n = :data:`NGRAM_MAX` tried first,
then down to :data:`NGRAM_MIN`).  How many tokens it proposes is set by the
evidence: the *match length* m, how many tokens before the current position
equal those before the earlier occurrence (the n-gram extended backwards).
A match shorter than :data:`NGRAM_MIN` tokens proposes nothing; a longer
one proposes at most m tokens (and at most what the scheduler allows).  So a
copy of the input that has gone on for a while is proposed in long runs
(each accepted run lengthens the match), and a stray coincidence of a
token or two proposes nothing.

Why: on a CPU each row a verification decode adds costs about half a
one-row decode of the default model (docs/design.md, "Speculative
decoding": 1.66x for 2 rows, 7.7x for 16, one thread), so a proposal pays
only when most of it is accepted.  Counted over the greedy answers to
benchmarks/bench_spec.py's tasks and variants of them, the first token
proposed after a 1-token match was accepted 13% of the time, after a
2-token match 37%, a 3- or 4-token match 80%, a longer one 92-98%.

A draft model has no match length: its proposals are bounded by a cap that
adapts to how the last ones fared (:func:`next_cap`): a fully accepted
proposal doubles the next one's length (up to ``draft_max``), a partly
rejected one cuts it to one more than was accepted.  For both, a proposal
with nothing accepted makes the sequence skip proposing for a few steps
(:func:`wait_after`: 1, 3, 7, 15 steps after 1, 2, 3, 4 such proposals in a
row, at most :data:`MAX_WAIT`), so text that does not repeat its input
soon costs next to nothing.

The lookup is pure: no model, no context.  Finding a proposal costs one dict
lookup per n and at most ``n_max`` comparisons to measure the match;
appending a token costs one insert per n.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.engine.requests import MAX_DRAFT

NGRAM_MAX = 4   # longest suffix looked up
NGRAM_MIN = 3   # shortest suffix looked up: the least matched context a proposal needs
NOT_A_TOKEN = -1  # stands for a media input in the history: never matched, never proposed
FIRST_CAP = 4     # draft model: tokens proposed at most before any verification
MAX_WAIT = 16     # most steps a sequence skips proposing after rejected proposals


def next_cap(cap: int, n_proposed: int, n_accepted: int) -> int:
    """The most tokens the next proposal may have, after a proposal of
    ``n_proposed`` tokens had its first ``n_accepted`` accepted."""
    if n_proposed <= 0:
        return cap
    if n_accepted >= n_proposed:
        return min(max(cap, n_proposed) * 2, MAX_DRAFT)
    return n_accepted + 1


def wait_after(misses: int) -> int:
    """Steps to skip proposing after ``misses`` proposals in a row had
    nothing accepted (0: propose at the next step)."""
    return 0 if misses <= 0 else min((1 << min(misses, 8)) - 1, MAX_WAIT)


@dataclass
class NgramLookup:
    """The history of one sequence (prompt tokens, then generated tokens) and,
    per suffix length n, where each n-gram last occurred.

    Invariant: ``index[n][g] = p`` means ``history[p-n:p] == g`` with the
    largest such ``p < len(history)``, so ``history[p]`` is the token that
    followed ``g`` there: every indexed n-gram has a continuation."""

    history: list[int] = field(default_factory=list)  # token ids; NOT_A_TOKEN for media rows
    index: dict[int, dict[tuple, int]] = field(default_factory=dict)  # n -> n-gram -> position after it
    n_generated: int = 0      # tokens of the sequence's generated list already in the history

    @classmethod
    def build(cls, prompt: list) -> "NgramLookup":
        """A lookup over ``prompt`` (token ids; anything else is a media row)."""
        hist = [t if type(t) is int else NOT_A_TOKEN for t in prompt]
        look = cls(history=hist)
        size = len(hist)
        for n in range(NGRAM_MIN, NGRAM_MAX + 1):
            # n-grams starting at 0 .. size-n-1 (each has a continuation);
            # later occurrences overwrite earlier ones.
            count = max(0, size - n)
            grams = zip(*(hist[k:k + count] for k in range(n)))
            look.index[n] = dict(zip(grams, range(n, n + count)))
        return look

    def extend(self, tokens: list[int]) -> None:
        """Append ``tokens`` to the history."""
        hist = self.history
        index = self.index
        for tok in tokens:
            hist.append(tok)
            end = len(hist) - 1  # the new token continues the n-grams ending before it
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end >= n:
                    index[n][tuple(hist[end - n:end])] = end

    def sync(self, generated: list[int]) -> None:
        """Take in the generated tokens not seen yet.  A shorter list than
        seen (the sequence was evaluated again after a context shift) starts
        the count over; the history keeps what it had."""
        if len(generated) < self.n_generated:
            self.n_generated = 0
        if len(generated) > self.n_generated:
            self.extend(generated[self.n_generated:])
            self.n_generated = len(generated)

    def propose(self, n_max: int) -> list[int]:
        """Up to ``n_max`` tokens continuing the most recent earlier
        occurrence of the longest suffix of the history that occurred
        before (n >= :data:`NGRAM_MIN`), at most as many as the match
        length (:meth:`match_length`); nothing when no such suffix
        occurred."""
        hist = self.history
        size = len(hist)
        if n_max <= 0:
            return []
        for n in range(min(NGRAM_MAX, size), NGRAM_MIN - 1, -1):
            key = tuple(hist[size - n:])
            if NOT_A_TOKEN in key:
                continue
            start = self.index[n].get(key)
            if start is None:
                continue
            out = hist[start:start + min(n_max, self.match_length(start, n, n_max))]
            if NOT_A_TOKEN in out:
                out = out[:out.index(NOT_A_TOKEN)]
            if out:
                return out
        return []

    def match_length(self, start: int, n: int, most: int) -> int:
        """How many tokens before ``start`` equal the last ones of the
        history: ``n`` (the n-gram found there) and as many more as match,
        counted up to ``most`` (at least ``n`` whatever ``most``).  A media
        row ends the match."""
        hist = self.history
        end = len(hist)
        m = n
        while m < most and start - m > 0:
            tok = hist[start - m - 1]
            if tok != hist[end - m - 1] or tok == NOT_A_TOKEN:
                break
            m += 1
        return m
