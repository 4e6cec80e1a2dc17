"""How long one heavy request stalls the other streams (not part of the test suite).

    python benchmarks/bench_stalls.py                       # every case, default model
    python benchmarks/bench_stalls.py --case prompt-15mb --case enum-20k --threads 2

Four greedy streams generate through one runner process while a second
client sends one heavy request.  For each case the report gives the longest
gap between two chunks of any of the four streams while the heavy request is
in the runner (from its send to its reply, plus half a second), next to the
longest gap in the same length of time just before it, when the longest gap
began, and what the heavy request got back (a result, or the error code that
refused it).  On a machine whose cores other work also uses, the gaps move
with that load: compare the two columns of one run, not runs.

Cases (the sizes of issue 15's probe, and the largest each limit accepts):

* ``prompt-15mb``: a completion with a 15 MB text prompt;
* ``tokenize-10mb``: a tokenize of 10 MB of text;
* ``grammar-20k``: a completion whose GBNF grammar has 20,000 alternatives;
* ``enum-20k``: a completion whose JSON schema is an enum of 20,000 strings;
* ``*-limit``: the same at the largest size :mod:`runner.engine.limits` accepts.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import msgpack
import zmq

from runner.bench.harness import filler_text, greedy_options
from runner.engine import limits
from runner.engine.requests import Chunk
from runner.process.client import Runner

N_STREAMS = 4


def _text(n_bytes: int) -> str:
    """About ``n_bytes`` of plain prose (ASCII, so bytes == characters)."""
    unit = filler_text(0, 2000) + " "
    return (unit * (n_bytes // len(unit) + 1))[:n_bytes]


def _alternatives(n: int) -> str:
    return "root ::= " + " | ".join(f'"w{i}"' for i in range(n)) + "\n"


def _enum(n: int) -> dict:
    return {"enum": [f"value-{i}" for i in range(n)]}


def _completion(prompt: str, **options) -> dict:
    return {"op": "completion", "prompt": prompt,
            "options": {**greedy_options(4), "ignore_eos": False, **options}}


def _enum_at_limit() -> dict:
    return _enum(limits.MAX_SCHEMA_ALTERNATIVES)


def _grammar_at_limit() -> str:
    """As many alternatives as fit in MAX_GRAMMAR_BYTES."""
    n = 0
    while len(_alternatives(n + 256).encode()) <= limits.MAX_GRAMMAR_BYTES:
        n += 256
    return _alternatives(n)


CASES = {
    "prompt-15mb": lambda: _completion(_text(15_000_000), truncate=True),
    "prompt-limit": lambda: _completion(_text(limits.MAX_TEXT_BYTES), truncate=True),
    "tokenize-10mb": lambda: {"op": "tokenize", "text": _text(10_000_000)},
    "tokenize-limit": lambda: {"op": "tokenize", "text": _text(limits.MAX_TEXT_BYTES)},
    "grammar-20k": lambda: _completion("Pick a word:", grammar=_alternatives(20_000)),
    "grammar-limit": lambda: _completion("Pick a word:", grammar=_grammar_at_limit()),
    "enum-20k": lambda: _completion("Pick a value:", json_schema=_enum(20_000)),
    "enum-limit": lambda: _completion("Pick a value:", json_schema=_enum_at_limit()),
}


class Streams:
    """``N_STREAMS`` long greedy completions, each chunk's arrival time recorded."""

    def __init__(self, runner: Runner, tokens: int) -> None:
        self.times: list[list[float]] = [[] for _ in range(N_STREAMS)]  # per stream: chunk arrivals
        self._streams = [runner.complete(f"Story {i}: once upon a time", **greedy_options(tokens))
                         for i in range(N_STREAMS)]
        self._threads = [threading.Thread(target=self._read, args=(i,), daemon=True)
                         for i in range(N_STREAMS)]
        for t in self._threads:
            t.start()

    def _read(self, i: int) -> None:
        for event in self._streams[i]:
            if isinstance(event, Chunk):
                self.times[i].append(time.perf_counter())

    def longest_gap(self, t0: float, t1: float) -> tuple[float, float]:
        """Longest time between consecutive chunks of one stream within [t0, t1],
        and when it began (seconds after t0)."""
        worst, at = 0.0, 0.0
        for times in self.times:
            inside = [t for t in times if t0 <= t <= t1]
            for a, b in zip(inside, inside[1:]):
                if b - a > worst:
                    worst, at = b - a, a - t0
        return worst, at

    def stop(self) -> None:
        for s in self._streams:
            s.cancel()
        for t in self._threads:
            t.join(30)


def run_case(runner: Runner, name: str, tokens: int) -> dict:
    message = CASES[name]()
    message["id"] = 1
    data = msgpack.packb(message)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(runner.endpoint)
    streams = Streams(runner, tokens)
    try:
        time.sleep(3.0)  # the streams are generating; this is the baseline window
        t_send = time.perf_counter()
        sock.send(data, copy=False)
        reply = None
        while sock.poll(120_000):
            reply = msgpack.unpackb(sock.recv(), raw=False)
            if reply["type"] != "chunk":
                break
        t_reply = time.perf_counter()
        time.sleep(0.5)
        window = t_reply + 0.5 - t_send
        gap_before, _ = streams.longest_gap(t_send - window, t_send)
        gap_during, gap_at = streams.longest_gap(t_send, t_reply + 0.5)
        outcome = "no reply" if reply is None else (
            f"error {reply['code']}: {reply['message'][:120]}" if reply["type"] == "error"
            else reply["type"])
        return {"case": name, "bytes": len(data), "reply_s": round(t_reply - t_send, 3),
                "gap_before_s": round(gap_before, 3), "gap_during_s": round(gap_during, 3),
                "gap_during_at_s": round(gap_at, 3), "chunks": [len(t) for t in streams.times],
                "outcome": outcome}
    finally:
        streams.stop()
        sock.close(0)
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--case", action="append", choices=sorted(CASES),
                   help="run only these cases (repeatable); default: all")
    p.add_argument("--threads", type=int, default=None, help="decode threads (default: all cores)")
    p.add_argument("--tokens", type=int, default=4000, help="tokens each stream may generate")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    from runner.model.models import resolve_model

    model = str(resolve_model(args.model))
    results = []
    with Runner.spawn(model, n_ctx=(N_STREAMS + 1) * 1024, parallel=N_STREAMS + 1,
                      n_threads=args.threads) as runner:
        for name in args.case or list(CASES):
            result = run_case(runner, name, args.tokens)
            results.append(result)
            print(f"{result['case']:15} {result['bytes'] / 1e6:7.2f} MB  reply {result['reply_s']:7.3f} s"
                  f"  longest gap before {result['gap_before_s']:6.3f} s, during "
                  f"{result['gap_during_s']:6.3f} s (at +{result['gap_during_at_s']:.2f} s)  "
                  f"({result['outcome']})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
