"""Runner process throughput and protocol cost (not part of the test suite).

    python benchmarks/bench_process.py                      # parallel 1, 4, 8; default model
    python benchmarks/bench_process.py --parallel 4 --tokens 256 --threads 2 --json out.json
    python benchmarks/bench_process.py --threads 2 --peer-only --rounds 9   # the issue-4 check
    python benchmarks/bench_process.py --protocol-only --consumers asyncio  # the client path alone

Two measurements, and a third with --peer / --peer-only:

1. **Generation through the process.**  ``parallel`` concurrent completions
   (greedy, ``ignore_eos``, ``--tokens`` each) through one client over ipc,
   next to the same workload on an in-process :class:`Engine`.  Aggregate
   tok/s is total generated tokens over wall time, from the first submit to
   the last final.  The two columns differ by what the process boundary costs
   under that load.
2. **Protocol cost per token.**  A runner whose engine is a stand-in that
   emits chunks as fast as it can.  The time per chunk is then the cost of the
   path alone: the engine callback, the outbox, the runner's I/O thread,
   msgpack, ipc, the client's I/O thread (or the thread or event loop that
   reads in its place), and the caller's iterator.  It is measured for 1 and
   8 concurrent streams, with the client's CPU time per chunk.
3. **Beside llama-batched-bench** (scripts/build_peers.sh).  For each level,
   ``--rounds`` rounds of one batched-bench run (-npp 128 -ntg ``--tokens``)
   and one client run whose rate is taken over the same window as S_TG (from
   the moment every stream has its first token to the last final).  Which
   side goes first alternates round by round; the ratio reported is the
   median of the per-round ratios, because single runs on a shared machine
   scatter by 10-20%.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time

from runner.bench.harness import greedy_options
from runner.bench.stats import format_interval, median_interval
from runner.engine.requests import Chunk, Final
from runner.process import protocol as P
from runner.process import security
from runner.process.client import Runner

PROMPTS = ["Write a long story about a lighthouse keeper.", "List facts about the moon.",
           "Explain how bread is made.", "Describe a walk through a forest.",
           "Tell me about the history of clocks.", "Write a letter to a friend.",
           "Describe the ocean at night.", "Explain what a compiler does."]


def run_concurrently(n: int, work) -> tuple[float, list]:
    """``work(i)`` for i in range(n), each on its own thread; (wall seconds,
    results in order).  The first exception is raised after all have ended."""
    results: list = [None] * n
    errors: list[BaseException] = []

    def one(i):
        try:
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0, results


def bench_client(model: str, parallel: int, tokens: int, threads: int | None) -> dict:
    with Runner.spawn(model, n_ctx=parallel * 1024, parallel=parallel, n_threads=threads) as runner:
        runner.complete("Warm up.", **greedy_options(8)).text()

        def one(i):
            return runner.complete(PROMPTS[i % len(PROMPTS)], **greedy_options(tokens)).text()[1]

        wall, finals = run_concurrently(parallel, one)
    generated = sum(f.eval_count for f in finals)
    return {"wall_s": wall, "tokens": generated, "tok_s": generated / wall,
            "per_stream_tok_s": sum(f.eval_count / f.eval_duration for f in finals) / len(finals)}


def bench_generation_window(model: str, parallel: int, tokens: int, threads: int | None,
                            pp: int = 128, consumers: str = "threads",
                            options: dict | None = None, **load) -> dict:
    """Client rate over the window llama-batched-bench's S_TG measures: from
    the moment every stream has its first token to the last final, with
    ``pp``-token prompts, ``n_ctx`` 4096 and n_batch 512 like the peer run.
    ``consumers``: "threads" (one blocking consumer thread per stream, as a
    threaded server consumes) or "asyncio" (one task per stream on one event
    loop).  ``options``: the requests' options (default greedy); ``load``:
    more load fields (``burst_ms``)."""
    opts = {**(options or greedy_options(tokens)), "num_predict": tokens, "ignore_eos": True}
    with Runner.spawn(model, n_ctx=max(4096, parallel * (pp + tokens + 16)), n_batch=512,
                      parallel=parallel, n_threads=threads, **load) as runner:
        # Every slot once (as bench_engine.py does): first use of a slot pays
        # one-off costs that batched-bench pays outside its S_TG window.
        run_concurrently(parallel, lambda i: runner.complete(
            [500 + 50 * i + k for k in range(16)], **greedy_options(8)).text())

        def prompt_of(i):
            return [1000 + 7919 * (i + 1) % 40000 + k for k in range(pp)]

        before = runner.metrics().step_seconds
        t_submit = time.perf_counter()

        if consumers == "asyncio":
            import asyncio

            async def one_async(i):
                seen = []
                async for event in runner.acomplete(prompt_of(i), **opts):
                    if isinstance(event, Chunk):
                        seen.append((time.perf_counter(), len(event.tokens)))
                    else:
                        return seen, time.perf_counter()

            async def all_streams():
                return await asyncio.gather(*(one_async(i) for i in range(parallel)))

            results = asyncio.run(all_streams())
        else:
            def one(i):
                seen = []
                for event in runner.complete(prompt_of(i), **opts):
                    if isinstance(event, Chunk):
                        seen.append((time.perf_counter(), len(event.tokens)))
                    else:
                        return seen, time.perf_counter()

            _, results = run_concurrently(parallel, one)
        t_done = max(end for _, end in results)
        after = runner.metrics().step_seconds
    out = window_rate(results)
    # The share of the streams' time that the engine's loop spent in its
    # steps (decodes, and in native runs the sampling between them): what
    # is not in it is the loop's own Python and waiting.  The two sides of
    # the quotient are timed by the same machine in the same seconds, so it
    # keeps still where ratios to a second program scatter.
    out["busy"] = (after.sum - before.sum) / (t_done - t_submit) if t_done > t_submit else 0.0
    out["steps"] = after.count - before.count
    return out


def window_rate(streams: list[tuple[list[tuple[float, int]], float]]) -> dict:
    """Aggregate rate over S_TG's window, from client timestamps: tokens that
    arrived after every stream had its first one, over the time from then to
    the last stream's end.  ``streams``: (arrivals as (time, tokens), end time)."""
    start = max(arrivals[0][0] for arrivals, _ in streams)
    end = max(t for _, t in streams)
    after = sum(n for arrivals, _ in streams for t, n in arrivals if t > start)
    return {"tok_s": after / (end - start) if end > start else 0.0, "window_s": end - start}


