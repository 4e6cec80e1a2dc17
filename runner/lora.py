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
"""

from __future__ import annotations

import numpy as np

from runner.requests import BadRequest

__all__ = ["LoraKey", "default_key", "describe", "resolve"]

LoraKey = tuple  # tuple[float, ...]: the scale of each loaded adapter, in load order


def _bad(problem: str) -> BadRequest:
    return BadRequest(f"invalid option lora: {problem}")


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
