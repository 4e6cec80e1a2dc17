"""The prefix cache's host-memory tier: more conversations than slots.

Two measurements, in-process on one Engine per setting (default model,
``--threads`` threads):

1. **conversations**: ``--chats`` chats of ``--turns`` turns, interleaved
   round-robin (turn 1 of every chat, then turn 2 of every chat, ...), one
   request at a time on ``--slots`` slots; each turn's prompt is the previous
   one plus its answer plus a new user message (bench_peers' conversation
   text).  Run with the tier off (``cache_ram_mb=0``) and on, in the same
   process.  Over turns 2+: the share of prompt tokens served from cache
   (``cached_count / prompt_count``), the median time to first token
   (``Final.prompt_eval_duration``: tokenizing + prompt evaluation + first
   sample) and the prompt tokens evaluated; plus the tier's counters (longest
   save = longest stall of the loop).
2. **restore**: a ``--prefix``-token prompt evaluated into one slot, then
   another prompt taking the slot (the first is saved), then the first again
   plus a few tokens (restored): the restore time against the evaluation
   time of the prefix, ``--repeat`` times, medians.

    .venv/bin/python benchmarks/bench_hostcache.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.bench import filler_text, greedy_options  # noqa: E402
from runner.engine import Engine, EngineConfig  # noqa: E402
from runner.models import resolve_model  # noqa: E402
from runner.requests import CompletionOptions, CompletionRequest  # noqa: E402


def complete(engine: Engine, prompt, n_predict: int):
    """Text and Final of one greedy completion of exactly ``n_predict`` tokens."""
    req = CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(greedy_options(n_predict)))
    return engine.submit(req).result()


def conversations(model: str, *, chats: int, turns: int, slots: int, user_words: int,
                  answer_tokens: int, threads: int, n_ctx: int, cache_ram_mb: int) -> dict:
    config = EngineConfig(model, n_ctx=n_ctx, parallel=slots, n_threads=threads,
                          cache_ram_mb=cache_ram_mb)
    with Engine(config) as engine:
        complete(engine, "Warm up.", 2)
        prompts = [filler_text(100 + c, 12) + "\n" for c in range(chats)]
        warm = []  # Final of every turn after the first
        t0 = time.perf_counter()
        for t in range(turns):
            for c in range(chats):
                prompts[c] += f"User: {filler_text(200 + c * turns + t, user_words)}\nAssistant:"
                text, final = complete(engine, prompts[c], answer_tokens)
                if final.error:
                    raise RuntimeError(final.error)
                prompts[c] += text + "\n"
                if t:
                    warm.append(final)
        wall = time.perf_counter() - t0
        tier = engine.info()["host_cache"]
    prompt = sum(f.prompt_count for f in warm)
    return {
        "cache_ram_mb": cache_ram_mb,
        "hit_rate": sum(f.cached_count for f in warm) / prompt,
        "warm_ttft_s": statistics.median(f.prompt_eval_duration for f in warm),
        "evaluated_prompt_tokens": sum(f.prompt_eval_count for f in warm),
        "prompt_tokens": prompt,
        "wall_s": wall,
        "tier": {k: tier[k] for k in ("entries", "bytes", "hits", "misses", "saves", "evictions",
                                      "save_seconds", "max_save_seconds", "restore_seconds")},
    }


def restore(model: str, *, prefix: int, repeat: int, threads: int) -> dict:
    config = EngineConfig(model, n_ctx=prefix + 512, parallel=1, n_threads=threads, cache_ram_mb=1024)
    evals, restores, saves, ttfts, sizes = [], [], [], [], []
    with Engine(config) as engine:
        complete(engine, "Warm up.", 2)
        for r in range(repeat):
            # at least one token per word: cut to the token count
            base = engine.tokenize(filler_text(300 + r, prefix), add_special=True)[:prefix]
            other = engine.tokenize(filler_text(400 + r, 64), add_special=True)
            _, first = complete(engine, base, 1)
            before = engine.info()["host_cache"]
            complete(engine, other, 1)                 # takes the slot: base saved
            mid = engine.info()["host_cache"]
            _, back = complete(engine, base + other[1:9], 1)  # base restored, 8 tokens evaluated
            after = engine.info()["host_cache"]
            if back.cached_count != len(base):
                raise RuntimeError(f"expected {len(base)} cached tokens, got {back.cached_count}")
            evals.append(first.prompt_eval_duration)
            saves.append(mid["save_seconds"] - before["save_seconds"])
            sizes.append(mid["bytes"] - before["bytes"])  # the base prefix's saved state
            restores.append(after["restore_seconds"] - mid["restore_seconds"])
            ttfts.append(back.prompt_eval_duration)
        # (The store's mean entry would mix in the short prompts' states.)
        state_bytes = statistics.median(sizes)
    ev, rs = statistics.median(evals), statistics.median(restores)
    return {"prefix_tokens": prefix, "evaluate_s": ev, "restore_s": rs, "restore_share": rs / ev,
            "save_s": statistics.median(saves), "ttft_after_restore_s": statistics.median(ttfts),
            "state_bytes": int(state_bytes)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chats", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=8192, help="total context (split across the slots)")
    ap.add_argument("--user-words", type=int, default=40, help="words per user message")
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--cache-ram-mb", type=int, default=256, help="the tier's bound when on")
    ap.add_argument("--prefix", type=int, default=2000, help="tokens of the restored prefix")
    ap.add_argument("--repeat", type=int, default=3, help="restore measurements")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    model = str(resolve_model(args.model or "default"))
    results: dict = {"conversations": []}
    for ram in (0, args.cache_ram_mb):
        r = conversations(model, chats=args.chats, turns=args.turns, slots=args.slots,
                          user_words=args.user_words, answer_tokens=args.answer_tokens,
                          threads=args.threads, n_ctx=args.n_ctx, cache_ram_mb=ram)
        results["conversations"].append(r)
        print(f"tier {'off' if not ram else f'{ram} MiB'}: hit rate {r['hit_rate']:.1%}, warm TTFT "
              f"median {r['warm_ttft_s'] * 1000:.0f} ms, {r['evaluated_prompt_tokens']} of "
              f"{r['prompt_tokens']} prompt tokens evaluated, {r['wall_s']:.1f} s; tier {r['tier']}",
              flush=True)
    r = results["restore"] = restore(model, prefix=args.prefix, repeat=args.repeat, threads=args.threads)
    print(f"{r['prefix_tokens']}-token prefix: evaluate {r['evaluate_s'] * 1000:.0f} ms, restore "
          f"{r['restore_s'] * 1000:.1f} ms ({r['restore_share']:.1%}), save {r['save_s'] * 1000:.1f} ms, "
          f"state {r['state_bytes'] / 2**20:.1f} MiB, TTFT after restore {r['ttft_after_restore_s'] * 1000:.0f} ms",
          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
