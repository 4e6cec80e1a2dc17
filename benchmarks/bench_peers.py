"""The runner beside llama.cpp's own tools, in one run (not part of the test suite).

    scripts/build_peers.sh
    python benchmarks/bench_peers.py --threads 2 [--json out.json]
    python benchmarks/bench_peers.py --smoke          # tiny counts: checks that it still works

Three sides, with the same model, threads, n_ctx, n_batch, slots and KV
layout (one stream per slot, flash attention "auto"; the embedding
llama-server excepted, see ServerSide):

* **llama-batched-bench**: the raw llama_decode limit (S_TG), no server;
* **llama-server**, spawned on a free loopback port and driven over its HTTP
  ``/completion`` API (streamed, urllib), ``-np`` slots, its prompt cache as
  it comes (``cache_prompt`` and ``--cache-ram`` defaults);
* **the runner**, spawned and driven through ``runner.process.client``.

Requests are greedy and ignore end-of-generation on both servers.  Times are
taken by the client from the streamed chunks, the same way on both.
Scenarios:

1. **streams** (``--parallel``, default 1,4,8): B streams with distinct
   ``--pp``-token prompts generating ``--tg`` tokens each.  Rate over S_TG's
   window (every stream has its first token -> the last one ends), wall rate
   (all tokens over submit -> last end), median TTFT; medians of ``--repeat``
   runs, the two servers taking turns.
2. **conversations**: ``--conversations`` concurrent chats of ``--turns``
   turns, each turn's prompt the previous one plus its answer plus a new user
   message.  Prompt cache hit rate over turns 2+, TTFT of turn 1, median TTFT
   of turns 2+ (warm), and the last turn's prompt sent with a new first word
   (cold, same length).
3. **long prompt**: one stream generates while a ``--long-prompt``-token
   prompt arrives in the other slot; the largest gap between the stream's
   tokens while that prompt is evaluated.
4. **embeddings**: ``--embed-texts`` texts, ``--embed-parallel`` in flight;
   embeddings/s and tokens/s, medians over ``--repeat`` rounds in which the
   sides take turns.  Both sides load the same way: embeddings only, mean
   pooling, ``--embed-parallel`` slots sharing one KV buffer (llama-server
   ``--embedding --pooling mean -kvu``; the runner ``embeddings``,
   ``pooling: mean``, ``kv_unified``).  The cosine similarity of the two
   sides' vectors is a sanity check.
5. **grammar** (``--grammar-parallel``, default 8): as **streams**, but one
   of the B streams carries a GBNF grammar (``--grammar``) whose first pick
   the model usually breaks, so that most of its tokens need the grammar
   applied to the whole vocabulary.  Plain streams' rate over their window,
   and the grammar stream's own tokens/s; medians over ``--repeat`` rounds,
   the sides taking turns.  llama-server does that work inside its step,
   for every slot; the runner on a worker thread (docs/design.md).

llama-server runs with the environment it is given: its OpenMP threads spin
after each decode as libgomp's default says, where ``llama-runner serve``
lowers GOMP_SPINCOUNT (runner/cli.py).  Set GOMP_SPINCOUNT in the
environment of this script to give both the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import PEER as BATCHED_BENCH, batched_bench  # noqa: E402
from bench_process import run_concurrently, window_rate  # noqa: E402
from runner.bench.harness import OPTIONS, greedy_options  # noqa: E402
from llama_server import SERVER, LlamaServer  # noqa: E402

from runner.bench.harness import cpu_model, filler_text  # noqa: E402
from runner.bench.stats import percentile  # noqa: E402
from runner.engine.requests import Chunk  # noqa: E402
from runner.process.client import Runner  # noqa: E402



# -- what a client saw of one streamed completion ------------------------------------

@dataclass
class Stream:
    """One streamed completion, timed by the client."""

    t_submit: float                                   # perf_counter at the request
    t_end: float = 0.0                                # perf_counter at the last event
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens) per chunk
    prompt_tokens: int = 0                            # prompt tokens in total
    cached_tokens: int = 0                            # of those, reused from the KV cache
    text: str = ""                                    # the generated text

    @property
    def ttft(self) -> float:
        return (self.arrivals[0][0] if self.arrivals else self.t_end) - self.t_submit

    @property
    def generated(self) -> int:
        return sum(n for _, n in self.arrivals)

    def gaps(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """Gaps between consecutive chunks, those that overlap [since, until]."""
        times = [t for t, _ in self.arrivals]
        return [b - a for a, b in zip(times, times[1:]) if b >= since and a <= until]


OnArrival = Callable[[int], Any]   # called with the number of tokens seen so far


class RunnerSide:
    """The runner, spawned and driven through its client."""

    name = "runner"

    def __init__(self, model: str, threads: int, n_ctx: int, n_batch: int, parallel: int,
                 **load: Any) -> None:
        self.runner = Runner.spawn(model, n_ctx=n_ctx, n_batch=n_batch, parallel=parallel,
                                   n_threads=threads, **load)
        self.n_vocab = self.runner.info(timeout=60).engine["model"]["n_vocab"]

    def stream(self, prompt: str | list[int], n_predict: int,
               on_arrival: OnArrival | None = None, extra: dict | None = None) -> Stream:
        s = Stream(t_submit=time.perf_counter())
        parts = []
        for event in self.runner.complete(prompt, **greedy_options(n_predict), **(extra or {})):
            now = time.perf_counter()
            if type(event) is Chunk:
                s.arrivals.append((now, len(event.tokens)))
                parts.append(event.text)
                if on_arrival is not None:
                    on_arrival(s.generated)
            else:
                s.t_end = now
                s.prompt_tokens, s.cached_tokens = event.prompt_count, event.cached_count
        s.text = "".join(parts)
        return s

    def embed(self, text: str) -> np.ndarray:
        return self.runner.embed(text, timeout=120).embedding

    def close(self) -> None:
        self.runner.close()


class ServerSide:
    """llama-server with the benchmark's settings; stopped by :meth:`close`."""

    name = "llama-server"

    def __init__(self, model: str, threads: int, n_ctx: int, n_batch: int, parallel: int,
                 embedding: bool = False, extra_args: tuple[str, ...] = ()) -> None:
        args = ["-m", model, "-c", str(n_ctx), "-b", str(n_batch), "-ub", str(n_batch),
                "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-fa", "auto"]
        if embedding:
            # With one KV stream per slot (-no-kvu), embeddings of requests that
            # llama-server batches together came out wrong at this vendor commit
            # (cosine 0.93-0.95 against the same text embedded alone); the
            # unified buffer gives the same vectors either way.
            args += ["--embedding", "--pooling", "mean", "-kvu"]
        else:
            args += ["-no-kvu"]   # one KV stream per slot, like the runner
        self.server = LlamaServer(args + list(extra_args))

    def stream(self, prompt: str | list[int], n_predict: int,
               on_arrival: OnArrival | None = None, extra: dict | None = None) -> Stream:
        body = {"prompt": prompt, "n_predict": n_predict, **OPTIONS, **(extra or {})}
        s = Stream(t_submit=time.perf_counter())
        parts = []
        for now, event in self.server.stream_completion(body):
            n = len(event.get("tokens") or ())
            if n:
                s.arrivals.append((now, n))
                parts.append(event.get("content", ""))
                if on_arrival is not None:
                    on_arrival(s.generated)
            if event.get("stop"):
                s.t_end = now
                timings = event.get("timings", {})
                s.cached_tokens = timings.get("cache_n", 0)
                s.prompt_tokens = s.cached_tokens + timings.get("prompt_n", 0)
        s.text = "".join(parts)
        return s

    def embed(self, text: str) -> np.ndarray:
        with self.server.post("/embedding", {"content": text}) as reply:
            result = json.loads(reply.read())
        vector = result[0]["embedding"] if isinstance(result, list) else result["embedding"]
        if vector and isinstance(vector[0], list):   # one vector per pooled sequence
            vector = vector[0]
        return np.asarray(vector, dtype=np.float32)

    def close(self) -> None:
        self.server.close()


