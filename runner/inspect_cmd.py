"""``llama-runner inspect MODEL``: summarise a GGUF file and what loading it would take, without loading it.

Its load flags are ``serve``'s (the same parser code, the same defaults),
turned into the same load settings, and the estimate is the ``estimate`` op's
(runner/model/placement.py): inspect answers for this machine's devices what that
op answers for the runner's.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import msgspec

from runner.engine.requests import BadRequest
from runner.model.gguf import GGUFError, GGUFFile, read_gguf

# Arrays longer than this (vocabularies, merges) are skipped: inspect only needs their lengths.
_MAX_ARRAY_SIZE = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``inspect`` arguments to ``parser``: the model, serve's load flags, --json."""
    from runner.cli import _add_context_args, _add_load_args

    parser.add_argument("model", metavar="MODEL", help='path to a GGUF file, or "default" for the default model')
    _add_context_args(parser)
    _add_load_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    """Print the summary; returns the process exit status."""
    from runner import _llama
    from runner.cli import _load_params
    from runner.model.placement import config_from_load, devices_for, estimate_report, host_available, report_dict
    from runner.process import protocol as P

    try:
        path = args.model
        if path == "default":
            from runner.model.models import default_model_path

            path = str(default_model_path())
        try:
            load = msgspec.convert({"id": 0, **_load_params(args)}, P.Load)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid load parameters: {exc}") from None
        config = config_from_load(path, load)
        info = read_gguf(path, max_array_size=_MAX_ARRAY_SIZE)
        projector = read_gguf(config.projector_path, max_array_size=_MAX_ARRAY_SIZE) if config.projector_path else None
        _llama.backend_init()
        devices = devices_for(config, _llama.devices(), host_available())
        mem, placed = estimate_report(config, info, devices, projector)
        summary = _summary(info)
        report = report_dict(info, mem, placed)
    except (OSError, GGUFError, ValueError, BadRequest) as exc:
        print(f"llama-runner inspect: {exc}", file=sys.stderr)
        return 1

    if args.json:
        print(json.dumps({**summary, **report}, indent=2))
        return 0
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    print()
    print(mem.table())
    if placed.plan is not None:
        print()
        print(placed.plan.table())
    if placed.problem:
        print(f"refused: {placed.problem}")
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