def bench_engine(model: str, parallel: int, tokens: int, threads: int | None) -> dict:
    from runner.engine.core import Engine, EngineConfig
    from runner.engine.requests import CompletionOptions, CompletionRequest

    def submit(engine, prompt, n):
        request = CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(greedy_options(n)))
        return engine.submit(request).result()[1]

    with Engine(EngineConfig(model, n_ctx=parallel * 1024, parallel=parallel,
                             n_threads=threads)) as engine:
        submit(engine, "Warm up.", 8)
        wall, finals = run_concurrently(
            parallel, lambda i: submit(engine, PROMPTS[i % len(PROMPTS)], tokens))
    generated = sum(f.eval_count for f in finals)
    return {"wall_s": wall, "tokens": generated, "tok_s": generated / wall}


# -- protocol cost: a runner with a stand-in engine -------------------------------------

class _Handle:
    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop

    def cancel(self) -> None:
        self._stop.set()


class _InstantEngine:
    """Emits ``num_predict`` one-token chunks from a thread, as fast as it
    can or one per ``pace`` seconds, calling ``on_delivered`` after each as
    the engine does after a step."""

    on_delivered = None

    def __init__(self, pace: float = 0.0) -> None:
        from runner.engine.hostcache import HostCache

        self.host_cache = HostCache(None, 0)  # the tier off, for health replies
        self.pace = pace                      # seconds between chunks (0: none)

    def submit(self, request, on_event=None):
        stop = threading.Event()

        def emit():
            n = request.options.num_predict
            chunk = Chunk(text=" tok", tokens=[42])
            t0 = time.perf_counter()
            for _ in range(n):
                if stop.is_set():
                    break
                on_event(chunk)
                self.on_delivered()
                if self.pace:
                    time.sleep(self.pace)
            on_event(Final(done_reason="length", eval_count=n, eval_duration=time.perf_counter() - t0))

        threading.Thread(target=emit, daemon=True).start()
        return _Handle(stop)

    def close(self, drain: bool = False, timeout: float = 30.0) -> None:
        pass

    def failure(self) -> str | None:
        return None  # never a lost device


def _fake_runner(endpoint: str, pace: float) -> int:
    from runner.process.server import Server

    class InstantServer(Server):
        def _load_model(self, params):
            engine = _InstantEngine(pace)
            engine.on_delivered = self._send_from_engine
            with self._state_lock:
                self.engine = engine
                self._state, self._progress = "ready", 1.0

    server = InstantServer("stand-in", endpoint, load=P.Load(id=0), parent_pid=os.getppid())
    print("ready", flush=True)
    try:
        return server.run()
    finally:
        server.close()


