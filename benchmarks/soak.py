"""Soak: a runner process under a mixed workload for N minutes (not a test).

    python benchmarks/soak.py --minutes 60 [--workers 6] [--parallel 4] [--json out.json]

One runner (default model, a tiny random vision projector so that media go
through the real encoder path) and ``--workers`` client threads, each looping
over randomly chosen actions (seeded): completions across every option family
(greedy, default sampling, penalties, seeds, stop strings with odd Unicode,
logprobs, JSON schemas, grammars, grammars that cannot be satisfied,
truncation, ignore_eos, token-id prompts), cancels mid-stream, clients that
disconnect without reading, embeddings, tokenize/detokenize round trips,
media completions, and refused requests (bad options, invalid grammars,
unknown token ids, prompts over the slot).

Reports requests by outcome, lost requests (no terminal reply within
``--reply-timeout`` seconds; must be 0), latency p50/p99 per action, and the
runner's RSS, open fds and threads at start and end.  The runner must be
alive at the end.  Exit status 1 when anything was lost or the runner died.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from runner.engine.requests import Chunk, EngineError, Final  # noqa: E402
from runner.process.client import Runner, RunnerGone  # noqa: E402

ODD = ["", "\u0000", "\ufffd", "😀🇫🇷", "e\u0301", "\u202e", "\U0010ffff", "日本語", " \t\n", "\"}]", "a" * 300]
SCHEMAS = [{}, {"type": "object"}, {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
           {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
           {"enum": ["red", "green", "blue"]}]
GRAMMARS = ['root ::= "yes" | "no"', 'root ::= [0-9]+', 'root ::= [z-a]', 'root ::= "a" [z-a]']


def proc_stats(pid: int) -> dict:
    """RSS (MiB), open fds and threads of a process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_mib"] = round(int(line.split()[1]) / 1024, 1)
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


