"""What a pool's model needs and where it would go: the runner's own memory
estimate (runner/model/memory.py, no load needed) against ``discover``'s devices.

The pool fits totals: a model offloaded to GPUs needs its full-offload GPU
bytes (weights except the CPU-resident input, KV cache, compute graph,
projector) from the GPUs' free memory; a model on the CPU needs all of its
weights, KV cache, CPU graph, projector and the prefix cache's host tier at
its bound.  How layers then split across devices is the runner's own
placement; the pool only decides whether the model fits beside the others.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from runner.model.gguf import read_gguf
from runner.model.memory import LoadOptions, estimate
from runner.process import protocol as P
from runner.process.pool_policy import Room

_MAX_ARRAY_SIZE = 4096  # vocabularies are skipped: only their lengths count


def load_message(params: Mapping[str, Any]) -> P.Load:
    """The ``load`` request the pool will send, checked as the runner checks it
    (a bad field raises ``msgspec.ValidationError`` naming it)."""
    return msgspec.convert({"id": 0, **params}, P.Load)


def offloads(devices: Sequence[Mapping[str, Any]], load: P.Load) -> bool:
    """Whether the runner will put the model on GPUs."""
    return load.n_gpu_layers != 0 and bool(_gpus(_usable(devices, load)))


def room(devices: Sequence[Mapping[str, Any]], load: P.Load) -> Room:
    """Free and total memory where the model would go: its GPUs when it is
    offloaded, else the CPU (``devices`` as ``discover`` lists them)."""
    usable = _usable(devices, load)
    chosen = _gpus(usable) if offloads(devices, load) else [d for d in usable if d["type"] == "cpu"]
    if not chosen:
        return Room(0, 0, "no known device")
    return Room(free=sum(int(d["free"]) for d in chosen), total=sum(int(d["total"]) for d in chosen),
                where="+".join(str(d["name"]) for d in chosen))


def footprint(path: str, load: P.Load, on_gpu: bool) -> int:
    """Bytes the model takes where it goes (see the module doc)."""
    info = read_gguf(path, max_array_size=_MAX_ARRAY_SIZE)
    projector = (read_gguf(load.projector_path, max_array_size=_MAX_ARRAY_SIZE)
                 if load.projector_path else None)
    total_ctx = load.n_ctx or info.context_length
    # serve's meaning: n_ctx is the whole context, split across the slots
    options = LoadOptions(
        n_ctx=max(total_ctx // load.parallel, 1), parallel=load.parallel, kv_unified=load.kv_unified,
        kv_type=load.type_k, n_batch=load.n_batch, flash_attention=load.flash_attn == "on",
        projector=projector, cache_ram=load.cache_ram_mb << 20, swa_full=load.swa_full)
    mem = estimate(info, options)
    if on_gpu:
        return mem.full_offload
    w = mem.weights
    projector_bytes = mem.projector.total if mem.projector is not None else 0
    media = load.media_cache_bytes if projector is not None else 0
    return (w.input + sum(w.layers) + w.output + mem.kv.total + max(mem.graph.cpu, mem.graph.full)
            + projector_bytes + media + mem.host_cache)


def discover_here(timeout: float = 60.0) -> list[dict[str, Any]]:
    """``llama-runner discover --json`` in a child process: the devices, without
    initialising any backend (a GPU context) in this process."""
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "discover", "--json"],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-runner discover failed ({proc.returncode}): {proc.stderr[-500:]}")
    return json.loads(proc.stdout)


def _usable(devices: Sequence[Mapping[str, Any]], load: P.Load) -> list[Mapping[str, Any]]:
    return [d for d in devices if load.devices is None or d["name"] in load.devices]


def _gpus(devices: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [d for d in devices if d["type"] in ("gpu", "igpu")]
