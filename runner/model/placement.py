"""Where a load puts the model: ``n_gpu_layers: "auto"`` and the ``estimate`` op.

One function, :func:`plan_for` (and :func:`place`, which refuses what does
not fit), turns a load's settings (an ``EngineConfig``),
the model's GGUF header and the devices ``discover`` reports into a
:class:`Placement`: the ``n_gpu_layers`` and ``tensor_split`` llama.cpp gets,
and the estimate (``runner.model.memory``) they came from.  The engine loads with
it, the ``estimate`` op and ``llama-runner inspect`` report it, so the three
agree by construction.

Policy (compare llama.cpp's ``common/fit.cpp``, see docs/design.md):

* ``auto`` offloads the most trailing layers (the output layer counts as the
  last) whose weights, KV cache and compute buffer fit every GPU's free
  memory less a headroom (``memory.gpu_reserve``: 384 MiB + 3 % of the
  device), spread over the GPUs in proportion to their room, in whole layers,
  as llama.cpp's ``tensor_split`` places them.  With no GPU, or no room for a
  single layer, it is 0: the CPU.
* A count (-1 = all) is passed through as given; the plan reports a GPU it
  overfills, and llama.cpp judges.
* For any count, the host side (weights of the layers left on the CPU, their
  KV cache, the CPU compute and output buffers and the prefix cache's host
  tier) must fit the memory
  the host has available, or the load is refused saying what it needed and
  what was free.  llama.cpp's fit takes host memory as unlimited; a runner
  that swaps or is killed serves no one, so we check it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runner.engine import lora
from runner.engine.requests import BadRequest
from runner.model import memory
from runner.model.gguf import GGUFFile

log = logging.getLogger("runner.placement")

AUTO = "auto"


class NoRoom(BadRequest):
    """The load needs more memory than its devices have free."""


@dataclass(frozen=True)
class Placement:
    """What a load gives llama.cpp, and the estimate behind it."""

    auto: bool                          # the load asked for n_gpu_layers "auto"
    n_gpu_layers: int                   # llama.cpp's n_gpu_layers (-1: all)
    tensor_split: list[float] | None    # llama.cpp's tensor_split (whole layers per GPU), or the load's
    plan: memory.Plan | None            # the per-device estimate; None when the model could not be estimated
    note: str | None = None             # why there is no plan
    problem: str | None = None          # why the plan does not fit (the load is refused with it)

    def to_dict(self) -> dict[str, Any]:
        """The wire form (``estimate`` reply, ``info``'s ``engine.placement``, ``inspect --json``)."""
        out: dict[str, Any] = {"auto": self.auto, "n_gpu_layers": self.n_gpu_layers,
                               "tensor_split": self.tensor_split}
        if self.plan is None:
            return {**out, "n_layer": None, "fits": None, "problem": None, "flash_attention": None,
                    "notes": [self.note] if self.note else [], "devices": []}
        plan = self.plan
        return {**out, "n_layer": plan.n_layer, "fits": plan.fits, "problem": self.problem,
                "flash_attention": plan.flash_attention, "notes": list(plan.notes),
                "devices": [_usage_dict(u) for u in plan.usage]}


def _usage_dict(u: memory.DeviceUsage) -> dict[str, Any]:
    return {"name": u.device.id, "type": u.device.type, "layers": list(u.layers), "output": u.output,
            "weights": u.weights, "kv": u.kv, "graph": u.graph, "projector": u.projector,
            "host_cache": u.host_cache, "outputs": u.outputs, "headroom": u.reserve, "needed": u.used + u.reserve,
            "free": u.device.free, "total": u.device.total, "fits": u.fits}


def flash_attention(config: Any, info: GGUFFile) -> bool:
    """Whether llama.cpp will run ``info`` with flash attention under ``config.flash_attn``.

    ``auto`` turns it on where the model supports it (llama.cpp checks that
    the device runs the flash-attention op; CPU, CUDA, Metal and Vulkan do).
    """
    if config.flash_attn == "off":
        return False
    return memory.supports_flash_attention(info)


def load_options(config: Any, info: GGUFFile, projector: GGUFFile | None = None) -> memory.LoadOptions:
    """The estimate's inputs for a load's settings (``EngineConfig`` or ``protocol.Load``): same meaning."""
    n_gpu = config.n_gpu_layers
    return memory.LoadOptions(
        n_ctx=config.n_ctx,
        parallel=config.parallel,
        kv_type=config.type_k,
        kv_type_v=config.type_v,
        n_batch=config.n_batch,
        flash_attention=flash_attention(config, info),
        n_gpu_layers=None if n_gpu == AUTO else int(n_gpu),
        kv_unified=config.kv_unified,
        swa_full=config.swa_full,
        projector=projector,
        cache_ram=config.cache_ram_mb << 20,
        embeddings=config.embeddings,
    )


def devices_for(config: Any, discovered: Iterable[Mapping[str, Any]],
                host_free: int | None = None) -> list[memory.Device]:
    """The devices llama.cpp will use for ``config`` (GPUs first, the CPU last),
    from ``discover``'s list: the load's ``devices`` by name, else the
    discrete GPUs (one per device id), else the integrated ones, as
    llama_model_load picks them; with ``main_gpu`` N, the N-th of those alone
    (split mode "none").  ``host_free`` replaces the CPU's free memory (ggml
    reports the whole RAM as free)."""
    found = list(discovered)
    cpu = next((d for d in found if d["type"] == "cpu"), None)
    wanted = config.devices
    if wanted:
        by_name = {d["name"]: d for d in found}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise BadRequest(f"unknown device {unknown[0]!r}; known devices: {sorted(by_name)}")
        gpus = [by_name[n] for n in wanted if by_name[n]["type"] in ("gpu", "igpu")]
    else:
        gpus, ids = [], set()
        for d in found:
            if d["type"] == "gpu" and not (d.get("device_id") and d["device_id"] in ids):
                gpus.append(d)
                ids.add(d.get("device_id"))
        if not gpus:
            gpus = [d for d in found if d["type"] == "igpu"]
    if config.main_gpu is not None and gpus:  # llama.cpp's split mode "none": that GPU alone
        if config.main_gpu >= len(gpus):
            raise BadRequest(f"main_gpu {config.main_gpu}: there are {len(gpus)} GPUs "
                             f"({', '.join(d['name'] for d in gpus)})")
        gpus = [gpus[config.main_gpu]]
    out = [memory.Device(d["name"], d.get("description") or d["name"], d["type"], int(d["free"]), int(d["total"]))
           for d in gpus]
    if cpu is not None:
        free = int(cpu["free"]) if host_free is None else host_free
        out.append(memory.Device(cpu["name"], cpu.get("description") or cpu["name"], "cpu", free, int(cpu["total"])))
    return out


def host_available() -> int | None:
    """Memory the host can give a new allocation (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def plan_for(config: Any, info: GGUFFile | None, devices: Sequence[memory.Device],
             projector: GGUFFile | None = None) -> Placement:
    """Decide ``n_gpu_layers`` and ``tensor_split`` for ``config`` on ``devices``;
    a plan that does not fit says why in ``problem`` (see :func:`place`).

    ``info`` None (a header the estimate cannot read) places without a plan:
    ``auto`` then means all layers where there is a GPU, else none.
    """
    auto = config.n_gpu_layers == AUTO
    if auto and config.tensor_split:
        raise BadRequest("tensor_split needs an explicit n_gpu_layers; with \"auto\" the runner splits")
    has_gpu = any(d.is_gpu for d in devices)
    if info is None:
        n_gpu = (-1 if has_gpu else 0) if auto else int(config.n_gpu_layers)
        return Placement(auto, n_gpu, config.tensor_split, None, "the model's memory could not be estimated")
    plan = memory.plan_layers(info, devices, load_options(config, info, projector))
    short = [u for u in plan.usage if not u.fits and (auto or not u.device.is_gpu)]
    problem = _no_room_message(plan, short) if short else None
    if auto:
        split = [float(n) for n in plan.tensor_split] if plan.n_gpu_layers and len(plan.tensor_split) > 1 else None
        return Placement(True, plan.n_gpu_layers, split, plan, problem=problem)
    return Placement(False, int(config.n_gpu_layers), config.tensor_split, plan, problem=problem)


def place(config: Any, info: GGUFFile | None, devices: Sequence[memory.Device],
          projector: GGUFFile | None = None) -> Placement:
    """:func:`plan_for`, refusing with :class:`NoRoom` a plan that does not
    fit: the host side for any load, a GPU only for ``auto`` (an explicit
    count that overfills a GPU is logged and left to llama.cpp)."""
    p = plan_for(config, info, devices, projector)
    if p.problem:
        raise NoRoom(p.problem)
    for u in p.plan.usage if p.plan is not None else ():
        if not u.fits:
            log.warning("n_gpu_layers %s: the estimate needs %s on %s, %s free", config.n_gpu_layers,
                        memory.format_bytes(u.used + u.reserve), u.device.id, memory.format_bytes(u.device.free))
    return p


def _no_room_message(plan: memory.Plan, short: Sequence[memory.DeviceUsage]) -> str:
    parts = []
    for u in short:
        what = [f"weights {memory.format_bytes(u.weights)}", f"KV cache {memory.format_bytes(u.kv)}",
                f"compute {memory.format_bytes(u.graph)}"]
        if u.projector:
            what.append(f"projector {memory.format_bytes(u.projector)}")
        if u.outputs:
            what.append(f"outputs {memory.format_bytes(u.outputs)}")
        if u.host_cache:
            what.append(f"host cache {memory.format_bytes(u.host_cache)}")
        if u.reserve:
            what.append(f"headroom {memory.format_bytes(u.reserve)}")
        parts.append(f"{u.device.id} needs {memory.format_bytes(u.used + u.reserve)} ({', '.join(what)}) "
                     f"but has {memory.format_bytes(u.device.free)} free")
    return (f"the model does not fit with n_gpu_layers {plan.n_gpu_layers} of {plan.n_layer + 1}: "
            + "; ".join(parts) + " (give a smaller n_ctx or parallel, a quantized KV cache, "
            "or a smaller cache_ram_mb)")


def place_load(config: Any) -> Placement:
    """:func:`place` for a load about to happen: the model's header, the
    devices ggml reports now and the host's available memory.  A load whose
    estimate does not fit is refused before llama.cpp touches memory (a
    2**30-token context once took 21 GB of RSS and 78 s to fail inside it),
    and so is one naming a LoRA adapter file llama.cpp could not use
    (:func:`runner.engine.lora.check_adapter_files`)."""
    from runner import _llama
    from runner.model.gguf import read_gguf

    _llama.backend_init()
    devices = devices_for(config, _llama.devices(), host_available())
    try:
        info = read_gguf(config.model_path, max_array_size=0)
        lora.check_adapter_files(config.lora_paths, info.architecture)
        proj = read_gguf(config.projector_path, max_array_size=0) if config.projector_path else None
        return place(config, info, devices, proj)
    except NoRoom as exc:
        if config.n_ctx:
            raise
        raise NoRoom(f"n_ctx 0 asks for the model's trained context of {info.context_length} tokens; "
                     f"{exc}") from None
    except BadRequest:
        raise
    except Exception:  # a header or architecture the estimate does not know: llama.cpp judges
        log.debug("no memory estimate for %s", config.model_path, exc_info=True)
        lora.check_adapter_files(config.lora_paths)  # unchecked if the header failed (no architecture)
        return place(config, None, devices)


def config_from_load(model_path: str, load: Any):
    """The ``EngineConfig`` of a validated ``protocol.Load`` (or ``Estimate``) for ``model_path``."""
    from runner.engine.core import EngineConfig

    fields = {name: getattr(load, name) for name in load.__struct_fields__ if name not in ("id", "v")}
    fields["lora_paths"] = tuple(fields["lora_paths"])
    return EngineConfig(model_path=model_path, **fields)


def memory_dict(mem: memory.MemoryEstimate) -> dict[str, Any]:
    """A device-independent estimate as plain data (bytes throughout)."""
    kv, shape = mem.kv, mem.kv.shape
    return {
        "weights": {"layers": sum(mem.weights.layers), "output": mem.weights.output, "input": mem.weights.input},
        "kv_cache": {
            "type_k": kv.type_k, "type_v": kv.type_v, "n_ctx": shape.n_ctx, "kv_size": shape.kv_size,
            "n_stream": shape.n_stream, "n_batch": shape.n_batch, "n_ubatch": shape.n_ubatch, "total": kv.total,
            "caches": [{"name": c.name, "cells": c.cells, "streams": c.streams, "layers": len(c.layers),
                        "bytes": c.total} for c in kv.caches],
        },
        "graph": {"full": mem.graph.full, "partial": mem.graph.partial, "cpu": mem.graph.cpu,
                  "formula": mem.graph.formula},
        "projector": mem.projector and {"weights": mem.projector.weights, "graph": mem.projector.graph},
        "full_offload": mem.full_offload,
        "host_cache": mem.host_cache,
        "note": mem.kv_note,
    }


def estimate_report(config: Any, info: GGUFFile, devices: Sequence[memory.Device],
                    projector: GGUFFile | None = None) -> tuple[memory.MemoryEstimate, Placement]:
    """The estimate of loading ``info`` with ``config`` and the placement
    :func:`place` would choose on ``devices`` (not raising: a plan that does
    not fit carries its ``problem``)."""
    return memory.estimate(info, load_options(config, info, projector)), plan_for(config, info, devices, projector)


def estimate_load(config: Any, discovered: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """What loading ``config`` would take and where it would go, without
    loading, as plain data: ``model``, ``memory`` (weights, KV cache, compute
    graph, host cache) and ``placement`` (per device, the layer placement
    :func:`place_load` would choose and the ``problem`` it would refuse the
    load with).  ``discovered`` defaults to the devices ggml reports now."""
    from runner.model.gguf import read_gguf

    if discovered is None:
        from runner import _llama

        _llama.backend_init()
        discovered = _llama.devices()
    devices = devices_for(config, discovered, host_available())
    info = read_gguf(config.model_path, max_array_size=0)
    proj = read_gguf(config.projector_path, max_array_size=0) if config.projector_path else None
    mem, p = estimate_report(config, info, devices, proj)
    return report_dict(info, mem, p)


def report_dict(info: GGUFFile, mem: memory.MemoryEstimate, p: Placement) -> dict[str, Any]:
    """The ``estimate`` reply's fields (also ``inspect --json``'s ``estimate``)."""
    return {"model": {"path": info.path, "architecture": info.architecture, "n_layer": info.block_count,
                      "n_ctx_train": info.context_length},
            "memory": memory_dict(mem), "placement": p.to_dict()}
