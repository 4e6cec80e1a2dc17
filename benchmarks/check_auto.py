"""Check ``n_gpu_layers: "auto"`` on this machine's devices: the placement it
chooses, what llama.cpp then allocates on each device, and the throughput.

    python benchmarks/check_auto.py [--model default] [--ctx 4096] [--parallel 4]
                                    [--pretend-free-gib CUDA0=4] [--tokens 128] [--json out.json]

``--pretend-free-gib NAME=GIB`` makes the placement see that much free memory
on a device (a partial offload of a small model on a large GPU); the load then
uses the layer count and split it chose.  Without it the engine places the
model itself and the script checks it chose what the estimate chose.  This is
the GPU check of docs/design.md ("Placement"); on a machine without a GPU it
shows the CPU placement.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner import _llama  # noqa: E402
from runner.engine.core import Engine, EngineConfig  # noqa: E402
from runner.engine.requests import CompletionOptions, CompletionRequest  # noqa: E402
from runner.model import placement  # noqa: E402
from runner.model.gguf import read_gguf  # noqa: E402
from runner.model.models import resolve_model  # noqa: E402

# "load_tensors: CUDA0 model buffer size = ..." / "llama_kv_cache: CUDA0 KV buffer size = ..."
BUFFER = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")


class _Lines(logging.Handler):
    """Keeps llama.cpp's log lines (runner.llama) while the model loads."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []  # messages in order

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _allocated(lines: list[str]) -> dict[str, dict[str, float]]:
    """MiB per buffer kind, per buffer type as llama.cpp names it (CUDA0, CPU_Mapped, CUDA_Host, ...)."""
    out: dict[str, dict[str, float]] = {}
    for line in lines:
        m = BUFFER.search(line)
        if m:
            kinds = out.setdefault(m.group(1), {})
            kinds[m.group(2)] = kinds.get(m.group(2), 0.0) + float(m.group(3))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--pretend-free-gib", action="append", default=[], metavar="NAME=GIB")
    ap.add_argument("--json", default=None, help="write the report here too")
    args = ap.parse_args()

    _llama.backend_init()
    config = EngineConfig(str(resolve_model(args.model)), n_ctx=args.ctx, parallel=args.parallel,
                          n_threads=args.threads)
    discovered = _llama.devices()
    for item in args.pretend_free_gib:
        name, gib = item.split("=")
        for d in discovered:
            if d["name"] == name:
                d["free"] = int(float(gib) * 2**30)
    devices = placement.devices_for(config, discovered, placement.host_available())
    chosen = placement.place(config, read_gguf(config.model_path, max_array_size=0), devices)
    print(chosen.plan.table() if chosen.plan is not None else chosen.note)
    if args.pretend_free_gib:
        config.n_gpu_layers, config.tensor_split = chosen.n_gpu_layers, chosen.tensor_split

    lines = _Lines()
    llama_log = logging.getLogger("runner.llama")
    llama_log.addHandler(lines)
    llama_log.setLevel(logging.INFO)
    _llama.set_log_level(logging.INFO)
    try:
        engine = Engine(config)
    finally:
        _llama.set_log_level(logging.WARNING)
        llama_log.removeHandler(lines)
    with engine:
        same = (engine.placement.n_gpu_layers, engine.placement.tensor_split) == (
            chosen.n_gpu_layers, chosen.tensor_split)
        options = CompletionOptions.from_dict({"num_predict": args.tokens, "temperature": 0.0,
                                               "ignore_eos": True})
        t0 = time.perf_counter()
        streams = [engine.submit(CompletionRequest(prompt=f"Story {i}:", options=options))
                   for i in range(args.parallel)]
        finals = [s.result()[1] for s in streams]
        wall = time.perf_counter() - t0
    report = {
        "model": config.model_path, "n_ctx": args.ctx, "parallel": args.parallel,
        "pretend_free_gib": args.pretend_free_gib,
        "placement": chosen.to_dict(), "engine_chose_the_same": same,
        "allocated_mib": _allocated(lines.lines),
        "tokens_per_s": round(sum(f.eval_count for f in finals) / wall, 2),
        "per_stream_tokens_per_s": [round(f.eval_count / f.eval_duration, 2) for f in finals if f.eval_duration],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "placement"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if same or args.pretend_free_gib else 1


if __name__ == "__main__":
    sys.exit(main())
