"""What the order and the spread of a step's sequence ids cost llama_decode.

With one KV stream per slot (the runner's default, llama-server's
``-no-kvu``), llama.cpp cuts a batch into micro-batches of consecutive
sequence ids taken in batch order, and each micro-batch is its own pass over
the weights.  This measures one generation step (one token per listed
sequence) straight through the binding, for id sets that are consecutive,
spread out, or out of order, a step with a prompt chunk listed last or in
slot order, a step where one of four sequences verifies four proposals,
and the same sets with one KV buffer shared by
all slots (``--kv-unified``), which has no such cut but attends over every
slot's cells.  Nothing of the runner's scheduling is involved; the result is
why runner.engine.scheduler keeps its rows in slot order (docs/design.md, "Batch
order").

    .venv/bin/python benchmarks/bench_layout.py                 # default model, 2 threads
    .venv/bin/python benchmarks/bench_layout.py --model tiny --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETS = {   # name: (sequence id, rows) per entry of one step, in batch order
    "2 adjacent": [(0, 1), (1, 1)],
    "2 apart": [(0, 1), (2, 1)],
    "4 adjacent": [(0, 1), (1, 1), (2, 1), (3, 1)],
    "4 apart": [(0, 1), (2, 1), (4, 1), (6, 1)],
    "8 in order": [(s, 1) for s in range(8)],
    "8 out of order": [(s, 1) for s in (3, 4, 0, 1, 2, 5, 6, 7)],
    "7 + chunk, chunk last": [(s, 1) for s in (0, 1, 2, 4, 5, 6, 7)] + [(3, 32)],
    "7 + chunk, by slot": [(s, 32 if s == 3 else 1) for s in range(8)],
    "4, one verifying 4": [(0, 1), (1, -5), (2, 1), (3, 1)],
}
# rows > 1: a prompt chunk (only its last row an output); rows < -1: a
# sampled token and its proposals, every row an output (a verification).


def measure(model_path: str, threads: int, unified: bool, prompt: int, steps: int,
            rounds: int) -> dict:
    from runner import _llama

    model = _llama.Model(model_path)
    parallel = 8
    ctx = _llama.Context(model, n_ctx=parallel * 512, n_batch=512, n_seq_max=parallel,
                         n_threads=threads, kv_unified=unified)
    batch = _llama.Batch(512)
    for s in range(parallel):   # every slot holds a prompt of its own
        batch.clear()
        batch.add_tokens([1000 + 50 * s + k for k in range(prompt)], 0, s, output_last=True)
        ctx.decode(batch)
    times: dict[str, list[float]] = {name: [] for name in SETS}
    for _ in range(rounds):   # the sets take turns
        for name, ids in SETS.items():
            t0 = time.perf_counter()
            for i in range(steps):
                batch.clear()
                for s, rows in ids:
                    if rows == 1:
                        batch.add(2000 + i, prompt, s, True)
                    elif rows > 1:   # a prompt chunk
                        batch.add_tokens([3000 + i + k for k in range(rows)], prompt, s, output_last=True)
                    else:   # a token and its proposals
                        for k in range(-rows):
                            batch.add(3000 + i + k, prompt + k, s, True)
                ctx.decode(batch)
                ctx.seq_rm(-1, prompt, -1)   # every step decodes at the same position
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model name or path; 'tiny' (benchmarks/tiny_model.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64, help="tokens each slot holds")
    ap.add_argument("--steps", type=int, default=8, help="steps per set and round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from runner.model.models import resolve_model
    from tiny_model import resolve

    model = str(resolve_model(resolve(args.model)))
    results = {layout: measure(model, args.threads, layout == "unified", args.prompt, args.steps,
                               args.rounds)
               for layout in ("per slot", "unified")}
    print(f"{Path(model).name}, {args.threads} threads, {args.prompt} cells per slot; "
          f"ms per step, medians of {args.rounds} rounds")
    print(f"{'sequence ids (x rows)':48s} {'per slot':>9s} {'unified':>9s}")
    for name, ids in SETS.items():
        label = ",".join(str(s) if n == 1 else f"{s}x{abs(n)}" for s, n in ids)
        print(f"{name + ' ' + label:48s} {results['per slot'][name]:9.2f} "
              f"{results['unified'][name]:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "threads": args.threads, **results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