class Sides:
    """The runner and the llama-server of the current configuration.  Asking
    for another configuration stops the one running first, so that only one
    of each decodes at a time; scenarios that share one reuse it."""

    def __init__(self, model: str, threads: int, n_batch: int) -> None:
        self._common = (model, threads)
        self._n_batch = n_batch
        self._runner: tuple[tuple, RunnerSide] | None = None
        self._server: tuple[tuple, ServerSide] | None = None

    def runner(self, parallel: int, n_ctx: int, **load: Any) -> RunnerSide:
        key = (parallel, n_ctx, tuple(sorted(load.items())))
        if self._runner is None or self._runner[0] != key:
            self._close_runner()
            self._runner = (key, RunnerSide(*self._common, n_ctx, self._n_batch, parallel, **load))
        return self._runner[1]

    def server(self, parallel: int, n_ctx: int, embedding: bool = False) -> ServerSide:
        key = (parallel, n_ctx, embedding)
        if self._server is None or self._server[0] != key:
            self._close_server()
            self._server = (key, ServerSide(*self._common, n_ctx, self._n_batch, parallel, embedding))
        return self._server[1]

    def both(self, parallel: int, n_ctx: int) -> list:
        return [self.server(parallel, n_ctx), self.runner(parallel, n_ctx)]

    def _close_runner(self) -> None:
        if self._runner is not None:
            self._runner[1].close()
            self._runner = None

    def _close_server(self) -> None:
        if self._server is not None:
            self._server[1].close()
            self._server = None

    def close(self) -> None:
        self._close_runner()
        self._close_server()


