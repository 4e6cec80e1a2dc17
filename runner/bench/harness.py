"""``llama-runner bench``: timed completions through a runner process.

Spawns a runner (or connects to one with ``--endpoint``), asks it what it
loaded (``info``), builds prompts of exactly ``--prompt-tokens`` tokens with
the runner's own tokenizer, runs ``--warmup`` untimed requests, then
``--epochs`` runs of ``--requests`` completions, ``--parallel`` of them in
flight at a time.  Every prompt is different from its first word on, so no
request reuses another's KV cache; generation is greedy and ignores
end-of-generation, so every request makes ``--max-tokens`` tokens.

The statistics and the output formats are in :mod:`runner.bench.stats`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import random
import shlex
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from runner.bench.stats import (RequestSample, RunSample, build_report, check_plot_available,
                               format_table, model_summary, plot, to_json)

# Sampling of every benchmark request: greedy, no penalties, a fixed length.
OPTIONS = {"temperature": 0.0, "repeat_penalty": 1.0, "ignore_eos": True}


def greedy_options(tokens: int) -> dict:
    """OPTIONS for exactly ``tokens`` generated tokens (a completion's options;
    llama-server takes the same keys, with ``n_predict`` for the count)."""
    return {**OPTIONS, "num_predict": tokens}

# Filler vocabulary of the prompts: plain words, so that any tokenizer splits
# them like ordinary prose.
_WORDS = (
    "river mountain window garden letter morning silver market engine harbor "
    "forest candle bridge winter summer evening station library kitchen orchard "
    "valley island desert meadow village tower castle lantern compass journey "
    "anchor thunder shadow mirror pocket basket blanket ladder pencil notebook "
    "painter teacher farmer sailor doctor builder baker dancer singer writer "
    "quiet bright gentle sudden distant narrow heavy simple careful ancient "
    "golden hollow steady patient curious honest rapid silent tender humble "
    "walks carries builds finds keeps opens watches reads writes counts "
    "follows gathers measures answers crosses drifts lifts mends paints plants "
    "under above between beyond across behind beside toward through around "
    "because although while after before until since whenever unless where "
    "apple bread cheese honey pepper salt butter flour sugar tea "
    "cloud rain snow wind storm sun moon star sky wave "
    "north south east west spring autumn noon dusk dawn night "
    "stone wood iron glass paper cloth wool clay sand brick"
).split()


def filler_text(seed: int, n_words: int) -> str:
    """Deterministic prose-like text whose first word depends on ``seed``, so
    that texts of different seeds (below ``len(_WORDS)`` apart) share no prefix."""
    rng = random.Random(seed)
    words = [_WORDS[seed % len(_WORDS)].capitalize()]
    while len(words) < n_words:
        word = rng.choice(_WORDS)
        words.append(word + "." if rng.random() < 0.08 else word)
    return " ".join(words)


Tokenize = Callable[[str, bool], list]   # (text, add_special) -> token ids
Detokenize = Callable[[list], str]


class PromptBuilder:
    """Texts that the model's own tokenizer turns into a given number of
    prompt tokens, special tokens the completion adds (BOS) included."""

    def __init__(self, tokenize: Tokenize, detokenize: Detokenize) -> None:
        self._tokenize = tokenize
        self._detokenize = detokenize
        self.n_special = len(tokenize("", True))    # tokens add_special puts around any text
        sample = filler_text(0, 200)
        self.tokens_per_word = len(tokenize(sample, False)) / 200  # calibration on the model

    def build(self, n_tokens: int, seed: int) -> tuple[str, int]:
        """(text, its token count); the count equals ``n_tokens`` unless the
        tokenizer merges across every cut tried (then it is the closest)."""
        content = n_tokens - self.n_special
        if content < 1:
            raise ValueError(f"a prompt needs more than {self.n_special} tokens")
        n_words = math.ceil(content / self.tokens_per_word * 1.2) + 4
        while True:
            tokens = self._tokenize(filler_text(seed, n_words), False)
            if len(tokens) >= content + 2:
                break
            n_words *= 2
        # Cutting the token list and turning it back into text may not give the
        # same tokens at the cut (a merge across it): re-count and move the cut.
        best: tuple[int, str, int] | None = None   # (distance, text, count)
        cut = content
        for _ in range(8):
            text = self._detokenize(tokens[:cut])
            got = len(self._tokenize(text, True))
            if got == n_tokens:
                return text, got
            if best is None or abs(got - n_tokens) < best[0]:
                best = (abs(got - n_tokens), text, got)
            cut = max(1, min(len(tokens), cut + n_tokens - got))
        return best[1], best[2]


# -- running requests -------------------------------------------------------------

def timed_completion(runner, prompt: str, options: dict) -> RequestSample:
    """One completion, timed by the client from submit to final reply."""
    from runner.engine.requests import Chunk

    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    final = None
    for event in runner.complete(prompt, **options):
        now = time.perf_counter()
        if type(event) is Chunk:
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
        else:
            final = event
    end = time.perf_counter()
    return RequestSample(
        prompt_count=final.prompt_count, prompt_eval_count=final.prompt_eval_count,
        cached_count=final.cached_count, prompt_eval_s=final.prompt_eval_duration,
        eval_count=final.eval_count, eval_s=final.eval_duration,
        ttft_s=(first if first is not None else end) - t0, total_s=end - t0,
        gaps_s=gaps, done_reason=final.done_reason, draft_proposed=final.draft_proposed,
        draft_accepted=final.draft_accepted)


def run_requests(runner, prompts: list[str], options: dict, parallel: int) -> tuple[float, list]:
    """All ``prompts``, ``parallel`` in flight at a time; (wall seconds, samples in order).
    The first failure is raised once every worker has stopped."""
    samples: list[RequestSample | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    indices = itertools.count()   # next() is atomic: workers take turns without a lock

    def work() -> None:
        while True:
            i = next(indices)
            if i >= len(prompts) or errors:
                return
            try:
                samples[i] = timed_completion(runner, prompts[i], options)
            except BaseException as exc:
                errors.append(exc)
                return

    workers = [threading.Thread(target=work, name=f"bench-{k}", daemon=True)
               for k in range(min(parallel, len(prompts)))]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, samples


def run_benchmark(runner, *, requests: int, parallel: int, prompt_tokens: int, max_tokens: int,
                  warmup: int, epochs: int, progress: Callable[[str], Any] | None = None,
                  speculative: dict | None = None) -> tuple[dict, list[RunSample]]:
    """Warm up, then time ``epochs`` runs; (model summary from ``info``, runs)."""
    info = runner.info(timeout=60)
    if info.engine is None:
        raise RuntimeError(f"the runner has no model loaded (state {info.state})")
    model = model_summary(info.engine, info.metadata)
    need = prompt_tokens + max_tokens
    if model["slot_ctx"] and need > model["slot_ctx"]:
        raise ValueError(f"{prompt_tokens} prompt + {max_tokens} generated tokens do not fit the "
                         f"{model['slot_ctx']} tokens each request gets: raise --num-ctx")
    say = progress or (lambda text: None)
    say("calibrating prompts on the model's tokenizer")
    builder = PromptBuilder(lambda text, special: runner.tokenize(text, add_special=special,
                                                                  timeout=60),
                            lambda tokens: runner.detokenize(tokens, timeout=60))
    options = {**greedy_options(max_tokens), **(speculative or {})}
    # Seeds run on across the warm-up and the epochs: no two prompts share a prefix.
    seeds = itertools.count(1)
    warm = [builder.build(prompt_tokens, next(seeds))[0] for _ in range(warmup)]
    batches = [[builder.build(prompt_tokens, next(seeds))[0] for _ in range(requests)]
               for _ in range(epochs)]
    if warm:
        say(f"warm-up: {len(warm)} request(s)")
        run_requests(runner, warm, options, parallel)
    runs = []
    for epoch, prompts in enumerate(batches, 1):
        wall, samples = run_requests(runner, prompts, options, parallel)
        runs.append(RunSample(epoch=epoch, wall_s=wall, requests=samples))
        generated = sum(s.eval_count for s in samples)
        say(f"run {epoch}/{epochs}: {len(samples)} requests, {generated} tokens in {wall:.2f} s")
    return model, runs


# -- the command --------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` arguments to ``p``."""
    p.add_argument("--model", "-m", default="default",
                   help="GGUF file, or 'default' for the default model (spawned runner)")
    p.add_argument("--endpoint", default=None,
                   help="benchmark the runner listening there instead of spawning one")
    p.add_argument("--requests", "-n", type=int, default=4, help="requests per run (default 4)")
    p.add_argument("--parallel", type=int, default=1,
                   help="requests in flight at once; also the spawned runner's slots (default 1)")
    p.add_argument("--num-ctx", type=int, default=None,
                   help="context per request of a spawned runner (default 2048; n_ctx = "
                        "num-ctx x parallel); the context in use is read back from the runner")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first (default 1)")
    p.add_argument("--epochs", type=int, default=3, help="timed runs (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of a spawned runner (default: all)")
    p.add_argument("--speculative", action="store_true",
                   help="requests use speculative decoding by prompt lookup; the report adds the acceptance")
    p.add_argument("--draft-max", type=int, default=None,
                   help="with --speculative: tokens proposed per step at most (default: the option's, 16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--plot", metavar="FILE", default=None, help="also draw the report as a PNG (needs matplotlib)")