def bench_protocol(streams: int, tokens: int, consumers: str = "threads",
                   pace: float = 0.0) -> dict:
    """Chunks per second through the path alone, and this process's CPU
    time per chunk (every client thread: consumers, the I/O thread, libzmq's).
    ``consumers``: one thread per stream, or one asyncio task per stream on
    one loop.  ``pace``: seconds between a stream's chunks (0: as fast as
    the path goes, so chunks arrive in bursts; paced, each one wakes the client)."""
    endpoint, directory = security.private_ipc_endpoint()
    proc = subprocess.Popen([sys.executable, __file__, "--fake-runner", endpoint,
                             "--protocol-pace-us", str(pace * 1e6)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with Runner.connect(endpoint) as runner:
            runner.wait_ready()
            runner.complete("warm", num_predict=1000).text()
            before = resource.getrusage(resource.RUSAGE_SELF)
            if consumers == "asyncio":
                import asyncio

                async def one_async(i):
                    return sum([1 async for _ in runner.acomplete("x", num_predict=tokens)]) - 1

                async def all_streams():
                    return await asyncio.gather(*(one_async(i) for i in range(streams)))

                t0 = time.perf_counter()
                counts = asyncio.run(all_streams())
                wall = time.perf_counter() - t0
            else:
                def one(i):
                    return sum(1 for _ in runner.complete("x", num_predict=tokens)) - 1  # minus the final

                wall, counts = run_concurrently(streams, one)
            after = resource.getrusage(resource.RUSAGE_SELF)
            runner.shutdown()
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
    total = sum(counts)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"streams": streams, "consumers": consumers, "chunks": total, "wall_s": wall,
            "chunks_per_s": total / wall, "us_per_chunk": wall / total * 1e6,
            "client_cpu_us_per_chunk": cpu / total * 1e6,
            "client_switches_per_chunk": (after.ru_nvcsw + after.ru_nivcsw
                                          - before.ru_nvcsw - before.ru_nivcsw) / total}


def compare_with_peer(model: str, levels: list[int], tokens: int, threads: int,
                      rounds: int, consumers: str = "threads", options: dict | None = None,
                      pp: int = 128, bursts: list[float] | None = None) -> list[dict]:
    """Client rate over the S_TG window beside llama-batched-bench, per level.

    Peer and client alternate, level by level and round by round, so that a
    slow spell on a shared machine hits both sides of a ratio alike; which
    side goes first alternates too (ABBA), in case going first pays.  The
    ratio reported is the median of the per-round ratios.  ``bursts``: the
    runner's ``burst_ms`` values to measure, each a client side of its own
    in every round (None: the load's default only).
    """
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_engine import batched_bench

    sides = [None] if not bursts else list(bursts)
    runs: dict[int, dict] = {level: {"peer": [], **{b: [] for b in sides}} for level in levels}
    busy: dict[int, dict] = {level: {} for level in levels}
    for r in range(rounds):
        for level in levels:
            def run_peer() -> float:
                return batched_bench(model, threads, max(4096, level * (pp + tokens + 16)), 512,
                                     [level], pp, tokens, unified=False).get(level, float("nan"))

            def run_client(burst) -> float:
                load = {} if burst is None else {"burst_ms": burst}
                got = bench_generation_window(model, level, tokens, threads, pp=pp,
                                              consumers=consumers, options=options, **load)
                busy[level].setdefault(burst, []).append(got["busy"])
                return got["tok_s"]

            order = ["peer", *sides]
            if r % 2:
                order.reverse()
            for side in order:
                runs[level][side].append(run_peer() if side == "peer" else run_client(side))
    out = []
    for level in levels:
        peer = runs[level]["peer"]
        for side in sides:
            client = runs[level][side]
            ratios = [c / p for c, p in zip(client, peer)]
            out.append({"parallel": level, "burst_ms": side, "client_tok_s": client,
                        "S_TG": peer, "ratios": ratios, "ratio": statistics.median(ratios),
                        "ratio_interval": median_interval(ratios),
                        "busy": busy[level][side], "busy_median": statistics.median(busy[level][side])})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default",
                    help="a model name or path; 'tiny': the tiny fast-decode model (benchmarks/tiny_model.py)")
    ap.add_argument("--parallel", default="1,4,8", help="comma-separated slot counts")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per completion")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for decoding")
    ap.add_argument("--protocol-tokens", type=int, default=20_000,
                    help="chunks per stream for the protocol-cost measurement")
    ap.add_argument("--skip-engine", action="store_true", help="no in-process comparison")
    ap.add_argument("--peer", action="store_true",
                    help="also compare with llama-batched-bench (scripts/build_peers.sh)")
    ap.add_argument("--peer-only", action="store_true",
                    help="only the comparison with llama-batched-bench")
    ap.add_argument("--protocol-only", action="store_true",
                    help="only the protocol cost (with --consumers)")
    ap.add_argument("--protocol-pace-us", type=float, default=0.0,
                    help="for the protocol cost: microseconds between a stream's chunks "
                         "(0: as fast as it goes)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating peer/client rounds per level for --peer (median ratio)")
    ap.add_argument("--consumers", choices=("threads", "asyncio"), default="threads",
                    help="for --peer and the protocol cost: one consumer thread per stream, "
                         "or one asyncio task per stream")
    ap.add_argument("--options", choices=("greedy", "defaults"), default="greedy",
                    help="for --peer: greedy, or every sampling option at its default "
                         "(temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1)")
    ap.add_argument("--pp", type=int, default=128, help="prompt tokens per stream for --peer")
    ap.add_argument("--burst-ms", default=None,
                    help="for --peer: comma-separated burst_ms values of the runner, each its own "
                         "side in every round (default: the load's default)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--fake-runner", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fake_runner:
        return _fake_runner(args.fake_runner, args.protocol_pace_us / 1e6)

    from runner.model.models import resolve_model

    if args.model == "tiny":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from tiny_model import write_tiny_llama

        model = str(write_tiny_llama())
    else:
        model = str(resolve_model(args.model))
    results = {"generation": [], "protocol": []}
    levels = [int(p) for p in args.parallel.split(",")]
    if not args.peer_only and not args.protocol_only:
        print(f"{'parallel':>8} {'client tok/s':>13} {'engine tok/s':>13} {'per stream':>11} {'ratio':>6}")
        for parallel in levels:
            client = bench_client(model, parallel, args.tokens, args.threads)
            engine = None if args.skip_engine else bench_engine(model, parallel, args.tokens, args.threads)
            results["generation"].append({"parallel": parallel, "client": client, "engine": engine})
            ratio = f"{client['tok_s'] / engine['tok_s']:.3f}" if engine else "-"
            print(f"{parallel:>8} {client['tok_s']:>13.1f} "
                  f"{engine['tok_s'] if engine else float('nan'):>13.1f} "
                  f"{client['per_stream_tok_s']:>11.1f} {ratio:>6}")
    if (args.peer or args.peer_only) and not args.protocol_only:
        threads = args.threads or os.cpu_count()
        options = None if args.options == "greedy" else {"num_predict": args.tokens}
        bursts = None if args.burst_ms is None else [float(x) for x in args.burst_ms.split(",")]
        results["peer"] = compare_with_peer(model, levels, args.tokens, threads, args.rounds,
                                            args.consumers, options, args.pp, bursts)
        print(f"\n{'parallel':>8} {'burst_ms':>8} {'client tok/s':>13} {'batched-bench S_TG':>19} {'ratio':>6}"
              f" {'interval':>17} {'busy':>6}  ({args.consumers} consumers, {args.options} options; "
              f"medians of {args.rounds} alternating rounds; interval: the median ratio's confidence "
              f"interval, at the coverage shown; per-round ratios; busy: the share of the streams' "
              f"time the engine loop spent in its steps)")
        for row in results["peer"]:
            burst = "default" if row["burst_ms"] is None else f"{row['burst_ms']:g}"
            print(f"{row['parallel']:>8} {burst:>8} {statistics.median(row['client_tok_s']):>13.1f} "
                  f"{statistics.median(row['S_TG']):>19.1f} {row['ratio']:>6.3f} "
                  f"{format_interval(row['ratio_interval']):>17} {row['busy_median']:>6.3f}  "
                  + " ".join(f"{r:.2f}" for r in row["ratios"]))
    if not args.peer_only:
        print(f"\n{'streams':>8} {'chunks/s':>10} {'us/chunk':>9} {'client CPU us/chunk':>20} "
              f"{'switches/chunk':>15}  ({args.consumers} consumers, pace "
              f"{args.protocol_pace_us:.0f} us)")
        for streams in (1, 8):
            row = bench_protocol(streams, args.protocol_tokens // streams, args.consumers,
                                 args.protocol_pace_us / 1e6)
            results["protocol"].append(row)
            print(f"{streams:>8} {row['chunks_per_s']:>10.0f} {row['us_per_chunk']:>9.1f} "
                  f"{row['client_cpu_us_per_chunk']:>20.1f} {row['client_switches_per_chunk']:>15.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