def id_prompt(seed: int, n: int, n_vocab: int) -> list[int]:
    """``n`` token ids, distinct from the first one for distinct seeds (below
    ~1000), above the special tokens that vocabularies put first."""
    low = 1000 if n_vocab > 4000 else 0
    span = n_vocab - low
    return [low + (seed * 997 + k * 31) % span for k in range(n)]


# -- scenarios --------------------------------------------------------------------------

def scenario_streams(side, b: int, pp: int, tg: int, n_vocab: int, first_seed: int = 1) -> dict:
    """``b`` concurrent streams; rates over S_TG's window and over the wall time.

    Every slot serves a short request first: a slot's first use pays one-off
    costs (its KV pages touched, graph buffers sized for b sequences) that
    llama-batched-bench pays in its prompt phase, outside S_TG."""
    run_concurrently(b, lambda i: side.stream(id_prompt(900 + i, 16, n_vocab), 4))
    wall, streams = run_concurrently(
        b, lambda i: side.stream(id_prompt(first_seed + i, pp, n_vocab), tg))
    window = window_rate([(s.arrivals, s.t_end) for s in streams])
    generated = sum(s.generated for s in streams)
    return {"window_tok_s": window["tok_s"], "wall_tok_s": generated / wall, "generated": generated,
            "ttft_p50_s": percentile([s.ttft for s in streams], 50), "wall_s": wall}


def scenario_grammar(side, b: int, pp: int, tg: int, n_vocab: int, grammar: str,
                     first_seed: int = 1) -> dict:
    """``b`` concurrent streams, the first with ``grammar``: the other
    streams' rate over their window, and the grammar stream's tokens/s from
    its first token to its end."""
    def work(i: int) -> Stream:
        extra = {"grammar": grammar} if i == 0 else None
        return side.stream(id_prompt(first_seed + i, pp, n_vocab), tg, extra=extra)

    run_concurrently(b, lambda i: side.stream(id_prompt(900 + i, 16, n_vocab), 4))
    _, streams = run_concurrently(b, work)
    constrained, plain = streams[0], streams[1:]
    window = window_rate([(s.arrivals, s.t_end) for s in plain])
    span = constrained.t_end - (constrained.arrivals[0][0] if constrained.arrivals else constrained.t_end)
    return {"plain_tok_s": window["tok_s"],
            "grammar_tok_s": constrained.generated / span if span > 0 else 0.0,
            "grammar_tokens": constrained.generated}