class Soak:
    def __init__(self, runner: Runner, rng_seed: int, reply_timeout: float, media: list[bytes]):
        self.runner = runner                  # shared client (thread-safe)
        self.reply_timeout = reply_timeout    # seconds before a request counts as lost
        self.media = media                    # image files for media completions
        self.lock = threading.Lock()          # guards the three tallies below
        self.outcomes: collections.Counter = collections.Counter()  # "action:outcome" -> count
        self.latency: dict[str, list[float]] = collections.defaultdict(list)  # action -> seconds
        self.lost: list[str] = []             # descriptions of requests with no terminal reply
        self.seed = rng_seed

    def record(self, action: str, outcome: str, seconds: float) -> None:
        with self.lock:
            self.outcomes[f"{action}:{outcome}"] += 1
            self.latency[action].append(seconds)

    def completion(self, rng: random.Random, action: str, prompt, **options) -> None:
        t0 = time.perf_counter()
        options.setdefault("num_predict", rng.choice([0, 1, 8, 24, 48]))
        stream = self.runner.complete(prompt, **options)
        cancel_after = rng.choice([1, 2, 4]) if action == "cancel" else None
        n_chunks = 0
        outcome = "no-final"
        deadline = time.monotonic() + self.reply_timeout
        try:
            for event in stream:
                if isinstance(event, Chunk):
                    n_chunks += 1
                    if cancel_after is not None and n_chunks == cancel_after:
                        stream.cancel()
                elif isinstance(event, Final):
                    outcome = event.done_reason
                if time.monotonic() > deadline:
                    outcome = "lost"
                    break
        except EngineError as exc:  # error replies and error finals
            outcome = f"error:{exc.code}"
        if outcome in ("lost", "no-final"):
            with self.lock:
                self.lost.append(f"{action} {options}")
        self.record(action, outcome, time.perf_counter() - t0)

    def one(self, rng: random.Random) -> None:
        kind = rng.choices(
            ["greedy", "sample", "schema", "grammar", "stops", "logprobs", "tokens", "truncate",
             "cancel", "disconnect", "embed", "tokenize", "media", "refused"],
            weights=[10, 10, 5, 4, 5, 3, 3, 2, 5, 2, 4, 4, 2, 4])[0]
        text = rng.choice(["Tell me a story.", "List three colours:", "Give JSON:", "Count: 1, 2,"])
        text += rng.choice(ODD)
        if kind == "greedy":
            self.completion(rng, kind, text, temperature=0.0)
        elif kind == "sample":
            self.completion(rng, kind, text, seed=rng.randrange(1 << 32), temperature=rng.choice([0.3, 0.8, 1.5]),
                            top_k=rng.choice([0, 1, 40, 2000]), top_p=rng.choice([0.5, 0.9, 1.0]),
                            min_p=rng.choice([0.0, 0.05]), repeat_penalty=rng.choice([1.0, 1.1, 1.5]),
                            frequency_penalty=rng.choice([0.0, 0.5]), presence_penalty=rng.choice([0.0, 0.5]),
                            typical_p=rng.choice([1.0, 0.7]))
        elif kind == "schema":
            self.completion(rng, kind, text, json_schema=rng.choice(SCHEMAS), num_predict=48)
        elif kind == "grammar":
            self.completion(rng, kind, text, grammar=rng.choice(GRAMMARS), ignore_eos=rng.random() < 0.5)
        elif kind == "stops":
            self.completion(rng, kind, text, stop=rng.sample([s for s in ODD if s] + [".", ",", "the"], 3))
        elif kind == "logprobs":
            self.completion(rng, kind, text, logprobs=True, top_logprobs=rng.randrange(0, 21))
        elif kind == "tokens":
            self.completion(rng, kind, [rng.randrange(0, 49152) for _ in range(rng.randrange(1, 200))])
        elif kind == "truncate":
            self.completion(rng, kind, "word " * rng.randrange(500, 3000), truncate=True,
                            num_keep=rng.randrange(0, 64), num_predict=4)
        elif kind == "cancel":
            self.completion(rng, kind, text, num_predict=64, ignore_eos=True)
        elif kind == "disconnect":
            t0 = time.perf_counter()
            other = Runner.connect(self.runner.endpoint)
            stream = other.complete(text, num_predict=64, ignore_eos=True)
            if rng.random() < 0.5:
                next(iter(stream), None)
            other.close(timeout=2.0)
            self.record(kind, "closed", time.perf_counter() - t0)
        elif kind == "embed":
            t0 = time.perf_counter()
            try:
                self.runner.embed(text or "x", normalize=rng.random() < 0.5, timeout=self.reply_timeout)
                outcome = "ok"
            except EngineError as exc:
                outcome = f"error:{exc.code}"
            self.record(kind, outcome, time.perf_counter() - t0)
        elif kind == "tokenize":
            t0 = time.perf_counter()
            tokens = self.runner.tokenize(text, timeout=self.reply_timeout)
            back = self.runner.detokenize(tokens, timeout=self.reply_timeout)
            self.record(kind, "ok" if back == text or "\ufffd" in back or "\u0000" in text else "mismatch",
                        time.perf_counter() - t0)
        elif kind == "media":
            self.completion(rng, kind, "What is in [img-0]?" + rng.choice(ODD),
                            media=[rng.choice(self.media)], num_predict=8)
        else:  # refused: each must come back as a clear error
            bad = rng.choice([{"grammar": "root ::= ("}, {"temperature": "hot"}, {"no_such": 1},
                              {"top_k": -5}, {"num_predict": -7}, {"stop": [""]}])
            t0 = time.perf_counter()
            try:
                list(self.runner.complete(text, **bad))
                outcome = "accepted!"
            except EngineError as exc:
                outcome = f"error:{exc.code}"
            self.record(kind, outcome, time.perf_counter() - t0)

    def worker(self, index: int, stop_at: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while time.monotonic() < stop_at:
            try:
                self.one(rng)
            except RunnerGone:
                raise
            except Exception as exc:  # a client-side surprise is an outcome too
                self.record("unexpected", type(exc).__name__, 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--reply-timeout", type=float, default=300.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from mmproj import png_bytes, write_vision_projector

    tmp = tempfile.mkdtemp(prefix="soak-")
    projector = str(write_vision_projector(Path(tmp) / "vision.gguf"))
    media = [png_bytes(32, 32, seed=s) for s in range(6)]
    runner = Runner.spawn("default", n_ctx=2048 * args.parallel, parallel=args.parallel,
                          n_threads=args.threads, projector_path=projector)
    pid = runner.process.pid
    start = proc_stats(pid)
    soak = Soak(runner, args.seed, args.reply_timeout, media)
    stop_at = time.monotonic() + args.minutes * 60
    t0 = time.perf_counter()
    workers = [threading.Thread(target=soak.worker, args=(i, stop_at)) for i in range(args.workers)]
    for w in workers:
        w.start()
    samples = [start]
    while any(w.is_alive() for w in workers):
        time.sleep(min(30.0, max(0.5, stop_at - time.monotonic())))
        if runner.returncode is None:
            samples.append(proc_stats(pid))
    for w in workers:
        w.join()
    alive = runner.returncode is None
    end = proc_stats(pid) if alive else {}
    healthy = alive and runner.health(timeout=30).state == "ready"
    runner.close()
    total = sum(soak.outcomes.values())
    report = {
        "minutes": args.minutes, "workers": args.workers, "parallel": args.parallel,
        "requests": total, "lost": len(soak.lost), "lost_examples": soak.lost[:10],
        "runner_alive": alive, "healthy_at_end": healthy,
        "outcomes": dict(sorted(soak.outcomes.items())),
        "latency_s": {a: {"n": len(v), "p50": round(statistics.median(v), 3),
                          "p99": round(sorted(v)[int(0.99 * (len(v) - 1))], 3)}
                      for a, v in sorted(soak.latency.items())},
        "runner_start": start, "runner_end": end,
        "rss_max_mib": max(s["rss_mib"] for s in samples),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if alive and healthy and not soak.lost else 1


if __name__ == "__main__":
    sys.exit(main())
