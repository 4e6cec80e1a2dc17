"""``llama-runner inspect MODEL``: summarise a GGUF file and its memory needs without loading it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from runner.gguf import GGUFError, GGUFFile, read_gguf
from runner.memory import KV_CACHE_TYPES, LoadOptions, MemoryEstimate, estimate

# Arrays longer than this (vocabularies, merges) are skipped: inspect only needs their lengths.
_MAX_ARRAY_SIZE = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``inspect`` arguments to ``parser``."""
    parser.add_argument("model", metavar="MODEL", help='path to a GGUF file, or "default" for the default model')
    parser.add_argument("--ctx", type=int, default=0, metavar="N",
                        help="total context, split evenly across the --parallel slots, as serve --ctx "
                             "(default 0: the model's training context)")
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="sequences decoded in parallel")
    parser.add_argument("--kv-unified", action="store_true",
                        help="one KV buffer shared by all slots, as serve --kv-unified (default: one stream each)")
    parser.add_argument("--kv-type", default="f16", choices=KV_CACHE_TYPES, help="KV cache type")
    parser.add_argument("--flash-attention", action="store_true", help="estimate with flash attention on")
    parser.add_argument("--mmproj", metavar="PATH", help="multimodal projector to include in the estimate")
    parser.add_argument("--swa-full", action="store_true", help="full-size cache for sliding-window layers")
    parser.add_argument("--cache-ram-mb", type=int, default=256, metavar="MIB",
                        help="host tier of the prefix cache, as serve --cache-ram-mb (0: off)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    """Print the summary; returns the process exit status."""
    try:
        if args.ctx < 0:
            raise ValueError(f"--ctx must be >= 0 (0: the model's context), not {args.ctx}")
        if args.parallel < 1:
            raise ValueError(f"--parallel must be >= 1, not {args.parallel}")
        if args.cache_ram_mb < 0:
            raise ValueError(f"--cache-ram-mb must be >= 0 (0: off), not {args.cache_ram_mb}")
        path = args.model
        if path == "default":
            from runner.models import default_model_path

            path = str(default_model_path())
        info = read_gguf(path, max_array_size=_MAX_ARRAY_SIZE)
        projector = read_gguf(args.mmproj, max_array_size=_MAX_ARRAY_SIZE) if args.mmproj else None
        # serve's meaning: --ctx is the whole context (0: the model's), split
        # across the slots; LoadOptions counts per sequence.
        total = args.ctx or info.context_length
        if total < args.parallel:
            raise ValueError(f"--ctx {total} is smaller than --parallel {args.parallel}")
        options = LoadOptions(
            n_ctx=total // args.parallel,
            parallel=args.parallel,
            kv_unified=args.kv_unified,
            kv_type=args.kv_type,
            flash_attention=args.flash_attention,
            projector=projector,
            cache_ram=args.cache_ram_mb << 20,
            swa_full=args.swa_full,
        )
        mem = estimate(info, options)
    except (OSError, GGUFError, ValueError) as exc:
        print(f"llama-runner inspect: {exc}", file=sys.stderr)
        return 1

    summary = _summary(info)
    if args.json:
        print(json.dumps({**summary, "memory": _memory_json(mem)}, indent=2))
        return 0
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    print()
    print(mem.table())
    return 0


def _summary(info: GGUFFile) -> dict[str, Any]:
    return {
        "path": info.path,
        "architecture": info.architecture,
        "name": info.name,
        "parameters": info.parameter_count,
        "quantization": info.file_type_name,
        "context_length": info.context_length,
        "layers": info.block_count,
        "tensors": len(info.tensors),
        "vocab_size": info.vocab_size,
        "gguf_version": info.version,
    }


def _memory_json(mem: MemoryEstimate) -> dict[str, Any]:
    kv = mem.kv
    return {
        "weights": {"layers": sum(mem.weights.layers), "output": mem.weights.output, "input": mem.weights.input},
        "kv_cache": {
            "type_k": kv.type_k,
            "type_v": kv.type_v,
            "n_ctx": kv.shape.n_ctx,
            "total": kv.total,
            "caches": [
                {"name": c.name, "cells": c.cells, "streams": c.streams, "layers": len(c.layers), "bytes": c.total}
                for c in kv.caches
            ],
        },
        "graph": {"full": mem.graph.full, "partial": mem.graph.partial, "formula": mem.graph.formula},
        "projector": mem.projector and {"weights": mem.projector.weights, "graph": mem.projector.graph},
        "full_offload": mem.full_offload,
        "host_cache": mem.host_cache,
        "note": mem.kv_note,
    }