def median_of_runs(runs: list[dict]) -> dict:
    """Each measure's median over repeated runs, and the window rates of all."""
    out = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    out["window_tok_s_runs"] = [run["window_tok_s"] for run in runs]
    return out


def scenario_conversations(side, conversations: int, turns: int, user_words: int,
                           answer_tokens: int) -> dict:
    """Concurrent chats whose turns extend each other's prompts; then, once
    all are over, each last prompt again behind a new first word (cold)."""
    side.stream("Warm up.", 2)

    def chat(c: int) -> tuple[list[Stream], str]:
        prompt = filler_text(100 + c, 12) + "\n"
        history = []
        for t in range(turns):
            prompt += f"User: {filler_text(200 + c * turns + t, user_words)}\nAssistant:"
            s = side.stream(prompt, answer_tokens)
            history.append(s)
            last = prompt
            prompt += s.text + "\n"
        return history, last

    _, chats = run_concurrently(conversations, chat)
    # One at a time and after the chats: a cold request must not evict a chat's slot.
    colds = [side.stream("Note: " + last, answer_tokens) for _, last in chats]
    warm = [s for history, _ in chats for s in history[1:]]
    first = [history[0] for history, _ in chats]
    prompt = sum(s.prompt_tokens for s in warm)
    return {
        "turn1_ttft_s": statistics.median(s.ttft for s in first),
        "warm_ttft_s": statistics.median(s.ttft for s in warm) if warm else float("nan"),
        "cold_ttft_s": statistics.median(s.ttft for s in colds),
        "warm_prompt_tokens": statistics.median(s.prompt_tokens for s in warm) if warm else 0,
        "cold_prompt_tokens": statistics.median(s.prompt_tokens for s in colds),
        "cache_hit_rate": sum(s.cached_tokens for s in warm) / prompt if prompt else 0.0,
        "cold_cached_tokens": sum(s.cached_tokens for s in colds),
    }


def scenario_long_prompt(side, n_prompt: int, generate: int, after: int, n_vocab: int) -> dict:
    """Largest gap between a stream's tokens while a long prompt is evaluated."""
    side.stream(id_prompt(998, 8, n_vocab), 2)   # warm-up
    started = threading.Event()
    box: dict[str, Any] = {}

    def generator() -> None:
        box["stream"] = side.stream(id_prompt(1, 16, n_vocab), generate,
                                    on_arrival=lambda n: n >= after and started.set())

    thread = threading.Thread(target=generator)
    thread.start()
    started.wait()
    t_long = time.perf_counter()
    long = side.stream(id_prompt(2, n_prompt, n_vocab), 1)
    t_done = time.perf_counter()
    thread.join()
    s = box["stream"]
    during = s.gaps(t_long, t_done)
    return {"max_gap_during_prompt_s": max(during, default=0.0),
            "median_gap_s": statistics.median(s.gaps()), "prompt_eval_s": long.ttft,
            "stream_done_before_prompt": s.t_end < t_done}


def scenario_embeddings(side, texts: list[str], parallel: int, tokens: int) -> dict:
    side.embed("warm up")
    pending = iter(range(len(texts)))
    vectors: list = [None] * len(texts)

    def worker(_):
        for i in pending:   # one shared iterator: each index taken once (the GIL serialises next)
            vectors[i] = side.embed(texts[i])

    wall, _ = run_concurrently(parallel, worker)
    return {"embeddings_per_s": len(texts) / wall, "tokens_per_s": tokens / wall, "wall_s": wall,
            "vectors": vectors}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- the run ---------------------------------------------------------------------------

SMOKE = {"parallel": "2", "repeat": 1, "pp": 16, "tg": 4, "n_ctx": 1024, "mixed_ctx": 1024, "conversations": 2,
         "turns": 2, "user_words": 12, "answer_tokens": 4, "long_prompt": 96, "long_generate": 64,
         "long_after": 4, "embed_texts": 4, "embed_parallel": 2, "embed_words": 24,
         "grammar_parallel": 2}


