"""What sampling costs per token: the engine on the tiny fast-decode model
(benchmarks/tiny_model.py) with greedy options, with the default options
(temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1 over 64 tokens) and
with greedy plus the default repeat_penalty, each through the binding's
native chain and through llama.cpp's CPU chain (EngineConfig.native_sampler).

    python benchmarks/bench_sampling.py [--threads 1,2] [--parallel 1,8] [--rounds 5] [--json out.json]

Every arm runs once per round, in an order that rotates from round to round;
the figure is the median over rounds of the aggregate generation rate (tokens
generated after every request had its first token / the time until the last
finished, the window of llama-batched-bench's S_TG).  The ratio column is
each arm against greedy in the same round: 1.0 means sampling costs no more
than an argmax.

    python benchmarks/bench_sampling.py --step-rows 64 [--model M] [--steps 20] [--rounds 3]

Without the engine: what sampling one step's rows costs.  B sequences are
prompted (128 tokens each, different prompts) and then decoded one token at
a time; after each decode, ``sample_batch`` samples the B rows on one thread
for one option set (its own B samplers, penalty windows filling as they
go), the sets taking turns within a round.  Reported: the median per step
(ms) and per row (us).  A row sampled again and again is cheaper than this
(its branches are learnt and it stays in cache), so this is the figure that
a decode step pays.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_engine import engine_rate  # noqa: E402
from tiny_model import write_tiny_llama  # noqa: E402

from runner.engine.core import Engine, EngineConfig  # noqa: E402

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0, "ignore_eos": True}
DEFAULTS = {"ignore_eos": True}  # every other option at its default
GREEDY_PENALTY = {"temperature": 0.0, "ignore_eos": True}  # repeat_penalty 1.1 (default)

ARMS = [  # (name, options, native sampler)
    ("greedy", GREEDY, True),
    ("defaults native", DEFAULTS, True),
    ("defaults llama.cpp", DEFAULTS, False),
    ("greedy+rp native", GREEDY_PENALTY, True),
    ("greedy+rp llama.cpp", GREEDY_PENALTY, False),
]


STEP_ARMS = [  # (name, Sampler keyword arguments)
    ("greedy", {"temperature": 0.0, "repeat_penalty": 1.0}),
    ("greedy+rp", {"temperature": 0.0}),
    ("defaults, rp 1.0", {"repeat_penalty": 1.0}),
    ("defaults", {}),
]


def step_rows(model_path: str, b: int, steps: int, rounds: int) -> list[dict]:
    """Per option set, the time ``sample_batch`` takes over a real step's
    ``b`` rows on one thread (medians over ``steps`` steps x ``rounds``)."""
    from runner import _llama
    model = _llama.Model(model_path)
    ctx = _llama.Context(model, n_ctx=b * (128 + rounds * len(STEP_ARMS) * steps + 64),
                         n_batch=512, n_seq_max=b, n_threads=1)
    batch = _llama.Batch(512)
    for s in range(b):
        batch.clear()
        batch.add_tokens([1000 + (7919 * (s + 1) + k) % 40000 for k in range(128)], 0, s,
                         output_last=True)
        ctx.decode(batch)
    pos = 128
    times: dict[str, list[float]] = {name: [] for name, _ in STEP_ARMS}
    for r in range(rounds):
        for name, kwargs in STEP_ARMS[r % len(STEP_ARMS):] + STEP_ARMS[:r % len(STEP_ARMS)]:
            samplers = [_llama.Sampler(model, seed=s, **kwargs) for s in range(b)]
            tokens = [7 + s for s in range(b)]
            for _ in range(steps):
                batch.clear()
                for s in range(b):
                    batch.add_seqs(tokens[s], pos, [s], True)
                ctx.decode(batch)
                ctx.synchronize()
                t0 = time.perf_counter()
                tokens = _llama.sample_batch(ctx, samplers, list(range(b)), 1)
                times[name].append(time.perf_counter() - t0)
                pos += 1
            for sampler in samplers:
                sampler.close()
    batch.close()
    ctx.close()
    model.close()
    out = []
    for name, _ in STEP_ARMS:
        step = statistics.median(times[name])
        out.append({"parallel": b, "arm": name, "step_ms": step * 1e3, "row_us": step / b * 1e6})
        print(f"B={b:<3} {name:<18} {step * 1e3:7.3f} ms per step  {step / b * 1e6:6.1f} us per row",
              flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: the tiny benchmark model)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--parallel", default="1,8")
    ap.add_argument("--pp", type=int, default=32)
    ap.add_argument("--tg", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--step-rows", type=int, default=0, metavar="B",
                    help="only the cost of sampling one step's B rows (see above)")
    ap.add_argument("--steps", type=int, default=20, help="with --step-rows: steps per option set and round")
    args = ap.parse_args()
    model = args.model or str(write_tiny_llama())
    if args.step_rows:
        write_json(args.json, model, step_rows(model, args.step_rows, args.steps, args.rounds))
        return 0
    results = []
    for threads in [int(x) for x in args.threads.split(",")]:
        for b in [int(x) for x in args.parallel.split(",")]:
            engines = {native: Engine(EngineConfig(model, n_ctx=max(4096, b * (args.pp + args.tg + 8)),
                                                   parallel=b, n_threads=threads, native_sampler=native))
                       for native in (True, False)}
            rates: dict[str, list[float]] = {name: [] for name, _, _ in ARMS}
            ratios: dict[str, list[float]] = {name: [] for name, _, _ in ARMS}
            for r in range(args.rounds):
                order = ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]
                got = {}
                for name, options, native in order:
                    got[name] = engine_rate(engines[native], b, args.pp, args.tg, rng_base=1000 + 97 * r,
                                            options=options)["rate"]
                for name in got:
                    rates[name].append(got[name])
                    ratios[name].append(got[name] / got["greedy"])
            for e in engines.values():
                e.close()
            for name, options, native in ARMS:
                row = {"threads": threads, "parallel": b, "arm": name,
                       "tok_s": statistics.median(rates[name]),
                       "vs_greedy": statistics.median(ratios[name]), "rounds": rates[name]}
                results.append(row)
                print(f"threads {threads} B={b:<3} {name:<22} {row['tok_s']:8.0f} tok/s  "
                      f"{row['vs_greedy']:.3f}x greedy", flush=True)
    write_json(args.json, model, results)
    return 0


def write_json(path: str | None, model: str, results: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps({"machine": platform.platform(), "model": model,
                                          "time": time.strftime("%Y-%m-%d %H:%M"),
                                          "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
