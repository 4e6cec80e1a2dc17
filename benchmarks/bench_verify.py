"""What a verification decode costs: one decode of n rows, every row an
output (as speculative decoding verifies n - 1 proposals), against a decode
of one row, on the default model after a context of ``--context`` tokens.

Each round decodes every n once, in a shuffled order, and removes the rows
again; a number is the median (and the least) over ``--rounds`` rounds,
divided by the same statistic for one row.  With ``--threads 1`` it also
reports the decode thread's CPU time (``time.thread_time``; with one thread
ggml computes on the calling thread): on a machine that other work loads,
CPU time is what the decode itself costs, while the wall clock includes the
time the thread waited for a core.  With more threads only the wall clock
means anything (the other threads spin while they wait).

    .venv/bin/python benchmarks/bench_verify.py --threads 1 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from runner import _llama
from runner.model.models import default_model_path


def measure(args: argparse.Namespace) -> dict:
    sizes = list(range(1, args.max_rows + 1))
    model = _llama.Model(args.model or str(default_model_path()))
    ctx = _llama.Context(model, n_ctx=args.context + args.max_rows + 16, n_batch=512,
                         n_threads=args.threads)
    batch = _llama.Batch(512)
    tokens = [(i * 7919) % (model.n_vocab - 200) + 100 for i in range(args.context)]
    try:
        for start in range(0, args.context, 512):
            batch.clear()
            part = tokens[start:start + 512]
            batch.add_tokens(part, start, 0, output_last=start + len(part) == args.context)
            ctx.decode(batch)
        wall: dict[int, list[float]] = {n: [] for n in sizes}
        cpu: dict[int, list[float]] = {n: [] for n in sizes}
        rng = random.Random(args.seed)
        for _ in range(args.rounds):
            order = sizes[:]
            rng.shuffle(order)
            for n in order:
                batch.clear()
                for i in range(n):
                    batch.add(tokens[i], args.context + i, 0, True)
                c0, w0 = time.thread_time(), time.perf_counter()
                ctx.decode(batch)
                ctx.logits(n - 1)  # waits for the decode's results
                w1, c1 = time.perf_counter(), time.thread_time()
                ctx.seq_rm(0, args.context, -1)
                wall[n].append(w1 - w0)
                cpu[n].append(c1 - c0)
    finally:
        batch.close()
        ctx.close()
        model.close()
    out = {"threads": args.threads, "context": args.context, "rounds": args.rounds, "wall": {}, "cpu": {}}
    clocks = {"wall": wall, "cpu": cpu} if args.threads == 1 else {"wall": wall}
    for clock, times in clocks.items():
        for stat in ("median", "min"):
            f = statistics.median if stat == "median" else min
            base = f(times[1])
            out[clock][stat] = {"one_row_ms": base * 1e3,
                                "ratio": {n: f(times[n]) / base for n in sizes}}
    return out


def report(out: dict) -> str:
    lines = [f"default model, {out['threads']} thread(s), context {out['context']}, "
             f"{out['rounds']} rounds; cost of a decode of n rows / one row"]
    n_max = max(int(n) for n in out["wall"]["median"]["ratio"])  # keys are strings after JSON
    lines.append(f"{'clock':6} {'stat':7} {'1 row ms':>9} " + " ".join(f"{n:>5}" for n in range(2, n_max + 1)))
    for clock in ("wall", "cpu"):
        for stat, row in out.get(clock, {}).items():
            ratio = {int(n): r for n, r in row["ratio"].items()}
            lines.append(f"{clock:6} {stat:7} {row['one_row_ms']:9.2f} "
                         + " ".join(f"{ratio[n]:5.2f}" for n in range(2, n_max + 1)))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--context", type=int, default=300, help="tokens in the KV memory before the rows")
    p.add_argument("--max-rows", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = measure(args)
    print(json.dumps(out, indent=1) if args.json else report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
