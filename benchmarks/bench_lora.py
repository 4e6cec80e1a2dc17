"""What switching LoRA adapter sets costs a decode.

llama.cpp applies adapters to a whole context; changing the set
(``llama_set_adapters_lora``) makes the next decode reserve its compute graph
again.  This times one generation-sized decode (``--seqs`` tokens, one per
sequence) on a context with two random adapters (tests/lora_models.py):
always under the same set, and switching sets before every decode.  The
difference is the price of one switch, which the scheduler's LoRA turns
(runner.engine.scheduler, ``LORA_TURN_STEPS``) amortise.

    python benchmarks/bench_lora.py [--model PATH] [--steps 40] [--seqs 4]

Prints medians in milliseconds.  A measurement, not a test: on a loaded
machine the numbers move; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lora_models import write_lora  # noqa: E402

from runner import _llama  # noqa: E402
from runner.model.models import default_model_path  # noqa: E402


def run(model_path: str, steps: int, seqs: int, threads: int) -> dict:
    _llama.backend_init()
    with tempfile.TemporaryDirectory() as d:
        a = write_lora(model_path, Path(d) / "a.gguf", seed=1)
        b = write_lora(model_path, Path(d) / "b.gguf", seed=2)
        model = _llama.Model(model_path)
        ctx = _llama.Context(model, n_ctx=256 * seqs, n_batch=64, n_seq_max=seqs, n_threads=threads)
        adapters = [_llama.LoraAdapter(model, a), _llama.LoraAdapter(model, b)]
        batch = _llama.Batch(64)
        sets = [[(adapters[0], 1.0)], [(adapters[1], 1.0)]]
        out = {}
        try:
            for mode in ("same", "switch", "same"):
                times = []
                ctx.clear()
                ctx.set_loras(sets[0])
                for step in range(steps):
                    if mode == "switch":
                        ctx.set_loras(sets[step % 2])
                    batch.clear()
                    for s in range(seqs):
                        batch.add(1 + s, step, s, True)
                    t0 = time.perf_counter()
                    ctx.decode(batch)
                    times.append(time.perf_counter() - t0)
                out.setdefault(mode, []).append(statistics.median(times[2:]) * 1000)
        finally:
            batch.close()
            ctx.close()
            for x in adapters:
                x.close()
            model.close()
    return {"same_ms": min(out["same"]), "switch_ms": out["switch"][0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="llama-architecture GGUF (default: the default model)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = args.model or str(default_model_path())
    r = run(path, args.steps, args.seqs, args.threads)
    print(f"model {Path(path).name}, {args.seqs} sequences, {args.threads} threads")
    print(f"decode, same set:        {r['same_ms']:.3f} ms")
    print(f"decode after a switch:   {r['switch_ms']:.3f} ms")
    print(f"one switch costs:        {r['switch_ms'] - r['same_ms']:.3f} ms "
          f"({r['switch_ms'] / r['same_ms']:.2f}x a decode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
