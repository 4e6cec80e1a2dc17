"""How long save_slot and restore_slot hold the engine loop (other sequences wait).

One in-process Engine (default model, ``--threads`` threads, 2 slots, slot
files in a temporary directory): a ``--prefix``-token prompt is evaluated
into a slot, then ``--repeat`` times the slot is saved to a file and that
file restored over it (the restore first copies what the slot holds, to put
it back if the memory refused the file).  Per op: the loop's time
(``loop_seconds``: the state copies, and the restore's ``state_set``) and
the whole call (file I/O, checksum, buffers), minimum / median / maximum.

``--root DIR`` imports ``runner`` from another checkout (built in place),
so that two versions can be measured on the same machine, taking turns::

    .venv/bin/python benchmarks/bench_slot_save.py --root /work/main
    .venv/bin/python benchmarks/bench_slot_save.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path


def spread(values: list[float]) -> dict:
    return {"min_ms": round(min(values) * 1e3, 2), "median_ms": round(statistics.median(values) * 1e3, 2),
            "max_ms": round(max(values) * 1e3, 2)}


def measure(args: argparse.Namespace) -> dict:
    from runner.bench.harness import filler_text
    from runner.engine.core import Engine, EngineConfig
    from runner.engine.requests import CompletionOptions, CompletionRequest
    from runner.model.models import resolve_model

    model = str(resolve_model(args.model or "default"))
    with tempfile.TemporaryDirectory() as d:
        config = EngineConfig(model, n_ctx=2 * (args.prefix + 512), parallel=2,
                              n_threads=args.threads, cache_ram_mb=args.cache_ram_mb,
                              slot_save_dir=d)
        with Engine(config) as engine:
            tokens = engine.tokenize(filler_text(7, args.prefix), add_special=True)[:args.prefix]
            options = CompletionOptions.from_dict({"temperature": 0.0, "num_predict": 1})
            final = list(engine.submit(CompletionRequest(prompt=tokens, options=options)))[-1]
            saves, save_calls, restores, restore_calls = [], [], [], []
            n_bytes = 0
            for _ in range(args.repeat):
                saved = engine.save_slot(final.slot, "s")
                saves.append(saved.loop_seconds)
                save_calls.append(saved.seconds)
                n_bytes = saved.n_bytes
                restored = engine.restore_slot(final.slot, "s")
                restores.append(restored.loop_seconds)
                restore_calls.append(restored.seconds)
            copies = dict(getattr(engine, "slot_copies", {}))
    return {"runner": str(Path(sys.modules["runner"].__file__).parent), "n_inputs": saved.n_inputs,
            "file_bytes": n_bytes, "repeat": args.repeat, "cache_ram_mb": args.cache_ram_mb,
            "save_loop": spread(saves), "save_call": spread(save_calls),
            "restore_loop": spread(restores), "restore_call": spread(restore_calls),
            "slot_copies": copies}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=2000, help="tokens in the saved slot")
    ap.add_argument("--repeat", type=int, default=9, help="saves and restores")
    ap.add_argument("--cache-ram-mb", type=int, default=256, help="host tier bound (0: off)")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent),
                    help="checkout to import runner from (default: this one)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(args.root).resolve()))
    result = measure(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
