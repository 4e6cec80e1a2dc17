"""Engine throughput beside llama.cpp's llama-batched-bench, in one run.

    python benchmarks/bench_engine.py [--threads 2] [--parallel 1,4,8] [--json out.json]

For each B in --parallel: llama-batched-bench (built by scripts/build_peers.sh
from the same vendor tree) with -npp 128 -ntg 128 -npl B, and the engine with
B concurrent requests of 128 prompt tokens and 128 generated tokens (greedy,
end-of-generation ignored).  Same model, threads, n_ctx, n_batch and KV layout
(one stream per sequence unless --kv-unified).
Engine aggregate generation rate = tokens generated after every request had
its first token / the time until the last finished — the same window that
batched-bench's S_TG measures.  Then the prefix-cache check: time to first
token of a request sharing a 1,000-token prefix with a finished one, against
the same request cold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.bench.harness import greedy_options  # noqa: E402
from runner.bench.stats import format_interval, median_interval  # noqa: E402
from runner.engine.core import Engine, EngineConfig  # noqa: E402
from runner.engine.requests import Chunk, CompletionOptions, CompletionRequest  # noqa: E402
from runner.model.models import default_model_path  # noqa: E402

# scripts/build_peers.sh's, unless LLAMA_RUNNER_BATCHED_BENCH names another
# (scripts/gpu_check.sh builds one beside the extension).
PEER = Path(os.environ.get("LLAMA_RUNNER_BATCHED_BENCH")
            or ROOT / "build" / "peers" / "bin" / "llama-batched-bench")


def batched_bench(model: str, threads: int, n_ctx: int, n_batch: int, parallel: list[int],
                  pp: int, tg: int, unified: bool) -> dict[int, float]:
    """S_TG (tokens/s) per B from llama-batched-bench."""
    if not PEER.exists():
        raise SystemExit(f"{PEER} is missing: run scripts/build_peers.sh first")
    cmd = [str(PEER), "-m", model, "-c", str(n_ctx), "-b", str(n_batch), "-ub", str(n_batch),
           "-npp", str(pp), "-ntg", str(tg), "-npl", ",".join(map(str, parallel)),
           "-t", str(threads), "-tb", str(threads), "-kvu" if unified else "-no-kvu", "-fa", "auto"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rates = {}
    for line in out.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cols) == 10 and cols[0].isdigit():
            rates[int(cols[2])] = float(cols[7])
    return rates


def engine_rate(engine: Engine, b: int, pp: int, tg: int, *, rng_base: int = 1000,
                options: dict | None = None) -> dict:
    """Aggregate generation tokens/s with ``b`` concurrent requests
    (``options``: the requests' options, default greedy; ``tg`` tokens each)."""
    first_at: dict[int, float] = {}
    done = threading.Event()
    finished = []
    lock = threading.Lock()

    def sink_for(i):
        def sink(ev):
            with lock:
                if isinstance(ev, Chunk):
                    first_at.setdefault(i, time.perf_counter())
                else:
                    finished.append((i, time.perf_counter(), ev))
                    if len(finished) == b:
                        done.set()
        return sink

    opts = CompletionOptions.from_dict({**(options or greedy_options(tg)), "num_predict": tg})
    t0 = time.perf_counter()
    for i in range(b):
        # Distinct prompts so that nothing is shared through the prefix cache.
        prompt = [rng_base + 7919 * (i + 1) % 40000 + k for k in range(pp)]
        engine.submit(CompletionRequest(prompt=prompt, options=opts), on_event=sink_for(i))
    done.wait()
    t_first = max(first_at.values())
    t_end = max(t for _, t, _ in finished)
    # Tokens generated after the last request got its first token.
    tokens = sum(ev.eval_count for _, _, ev in finished) - b
    return {"rate": tokens / (t_end - t_first), "total_s": t_end - t0,
            "eval_count": sum(ev.eval_count for _, _, ev in finished)}


def ttft(engine: Engine, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    handle = engine.submit(CompletionRequest(prompt=prompt, options=CompletionOptions(
        num_predict=1, temperature=0.0, ignore_eos=True)))
    for ev in handle:
        if isinstance(ev, Chunk):
            return time.perf_counter() - t0
    raise RuntimeError("no token")


def long_prompt_gap(engine: Engine, n_prompt: int = 2000) -> dict:
    """Largest gap between two tokens of a generating stream while a
    ``n_prompt``-token prompt arrives and is evaluated."""
    times: list[float] = []
    started = threading.Event()
    done = threading.Event()

    def sink(ev):
        if isinstance(ev, Chunk):
            times.extend([time.perf_counter()] * len(ev.tokens))
            if len(times) >= 10:
                started.set()
        else:
            done.set()

    opts = CompletionOptions.from_dict(greedy_options(150))
    engine.submit(CompletionRequest(prompt=[300 + k for k in range(16)], options=opts), on_event=sink)
    started.wait()
    t_long = time.perf_counter()
    long = engine.submit(CompletionRequest(prompt=[5000 + (k * 13) % 20000 for k in range(n_prompt)],
                                           options=CompletionOptions(num_predict=1, ignore_eos=True)))
    long.result()
    t_long_done = time.perf_counter()
    done.wait()
    gaps = [b - a for a, b in zip(times, times[1:]) if b > a]
    during = [b - a for a, b in zip(times, times[1:]) if b > a and t_long <= b <= t_long_done + 0.5]
    return {"max_gap_s": max(gaps), "median_gap_s": statistics.median(gaps),
            "max_gap_during_prefill_s": max(during) if during else 0.0,
            "prefill_s": t_long_done - t_long}


def step_gap(engine: Engine) -> tuple[float, float, float]:
    """Over the engine's generation-only records: the median Python time
    between two decodes per step (a record's ``idle_gap`` less the sampling
    of the record before it, which it includes), the median decode +
    sampling time per step, and the median steps per visit of Python (a
    native run of ``burst_ms`` holds several steps and samples inside its
    decode time)."""
    timings = list(engine.timings)
    pairs = [(prev, s) for prev, s in zip(timings, timings[1:]) if s.n_generating == s.n_tokens]
    if not pairs:
        return 0.0, 0.0, 0.0
    return (statistics.median(max(0.0, s.idle_gap - prev.sample) / s.steps for prev, s in pairs),
            statistics.median((s.decode + s.sample) / s.steps for _, s in pairs),
            statistics.median(s.steps for _, s in pairs))


def burst_ab(model: str, args: argparse.Namespace, levels: list[int], bursts: list[float],
             options: dict | None, samplings: tuple[str, ...] = ("cpu",)) -> list[dict]:
    """Per B, llama-batched-bench and one engine per ``burst_ms`` value and
    sampling side (``cpu``: the runner's chains; ``graph``: backend_sampling,
    the chain inside the decode graph), taking turns over ``args.rounds``
    rounds (the order reversed every other round); per engine the median of
    its per-round ratios to the peer, and its step gap (see step_gap)."""
    out = []
    sides = [(burst, sampling) for burst in bursts for sampling in samplings]
    for b in levels:
        n_ctx = max(args.n_ctx, b * (args.pp + args.tg + 16))
        engines = {side: Engine(EngineConfig(model, n_ctx=n_ctx, n_batch=args.n_batch, parallel=b,
                                             n_threads=args.threads, kv_unified=args.kv_unified,
                                             burst_ms=side[0], backend_sampling=side[1] == "graph"))
                   for side in sides}
        try:
            for engine in engines.values():
                engine_rate(engine, b, 16, 8, options=options)  # warm-up
            runs: dict = {"peer": [], **{side: [] for side in sides}}
            gaps: dict = {side: [] for side in sides}
            for r in range(args.rounds):
                order = ["peer", *sides]
                for side in (order if r % 2 == 0 else order[::-1]):
                    if side == "peer":
                        runs["peer"].append(batched_bench(model, args.threads, n_ctx, args.n_batch, [b],
                                                          args.pp, args.tg, args.kv_unified)[b])
                        continue
                    engine = engines[side]
                    engine.timings.clear()
                    runs[side].append(engine_rate(engine, b, args.pp, args.tg, options=options)["rate"])
                    gaps[side].append(step_gap(engine))
        finally:
            for engine in engines.values():
                engine.close()
        for side in sides:
            ratios = [e / p for e, p in zip(runs[side], runs["peer"])]
            gap, step, visits = (statistics.median(g[i] for g in gaps[side]) for i in range(3))
            out.append({"B": b, "burst_ms": side[0], "sampling": side[1], "engine_tok_s": runs[side],
                        "S_TG": runs["peer"],
                        "ratios": ratios, "ratio": statistics.median(ratios),
                        "ratio_interval": median_interval(ratios), "gap_ms": gap * 1e3,
                        "step_ms": step * 1e3, "steps_per_visit": visits})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="GGUF file (default: the default model); 'tiny': the tiny fast-decode model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", default="1,4,8")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="engine runs per B (median reported)")
    ap.add_argument("--kv-unified", action="store_true", help="one KV buffer for all sequences")
    ap.add_argument("--json", default=None)
    ap.add_argument("--burst-ms", default=None,
                    help="comma-separated burst_ms values: only the same-run comparison of engines "
                         "with each value beside batched-bench (--rounds rounds, --options)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds for --burst-ms")
    ap.add_argument("--options", choices=("greedy", "defaults"), default="greedy",
                    help="for --burst-ms: greedy, or every sampling option at its default")
    ap.add_argument("--sampling", default="cpu",
                    help="for --burst-ms: comma-separated sampling sides, cpu (the runner's chains) "
                         "and/or graph (backend_sampling: the chain inside the decode graph)")
    args = ap.parse_args()
    from tiny_model import resolve

    model = resolve(args.model) or str(default_model_path())
    parallel = [int(x) for x in args.parallel.split(",")]
    if args.burst_ms is not None:
        options = None if args.options == "greedy" else {"num_predict": args.tg}
        samplings = tuple(x.strip() for x in args.sampling.split(","))
        if not set(samplings) <= {"cpu", "graph"}:
            ap.error("--sampling takes cpu and/or graph")
        rows = burst_ab(model, args, parallel, [float(x) for x in args.burst_ms.split(",")], options,
                        samplings)
        print(f"model {Path(model).name}, threads {args.threads}, {args.options} options, "
              f"medians of {args.rounds} rounds taking turns")
        print(f"{'B':>3} {'burst_ms':>8} {'sampling':>8} {'engine tok/s':>13} {'S_TG':>8} {'ratio':>6} "
              f"{'interval':>17} {'step ms':>8} {'gap ms':>7} {'steps/visit':>11}  per-round ratios "
              f"(interval: the median ratio's confidence interval, at the coverage shown)")
        for r in rows:
            print(f"{r['B']:>3} {r['burst_ms']:>8g} {r['sampling']:>8} {statistics.median(r['engine_tok_s']):>13.1f} "
                  f"{statistics.median(r['S_TG']):>8.1f} {r['ratio']:>6.3f} "
                  f"{format_interval(r['ratio_interval']):>17} {r['step_ms']:>8.3f} "
                  f"{r['gap_ms']:>7.3f} {r['steps_per_visit']:>11.1f}  "
                  + " ".join(f"{x:.2f}" for x in r["ratios"]))
        if args.json:
            Path(args.json).write_text(json.dumps({"burst_ab": rows, "argv": sys.argv}, indent=2))
        return 0

    peer = batched_bench(model, args.threads, args.n_ctx, args.n_batch, parallel, args.pp, args.tg,
                         args.kv_unified)
    rows = []
    for b in parallel:
        with Engine(EngineConfig(model, n_ctx=args.n_ctx, n_batch=args.n_batch, parallel=b,
                                 n_threads=args.threads, kv_unified=args.kv_unified)) as engine:
            engine_rate(engine, b, 16, 8)  # warm-up
            runs = [engine_rate(engine, b, args.pp, args.tg)["rate"] for _ in range(args.repeat)]
            overhead, decode, _ = step_gap(engine)
        rate = statistics.median(runs)
        rows.append({"B": b, "engine_tok_s": rate, "batched_bench_S_TG": peer.get(b),
                     "ratio": rate / peer[b] if peer.get(b) else None, "runs": runs,
                     "median_decode_ms": decode * 1e3, "median_gap_ms": overhead * 1e3})

    with Engine(EngineConfig(model, n_ctx=args.n_ctx, n_batch=args.n_batch, parallel=2,
                             n_threads=args.threads)) as engine:
        prefix = [2000 + (k * 37) % 30000 for k in range(1000)]
        cold = ttft(engine, prefix + [11, 12, 13])
        warm = ttft(engine, prefix + [21, 22, 23])
    cache = {"cold_ttft_s": cold, "warm_ttft_s": warm, "warm_over_cold": warm / cold}

    gaps = {}
    for budget in dict.fromkeys((args.n_batch, 128)):  # once each, also when --n-batch 128
        with Engine(EngineConfig(model, n_ctx=8192, n_batch=args.n_batch, parallel=2,
                                 n_threads=args.threads, prefill_budget=budget)) as engine:
            gaps[budget] = long_prompt_gap(engine)

    print(f"model {Path(model).name}, threads {args.threads}, n_ctx {args.n_ctx}, "
          f"n_batch {args.n_batch}, pp {args.pp}, tg {args.tg}, {platform.processor() or platform.machine()}")
    print(f"{'B':>3} {'engine tok/s':>13} {'batched-bench S_TG':>19} {'ratio':>6} "
          f"{'decode ms':>10} {'gap ms':>7}")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] else "n/a"
        print(f"{r['B']:>3} {r['engine_tok_s']:>13.1f} {r['batched_bench_S_TG'] or 0:>19.1f} {ratio:>6} "
              f"{r['median_decode_ms']:>10.2f} {r['median_gap_ms']:>7.3f}")
    print(f"prefix cache: cold TTFT {cold * 1e3:.1f} ms, warm TTFT {warm * 1e3:.1f} ms "
          f"({cache['warm_over_cold'] * 100:.1f}% of cold)")
    for budget, g in gaps.items():
        print(f"2000-token prompt during generation, prefill_budget {budget}: largest gap "
              f"{g['max_gap_during_prefill_s'] * 1e3:.0f} ms (median gap {g['median_gap_s'] * 1e3:.1f} ms, "
              f"prompt evaluated in {g['prefill_s']:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "cache": cache, "gaps": gaps, "date": time.strftime("%F %T"),
                                               "argv": sys.argv}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
