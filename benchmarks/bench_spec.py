"""Speculative decoding by prompt lookup (issue 21), beside llama-server's own.

Tasks on the default model, greedy (temperature 0, no repeat penalty), each
answer up to ``--tokens`` tokens.  Three whose answer repeats its input:

* code edit: rename a function in a short module; the answer starts with the
  code fence, as editing clients prompt it (the 135M model then copies the
  code, without making the rename);
* JSON rewrite: rename a key of a one-line record (the model pretty-prints
  it, so it copies the record in pieces of 3 to 15 tokens);
* summary with quotes: quote three statements word for word;

and one control whose answer does not: the code edit's request without the
fence, which the model answers with prose about the code (it copies one
short function of it).  Reported:

* single stream: generation tokens/s of the runner (in process, one request
  at a time) without and with ``speculative``, and of llama-server without
  and with its n-gram speculation (``--server-spec``, by default
  ngram-simple with a 4-token lookup and 16-token drafts, the closest to the
  runner's lookup), on the same prompts; per row the tokens, the tokens
  proposed and accepted, and the decodes (tokens less accepted: each decode
  yields one token and the proposals it confirmed);
* aggregate: B = 1, 4, 8 streams at once (the tasks in turn, generating past
  their answer), generated tokens per wall second of the runner without and
  with speculation;
* draft model: the single-stream case again with a draft model instead of
  prompt lookup: the tiny random-weight model of benchmarks/tiny_model.py
  (the default vocabulary; it proposes noise, so this measures the cost of
  drafting and verifying with next to nothing accepted), against requests
  without ``speculative`` on the same engine ("draft off"), taking turns.

Generation rates are the engines' own (eval_count / eval_duration for the
runner, ``timings.predicted_per_second`` for llama-server).  Both servers
run beside the runner for the whole run, idle between their requests, and
every round runs each side once, in an order that rotates from round to
round, so a burst of load from other work lands on all sides alike.  Every
number is the median (``--stat best``: the best) of ``--reps`` rounds.  Run
on a machine shared with other work, say so next to the numbers: the
ratios within one run are what to compare.

    .venv/bin/python benchmarks/bench_spec.py --threads 2 --tokens 96 --reps 3
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

from runner.engine.core import Engine, EngineConfig  # noqa: E402
from runner.model.models import default_model_path  # noqa: E402

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


_CODE_ASK = ("Rename the function load_rows to read_rows everywhere in this code and return the "
             f"whole code, nothing else:\n```python\n{_CODE}```")

TASKS = {
    "code edit": chat(_CODE_ASK) + "```python\n",
    "JSON rewrite": chat("Rewrite this JSON with the key \"email\" renamed to \"mail\"; keep "
                         f"everything else exactly. Reply with the JSON only.\n{_JSON}"),
    "summary with quotes": chat("Summarize this text, quoting each statement word for word:\n"
                                f"{_SOURCE}"),
    "control: prose": chat(_CODE_ASK),
}


def runner_stream(engine: Engine, prompt: str, tokens: int, speculative: bool) -> dict:
    """One request alone on ``engine``; with its rows per decode after the
    first (the prompt's), read from the engine's step records."""
    options = {**GREEDY, "num_predict": tokens, "speculative": speculative}
    engine.timings.clear()
    text, final = engine.complete(prompt, **options)
    rate = (final.eval_count - 1) / final.eval_duration if final.eval_duration > 0 else 0.0
    rows = [s.n_tokens for s in list(engine.timings)[1:] if s.n_generating]
    return {"rate": rate, "tokens": final.eval_count, "proposed": final.draft_proposed,
            "accepted": final.draft_accepted, "text": text, "rows": rows}


def estimate(row: dict, cost: dict[int, float]) -> float:
    """Speed-up over one token per decode that the decodes' row counts give
    with ``cost`` (rows -> cost of a decode of that many rows, one row = 1;
    bench_verify.py measures it): generated tokens after the first over what
    their decodes cost."""
    rows = row.get("rows") or []
    if not rows or not cost:
        return 0.0
    top = max(cost)
    spent = sum(cost.get(n, cost[top] * n / top) for n in rows)
    return (row["tokens"] - 1) / spent if spent else 0.0


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
            "text": runs[-1]["text"], "rows": runs[-1].get("rows")}


def aggregate(engine: Engine, b: int, tokens: int, speculative: bool) -> dict:
    """Generated tokens per wall second with ``b`` streams at once, the
    decodes it took (the engine's steps) and the tokens proposed and accepted."""
    prompts = [list(TASKS.values())[i % len(TASKS)] for i in range(b)]
    finals = [None] * b

    def one(i: int) -> None:
        finals[i] = engine.complete(prompts[i], **GREEDY, num_predict=tokens,
                                    speculative=speculative, ignore_eos=True)[1]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(b)]
    engine.timings.clear()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"rate": sum(f.eval_count for f in finals) / wall, "decodes": len(engine.timings),
            "proposed": sum(f.draft_proposed for f in finals),
            "accepted": sum(f.draft_accepted for f in finals)}