SCENARIOS = ("streams", "conversations", "long_prompt", "embeddings", "grammar")


def run(args: argparse.Namespace) -> dict:
    model = args.model
    levels = [int(x) for x in args.parallel.split(",")]
    chosen = args.scenarios.split(",")
    results: dict[str, Any] = {}
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if not args.quiet else (lambda text: None)
    sides = Sides(model, args.threads, args.n_batch)
    try:
        if "streams" in chosen:
            say(f"llama-batched-bench -npl {args.parallel}")
            peer = batched_bench(model, args.threads, args.n_ctx, args.n_batch, levels, args.pp,
                                 args.tg, unified=False)
            results["streams"] = []
            for b in levels:
                say(f"streams: {b} in parallel")
                row = {"parallel": b, "batched_bench_S_TG": peer.get(b)}
                both = sides.both(b, args.n_ctx)
                n_vocab = sides.runner(b, args.n_ctx).n_vocab
                runs: dict[str, list] = {side.name: [] for side in both}
                for side in both:
                    side.stream(id_prompt(999, 8, n_vocab), 4)   # warm-up
                # The sides take turns, so that a disturbance on the shared machine
                # does not fall on one side's runs only; no prompt is sent twice.
                for r in range(args.repeat):
                    for side in both:
                        runs[side.name].append(scenario_streams(side, b, args.pp, args.tg, n_vocab,
                                                                first_seed=1 + r * b))
                for name, measured in runs.items():
                    row[name] = median_of_runs(measured)
                results["streams"].append(row)

        if "conversations" in chosen:
            say(f"conversations: {args.conversations} x {args.turns} turns")
            results["conversations"] = {}
            for side in sides.both(args.conversations, args.mixed_ctx):
                results["conversations"][side.name] = scenario_conversations(
                    side, args.conversations, args.turns, args.user_words, args.answer_tokens)

        if "long_prompt" in chosen:
            say(f"long prompt: {args.long_prompt} tokens during generation")
            results["long_prompt"] = {}
            for side in sides.both(2, args.mixed_ctx):
                n_vocab = sides.runner(2, args.mixed_ctx).n_vocab
                results["long_prompt"][side.name] = scenario_long_prompt(
                    side, args.long_prompt, args.long_generate, args.long_after, n_vocab)

        if "embeddings" in chosen:
            say(f"embeddings: {args.embed_texts} texts, {args.embed_parallel} at a time")
            texts = [filler_text(300 + i, args.embed_words) for i in range(args.embed_texts)]
            # The same layout on both sides: an embedding load with mean pooling,
            # one slot per request in flight and one KV buffer shared by them.
            n_ctx = args.embed_parallel * args.n_batch
            runner = sides.runner(args.embed_parallel, n_ctx, embeddings=True, pooling="mean",
                                  kv_unified=True)
            tokens = sum(len(runner.runner.tokenize(t, add_special=True)) for t in texts)
            server = sides.server(args.embed_parallel, n_ctx, embedding=True)
            runs: dict[str, list] = {"llama-server": [], "runner": []}
            vectors = {}
            for r in range(args.repeat):   # the sides take turns
                for side in ((server, runner) if r % 2 == 0 else (runner, server)):
                    row = scenario_embeddings(side, texts, args.embed_parallel, tokens)
                    vectors[side.name] = row.pop("vectors")
                    runs[side.name].append(row)
            results["embeddings"] = {
                name: {key: statistics.median(row[key] for row in rows) for key in rows[0]}
                for name, rows in runs.items()}
            results["embeddings"]["rounds"] = runs
            cosines = [_cosine(a, b) for a, b in zip(vectors["runner"], vectors["llama-server"])]
            results["embeddings"]["cosines"] = cosines
            results["embeddings"]["min_cosine"] = min(cosines)

        if "grammar" in chosen:
            b = args.grammar_parallel
            say(f"grammar: 1 of {b} streams with {args.grammar!r}")
            both = sides.both(b, args.n_ctx)
            n_vocab = sides.runner(b, args.n_ctx).n_vocab
            runs = {side.name: [] for side in both}
            for r in range(args.repeat):   # the sides take turns
                for side in (both if r % 2 == 0 else both[::-1]):
                    runs[side.name].append(scenario_grammar(side, b, args.pp, args.tg, n_vocab,
                                                            args.grammar, first_seed=500 + r * b))
            results["grammar"] = {name: {key: statistics.median(row[key] for row in rows) for key in rows[0]}
                                  for name, rows in runs.items()}
            results["grammar"]["rounds"] = runs
    finally:
        sides.close()
    return results


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def report(results: dict, args: argparse.Namespace) -> str:
    out = [(f"model {Path(args.model).name}, {args.threads} threads, n_batch {args.n_batch}, "
            f"{cpu_model()}"), ""]
    if "streams" in results:
        out += _report_streams(results["streams"], args)
    if "conversations" in results:
        out += _report_conversations(results["conversations"], args)
    if "long_prompt" in results:
        out += _report_long_prompt(results["long_prompt"], args)
    if "embeddings" in results:
        out += _report_embeddings(results["embeddings"], args)
    if "grammar" in results:
        out += _report_grammar(results["grammar"], args)
    return "\n".join(out)


