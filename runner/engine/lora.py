"""LoRA adapter sets: which of the loaded adapters a request runs under, and
at what scale.

Adapters are loaded once, at load (``lora_paths``), in order; adapter ``i``
is the ``i``-th path.  A request picks scales with the ``lora`` option, the
list llama-server's completion endpoint takes: ``[{"id": i, "scale": s},
...]``.  As in llama-server, an adapter the list leaves out runs at scale 0,
and a request without the option (or with an empty list) runs under the
load's default set: every adapter at scale 1.

An adapter set is written as a :data:`LoraKey`: one scale per loaded
adapter, in load order (``()`` when none are loaded).  Two requests can
share a decode only when their keys are equal (llama.cpp applies adapters
to the whole context, ``llama_set_adapters_lora``), and a slot's cached
prefix serves only a prompt of the same key; the scheduler and the slot
cache compare keys and nothing else.  llama.cpp leaves adapters at scale 0
out of the graph, so a key of zeros computes exactly what the base model
does.

:func:`check_adapter_files` refuses, before llama.cpp sees them, adapter
files it could not open or would refuse for their header, with a reason that
names the file (llama.cpp logs its reason and returns NULL).
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable

import numpy as np

from runner.engine.requests import BadRequest
from runner.model.gguf import GGUFError, read_gguf

__all__ = ["LoraKey", "SwitchCost", "check_adapter_files", "default_key", "describe", "resolve"]

LoraKey = tuple  # tuple[float, ...]: the scale of each loaded adapter, in load order


def _bad(problem: str) -> BadRequest:
    return BadRequest(f"invalid option lora: {problem}")


def check_adapter_files(paths: Iterable[str | os.PathLike[str]], architecture: str = "") -> None:
    """Raise BadRequest naming the first adapter file that is missing, not a
    regular file, unreadable, not a readable GGUF header, or not what
    llama_adapter_lora_init accepts in its header (src/llama-adapter.cpp):
    ``general.type`` "adapter", ``adapter.type`` "lora", and
    ``general.architecture`` equal to the model's (``architecture``; "" when
    the model's header could not be read: not compared).  Tensors that do
    not match the model are left to llama.cpp, which names them."""
    for path in paths:
        _check_adapter_file(os.fspath(path), architecture)


def _check_adapter_file(path: str, architecture: str) -> None:
    def refuse(problem: str) -> BadRequest:
        return BadRequest(f"LoRA adapter {path} {problem}")

    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise BadRequest(f"LoRA adapter not found: {path}") from None
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise refuse("is a directory, not a GGUF file")
    if not stat.S_ISREG(mode):  # a FIFO or device: reading it could block or never end
        raise refuse("is not a regular file")
    try:
        info = read_gguf(path, max_array_size=0)
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    except GGUFError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        raise refuse(f"is not a usable GGUF file: {reason}") from None
    try:
        kind = info.get_str("general.type", "")
        adapter = info.get_str("adapter.type", "")
        arch = info.architecture
    except GGUFError as exc:
        raise refuse(f"is not a LoRA adapter: {exc}") from None
    if kind != "adapter":
        what = f"general.type is {kind!r}" if kind else "it has no general.type"
        raise refuse(f"is not a LoRA adapter ({what}, not 'adapter')")
    if adapter != "lora":
        what = f"adapter.type is {adapter!r}" if adapter else "it has no adapter.type"
        raise refuse(f"is not a LoRA adapter ({what}, not 'lora')")
    if architecture and arch != architecture:
        raise refuse(f"is for architecture {arch!r}; the model's is {architecture!r}")


def default_key(n_adapters: int) -> LoraKey:
    """The load's default set: every loaded adapter at scale 1."""
    return (1.0,) * n_adapters


def resolve(value: list | None, n_adapters: int) -> LoraKey:
    """The key of a request's ``lora`` option (its shape checked by
    CompletionOptions.validate).
    An id that names no loaded adapter, or one given twice, is a bad request."""
    if not value:
        return default_key(n_adapters)
    scales = [0.0] * n_adapters
    seen = set()
    for entry in value:
        i = entry["id"]
        if not 0 <= i < n_adapters:
            loaded = f"ids 0..{n_adapters - 1}" if n_adapters else "none"
            raise _bad(f"no adapter with id {i} is loaded (loaded: {loaded})")
        if i in seen:
            raise _bad(f"adapter {i} is given twice")
        seen.add(i)
        # float32, as llama.cpp takes it; + 0.0 turns -0.0 into 0.0: one key per set
        scales[i] = float(np.float32(entry.get("scale", 0.0))) + 0.0
    return tuple(scales)


def describe(key: LoraKey) -> str:
    """A key as people read it: ``base`` or ``0:1, 1:0.5`` (zero scales left out)."""
    parts = [f"{i}:{s:g}" for i, s in enumerate(key) if s != 0.0]
    return ", ".join(parts) if parts else "base"


class SwitchCost:
    """What changing adapter sets costs, measured on the engine's own decodes,
    and the turn length (runner.engine.scheduler's ``lora_turn_steps``) that keeps
    that cost near ``overhead`` of a turn's decode time.

    A switch makes llama.cpp reserve its compute graph again in the next
    decode: a fixed cost that is small beside a slow decode and many times a
    fast one (benchmarks/bench_lora.py; docs/design.md, "LoRA").  The
    measure compares generation-only decodes right after a switch with
    those without one (exponential averages); until both are known the turn
    is ``min_steps``.  Loop thread only."""

    def __init__(self, min_steps: int = 8, max_steps: int = 64, overhead: float = 0.1,
                 weight: float = 0.2):
        self.min_steps = min_steps      # shortest turn (also the turn before any measurement)
        self.max_steps = max_steps      # longest turn: what another set may wait, per set
        self.overhead = overhead        # target share of a turn's time spent on its switch
        self.weight = weight            # weight of the newest decode in the averages
        self.step_s: float | None = None    # average decode without a switch, seconds
        self.extra_s: float | None = None   # average extra time of a decode after a switch

    def note(self, seconds: float, switched: bool) -> None:
        """One generation-only decode took ``seconds``; ``switched``: the
        adapter set changed just before it."""
        if not switched:
            self.step_s = seconds if self.step_s is None else _mix(self.step_s, seconds, self.weight)
        elif self.step_s is not None:
            extra = max(0.0, seconds - self.step_s)
            self.extra_s = extra if self.extra_s is None else _mix(self.extra_s, extra, self.weight)

    def turn_steps(self) -> int:
        """Steps per turn: enough that one switch costs about ``overhead``
        of the turn, within [min_steps, max_steps]."""
        if self.step_s is None or self.extra_s is None or self.step_s <= 0:
            return self.min_steps
        need = math.ceil(self.extra_s / (self.overhead * self.step_s) - 1e-9)  # 10.000000001 is 10
        return max(self.min_steps, min(self.max_steps, need))


def _mix(old: float, new: float, weight: float) -> float:
    return old + weight * (new - old)
