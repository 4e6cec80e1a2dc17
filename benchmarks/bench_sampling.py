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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: the tiny benchmark model)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--parallel", default="1,8")
    ap.add_argument("--pp", type=int, default=32)
    ap.add_argument("--tg", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = args.model or str(write_tiny_llama())
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
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.platform(), "model": model,
                                               "time": time.strftime("%Y-%m-%d %H:%M"),
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
