"""Speculative decoding by prompt lookup (issue 21), beside llama-server's own.

Three tasks whose answer repeats its input (a code edit, a JSON rewrite, a
summary quoting its source) on the default model, greedy (temperature 0, no
repeat penalty), each answer up to ``--tokens`` tokens:

* single stream: generation tokens/s of the runner (in process, one request
  at a time) without and with ``speculative``, and of llama-server without and
  with its n-gram speculation (``--server-spec``, by default ngram-simple with
  a 4-token lookup and 16-token drafts, the closest to the runner's lookup),
  in the same run on the same prompts; the acceptance each reports;
* aggregate: B = 1, 4, 8 streams at once (the tasks in turn), generated
  tokens per wall second of the runner without and with speculation;
* draft model: the single-stream case again with a draft model instead of
  prompt lookup: the tiny random-weight model of benchmarks/tiny_model.py
  (the default vocabulary; it proposes noise, so this measures the cost of
  drafting and verifying with next to nothing accepted).

Generation rates are the engines' own (eval_count / eval_duration for the
runner, ``timings.predicted_per_second`` for llama-server).  Every number is
the median (``--stat best``: the best) of ``--reps`` runs, the runner's off
and on runs taking turns.  Run on a machine shared with other work, say so
next to the numbers: the ratios within one run are what to compare.

    .venv/bin/python benchmarks/bench_spec.py --threads 2 --tokens 96 --reps 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_server import LlamaServer  # noqa: E402
from tiny_model import write_tiny_llama  # noqa: E402

from runner.engine import Engine, EngineConfig  # noqa: E402
from runner.models import default_model_path  # noqa: E402

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}

_CODE = '''def load_rows(path, limit=None):
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            if limit is not None and number >= limit:
                break
            fields = line.rstrip("\\n").split(",")
            rows.append({"name": fields[0], "count": int(fields[1]), "price": float(fields[2])})
    return rows


def total_price(rows):
    return sum(row["count"] * row["price"] for row in rows)
'''

_JSON = ('{"id": 4172, "name": "Grace Hopper", "email": "grace@example.org", "roles": ["admin", '
         '"reviewer"], "address": {"street": "12 Harbor Road", "city": "Arlington", "zip": "22201"}, '
         '"active": true, "last_login": "2026-11-30T08:15:00Z"}')

_SOURCE = ('The committee wrote: "The bridge will stay closed to heavy traffic until the spring '
           'inspection is complete." The mayor added: "Buses will use the north road, and the '
           'ferry will run every twenty minutes during the morning." Residents said: "We were '
           'told nothing about the ferry timetable before today."')


def chat(text: str) -> str:
    """The default model's ChatML turn for ``text``."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


TASKS = {
    "code edit": chat("Rename the function load_rows to read_rows everywhere in this code and "
                      f"return the whole code, nothing else:\n```python\n{_CODE}```"),
    "JSON rewrite": chat("Rewrite this JSON with the key \"email\" renamed to \"mail\"; keep "
                         f"everything else exactly. Reply with the JSON only.\n{_JSON}"),
    "summary with quotes": chat("Summarize this text, quoting each statement word for word:\n"
                                f"{_SOURCE}"),
}


def runner_stream(engine: Engine, prompt: str, tokens: int, speculative: bool) -> dict:
    options = {**GREEDY, "num_predict": tokens, "speculative": speculative}
    text, final = engine.complete(prompt, **options)
    rate = (final.eval_count - 1) / final.eval_duration if final.eval_duration > 0 else 0.0
    return {"rate": rate, "tokens": final.eval_count, "proposed": final.draft_proposed,
            "accepted": final.draft_accepted, "text": text}


def server_stream(server: LlamaServer, prompt: str, tokens: int) -> dict:
    body = {"prompt": prompt, "n_predict": tokens, "cache_prompt": True, **GREEDY}
    with server.post("/completion", body) as reply:
        result = json.loads(reply.read())
    t = result.get("timings", {})
    return {"rate": t.get("predicted_per_second", 0.0), "tokens": t.get("predicted_n", 0),
            "proposed": t.get("draft_n", 0), "accepted": t.get("draft_n_accepted", 0),
            "text": result.get("content", "")}


def pick(values: list[float], stat: str) -> float:
    """The median, or the best (on a machine others load, the run least disturbed)."""
    return max(values) if stat == "best" else statistics.median(values)


def pick_row(runs: list[dict], stat: str) -> dict:
    return {"rate": pick([r["rate"] for r in runs], stat), "tokens": runs[-1]["tokens"],
            "proposed": runs[-1]["proposed"], "accepted": runs[-1]["accepted"],
            "text": runs[-1]["text"]}