def _report_streams(rows: list, args: argparse.Namespace) -> list[str]:
    out = [(f"streams: {args.pp}-token prompts, {args.tg} generated, n_ctx {args.n_ctx}; "
            "tok/s over S_TG's window (wall-clock tok/s)")]
    out.append(f"{'B':>3} {'batched-bench':>13} {'llama-server':>16} {'runner':>16} "
               f"{'runner/server':>13} {'runner/bb':>9} {'TTFT ms server':>14} {'runner':>7}")
    for row in rows:
        srv, run_ = row["llama-server"], row["runner"]
        bb = row["batched_bench_S_TG"]
        out.append(f"{row['parallel']:>3} {bb or 0:>13.1f} "
                   f"{srv['window_tok_s']:>7.1f} ({srv['wall_tok_s']:>6.1f}) "
                   f"{run_['window_tok_s']:>7.1f} ({run_['wall_tok_s']:>6.1f}) "
                   f"{_ratio(run_['window_tok_s'], srv['window_tok_s']):>13} "
                   f"{_ratio(run_['window_tok_s'], bb):>9} "
                   f"{srv['ttft_p50_s'] * 1e3:>14.1f} {run_['ttft_p50_s'] * 1e3:>7.1f}")
    return out


def _report_conversations(c: dict, args: argparse.Namespace) -> list[str]:
    out = ["", (f"conversations: {args.conversations} chats x {args.turns} turns, "
                f"{args.answer_tokens}-token answers, n_ctx {args.mixed_ctx}")]
    out.append(f"{'':>13} {'hit rate':>8} {'turn-1 TTFT ms':>14} {'warm TTFT ms':>12} "
               f"{'cold TTFT ms':>12} {'warm/cold':>9} {'prompt tokens':>13}")
    for name in ("llama-server", "runner"):
        r = c[name]
        out.append(f"{name:>13} {r['cache_hit_rate'] * 100:>7.1f}% {r['turn1_ttft_s'] * 1e3:>14.1f} "
                   f"{r['warm_ttft_s'] * 1e3:>12.1f} {r['cold_ttft_s'] * 1e3:>12.1f} "
                   f"{_ratio(r['warm_ttft_s'], r['cold_ttft_s']):>9} {r['cold_prompt_tokens']:>13}")
    out.append(f"{'runner/server':>13} {'':>8} {'':>14} "
               f"{_ratio(c['runner']['warm_ttft_s'], c['llama-server']['warm_ttft_s']):>12} "
               f"{_ratio(c['runner']['cold_ttft_s'], c['llama-server']['cold_ttft_s']):>12}")
    return out