def run(args: argparse.Namespace) -> dict:
    model = args.model or str(default_model_path())
    results: dict = {"single": {}, "aggregate": {}}
    servers: dict[str, LlamaServer] = {}
    engine = Engine(EngineConfig(model, n_ctx=1024 * max(args.batches), parallel=max(args.batches),
                                 n_threads=args.threads))
    try:
        if not args.no_server:
            common = ["-m", model, "-c", "2048", "-t", str(args.threads), "-tb", str(args.threads),
                      "-np", "1", "-fa", "auto"]
            for label, extra in (("server off", []), ("server on", shlex.split(args.server_spec))):
                servers[label] = LlamaServer(common + extra)
        sides = {"runner off": lambda p: runner_stream(engine, p, args.tokens, False),
                 "runner on": lambda p: runner_stream(engine, p, args.tokens, True)}
        for label, server in servers.items():
            sides[label] = lambda p, server=server: server_stream(server, p, args.tokens)
        names = list(sides)
        for name, prompt in TASKS.items():
            engine.complete(prompt, **GREEDY, num_predict=1)  # the prompt cached for every run
            for server in servers.values():
                server_stream(server, prompt, 1)
            runs: dict[str, list] = {label: [] for label in names}
            for r in range(args.reps):  # every side once per round, the order rotating
                for label in names[r % len(names):] + names[:r % len(names)]:
                    runs[label].append(sides[label](prompt))
            results["single"][name] = {label: pick_row(runs[label], args.stat) for label in names}
        for server in servers.values():
            server.close()
        servers.clear()
        for b in args.batches:
            runs = {False: [], True: []}
            for r in range(args.reps):
                for spec in ((False, True) if r % 2 == 0 else (True, False)):
                    runs[spec].append(aggregate(engine, b, args.tokens, spec))
            results["aggregate"][b] = {
                "off": pick([a["rate"] for a in runs[False]], args.stat),
                "on": pick([a["rate"] for a in runs[True]], args.stat),
                "decodes off": runs[False][-1]["decodes"], "decodes on": runs[True][-1]["decodes"],
                "proposed": runs[True][-1]["proposed"], "accepted": runs[True][-1]["accepted"]}
    finally:
        for server in servers.values():
            server.close()
        engine.close()
    if not args.no_draft:
        draft = str(write_tiny_llama())
        engine = Engine(EngineConfig(model, n_ctx=2048, parallel=1, n_threads=args.threads,
                                     draft_model=draft))
        try:
            for name, prompt in TASKS.items():
                engine.complete(prompt, **GREEDY, num_predict=1)
                runs = {False: [], True: []}
                for r in range(args.reps):  # its own baseline, taking turns with it
                    for spec in ((False, True) if r % 2 == 0 else (True, False)):
                        runs[spec].append(runner_stream(engine, prompt, args.tokens, spec))
                results["single"][name]["draft off"] = pick_row(runs[False], args.stat)
                results["single"][name]["tiny draft"] = pick_row(runs[True], args.stat)
        finally:
            engine.close()
    return results


def load_cost(path: str | None) -> dict[int, float]:
    """Rows -> relative decode cost from a ``bench_verify.py --json`` file
    (the CPU time's median where measured, else the wall clock's)."""
    if not path:
        return {}
    out = json.loads(Path(path).read_text())
    clock = out["cpu"] if out.get("cpu") else out["wall"]
    return {int(n): r for n, r in clock["median"]["ratio"].items()}


def report(results: dict, args: argparse.Namespace) -> str:
    cost = load_cost(args.cost)
    lines = [f"default model, {args.threads} threads, greedy, up to {args.tokens} tokens, "
             f"{args.stat} of {args.reps}; llama-server speculation: {args.server_spec}"]
    if cost:
        lines.append(f"est x: the runner's decodes (rows each) costed with {args.cost}")
    lines.append("")
    head = (f"{'task':22} {'side':12} {'tok/s':>8} {'x off':>7} {'tokens':>7} {'proposed':>9} "
            f"{'accepted':>9} {'decodes':>8}" + (f" {'est x':>6}" if cost else ""))
    lines.append(head)
    for name, sides in results["single"].items():
        for label, row in sides.items():
            base = sides["server off" if label.startswith("server") else
                         "draft off" if label in ("draft off", "tiny draft") else "runner off"]["rate"]
            ratio = row["rate"] / base if base else 0.0
            line = (f"{name:22} {label:12} {row['rate']:8.1f} {ratio:7.2f} {row['tokens']:7d} "
                    f"{row['proposed']:9d} {row['accepted']:9d} "
                    f"{row['tokens'] - row['accepted']:8d}")
            if cost and label.startswith("runner"):
                line += f" {estimate(row, cost):6.2f}"
            lines.append(line)
        same = [r["text"] for label, r in sides.items() if label.startswith("runner")]
        lines.append(f"{'':22} runner text identical on/off: {len(set(same)) == 1}")
    lines += ["", f"{'streams':>8} {'off tok/s':>10} {'on tok/s':>10} {'on/off':>7} "
                  f"{'decodes off':>12} {'decodes on':>11} {'proposed':>9} {'accepted':>9}"]
    for b, row in results["aggregate"].items():
        lines.append(f"{b:8d} {row['off']:10.1f} {row['on']:10.1f} {row['on'] / row['off']:7.2f} "
                     f"{row['decodes off']:12d} {row['decodes on']:11d} {row['proposed']:9d} "
                     f"{row['accepted']:9d}")
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
    p.add_argument("--cost", default=None, metavar="JSON",
                   help="bench_verify.py --json output: adds the speed-up the runner's decode "
                        "counts give at that cost per decode (a number the machine's load does not move)")
    p.add_argument("--no-server", action="store_true", help="skip llama-server")
    p.add_argument("--no-draft", action="store_true", help="skip the draft model case")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = run(args)
    print(json.dumps(results, indent=1) if args.json else report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
