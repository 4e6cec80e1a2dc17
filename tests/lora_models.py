"""Tiny random LoRA adapters, written with the ``gguf`` package, for the
benchmarks' tiny llama (benchmarks/tiny_model.py) or any llama-shaped GGUF.

An adapter is the GGUF llama.cpp's convert_lora_to_gguf.py writes:
``general.type = "adapter"``, ``adapter.type = "lora"``,
``adapter.lora.alpha``, and for each adapted weight ``W`` (ggml shape
``[n_in, n_out]``) a pair ``W.lora_a`` (``[n_in, rank]``) and ``W.lora_b``
(``[rank, n_out]``), so that the layer computes ``W x + scale * alpha/rank *
B (A x)`` (src/llama-adapter.cpp checks exactly these shapes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runner.model.gguf import read_gguf

# Weights adapted in every block, and the output projection (which moves the
# logits most directly, so that a small adapter changes greedy text).
TARGETS = ("attn_q", "attn_v", "ffn_up")


def write_lora(base: str | Path, path: str | Path, *, seed: int, rank: int = 4,
               std: float = 0.5) -> Path:
    """Write a random adapter for the llama GGUF ``base`` to ``path`` (if
    absent) and return its path.  ``std``: spread of the B matrices (A is
    scaled by 1/sqrt(n_in)), large enough that scale 1 changes the output."""
    import gguf

    path = Path(path)
    if path.exists():
        return path
    info = read_gguf(base)
    arch = info.fields["general.architecture"].value
    n_layer = int(info.fields[f"{arch}.block_count"].value)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in info.tensors}  # ggml order: (n_in, n_out)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_string("general.type", "adapter")
    w.add_string("general.name", f"llama-runner test lora, seed {seed}")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    names = [f"blk.{i}.{t}.weight" for i in range(n_layer) for t in TARGETS] + ["output.weight"]
    for name in [n for n in names if n in shapes]:  # tied embeddings: no output.weight
        n_in, n_out = shapes[name]
        base_name = name[: -len(".weight")]
        a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * std).astype(np.float32)
        w.add_tensor(f"{base_name}.weight.lora_a", a)
        w.add_tensor(f"{base_name}.weight.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)
    return path