def _report_long_prompt(g: dict, args: argparse.Namespace) -> list[str]:
    out = ["", (f"long prompt: {args.long_prompt} tokens arrive while one stream generates "
                f"(n_batch {args.n_batch})")]
    out.append(f"{'':>13} {'largest gap ms':>14} {'median gap ms':>13} {'prompt evaluated in s':>21}")
    for name in ("llama-server", "runner"):
        r = g[name]
        out.append(f"{name:>13} {r['max_gap_during_prompt_s'] * 1e3:>14.0f} "
                   f"{r['median_gap_s'] * 1e3:>13.1f} {r['prompt_eval_s']:>21.2f}")
    return out


def _report_embeddings(e: dict, args: argparse.Namespace) -> list[str]:
    out = ["", (f"embeddings: {args.embed_texts} texts of {args.embed_words} words, "
                f"{args.embed_parallel} in flight")]
    out.append(f"{'':>13} {'embeddings/s':>12} {'tokens/s':>9}")
    for name in ("llama-server", "runner"):
        out.append(f"{name:>13} {e[name]['embeddings_per_s']:>12.1f} {e[name]['tokens_per_s']:>9.0f}")
    out.append(f"{'runner/server':>13} "
               f"{_ratio(e['runner']['embeddings_per_s'], e['llama-server']['embeddings_per_s']):>12}"
               f"  (cosine of the two sides' vectors: min {e['min_cosine']:.4f})")
    return out


def _report_grammar(g: dict, args: argparse.Namespace) -> list[str]:
    out = ["", (f"grammar: {args.grammar_parallel} streams of {args.tg} tokens, one with the grammar "
                f"{args.grammar!r}")]
    out.append(f"{'':>13} {'plain tok/s':>11} {'grammar stream tok/s':>20} {'its tokens':>10}")
    for name in ("llama-server", "runner"):
        r = g[name]
        out.append(f"{name:>13} {r['plain_tok_s']:>11.1f} {r['grammar_tok_s']:>20.1f} "
                   f"{r['grammar_tokens']:>10.0f}")
    out.append(f"{'runner/server':>13} {_ratio(g['runner']['plain_tok_s'], g['llama-server']['plain_tok_s']):>11} "
               f"{_ratio(g['runner']['grammar_tok_s'], g['llama-server']['grammar_tok_s']):>20}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="GGUF file (default: the default model); 'tiny': the tiny fast-decode model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--parallel", default="1,4,8", help="stream counts of scenario 1")
    ap.add_argument("--n-ctx", type=int, default=4096, help="n_ctx of scenario 1 (split across slots)")
    ap.add_argument("--pp", type=int, default=128, help="prompt tokens per stream")
    ap.add_argument("--tg", type=int, default=128, help="generated tokens per stream")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each stream count per side (medians reported)")
    ap.add_argument("--mixed-ctx", type=int, default=8192, help="n_ctx of scenarios 2 and 3 (2 slots)")
    ap.add_argument("--conversations", type=int, default=2)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--user-words", type=int, default=40, help="words per user message")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--long-prompt", type=int, default=2000, help="tokens of the arriving prompt")
    ap.add_argument("--long-generate", type=int, default=150, help="tokens of the generating stream")
    ap.add_argument("--long-after", type=int, default=10,
                    help="the long prompt arrives once the stream has this many tokens")
    ap.add_argument("--embed-texts", type=int, default=64)
    ap.add_argument("--embed-parallel", type=int, default=4)
    ap.add_argument("--embed-words", type=int, default=48)
    ap.add_argument("--grammar-parallel", type=int, default=8, help="streams of scenario 5")
    ap.add_argument("--grammar", default="root ::= [a-z ]+",
                    help="GBNF grammar of scenario 5's constrained stream")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    ap.add_argument("--smoke", action="store_true", help="tiny counts (the test suite's smoke run)")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    from runner.model.models import resolve_model

    from tiny_model import resolve

    args.model = str(resolve_model(resolve(args.model)))
    for binary in (BATCHED_BENCH, SERVER):
        if not binary.exists():
            print(f"{binary} is missing: run scripts/build_peers.sh first", file=sys.stderr)
            return 2
    results = run(args)
    print(report(results, args))
    if args.json:
        doc = {"date": time.strftime("%F %T"), "command": shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
               "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
               "settings": vars(args), **results}
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