def aggregate(engine: Engine, b: int, tokens: int, speculative: bool) -> float:
    """Generated tokens per wall second with ``b`` streams at once."""
    prompts = [list(TASKS.values())[i % len(TASKS)] for i in range(b)]
    counts = [0] * b

    def one(i: int) -> None:
        counts[i] = engine.complete(prompts[i], **GREEDY, num_predict=tokens,
                                    speculative=speculative, ignore_eos=True)[1].eval_count

    threads = [threading.Thread(target=one, args=(i,)) for i in range(b)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict:
    model = args.model or str(default_model_path())
    results: dict = {"single": {}, "aggregate": {}}
    engine = Engine(EngineConfig(model, n_ctx=1024 * max(args.batches), parallel=max(args.batches),
                                 n_threads=args.threads))
    try:
        for name, prompt in TASKS.items():
            engine.complete(prompt, **GREEDY, num_predict=1)  # the prompt cached for every run
            runs = {False: [], True: []}
            for _ in range(args.reps):  # off and on take turns: a burst of load hits both
                for spec in (False, True):
                    runs[spec].append(runner_stream(engine, prompt, args.tokens, spec))
            for spec in (False, True):
                results["single"].setdefault(name, {})["runner " + ("on" if spec else "off")] = \
                    pick_row(runs[spec], args.stat)
        for b in args.batches:
            rates = {False: [], True: []}
            for _ in range(args.reps):
                for spec in (False, True):
                    rates[spec].append(aggregate(engine, b, args.tokens, spec))
            results["aggregate"][b] = {"on" if spec else "off": pick(rates[spec], args.stat)
                                       for spec in (False, True)}
    finally:
        engine.close()
    if not args.no_draft:
        draft = str(write_tiny_llama())
        engine = Engine(EngineConfig(model, n_ctx=2048, parallel=1, n_threads=args.threads,
                                     draft_model=draft))
        try:
            for name, prompt in TASKS.items():
                engine.complete(prompt, **GREEDY, num_predict=1)
                runs = [runner_stream(engine, prompt, args.tokens, True) for _ in range(args.reps)]
                results["single"][name]["tiny draft"] = pick_row(runs, args.stat)
        finally:
            engine.close()
    if not args.no_server:
        common = ["-m", model, "-c", "2048", "-t", str(args.threads), "-tb", str(args.threads),
                  "-np", "1", "-fa", "auto"]
        for label, extra in (("server off", []), ("server on", shlex.split(args.server_spec))):
            server = LlamaServer(common + extra)
            try:
                for name, prompt in TASKS.items():
                    server_stream(server, prompt, 1)
                    runs = [server_stream(server, prompt, args.tokens) for _ in range(args.reps)]
                    results["single"][name][label] = pick_row(runs, args.stat)
            finally:
                server.close()
    return results


def report(results: dict, args: argparse.Namespace) -> str:
    lines = [f"default model, {args.threads} threads, greedy, up to {args.tokens} tokens, "
             f"{args.stat} of {args.reps}; llama-server speculation: {args.server_spec}", ""]
    head = f"{'task':22} {'side':12} {'tok/s':>8} {'x off':>7} {'tokens':>7} {'proposed':>9} {'accepted':>9}"
    lines.append(head)
    for name, sides in results["single"].items():
        for label, row in sides.items():
            base = sides["server off" if label.startswith("server") else "runner off"]["rate"]
            ratio = row["rate"] / base if base else 0.0
            lines.append(f"{name:22} {label:12} {row['rate']:8.1f} {ratio:7.2f} {row['tokens']:7d} "
                         f"{row['proposed']:9d} {row['accepted']:9d}")
        same = [r["text"] for label, r in sides.items() if label.startswith("runner")]
        lines.append(f"{'':22} runner text identical on/off: {len(set(same)) == 1}")
    lines += ["", f"{'streams':>8} {'off tok/s':>10} {'on tok/s':>10} {'on/off':>7}"]
    for b, row in results["aggregate"].items():
        lines.append(f"{b:8d} {row['off']:10.1f} {row['on']:10.1f} {row['on'] / row['off']:7.2f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=96, help="tokens per answer at most")
    p.add_argument("--reps", type=int, default=2, help="runs per number")
    p.add_argument("--stat", choices=["median", "best"], default="median",
                   help="the number of the reps: their median, or the best (a loaded machine)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="streams for the aggregate")
    p.add_argument("--server-spec", default="--spec-type ngram-simple --spec-ngram-simple-size-n 4 "
                                            "--spec-ngram-simple-size-m 16",
                   help="llama-server's speculative flags")
    p.add_argument("--no-server", action="store_true", help="skip llama-server")
    p.add_argument("--no-draft", action="store_true", help="skip the draft model case")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = run(args)
    print(json.dumps(results, indent=1) if args.json else report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
