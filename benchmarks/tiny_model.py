"""The tiny random-weight llama the benchmarks use as a stand-in for a fast
(GPU-like) decode: 2 layers of width 64 with the default model's vocabulary,
so sampling, detokenizing and delivery cost what they cost on the real model
while a decode takes well under a millisecond.

    python benchmarks/tiny_model.py [PATH]     # writes it (default: build/bench-models/)

Needs the `gguf` package (a test dependency).  The weights are seeded: the
same file every time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mmproj import _matrix, _ones, finish_gguf, text_model_writer  # noqa: E402

DEFAULT_PATH = ROOT / "build" / "bench-models" / "tiny-llama-64x2.gguf"


def write_tiny_llama(path: Path = DEFAULT_PATH, *, n_embd: int = 64, n_layer: int = 2,
                     n_head: int = 4, n_ff: int = 128, seed: int = 0,
                     tokenizer_replace: dict | None = None) -> Path:
    """Write the model (if absent) and return its path.  ``tokenizer_replace``:
    tokenizer keys to put in place of the default model's (tests/mmproj.py)."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(seed)
    w, n_vocab = text_model_writer(tmp, "llama", seed, n_ctx=8192, n_embd=n_embd, n_layer=n_layer,
                                   n_ff=n_ff, n_head=n_head, n_head_kv=n_head, rope_freq_base=10000.0,
                                   tokenizer_replace=tokenizer_replace)
    w.add_uint32("llama.rope.dimension_count", n_embd // n_head)
    w.add_tensor("token_embd.weight", _matrix(rng, n_vocab, n_embd))
    for i in range(n_layer):
        blk = f"blk.{i}"
        w.add_tensor(f"{blk}.attn_norm.weight", _ones(n_embd))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"{blk}.{name}.weight", _matrix(rng, n_embd, n_embd))
        w.add_tensor(f"{blk}.ffn_norm.weight", _ones(n_embd))
        w.add_tensor(f"{blk}.ffn_gate.weight", _matrix(rng, n_ff, n_embd))
        w.add_tensor(f"{blk}.ffn_up.weight", _matrix(rng, n_ff, n_embd))
        w.add_tensor(f"{blk}.ffn_down.weight", _matrix(rng, n_embd, n_ff))
    w.add_tensor("output_norm.weight", _ones(n_embd))
    w.add_tensor("output.weight", _matrix(rng, n_vocab, n_embd))
    finish_gguf(w)
    tmp.rename(path)
    return path


def resolve(name: str | None) -> str | None:
    """``tiny`` -> the tiny model's path (written if absent); anything else as is."""
    return str(write_tiny_llama()) if name == "tiny" else name


if __name__ == "__main__":
    print(write_tiny_llama(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH))
