"""The tiny random-weight llama the benchmarks use as a stand-in for a fast
(GPU-like) decode: 2 layers of width 64 with the default model's vocabulary,
so sampling, detokenizing and delivery cost what they cost on the real model
while a decode takes well under a millisecond.

    python benchmarks/tiny_model.py [PATH]     # writes it (default: build/bench-models/)
    python benchmarks/tiny_model.py --smol [--vocab-from GGUF] [PATH]

``--smol`` writes a random-weight model of the default model's shape
(SmolLM2-135M: 30 layers, width 576, 9 heads over 3 KV heads, Q4_1 with a
Q8_0 embedding that is also the output matrix): a decode
costs what the default model's costs, for machines the 98 MB model file
cannot travel to (scripts/gpu_check.sh).  ``--vocab-from`` takes the
vocabulary from another GGUF (the tiny model) instead of the default model.

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
SMOL_PATH = ROOT / "build" / "bench-models" / "smol-shape-q4_1.gguf"
# SmolLM2-135M-Instruct's hyperparameters (the default model's GGUF header).
# Its token embedding is Q8_0 and doubles as the output matrix (no output.weight).
SMOL_SHAPE = dict(n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536, qtype="q4_1",
                  embd_qtype="q8_0", tied=True)


def write_tiny_llama(path: Path = DEFAULT_PATH, *, n_embd: int = 64, n_layer: int = 2,
                     n_head: int = 4, n_ff: int = 128, seed: int = 0,
                     n_head_kv: int | None = None, qtype: str | None = None,
                     embd_qtype: str | None = None, tied: bool = False, vocab_from=None,
                     tokenizer_replace: dict | None = None) -> Path:
    """Write the model (if absent) and return its path.  ``n_head_kv``:
    grouped-query attention (default: ``n_head``); ``qtype``: a type the
    gguf package quantises (e.g. "q4_1") for the weight matrices, else F16;
    ``embd_qtype``: the token embedding's (default: ``qtype``'s); ``tied``:
    no output matrix (llama.cpp then projects with the token embedding);
    ``vocab_from``: the GGUF whose tokenizer is copied (default: the default
    model); ``tokenizer_replace``: tokenizer keys to put in place of the
    copied ones (tests/mmproj.py)."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(seed)
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    w, n_vocab = text_model_writer(tmp, "llama", seed, n_ctx=8192, n_embd=n_embd, n_layer=n_layer,
                                   n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                                   rope_freq_base=10000.0, vocab_from=vocab_from,
                                   tokenizer_replace=tokenizer_replace)
    w.add_uint32("llama.rope.dimension_count", n_embd // n_head)
    matrix = _matrix_writer(w, rng, qtype)
    n_kv = n_embd // n_head * n_head_kv
    _matrix_writer(w, rng, embd_qtype or qtype)("token_embd.weight", n_vocab, n_embd)
    for i in range(n_layer):
        blk = f"blk.{i}"
        w.add_tensor(f"{blk}.attn_norm.weight", _ones(n_embd))
        for name, rows in (("attn_q", n_embd), ("attn_k", n_kv), ("attn_v", n_kv),
                           ("attn_output", n_embd)):
            matrix(f"{blk}.{name}.weight", rows, n_embd)
        w.add_tensor(f"{blk}.ffn_norm.weight", _ones(n_embd))
        matrix(f"{blk}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"{blk}.ffn_up.weight", n_ff, n_embd)
        matrix(f"{blk}.ffn_down.weight", n_embd, n_ff)
    w.add_tensor("output_norm.weight", _ones(n_embd))
    if not tied:
        matrix("output.weight", n_vocab, n_embd)
    finish_gguf(w)
    tmp.rename(path)
    return path


def _matrix_writer(w, rng: np.random.Generator, qtype: str | None):
    """add(name, rows, cols): a seeded random matrix into ``w``, F16 or
    quantised to ``qtype``."""
    if qtype is None:
        return lambda name, rows, cols: w.add_tensor(name, _matrix(rng, rows, cols))
    import gguf
    from gguf.quants import quantize

    kind = gguf.GGMLQuantizationType[qtype.upper()]

    def add(name: str, rows: int, cols: int) -> None:
        data = _matrix(rng, rows, cols).astype(np.float32)
        w.add_tensor(name, quantize(data, kind), raw_dtype=kind)
    return add


def resolve(name: str | None) -> str | None:
    """``tiny`` -> the tiny model's path (written if absent); anything else as is."""
    return str(write_tiny_llama()) if name == "tiny" else name


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write the benchmarks' random-weight llama")
    ap.add_argument("path", nargs="?", default=None)
    ap.add_argument("--smol", action="store_true", help="the default model's shape (SmolLM2-135M, Q4_1)")
    ap.add_argument("--vocab-from", default=None, help="GGUF whose tokenizer is copied")
    args = ap.parse_args()
    if args.smol:
        out = write_tiny_llama(Path(args.path or SMOL_PATH), vocab_from=args.vocab_from, **SMOL_SHAPE)
    else:
        out = write_tiny_llama(Path(args.path or DEFAULT_PATH), vocab_from=args.vocab_from)
    print(out)
