"""GGUF files built byte by byte, and a tiny random-weight llama model, for the load-check and fuzz tests.

``encode`` serialises a :class:`GGUFSpec` (key/values and tensors, in order)
exactly as the GGUF v3 format lays them out, and records where each
structural field landed (:class:`Site`): counts, key and string lengths,
value types, array lengths, tensor dimensions, types and offsets.  The fuzz
tests overwrite those fields with hostile values, or cut the file short,
without any knowledge of the format beyond this list.

``tiny_llama`` is the smallest model the vendored llama.cpp loads and runs:
``general.architecture = "llama"`` with two layers of width 32, f32
weights, and a 270-token SentencePiece-style vocabulary (``<unk>``, ``<s>``,
``</s>``, the 256 byte tokens, a few words), so a file is about 140 KB and
loads in milliseconds.  ``hparams`` overrides any ``llama.*`` key; the tensor
shapes follow the *intended* shape (``TinyShape``), so a key set out of range
reaches llama.cpp with tensors that still have sane sizes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

# gguf_type values (runner.model.gguf.ValueType numbers them the same way)
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_CODES = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}
GGML_F32 = 0  # ggml_type id of f32 tensors


@dataclass(frozen=True)
class KV:
    """One metadata pair as it will be written."""

    key: str  # the key
    type: int  # gguf_type of the value
    value: Any  # scalar, str, or a list for arrays
    element_type: int | None = None  # gguf_type of the elements when type is ARRAY


@dataclass(frozen=True)
class Tensor:
    """One tensor: info record and data."""

    name: str  # tensor name
    shape: tuple[int, ...]  # ne[0] first
    data: bytes  # raw data (f32 little-endian)
    type: int = GGML_F32  # ggml_type id


@dataclass(frozen=True)
class GGUFSpec:
    """A whole file: what ``encode`` writes, in order."""

    kvs: tuple[KV, ...]  # metadata pairs in file order
    tensors: tuple[Tensor, ...]  # tensors in file order
    alignment: int = 32  # data alignment (general.alignment is written only if != 32)
    version: int = 3  # GGUF version field


@dataclass(frozen=True)
class Site:
    """Where a structural field of the file landed."""

    kind: str  # n_tensors, n_kv, key_len, value_type, str_len, arr_type, arr_len, n_dims, dim, ggml_type, offset, u32
    offset: int  # byte offset of the field in the file
    width: int  # bytes: 4 or 8
    label: str  # what it belongs to, e.g. the key or tensor name


class _Out:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.sites: list[Site] = []

    def put(self, fmt: str, value: Any, kind: str | None = None, label: str = "") -> None:
        if kind is not None:
            self.sites.append(Site(kind, len(self.buf), struct.calcsize("<" + fmt), label))
        self.buf += struct.pack("<" + fmt, value)

    def string(self, text: str | bytes, kind: str = "str_len", label: str = "") -> None:
        raw = text.encode() if isinstance(text, str) else text
        self.put("Q", len(raw), kind, label)
        self.buf += raw

    def value(self, vtype: int, value: Any, etype: int | None, label: str) -> None:
        if vtype == STRING:
            self.string(value, label=label)
        elif vtype == ARRAY:
            assert etype is not None
            self.put("I", etype, "arr_type", label)
            self.put("Q", len(value), "arr_len", label)
            for item in value:
                self.value(etype, item, None, label)
        else:
            self.put(_CODES[vtype], value, "u32" if vtype == U32 else None, label)


def encode(spec: GGUFSpec) -> tuple[bytes, list[Site]]:
    """The file bytes of ``spec`` and the sites of its structural fields."""
    out = _Out()
    out.buf += b"GGUF"
    out.put("I", spec.version)
    kvs = list(spec.kvs)
    if spec.alignment != 32:
        kvs.append(KV("general.alignment", U32, spec.alignment))
    out.put("Q", len(spec.tensors), "n_tensors")
    out.put("Q", len(kvs), "n_kv")
    for kv in kvs:
        out.string(kv.key, "key_len", kv.key)
        out.put("I", kv.type, "value_type", kv.key)
        out.value(kv.type, kv.value, kv.element_type, kv.key)
    offset = 0
    for t in spec.tensors:
        out.string(t.name, "key_len", t.name)
        out.put("I", len(t.shape), "n_dims", t.name)
        for dim in t.shape:
            out.put("Q", dim, "dim", t.name)
        out.put("I", t.type, "ggml_type", t.name)
        out.put("Q", offset, "offset", t.name)
        offset += _pad(len(t.data), spec.alignment)
    out.buf += bytes(_pad(len(out.buf), spec.alignment) - len(out.buf))
    for t in spec.tensors:
        out.buf += t.data + bytes(_pad(len(t.data), spec.alignment) - len(t.data))
    return bytes(out.buf), out.sites


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------
# the tiny llama


@dataclass(frozen=True)
class TinyShape:
    """Shape the tensors of ``tiny_llama`` are made for."""

    n_embd: int = 32  # model width
    n_layer: int = 2  # repeating layers
    n_head: int = 4  # query heads (head size n_embd / n_head = 8)
    n_head_kv: int = 2  # KV heads
    n_ff: int = 64  # FFN width
    n_ctx: int = 256  # training context
    head_dim_k: int | None = None  # K (and Q) head size written as attention.key_length; None: n_embd / n_head
    head_dim_v: int | None = None  # V head size written as attention.value_length; None: n_embd / n_head


TINY = TinyShape()
WORDS = ("\u2581the", "\u2581a", "\u2581cat", "\u2581sat", "\u2581on", "\u2581mat", "the", "a", "s", ".", "\u2581")


def tiny_vocab() -> list[str]:
    """``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens ``<0xNN>``, then WORDS."""
    return ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(WORDS)


def tiny_llama_spec(
    shape: TinyShape = TINY, *, hparams: dict[str, Any] | None = None, tokens: list[str] | None = None, seed: int = 0
) -> GGUFSpec:
    """The tiny llama as a GGUFSpec.

    ``hparams`` maps a key without the ``llama.`` prefix to a value (written
    as UINT32 for an int, FLOAT32 for a float, STRING for a str, an INT32
    array for a list) or to ``None`` to leave the key out; it may also name
    keys the model does not have (``expert_count``...).  ``tokens`` replaces
    the vocabulary (scores and token types follow its length).
    """
    rng = np.random.default_rng(seed)
    vocab = tiny_vocab() if tokens is None else tokens
    keys: dict[str, Any] = {
        "context_length": shape.n_ctx,
        "embedding_length": shape.n_embd,
        "block_count": shape.n_layer,
        "feed_forward_length": shape.n_ff,
        "attention.head_count": shape.n_head,
        "attention.head_count_kv": shape.n_head_kv,
        "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 10000.0,
    }
    if shape.head_dim_k is not None:
        keys["attention.key_length"] = shape.head_dim_k
    if shape.head_dim_v is not None:
        keys["attention.value_length"] = shape.head_dim_v
    keys.update(hparams or {})
    kvs = [KV("general.architecture", STRING, "llama"), KV("general.name", STRING, "llama-runner tiny test model")]
    for name, value in keys.items():
        if value is not None:
            kvs.append(_hparam(f"llama.{name}", value))
    n_byte = sum(1 for t in vocab if t.startswith("<0x"))
    kvs += [
        KV("tokenizer.ggml.model", STRING, "llama"),
        KV("tokenizer.ggml.tokens", ARRAY, vocab, STRING),
        KV("tokenizer.ggml.scores", ARRAY, [float(-i) for i in range(len(vocab))], F32),
        KV("tokenizer.ggml.token_type", ARRAY, [3 if i < 3 else 6 if i < 3 + n_byte else 1 for i in range(len(vocab))], I32),
        KV("tokenizer.ggml.bos_token_id", U32, 1),
        KV("tokenizer.ggml.eos_token_id", U32, 2),
        KV("tokenizer.ggml.unknown_token_id", U32, 0),
        KV("tokenizer.ggml.add_bos_token", BOOL, True),
    ]

    e = shape.n_embd
    hk = shape.n_embd // shape.n_head if shape.head_dim_k is None else shape.head_dim_k
    hv = shape.n_embd // shape.n_head if shape.head_dim_v is None else shape.head_dim_v

    def weight(name: str, *dims: int) -> Tensor:
        data = (rng.standard_normal(int(np.prod(dims))) * 0.05).astype("<f4").tobytes()
        return Tensor(name, dims, data)

    def ones(name: str, n: int) -> Tensor:
        return Tensor(name, (n,), np.ones(n, "<f4").tobytes())

    tensors = [weight("token_embd.weight", e, len(vocab)), ones("output_norm.weight", e)]
    for il in range(shape.n_layer):
        b = f"blk.{il}"
        tensors += [
            ones(f"{b}.attn_norm.weight", e),
            weight(f"{b}.attn_q.weight", e, hk * shape.n_head),
            weight(f"{b}.attn_k.weight", e, hk * shape.n_head_kv),
            weight(f"{b}.attn_v.weight", e, hv * shape.n_head_kv),
            weight(f"{b}.attn_output.weight", hk * shape.n_head, e),
            ones(f"{b}.ffn_norm.weight", e),
            weight(f"{b}.ffn_gate.weight", e, shape.n_ff),
            weight(f"{b}.ffn_up.weight", e, shape.n_ff),
            weight(f"{b}.ffn_down.weight", shape.n_ff, e),
        ]
    return GGUFSpec(tuple(kvs), tuple(tensors))


def _hparam(key: str, value: Any) -> KV:
    if isinstance(value, KV):
        return replace(value, key=key)
    if isinstance(value, bool):
        return KV(key, BOOL, value)
    if isinstance(value, int):
        return KV(key, U32, value)
    if isinstance(value, float):
        return KV(key, F32, value)
    if isinstance(value, str):
        return KV(key, STRING, value)
    if isinstance(value, list):
        return KV(key, ARRAY, value, I32)
    raise TypeError(f"no GGUF type for {value!r}")


def write_tiny_llama(path: str | Path, shape: TinyShape = TINY, **kw: Any) -> Path:
    """Write ``tiny_llama_spec(shape, **kw)`` to ``path``; returns the path."""
    path = Path(path)
    path.write_bytes(encode(tiny_llama_spec(shape, **kw))[0])
    return path