DEFAULT_NUM_CTX = 2048


def _check(args: argparse.Namespace) -> None:
    for name, low in (("requests", 1), ("parallel", 1), ("prompt_tokens", 1), ("max_tokens", 1),
                      ("warmup", 0), ("epochs", 1), ("num_ctx", 1), ("threads", 1),
                      ("draft_max", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}")


def _speculative(args: argparse.Namespace) -> dict | None:
    """The speculative options of the requests (None: off)."""
    if not args.speculative:
        return None
    out = {"speculative": True}
    if args.draft_max is not None:
        out["draft_max"] = args.draft_max
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command(args: argparse.Namespace) -> str:
    """The command line that repeats this run (every option spelt out)."""
    words = ["llama-runner", "bench"]
    if args.endpoint is not None:
        words += ["--endpoint", args.endpoint]
    else:
        words += ["--model", args.model]
    for name in ("requests", "parallel", "num_ctx", "prompt_tokens", "max_tokens", "warmup",
                 "epochs", "threads"):
        value = getattr(args, name)
        if value is not None:
            words += [f"--{name.replace('_', '-')}", str(value)]
    if args.speculative:
        words.append("--speculative")
        if args.draft_max is not None:
            words += ["--draft-max", str(args.draft_max)]
    if args.json:
        words.append("--json")
    if args.plot:
        words += ["--plot", args.plot]
    return shlex.join(words)


def _connect(args: argparse.Namespace):
    from runner.process.client import Runner

    if args.endpoint is None:
        num_ctx = args.num_ctx or DEFAULT_NUM_CTX
        return Runner.spawn(args.model, n_ctx=num_ctx * args.parallel, parallel=args.parallel,
                            n_threads=args.threads, log_level=args.log_level)
    runner = Runner.connect(args.endpoint)
    try:
        health = runner.health(timeout=30)
        if health.state == "loading":
            runner.wait_ready()
        elif health.state != "ready":
            raise RuntimeError(f"the runner at {args.endpoint} is {health.state!r}, not ready")
    except BaseException:
        runner.close()
        raise
    return runner


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print its report; returns the exit status."""
    _check(args)
    if args.plot:
        check_plot_available()
    show = sys.stderr.isatty() and not args.json
    progress = (lambda text: print(text, file=sys.stderr, flush=True)) if show else None
    with _connect(args) as runner:
        model, runs = run_benchmark(runner, requests=args.requests, parallel=args.parallel,
                                    prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                                    warmup=args.warmup, epochs=args.epochs, progress=progress,
                                    speculative=_speculative(args))
    if args.endpoint is not None:
        if args.num_ctx and args.num_ctx != model["slot_ctx"]:
            print(f"note: --num-ctx applies to a spawned runner; this one gives each request "
                  f"{model['slot_ctx']} tokens", file=sys.stderr)
        if args.parallel > (model["slots"] or 1):
            print(f"note: {args.parallel} requests in flight for {model['slots']} slots: the "
                  f"others waited in the runner's queue (included in their TTFT)", file=sys.stderr)
    config = {
        "requests": args.requests, "parallel": args.parallel, "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "warmup": args.warmup, "epochs": args.epochs,
        "num_ctx": args.num_ctx, "threads": args.threads, "endpoint": args.endpoint,
        "spawned": args.endpoint is None, "options": {**OPTIONS, **(_speculative(args) or {})},
    }
    extra = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": _command(args),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "system": platform.platform()},
    }
    report = build_report(model, config, runs, extra)
    if args.json:
        print(to_json(report))
    else:
        print(format_table(report))
    if args.plot:
        plot(report, args.plot)
    return 0
