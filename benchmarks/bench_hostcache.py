"""The prefix cache's host-memory tier: more conversations than slots.

Two measurements (default model, ``--threads`` threads):

1. **conversations**, the same run for three sides: llama-server with
   ``--cache-ram`` (its host prompt cache, idle slots saved on a new task),
   the runner with the tier on (``cache_ram_mb``, the same byte budget) and
   the runner with it off (``cache_ram_mb=0``).  Each side is a fresh
   process with ``--slots`` slots, one KV stream per slot and the same
   n_ctx, n_batch and threads, driven like bench_peers (streamed, greedy,
   end-of-generation ignored, times taken by the client from the chunks).
   The trace: ``--chats`` chats of ``--turns`` turns, interleaved round-robin
   (turn 1 of every chat, then turn 2 of every chat, ...), one request at a
   time; each turn's prompt is the previous one plus its answer plus a new
   user message.  Over turns 2+: the share of prompt tokens served from
   cache, the prompt tokens evaluated and the median time to first token.
   ``--rounds`` rounds, the sides taking turns in a rotated order each
   round; the report gives the median of each figure over the rounds, and
   whether every side was sent the same prompts (greedy answers agree).
   Both servers get the OpenMP spin count ``llama-runner serve`` sets
   (GOMP_SPINCOUNT, unless the environment sets one): with libgomp's
   default, llama-server's two threads spun against the other load of the
   shared VM at up to 590 ms per token.
2. **stall** (in-process, one Engine per setting, ``--streams`` + 1 slots):
   a ``--prefix``-token prompt is evaluated into one slot, then
   ``--streams`` greedy streams generate in the others; while they do, a
   short new prompt takes the first slot, whose state the tier saves (tier
   on) or drops (tier off).  Per setting: the longest save on the loop
   (``max_save_seconds``), where the saves were copied, the median gap
   between two chunks of the streams (one step) and the longest gap while
   the new prompt was admitted.
3. **restore** (in-process, one Engine): a ``--prefix``-token prompt
   evaluated into one slot, then another prompt taking the slot (the first
   is saved), then the first again plus a few tokens (restored): the restore
   time against the evaluation time of the prefix, ``--repeat`` times,
   medians.

    scripts/build_peers.sh     # llama-server
    .venv/bin/python benchmarks/bench_hostcache.py [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_peers import RunnerSide, ServerSide  # noqa: E402
from runner.bench.harness import filler_text, greedy_options  # noqa: E402
from runner.cli import SERVE_GOMP_SPINCOUNT  # noqa: E402
from runner.engine.core import Engine, EngineConfig  # noqa: E402
from runner.engine.requests import Chunk, CompletionOptions, CompletionRequest  # noqa: E402
from runner.model.models import resolve_model  # noqa: E402

SIDES = ("llama-server", "runner tier on", "runner tier off")


def complete(engine: Engine, prompt, n_predict: int):
    """Text and Final of one greedy completion of exactly ``n_predict`` tokens."""
    req = CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(greedy_options(n_predict)))
    return engine.submit(req).result()


def open_side(name: str, args: argparse.Namespace):
    """A fresh process for side ``name`` (its caches empty)."""
    common = (args.model, args.threads, args.n_ctx, args.n_batch, args.slots)
    if name == "llama-server":
        return ServerSide(*common, extra_args=("--cache-ram", str(args.cache_ram_mb)))
    ram = args.cache_ram_mb if name == "runner tier on" else 0
    return RunnerSide(*common, cache_ram_mb=ram)


def conversations(side, *, chats: int, turns: int, user_words: int, answer_tokens: int) -> dict:
    """The round-robin trace on one side; figures over turns 2+."""
    side.stream("Warm up.", 2)
    prompts = [filler_text(100 + c, 12) + "\n" for c in range(chats)]
    digest = hashlib.sha256()  # of every prompt sent, in order
    warm = []  # Stream of every turn after the first
    t0 = time.perf_counter()
    for t in range(turns):
        for c in range(chats):
            prompts[c] += f"User: {filler_text(200 + c * turns + t, user_words)}\nAssistant:"
            digest.update(prompts[c].encode())
            s = side.stream(prompts[c], answer_tokens)
            if s.generated != answer_tokens:
                raise RuntimeError(f"{side.name}: {s.generated} of {answer_tokens} tokens")
            prompts[c] += s.text + "\n"
            if t:
                warm.append(s)
    prompt = sum(s.prompt_tokens for s in warm)
    return {
        "hit_rate": sum(s.cached_tokens for s in warm) / prompt,
        "warm_ttft_s": statistics.median(s.ttft for s in warm),
        "evaluated_prompt_tokens": prompt - sum(s.cached_tokens for s in warm),
        "prompt_tokens": prompt,
        "wall_s": time.perf_counter() - t0,
        "prompts_sha256": digest.hexdigest(),
    }


def compare(args: argparse.Namespace) -> dict:
    """Every side once per round, the order rotated each round."""
    runs: dict[str, list[dict]] = {name: [] for name in SIDES}
    for r in range(args.rounds):
        order = SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)]
        for name in order:
            side = open_side(name, args)
            try:
                result = conversations(side, chats=args.chats, turns=args.turns,
                                       user_words=args.user_words, answer_tokens=args.answer_tokens)
                if name == "runner tier on":
                    result["tier"] = {k: v for k, v in side.runner.info(timeout=30).engine["host_cache"].items()
                                      if k in ("entries", "bytes", "hits", "misses", "saves", "evictions",
                                               "max_save_seconds", "restore_seconds")}
            finally:
                side.close()
            runs[name].append(result)
            if args.json:  # what is done so far, should the run be cut short
                Path(args.json).write_text(json.dumps({"conversations": {"rounds": runs}}, indent=2))
            print(f"round {r + 1} {name}: hit rate {result['hit_rate']:.1%}, warm TTFT median "
                  f"{result['warm_ttft_s'] * 1000:.0f} ms, {result['evaluated_prompt_tokens']} of "
                  f"{result['prompt_tokens']} prompt tokens evaluated, {result['wall_s']:.1f} s"
                  + (f"; tier {result['tier']}" if "tier" in result else ""), flush=True)
    digests = {run["prompts_sha256"] for rs in runs.values() for run in rs}
    summary = {name: {key: statistics.median(run[key] for run in rs)
                      for key in ("hit_rate", "warm_ttft_s", "evaluated_prompt_tokens", "prompt_tokens")}
               for name, rs in runs.items()}
    return {"rounds": runs, "median": summary, "same_prompts": len(digests) == 1}


def stall(model: str, *, prefix: int, streams: int, threads: int, cache_ram_mb: int,
          generate: int = 64) -> dict:
    """The save of a ``prefix``-token slot while ``streams`` streams generate."""
    import threading

    slot_ctx = prefix + 512
    config = EngineConfig(model, n_ctx=slot_ctx * (streams + 1), parallel=streams + 1,
                          n_threads=threads, cache_ram_mb=cache_ram_mb)
    with Engine(config) as engine:
        complete(engine, "Warm up.", 2)
        base = engine.tokenize(filler_text(300, prefix), add_special=True)[:prefix]
        _, first = complete(engine, base, 1)
        arrivals: list[list[float]] = [[] for _ in range(streams)]
        slots = [-1] * streams

        def stream(k: int) -> None:
            req = CompletionRequest(prompt=filler_text(500 + k, 20),
                                    options=CompletionOptions.from_dict(greedy_options(generate)))
            for event in engine.submit(req):
                if type(event) is Chunk:
                    arrivals[k].append(time.perf_counter())
                else:
                    slots[k] = event.slot

        threads_ = [threading.Thread(target=stream, args=(k,)) for k in range(streams)]
        for t in threads_:
            t.start()
        while min(len(a) for a in arrivals) < generate // 3:
            time.sleep(0.01)
        t0 = time.perf_counter()
        _, taker = complete(engine, filler_text(600, 12), 1)   # takes the prefix's slot
        t1 = time.perf_counter()
        for t in threads_:
            t.join()
        tier = engine.info()["host_cache"]
    if taker.slot != first.slot or first.slot in slots:
        raise RuntimeError(f"the new prompt went to slot {taker.slot}, not {first.slot}")
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:])]
    around = [b - a for times in arrivals for a, b in zip(times, times[1:]) if b >= t0 and a <= t1]
    return {"cache_ram_mb": cache_ram_mb, "prefix_tokens": prefix, "streams": streams,
            "max_save_s": tier["max_save_seconds"], "saves": tier["saves"],
            "into": {k: tier.get(k) for k in ("into_spare", "into_evicted", "into_fresh")},
            "median_gap_s": statistics.median(gaps), "max_gap_admit_s": max(around),
            "admit_s": t1 - t0}


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
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--user-words", type=int, default=40, help="words per user message")
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--cache-ram-mb", type=int, default=256,
                    help="host cache budget, MiB, of llama-server and of the runner with its tier on")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three sides")
    ap.add_argument("--prefix", type=int, default=2000, help="tokens of the restored prefix")
    ap.add_argument("--repeat", type=int, default=3, help="restore measurements")
    ap.add_argument("--streams", type=int, default=4, help="streams generating during the stall")
    ap.add_argument("--skip", choices=("conversations", "stall", "restore"), action="append",
                    default=[])
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    args.model = str(resolve_model(args.model or "default"))
    os.environ.setdefault("GOMP_SPINCOUNT", SERVE_GOMP_SPINCOUNT)  # both servers inherit it
    results: dict = {}
    if "conversations" not in args.skip:
        c = results["conversations"] = compare(args)
        print(f"medians over {args.rounds} rounds (same prompts to every side: {c['same_prompts']}):")
        server = c["median"]["llama-server"]
        for name, m in c["median"].items():
            print(f"  {name:16s} hit rate {m['hit_rate']:.1%}, warm TTFT {m['warm_ttft_s'] * 1000:.0f} ms "
                  f"({m['warm_ttft_s'] / server['warm_ttft_s']:.2f}x llama-server), "
                  f"{m['evaluated_prompt_tokens']:.0f} of {m['prompt_tokens']:.0f} prompt tokens evaluated",
                  flush=True)
    if "stall" not in args.skip:
        results["stall"] = []
        for ram in (args.cache_ram_mb, 0):
            r = stall(args.model, prefix=args.prefix, streams=args.streams, threads=args.threads,
                      cache_ram_mb=ram)
            results["stall"].append(r)
            print(f"stall, tier {'off' if not ram else f'{ram} MiB'}: {r['prefix_tokens']}-token slot "
                  f"taken while {r['streams']} streams generate: longest save {r['max_save_s'] * 1000:.1f} ms "
                  f"({r['saves']} saves, {r['into']}), median step gap {r['median_gap_s'] * 1000:.0f} ms, "
                  f"longest gap while admitting {r['max_gap_admit_s'] * 1000:.0f} ms", flush=True)
    if "restore" not in args.skip:
        r = results["restore"] = restore(args.model, prefix=args.prefix, repeat=args.repeat,
                                         threads=args.threads)
        print(f"{r['prefix_tokens']}-token prefix: evaluate {r['evaluate_s'] * 1000:.0f} ms, restore "
              f"{r['restore_s'] * 1000:.1f} ms ({r['restore_share']:.1%}), save {r['save_s'] * 1000:.1f} ms, "
              f"state {r['state_bytes'] / 2**20:.1f} MiB, TTFT after restore {r['ttft_after_restore_s'] * 1000:.0f} ms",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
