"""Memory estimates for running a GGUF model with llama.cpp, and GPU layer planning.

Three kinds of numbers live here:

* The KV cache size is *exact*: it replays how the pinned llama.cpp sizes its
  caches (llama-context.cpp pads n_ctx to 256 cells; llama-kv-cache.cpp
  allocates, per layer, K as ``ggml_row_size(type_k, n_embd_k_gqa) * kv_size *
  n_stream`` and V likewise; llama-kv-cache-iswa.cpp sizes the sliding-window
  cache as ``pad(min(kv_size, n_swa * n_seq + n_ubatch), 256)``).
  ``KVCacheBuffer.log_mib`` reproduces the figure llama.cpp prints in
  ``llama_kv_cache: size = ... MiB`` so the two can be cross-checked.
* The compute-graph size is a *heuristic*, an upper-bound style formula per
  architecture family in the spirit of Ollama's fs/ggml GraphSize (see
  ``graph_size``).
* The plan (``plan_layers``) decides how many layers llama.cpp offloads
  (``n_gpu_layers``) and how they split across GPUs (``tensor_split``), with a
  safety margin per GPU (``gpu_reserve``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runner.model.gguf import GGUFFile, ggml_type

MiB = 1 << 20
GiB = 1 << 30
F32 = 4  # bytes per activation; llama.cpp graphs compute in f32

CONTEXT_PAD = 256  # llama.cpp pads n_ctx, n_ctx_seq and the SWA cache size to this many cells
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # as the load takes them

# Safety margin held back on every GPU: a fixed part for the backend's own
# allocations (CUDA/ROCm context, cuBLAS/hipBLAS workspaces, the driver's
# per-process reserve) plus a fraction of the device's memory for allocator
# fragmentation and the error of the graph-size heuristic.
GPU_RESERVE_FIXED = 384 * MiB
GPU_RESERVE_FRACTION = 0.03

# Architectures llama.cpp builds without a KV cache (encoders and diffusion
# models: create_memory returns nullptr for them).
_NO_KV_CACHE_ARCHS = frozenset(
    {
        "bert",
        "jina-bert-v2",
        "jina-bert-v3",
        "nomic-bert",
        "nomic-bert-moe",
        "neo-bert",
        "eurobert",
        "modern-bert",
        "gemma-embedding",
        "wavtokenizer-dec",
        "dream",
        "llada",
        "llada-moe",
        "rnd1",
    }
)
# Architectures whose attention is never causal (llama.cpp then does not clamp n_batch to n_ctx).
_NON_CAUSAL_ARCHS = frozenset({"dream", "llada", "llada-moe", "rnd1", "gemma-embedding"})
# Architectures for which llama.cpp switches flash attention off.
_NO_FLASH_ATTENTION_ARCHS = frozenset({"grok"})

# mllama cross-attention layers cache the image tokens, not the text: 4 tiles
# of (560 / 14)^2 patches plus a class token each.
MLLAMA_VISION_TOKENS = 4 * 1601


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------
# attention layout (llama.cpp hparams)


@dataclass(frozen=True, slots=True)
class _SwaRule:
    """How one architecture's hparams loader sets up sliding-window attention."""

    period: int | None  # default pattern period (None: the per-layer array key is required)
    dense_first: bool  # the full-attention layer leads each period instead of ending it
    default_window: int | None  # n_swa when the file has no sliding_window key
    needs_window: bool  # SWA is enabled only when sliding_window is present and > 0


# Mirrors the per-architecture load_arch_hparams of the pinned llama.cpp (src/models/*.cpp).
_SWA_RULES: dict[str, _SwaRule] = {
    "gemma2": _SwaRule(2, False, 4096, False),
    "gemma3": _SwaRule(6, False, None, True),
    "gemma3n": _SwaRule(5, False, None, False),
    "gemma4": _SwaRule(None, False, None, False),
    "cohere2": _SwaRule(4, False, None, False),
    "cohere2moe": _SwaRule(4, True, None, False),
    "gpt-oss": _SwaRule(2, False, None, False),
    "exaone-moe": _SwaRule(4, False, 128, False),
    "olmo2": _SwaRule(4, False, None, True),
    "afmoe": _SwaRule(4, False, None, True),
    "mellum": _SwaRule(4, False, None, True),
    "plamo3": _SwaRule(8, False, None, True),
    "laguna": _SwaRule(4, True, None, True),
    "muse-glimmer": _SwaRule(4, False, None, False),
    "granite_swa": _SwaRule(None, False, None, False),
    "maple": _SwaRule(None, False, None, False),
    "mimo2": _SwaRule(None, False, None, False),
    "step35": _SwaRule(None, False, None, False),
    "spark2_5": _SwaRule(None, False, None, False),
    "dots3note": _SwaRule(None, False, None, False),
}


@dataclass(frozen=True)
class AttentionLayout:
    """The per-layer attention facts that size the KV cache, as llama.cpp derives them."""

    arch: str  # general.architecture
    n_layer: int  # repeating layers in the file (block_count, MTP layers included)
    kv_layers: tuple[bool, ...]  # layer holds KV cells in the main context
    swa_layers: tuple[bool, ...]  # layer uses sliding-window (or chunked) attention
    n_swa: int  # sliding window in tokens; 0 when no layer slides
    n_embd_k_gqa: tuple[int, ...]  # K row length per layer: K head size * KV heads
    n_embd_v_gqa: tuple[int, ...]  # V row length per layer; 0 when the cache keeps no V (MLA)
    head_dim_k: tuple[int, ...]  # K head size per layer
    head_dim_v: tuple[int, ...]  # V head size per layer
    cross_layers: tuple[int, ...]  # mllama cross-attention layers (cache image tokens)

    @property
    def has_swa(self) -> bool:
        return any(s and k for s, k in zip(self.swa_layers, self.kv_layers))


def attention_layout(info: GGUFFile) -> AttentionLayout:
    """Derive the attention layout of a model the way the pinned llama.cpp's hparams loader does.

    Covered: per-layer KV head counts, key/value lengths (and their _swa
    variants), MLA (K-only cache), sliding-window patterns (see _SWA_RULES),
    shared-KV layers (gemma3n/gemma4), MTP layers (excluded from the main
    context), and encoder-only models (no cache). Recurrent state of
    hybrid/recurrent models is not modelled.
    """
    arch = info.architecture
    n_layer = info.checked_block_count()
    heads_kv = info.head_counts_kv() if n_layer else ()
    n_nextn = info.get_int(info.arch_key("nextn_predict_layers"), 0) or 0
    n_main = n_layer - n_nextn if 0 < n_nextn < n_layer else n_layer

    swa, n_swa = _swa_layers(info, n_main)
    swa = swa + (False,) * (n_layer - len(swa))

    # like llama.cpp, a layer without KV heads still gets (empty) cache tensors:
    # its V rows are padded to the widest when V is stored transposed
    kv = [True] * n_layer
    if arch in _NO_KV_CACHE_ARCHS or info.head_count == 0:
        kv = [False] * n_layer
    for il in range(n_main, n_layer):
        kv[il] = False
    kv_from_start = _kv_from_start(info)
    if kv_from_start is not None:
        for il in range(kv_from_start, n_layer):
            kv[il] = False

    is_mla = info.is_mla
    # each accessor once: they are not free, and a per-layer call made this quadratic
    k_full, k_swa, v_full, v_swa = info.key_length, info.key_length_swa, info.value_length, info.value_length_swa
    dk = [k_swa if s else k_full for s in swa]
    dv = [v_swa if s else v_full for s in swa]
    cross: tuple[int, ...] = ()
    if arch == "mllama":
        raw = info.get_arch("attention.cross_attention_layers", [])
        cross = tuple(int(i) for i in raw) if isinstance(raw, list) else ()
    return AttentionLayout(
        arch=arch,
        n_layer=n_layer,
        kv_layers=tuple(kv),
        swa_layers=swa,
        n_swa=n_swa if any(swa) else 0,
        n_embd_k_gqa=tuple(d * h for d, h in zip(dk, heads_kv)),
        n_embd_v_gqa=tuple(0 if is_mla else d * h for d, h in zip(dv, heads_kv)),
        head_dim_k=tuple(dk),
        head_dim_v=tuple(dv),
        cross_layers=cross,
    )


def _swa_layers(info: GGUFFile, n_main: int) -> tuple[tuple[bool, ...], int]:
    arch = info.architecture
    window = info.sliding_window
    rule = _SWA_RULES.get(arch)
    if arch == "llama4":
        # chunked attention, fixed 8192-token chunks, unless sliding_window is explicitly 0
        if window == 0:
            return (False,) * n_main, 0
        rule, window = _SwaRule(4, False, None, False), 8192
    elif arch == "exaone4":
        # only the 64-layer (32B) model interleaves sliding-window layers
        if n_main != 64:
            return (False,) * n_main, 0
        rule = _SwaRule(4, False, 4096, False)
    elif arch == "smallthinker" and window:
        rule, window = _SwaRule(4, True, None, True), 4096
    if rule is None or (rule.needs_window and not window):
        return (False,) * n_main, 0
    if window is None:
        window = rule.default_window or 0

    pattern = info.sliding_window_pattern
    if isinstance(pattern, list):
        flags = tuple(pattern[:n_main]) + (False,) * max(0, n_main - len(pattern))
    else:
        period = pattern if isinstance(pattern, int) else rule.period
        if period is None:
            return (False,) * n_main, 0
        flags = tuple(_swa_by_period(il, period, rule.dense_first) for il in range(n_main))
    return flags, window


def _swa_by_period(il: int, period: int, dense_first: bool) -> bool:
    # llama_hparams::set_swa_pattern: period 0 means every layer slides
    if period == 0:
        return True
    if dense_first:
        return il % period != 0
    return il % period < period - 1


def _kv_from_start(info: GGUFFile) -> int | None:
    """First layer that reuses an earlier layer's KV instead of owning cells (gemma3n/gemma4), if any."""
    if info.architecture == "gemma3n":
        return 20
    shared = info.get_int(info.arch_key("attention.shared_kv_layers"))
    if shared:
        return info.block_count - shared
    return None


# ---------------------------------------------------------------------------
# context shape and KV cache


@dataclass(frozen=True, slots=True)
class ContextShape:
    """The context sizes llama.cpp settles on for given load options (llama-context.cpp)."""

    n_ctx: int  # total cells after padding (llama.cpp cparams.n_ctx)
    kv_size: int  # cells per stream (cparams.n_ctx_seq), the size of each cache tensor
    n_stream: int  # cache streams: 1 when unified, else one per sequence
    n_seq_max: int  # sequences (parallel slots)
    n_batch: int  # logical batch after clamping to n_ctx
    n_ubatch: int  # physical batch (tokens per graph evaluation)
    unified: bool  # one cache shared by all sequences


def context_shape(
    info: GGUFFile,
    *,
    n_ctx: int = 0,
    parallel: int = 1,
    n_batch: int = 512,
    n_ubatch: int = 0,
    unified: bool = False,
) -> ContextShape:
    """Replay llama.cpp's context sizing (llama_context's constructor).

    ``n_ctx`` is the whole context, as the load's ``n_ctx`` and llama.cpp's
    take it (0 = the model's training context), shared by ``parallel``
    sequences. It is padded to 256 cells; with ``unified`` (llama.cpp
    kv_unified) all sequences share that one stream of cells, otherwise each
    gets a stream of pad(n_ctx / parallel, 256) cells.
    """
    if parallel < 1:
        raise ValueError("parallel must be >= 1")
    total = n_ctx or info.context_length
    if total <= 0:
        raise ValueError("n_ctx is 0 and the model has no context_length")
    causal = info.architecture not in _NON_CAUSAL_ARCHS and info.get_arch("attention.causal", True) is not False
    batch = min(total, n_batch) if causal else n_batch
    ubatch = min(batch, n_ubatch or n_batch)
    total = _pad(total, CONTEXT_PAD)
    if unified:
        return ContextShape(total, total, 1, parallel, batch, ubatch, True)
    kv_size = _pad(total // parallel, CONTEXT_PAD)
    return ContextShape(kv_size * parallel, kv_size, parallel, parallel, batch, ubatch, False)


@dataclass(frozen=True, slots=True)
class KVCacheBuffer:
    """One llama_kv_cache instance (a model with sliding-window layers has two)."""

    name: str  # "base", "swa" or "cross" (mllama image tokens)
    cells: int  # kv_size: cells per stream
    streams: int  # n_stream
    layers: tuple[int, ...]  # layer indices with tensors in this cache
    k_bytes: int  # sum of ggml_nbytes of the K tensors
    v_bytes: int  # sum of ggml_nbytes of the V tensors

    @property
    def total(self) -> int:
        return self.k_bytes + self.v_bytes

    @property
    def log_mib(self) -> str:
        """The size as llama.cpp logs it: ``llama_kv_cache: size = <this> MiB`` (float32 math, %.2f)."""
        as_f32 = struct.unpack("f", struct.pack("f", float(self.total)))[0]
        return f"{as_f32 / MiB:.2f}"


@dataclass(frozen=True)
class KVCacheEstimate:
    """KV cache allocation for one context."""

    type_k: str  # K cache ggml type
    type_v: str  # V cache ggml type
    shape: ContextShape  # context sizes the cache was sized for
    caches: tuple[KVCacheBuffer, ...]  # the llama_kv_cache instances, base first
    per_layer: tuple[int, ...]  # bytes held by each repeating layer

    @property
    def total(self) -> int:
        return sum(c.total for c in self.caches)


def kv_cache_size(
    info: GGUFFile,
    *,
    n_ctx: int = 0,
    parallel: int = 1,
    type_k: str = "f16",
    type_v: str | None = None,
    flash_attention: bool = False,
    n_batch: int = 512,
    n_ubatch: int = 0,
    unified: bool = False,
    swa_full: bool = False,
) -> KVCacheEstimate:
    """The KV cache llama.cpp allocates for these context parameters, byte-exact.

    Without flash attention llama.cpp stores V transposed and pads every V row
    to the largest V width of the model when widths differ per layer.
    """
    type_v = type_v or type_k
    tk, tv = ggml_type(type_k), ggml_type(type_v)
    shape = context_shape(info, n_ctx=n_ctx, parallel=parallel, n_batch=n_batch, n_ubatch=n_ubatch, unified=unified)
    lay = attention_layout(info)
    v_rows = lay.n_embd_v_gqa
    if not flash_attention and len(set(v_rows)) > 1:
        v_rows = (max(v_rows),) * lay.n_layer

    swa_size = shape.kv_size
    if lay.has_swa and not swa_full:
        seqs = shape.n_seq_max if shape.unified else 1
        swa_size = _pad(min(shape.kv_size, lay.n_swa * seqs + shape.n_ubatch), CONTEXT_PAD)

    placed = []  # (cache name, cells, streams, layer, K bytes, V bytes) per layer with cells
    cross_layers = frozenset(lay.cross_layers)
    for il in range(lay.n_layer):
        if not lay.kv_layers[il]:
            continue
        if il in cross_layers:
            name, cells, streams = "cross", MLLAMA_VISION_TOKENS * shape.n_seq_max, 1
        elif lay.swa_layers[il]:
            name, cells, streams = "swa", swa_size, shape.n_stream
        else:
            name, cells, streams = "base", shape.kv_size, shape.n_stream
        k = tk.row_size(lay.n_embd_k_gqa[il]) * cells * streams
        v = tv.row_size(v_rows[il]) * cells * streams
        placed.append((name, cells, streams, il, k, v))

    per_layer = [0] * lay.n_layer
    for _, _, _, il, k, v in placed:
        per_layer[il] = k + v
    caches = []
    for name in ("base", "swa", "cross"):
        rows = [p for p in placed if p[0] == name]
        if rows:
            layers = tuple(r[3] for r in rows)
            k_bytes, v_bytes = sum(r[4] for r in rows), sum(r[5] for r in rows)
            caches.append(KVCacheBuffer(name, rows[0][1], rows[0][2], layers, k_bytes, v_bytes))
    return KVCacheEstimate(type_k, type_v, shape, tuple(caches), tuple(per_layer))


# ---------------------------------------------------------------------------
# feature support


def supports_flash_attention(info: GGUFFile) -> bool:
    """Whether llama.cpp can run this model with flash attention.

    Not for models without attention heads or architectures llama.cpp forces
    off (grok); otherwise K and V heads must have the same size, except for
    MLA models whose latent cache the flash-attention kernels handle.
    """
    if info.head_count == 0 or info.architecture in _NO_FLASH_ATTENTION_ARCHS:
        return False
    if info.is_mla:
        return True
    return info.key_length == info.value_length and info.key_length_swa == info.value_length_swa


def kv_cache_type_problem(info: GGUFFile, kv_type: str, flash_attention: bool) -> str | None:
    """Why ``kv_type`` cannot be used for this model, or None when it can.

    Quantized caches need flash attention (llama.cpp requires it for V; like
    Ollama we require it for K too) and head sizes divisible by the block size.
    """
    if kv_type not in KV_CACHE_TYPES:
        return f"unknown KV cache type {kv_type!r} (expected one of {', '.join(KV_CACHE_TYPES)})"
    t = ggml_type(kv_type)
    if not t.quantized:
        return None
    if not flash_attention:
        return f"{kv_type} KV cache needs flash attention, which is off"
    if not supports_flash_attention(info):
        return f"{kv_type} KV cache needs flash attention, which {info.architecture or 'this model'} does not support"
    lay = attention_layout(info)
    for size in set(lay.head_dim_k) | {d for d in lay.head_dim_v if d}:
        if size % t.block_size:
            return f"{kv_type} KV cache needs head sizes divisible by {t.block_size}; model has {size}"
    return None


def effective_kv_type(info: GGUFFile, requested: str, flash_attention: bool) -> tuple[str, str | None]:
    """The KV cache type to use: ``requested`` if usable, else f16; plus the reason for a fallback."""
    problem = kv_cache_type_problem(info, requested, flash_attention)
    if problem is None:
        return requested, None
    return "f16", f"using f16 KV cache: {problem}"


# ---------------------------------------------------------------------------
# compute graph


@dataclass(frozen=True, slots=True)
class GraphEstimate:
    """Compute-buffer sizes (heuristic) for one context."""

    full: int  # per GPU when every layer and the output layer are offloaded
    partial: int  # per GPU when some layers stay on the CPU (includes staging copies of CPU weights)
    cpu: int  # CPU compute buffer when some layers run on the CPU
    formula: str  # architecture family whose formula was used


@dataclass(frozen=True, slots=True)
class _Dims:
    """Model dimensions the graph formulas use."""

    b: int  # tokens per ubatch
    c: int  # KV cells attended by a full-attention layer
    e: int  # embedding length
    h: int  # attention heads (max over layers)
    hkv: int  # KV heads (max over layers)
    dk: int  # K head size
    dv: int  # V head size
    vocab: int  # vocabulary size
    ff: int  # FFN width of the widest layer (active experts included)
    fa: bool  # flash attention


_GRAPH_FAMILIES = {
    "llama": "llama",
    "llama4": "llama",
    "qwen2": "llama",
    "stablelm": "llama",
    "mllama": "mllama",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma",
    "command-r": "command-r",
    "cohere2": "command-r",
    "phi2": "fused-qkv",
    "chatglm": "fused-qkv",
    "deepseek2": "deepseek2",
}


def graph_size(info: GGUFFile, *, kv_cells: int, n_ubatch: int, flash_attention: bool) -> GraphEstimate:
    """Estimate the compute buffers of llama.cpp's graph for one ubatch.

    Peak live f32 activations of one layer, the larger of its attention and
    FFN halves, against the logits at the end:

    * attention: residual + norm (2e), Q (h*dk), K and V (hkv*(dk+dv)),
      attention output (h*dv) per token, plus the KQ mask (c per token, f16
      with flash attention) and, without flash attention, the materialised
      scores (h*c per token);
    * FFN: residual + norm (2e) and three ff-wide tensors (gate, up,
      activation) per token, ff counting the active experts of MoE layers;
    * logits: vocab logits per token, and three hidden states live beside
      them (the last residual, its norm and the normed result).

    Families adjust this: gemma2 keeps a second copy of soft-capped scores
    and logits; command-r computes attention and FFN in parallel; phi2 and
    chatglm materialise a fused QKV; deepseek2 attends with the MLA head sizes
    over the latent cache; mllama adds cross-attention to the image tokens.
    Any other architecture uses the plain formula (the "llama" family).

    Partial offload adds what a GPU stages when it runs a CPU-resident layer
    for a large batch: the largest weight of a repeating layer (all expert
    tensors of a MoE layer together), or the output matrix for the logits;
    plus the batch's input embeddings copied from the CPU.
    """
    d = _dims(info, kv_cells, n_ubatch, flash_attention)
    family = _GRAPH_FAMILIES.get(info.architecture, "llama")
    b, c, e, h = d.b, d.c, d.e, d.h
    mask = (2 if d.fa else F32) * b * c
    scores = 0 if d.fa else F32 * b * c * h
    qkv = h * d.dk + d.hkv * (d.dk + d.dv)
    attn = F32 * b * (2 * e + qkv + h * d.dv) + mask + scores
    ffn = F32 * b * (2 * e + 3 * d.ff)
    logits = F32 * b * (3 * e + d.vocab)

    if family == "gemma2":
        attn += scores
        logits += F32 * b * d.vocab
    elif family == "command-r":
        attn = attn + ffn - F32 * b * 2 * e
        ffn = 0
    elif family == "fused-qkv":
        attn += F32 * b * qkv
    elif family == "deepseek2":
        dk = info.get_int(info.arch_key("attention.key_length_mla"), d.dk) or d.dk
        dv = info.get_int(info.arch_key("attention.value_length_mla"), d.dv) or d.dv
        latent = info.get_int(info.arch_key("attention.kv_lora_rank"), 0) or 0
        attn = F32 * b * (2 * e + h * (dk + dv) + d.hkv * (d.dk + d.dv) + h * latent) + mask + scores
    elif family == "mllama":
        cross = F32 * b * h * MLLAMA_VISION_TOKENS + F32 * b * (2 * e + qkv)
        attn = max(attn, cross)

    layer = max(attn, ffn)
    full = max(layer, logits)
    staging_layer, staging_output = _staging_bytes(info)
    partial = F32 * b * e + max(layer + staging_layer, logits + staging_output)
    return GraphEstimate(full=full, partial=partial, cpu=full, formula=family)


def _dims(info: GGUFFile, kv_cells: int, n_ubatch: int, flash_attention: bool) -> _Dims:
    n_layer = info.block_count
    heads = info.head_counts() if n_layer else (info.head_count,)
    ff = info.feed_forward_length
    expert_ff = info.get_int(info.arch_key("expert_feed_forward_length"), 0) or 0
    used = info.expert_used_count
    if used and expert_ff:
        shared = info.get_int(info.arch_key("expert_shared_count"), 0) or 0
        shared_ff = info.get_int(info.arch_key("expert_shared_feed_forward_length"), 0) or expert_ff
        ff = max(ff, used * expert_ff + shared * shared_ff)
    return _Dims(
        b=n_ubatch,
        c=kv_cells,
        e=info.embedding_length,
        h=max(heads, default=0),
        hkv=info.head_count_kv,
        dk=max(info.key_length, info.key_length_swa),
        dv=max(info.value_length, info.value_length_swa),
        vocab=info.vocab_size,
        ff=ff,
        fa=flash_attention,
    )


def _staging_bytes(info: GGUFFile) -> tuple[int, int]:
    """(largest weight staged for a repeating layer, output matrix) in bytes."""
    largest = 0
    for name, tensors in info.layers().items():
        if not name.startswith("blk."):
            continue
        experts = sum(t.n_bytes for t in tensors if "_exps." in t.name)
        largest = max(largest, experts, max((t.n_bytes for t in tensors), default=0))
    return largest, _output_matrix_bytes(info)


def _output_matrix_bytes(info: GGUFFile) -> int:
    out = info.tensor("output.weight") or info.tensor("token_embd.weight")
    return out.n_bytes if out is not None else 0


# ---------------------------------------------------------------------------
# projectors


@dataclass(frozen=True, slots=True)
class ProjectorEstimate:
    """Memory of a multimodal projector (mmproj) loaded next to the model."""

    weights: int  # bytes of its tensors
    graph: int  # compute buffer for encoding one image (or audio clip); heuristic

    @property
    def total(self) -> int:
        return self.weights + self.graph


# audio encoders: frames per 30 s window after the convolutional stem (Whisper-style)
_AUDIO_FRAMES = 1500


def projector_size(proj: GGUFFile) -> ProjectorEstimate:
    """Weights and encode-graph size of a projector file.

    The graph is a ViT-style estimate per image tile: the f32 input image
    (3 * side^2), per patch the residual, norm and QKV-sized activations plus
    the FFN width (3e + ff), the attention scores (heads * patches^2), and
    the projected output (patches * projection_dim). Audio encoders use the
    same shape over 1500 frames. Dynamic-resolution encoders are sized at
    their nominal clip.vision.image_size.
    """
    weights = proj.tensor_bytes
    graph = 0
    vision = proj.vision_info()
    if vision is not None and vision.patch_size:
        n = vision.n_patches + (1 if proj.tensor("v.class_embd") is not None else 0)
        per_tile = (
            3 * vision.image_size * vision.image_size
            + _encoder_activations(n, vision.embedding_length, vision.feed_forward_length, vision.head_count)
            + n * vision.projection_dim
        )
        graph = F32 * vision.max_num_tiles * per_tile
    if proj.has_audio_encoder:
        e = proj.get_int("clip.audio.embedding_length", 0) or 0
        ff = proj.get_int("clip.audio.feed_forward_length", 0) or 0
        heads = proj.get_int("clip.audio.attention.head_count", 0) or 0
        graph = max(graph, F32 * _encoder_activations(_AUDIO_FRAMES, e, ff, heads))
    return ProjectorEstimate(weights=weights, graph=graph)


def _encoder_activations(tokens: int, embd: int, ff: int, heads: int) -> int:
    return tokens * (3 * embd + ff) + heads * tokens * tokens


# ---------------------------------------------------------------------------
# weights per layer


@dataclass(frozen=True)
class LayerWeights:
    """Model weights split the way llama.cpp places them."""

    layers: tuple[int, ...]  # bytes of each repeating layer blk.N
    output: int  # the output layer: output norm and matrix (a copy of token_embd when tied)
    input: int  # tensors that always stay on the CPU: token_embd and other non-layer tensors
    tied: int = 0  # of ``output``, the copy of token_embd a tied model makes only off the CPU

    @property
    def total(self) -> int:
        return sum(self.layers) + self.output + self.input


def layer_weights(info: GGUFFile) -> LayerWeights:
    """Bytes of each repeating layer, the output layer and the CPU-resident input tensors.

    llama.cpp keeps the input layer (token_embd) on the CPU; when the output
    matrix is tied to token_embd it creates a duplicate on the output device,
    which is counted in ``output`` and in ``tied`` (the file itself holds one copy;
    with the output layer on the CPU there is no duplicate).
    """
    n_layer = info.checked_block_count()
    groups = info.layer_bytes()
    layers = tuple(groups.get(f"blk.{il}", 0) for il in range(n_layer))
    output = groups.get("output", 0) + groups.get("output_norm", 0)
    tied = 0
    if info.tensor("output.weight") is None:
        tied = _output_matrix_bytes(info)
        output += tied
    counted = {f"blk.{il}" for il in range(n_layer)} | {"output", "output_norm"}
    cpu = sum(size for name, size in groups.items() if name not in counted)
    return LayerWeights(layers, output, cpu, tied)


# ---------------------------------------------------------------------------
# planning


@dataclass(frozen=True, slots=True)
class Device:
    """A compute device as the backend reports it."""

    id: str  # backend device id, e.g. "CUDA0" or "CPU"
    name: str  # human-readable description
    type: str  # "cpu", "gpu" or "igpu"
    free: int  # bytes free now
    total: int  # bytes in total

    @property
    def is_gpu(self) -> bool:
        return self.type in ("gpu", "igpu")

    @property
    def is_rpc(self) -> bool:
        """A remote device of ggml's RPC backend (ggml names them RPC0, RPC1, ...; type "gpu")."""
        return self.id.startswith("RPC")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> Device:
        """Build from a dict with keys id, type, free, total and optionally name (other keys are ignored)."""
        kind = str(d["type"])
        if kind not in ("cpu", "gpu", "igpu"):
            raise ValueError(f"device type must be cpu, gpu or igpu, not {kind!r}")
        return cls(str(d["id"]), str(d.get("name", d["id"])), kind, int(d["free"]), int(d["total"]))


@dataclass(frozen=True)
class LoadOptions:
    """How the model will be loaded; the inputs of ``plan_layers``."""

    n_ctx: int = 0  # whole context shared by the sequences, as the load's n_ctx; 0 = the model's training context
    parallel: int = 1  # sequences decoded in parallel (one KV stream each unless kv_unified)
    kv_type: str = "f16"  # requested K cache type (and V's unless kv_type_v is given)
    kv_type_v: str | None = None  # requested V cache type; None = kv_type
    n_batch: int = 512  # logical batch size
    n_ubatch: int = 0  # physical batch size; 0 = n_batch
    flash_attention: bool = False  # run attention with flash attention kernels
    n_gpu_layers: int | None = None  # None = decide; else llama.cpp's count (n_layer + 1 also offloads output)
    kv_unified: bool = False  # one KV stream shared by all sequences (llama.cpp kv_unified), as the load's
    swa_full: bool = False  # give sliding-window layers a full-size cache
    projector: GGUFFile | None = None  # multimodal projector loaded on the first GPU
    gpu_reserve: int | None = None  # safety margin per GPU in bytes; None = gpu_reserve(device)
    cache_ram: int = 0  # bound of the prefix cache's host tier in bytes (cache_ram_mb << 20); host RAM
    embeddings: bool = False  # the context keeps embeddings mode (a larger output buffer)


def output_buffer_size(info: GGUFFile, n_seq: int, embeddings: bool = False) -> int:
    """llama.cpp's host output buffer (llama_context::output_reserve): f32 logits
    for one output per sequence, and the embedding too in embeddings mode."""
    return F32 * n_seq * (info.vocab_size + (info.embedding_length if embeddings else 0))


def gpu_reserve(device: Device) -> int:
    """Bytes held back on a GPU: GPU_RESERVE_FIXED + GPU_RESERVE_FRACTION of its total memory."""
    return GPU_RESERVE_FIXED + int(device.total * GPU_RESERVE_FRACTION)


@dataclass(frozen=True)
class DeviceUsage:
    """What the plan puts on one device."""

    device: Device  # the device
    layers: tuple[int, ...]  # repeating layers placed here, ascending
    output: bool  # holds the output layer
    weights: int  # bytes of weights placed here
    kv: int  # bytes of KV cache placed here
    graph: int  # compute buffer bytes
    projector: int  # projector weights + graph bytes
    reserve: int  # safety margin held back (GPUs only)
    host_cache: int = 0  # the prefix cache's host tier at its bound (the CPU entry only)
    outputs: int = 0  # llama.cpp's output buffer: logits (and embeddings) of one token per sequence (the CPU entry)

    @property
    def used(self) -> int:
        return self.weights + self.kv + self.graph + self.projector + self.host_cache + self.outputs

    @property
    def fits(self) -> bool:
        """Whether the device has room (a device reporting no free memory is taken
        as unbounded; one given nothing always has room)."""
        if (self.device.free <= 0 and not self.device.is_gpu) or self.used == 0:
            return True
        return self.used + self.reserve <= self.device.free


@dataclass(frozen=True)
class Plan:
    """Where llama.cpp should put the model, and what each device then holds."""

    n_layer: int  # repeating layers of the model
    n_gpu_layers: int  # llama.cpp n_gpu_layers: the last N of the n_layer + 1 layers (output last)
    tensor_split: tuple[int, ...]  # offloaded layers per GPU, in device order (llama.cpp tensor_split)
    usage: tuple[DeviceUsage, ...]  # per device: GPUs in the given order, then the CPU
    kv: KVCacheEstimate  # the KV cache the plan was made for
    graph: GraphEstimate  # compute-buffer estimate
    flash_attention: bool  # flash attention as planned
    notes: tuple[str, ...]  # decisions and warnings, one sentence each

    @property
    def fully_offloaded(self) -> bool:
        return self.n_gpu_layers == self.n_layer + 1

    @property
    def fits(self) -> bool:
        return all(u.fits for u in self.usage)

    def table(self) -> str:
        """A per-device table of the plan, followed by its notes."""
        header = ("device", "type", "layers", "weights", "kv cache", "graph", "outputs", "projector", "host cache",
                  "reserve", "total", "free", "")
        rows = [header]
        for u in self.usage:
            rows.append(
                (
                    u.device.id,
                    u.device.type,
                    _layer_ranges(u.layers, u.output),
                    format_bytes(u.weights),
                    format_bytes(u.kv),
                    format_bytes(u.graph),
                    format_bytes(u.outputs),
                    format_bytes(u.projector),
                    format_bytes(u.host_cache),
                    format_bytes(u.reserve),
                    format_bytes(u.used + u.reserve),
                    format_bytes(u.device.free) if u.device.free > 0 else "-",
                    "ok" if u.fits else "OVER",
                )
            )
        lines = _format_rows(rows)
        kv = self.kv
        lines.append(
            f"n_gpu_layers = {self.n_gpu_layers}/{self.n_layer + 1}, tensor_split = {list(self.tensor_split)}, "
            f"kv {kv.type_k}/{kv.type_v} x {kv.shape.kv_size} cells x {kv.shape.n_stream} stream(s), "
            f"flash attention {'on' if self.flash_attention else 'off'}"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def plan_layers(
    info: GGUFFile,
    devices: Iterable[Device | Mapping[str, Any]],
    options: LoadOptions | None = None,
) -> Plan:
    """Decide n_gpu_layers and the per-GPU split (whole layers) for loading ``info``.

    llama.cpp offloads the *last* n_gpu_layers of the n_layer + 1 layers (the
    output layer counts as the last) and hands them to the GPUs in device
    order (remote RPC devices first, as llama.cpp orders them), in
    contiguous runs of the sizes given by tensor_split. Each GPU
    that receives layers needs their weights and KV cache plus a compute
    buffer (the full-offload graph when everything is offloaded, else the
    partial one); the first GPU also holds the projector. On top, every GPU
    keeps ``gpu_reserve`` free.

    With n_gpu_layers=None the plan offloads as many layers as fit and
    spreads them over the GPUs in proportion to their room. A requested
    n_gpu_layers is honoured as is (clamped to n_layer + 1, negative meaning
    all); devices it overfills are marked in the table.
    """
    opts = options or LoadOptions()
    devs = [d if isinstance(d, Device) else Device.from_mapping(d) for d in devices]
    # llama.cpp puts remote (RPC) devices ahead of the local GPUs in a model's
    # device list, to keep the network hops few (src/llama.cpp, "add RPC
    # servers at the front"); tensor_split follows that list.
    gpus = sorted((d for d in devs if d.is_gpu), key=lambda d: not d.is_rpc)
    cpu = next((d for d in devs if d.type == "cpu"), Device("CPU", "CPU", "cpu", 0, 0))
    notes: list[str] = []

    est = estimate(info, opts)
    flash = opts.flash_attention and supports_flash_attention(info)
    if opts.flash_attention and not flash:
        notes.append(f"flash attention off: not supported for {info.architecture or 'this model'}")
    if est.kv_note:
        notes.append(est.kv_note)
    kv, graph, weights, proj = est.kv, est.graph, est.weights, est.projector

    n_layer = info.block_count
    # bytes of the n_layer + 1 placeable items: repeating layers with their KV, then the output layer
    item_bytes = [w + k for w, k in zip(weights.layers, kv.per_layer)] + [weights.output]
    budgets = [d.free - (opts.gpu_reserve if opts.gpu_reserve is not None else gpu_reserve(d)) for d in gpus]
    fixed_first = proj.total if proj is not None and gpus else 0

    if not gpus:
        counts: list[int] = []
        n_gpu = 0
        if opts.n_gpu_layers:
            notes.append(f"n_gpu_layers = {opts.n_gpu_layers} requested, but there is no GPU")
    elif opts.n_gpu_layers is not None:
        n_gpu = n_layer + 1 if opts.n_gpu_layers < 0 else min(opts.n_gpu_layers, n_layer + 1)
        g = graph.full if n_gpu == n_layer + 1 else graph.partial
        counts = _balanced_split(item_bytes, n_gpu, budgets, g, fixed_first, unbounded=True)
    else:
        n_gpu, counts = _most_layers(item_bytes, budgets, graph, fixed_first)
        if n_gpu == 0:
            notes.append("no GPU has room for a single layer; running on the CPU")
        elif n_gpu < n_layer + 1:
            notes.append(f"partial offload: {n_gpu} of {n_layer + 1} layers fit on the GPUs")

    usage = _usage(info, gpus, cpu, counts, n_gpu, weights, kv, graph, proj, opts)
    if proj is not None:
        # the runner loads the projector on the GPU only when the model offloads layers
        notes.append(f"projector on {gpus[0].id if gpus and n_gpu else cpu.id}")
    return Plan(
        n_layer=n_layer,
        n_gpu_layers=n_gpu,
        tensor_split=tuple(counts),
        usage=tuple(usage),
        kv=kv,
        graph=graph,
        flash_attention=flash,
        notes=tuple(notes),
    )


def _greedy_split(items: Sequence[int], rooms: Sequence[float]) -> list[int] | None:
    """Fill GPUs in order with the items (the offloaded tail); None if they do not all fit.

    ``rooms`` is each GPU's budget minus its fixed costs (compute buffer,
    and the projector on the first GPU).
    """
    counts = []
    i = 0
    for room in rooms:
        taken = 0
        while i < len(items) and items[i] <= room:
            room -= items[i]
            i += 1
            taken += 1
        counts.append(taken)
    return counts if i == len(items) else None


def _rooms(budgets: Sequence[int], graph: int, fixed_first: int) -> list[int]:
    return [b - graph - (fixed_first if g == 0 else 0) for g, b in enumerate(budgets)]


def _balanced_split(
    item_bytes: Sequence[int],
    n_gpu: int,
    budgets: Sequence[int],
    graph: int,
    fixed_first: int,
    unbounded: bool = False,
) -> list[int]:
    """Counts per GPU for the last ``n_gpu`` items, spread in proportion to each GPU's room.

    Bisects the smallest common fraction u of every GPU's room (budget minus
    fixed costs) that still holds all items when filled in order, so no GPU
    fills up much sooner than another. ``unbounded`` lets u exceed 1 (a
    requested layer count that does not fit is still split by capacity).
    """
    items = list(item_bytes[len(item_bytes) - n_gpu :]) if n_gpu else []
    if not items:
        return [0] * len(budgets)
    rooms = _rooms(budgets, graph, fixed_first)
    if unbounded:
        rooms = [max(r, 1) for r in rooms]
    hi = 1.0
    while _greedy_split(items, [r * hi for r in rooms]) is None:
        if not unbounded or hi > 1e12:
            raise ValueError("the layers do not fit")
        hi *= 2
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if _greedy_split(items, [r * mid for r in rooms]) is None:
            lo = mid
        else:
            hi = mid
    counts = _greedy_split(items, [r * hi for r in rooms])
    assert counts is not None
    return counts


def _most_layers(
    item_bytes: Sequence[int], budgets: Sequence[int], graph: GraphEstimate, fixed_first: int
) -> tuple[int, list[int]]:
    """The largest number of trailing items that fit, and its balanced split."""
    total = len(item_bytes)
    if _greedy_split(item_bytes, _rooms(budgets, graph.full, fixed_first)) is not None:
        return total, _balanced_split(item_bytes, total, budgets, graph.full, fixed_first)
    rooms = _rooms(budgets, graph.partial, fixed_first)
    for n in range(total - 1, 0, -1):
        if _greedy_split(item_bytes[total - n :], rooms) is not None:
            return n, _balanced_split(item_bytes, n, budgets, graph.partial, fixed_first)
    return 0, [0] * len(budgets)


def _usage(
    info: GGUFFile,
    gpus: Sequence[Device],
    cpu: Device,
    counts: Sequence[int],
    n_gpu: int,
    weights: LayerWeights,
    kv: KVCacheEstimate,
    graph: GraphEstimate,
    proj: ProjectorEstimate | None,
    opts: LoadOptions,
) -> list[DeviceUsage]:
    n_layer = len(weights.layers)
    first = n_layer + 1 - n_gpu  # first offloaded item index
    g_cost = graph.full if n_gpu == n_layer + 1 else graph.partial
    out: list[DeviceUsage] = []
    start = first
    for g, dev in enumerate(gpus):
        items = range(start, start + (counts[g] if g < len(counts) else 0))
        start = items.stop
        layers = tuple(i for i in items if i < n_layer)
        has_output = n_layer in items
        out.append(
            DeviceUsage(
                device=dev,
                layers=layers,
                output=has_output,
                weights=sum(weights.layers[i] for i in layers) + (weights.output if has_output else 0),
                kv=sum(kv.per_layer[i] for i in layers),
                graph=g_cost if len(items) else 0,
                projector=proj.total if proj is not None and g == 0 and n_gpu else 0,
                reserve=opts.gpu_reserve if opts.gpu_reserve is not None else gpu_reserve(dev),
            )
        )
    cpu_layers = tuple(range(min(first, n_layer)))
    cpu_output = n_gpu == 0
    b, e = kv.shape.n_ubatch, info.embedding_length
    out.append(
        DeviceUsage(
            device=cpu,
            layers=cpu_layers,
            output=cpu_output,
            # a tied output left on the CPU reads token_embd itself: no copy
            weights=weights.input + sum(weights.layers[i] for i in cpu_layers)
            + (weights.output - weights.tied if cpu_output else 0),
            kv=sum(kv.per_layer[i] for i in cpu_layers),
            graph=graph.cpu if cpu_layers or cpu_output else F32 * b * e,
            projector=proj.total if proj is not None and not n_gpu else 0,
            reserve=0,
            host_cache=opts.cache_ram,
            outputs=output_buffer_size(info, kv.shape.n_seq_max, opts.embeddings),
        )
    )
    return out


# ---------------------------------------------------------------------------
# summary for `inspect`


@dataclass(frozen=True)
class MemoryEstimate:
    """Device-independent memory summary of loading a model."""

    weights: LayerWeights  # weight bytes by placement class
    kv: KVCacheEstimate  # KV cache
    graph: GraphEstimate  # compute buffers
    projector: ProjectorEstimate | None  # projector, when one was given
    kv_note: str | None  # why the requested KV type was replaced, if it was
    host_cache: int = 0  # the prefix cache's host tier at its bound: host RAM, on no GPU

    @property
    def full_offload(self) -> int:
        """GPU bytes for offloading everything (weights except the CPU-resident input, KV, graph, projector)."""
        proj = self.projector.total if self.projector else 0
        return sum(self.weights.layers) + self.weights.output + self.kv.total + self.graph.full + proj

    def table(self) -> str:
        rows: list[tuple[str, ...]] = [("component", "size", "detail")]
        w, kv = self.weights, self.kv
        rows.append(("layer weights", format_bytes(sum(w.layers)), f"{len(w.layers)} layers"))
        rows.append(("output layer", format_bytes(w.output), ""))
        rows.append(("input (CPU)", format_bytes(w.input), "token embeddings and other non-layer tensors"))
        for cache in kv.caches:
            rows.append(
                (
                    f"kv cache ({cache.name})",
                    format_bytes(cache.total),
                    (
                        f"{kv.type_k}/{kv.type_v}, {cache.cells} cells x {cache.streams} stream(s), "
                        f"{len(cache.layers)} layers, llama.cpp log {cache.log_mib} MiB"
                    ),
                )
            )
        rows.append(("graph, full offload", format_bytes(self.graph.full), f"formula {self.graph.formula}"))
        rows.append(("graph, partial offload", format_bytes(self.graph.partial), "per GPU"))
        if self.projector is not None:
            rows.append(("projector weights", format_bytes(self.projector.weights), ""))
            rows.append(("projector graph", format_bytes(self.projector.graph), ""))
        rows.append(("total, full offload", format_bytes(self.full_offload), "GPU memory, before safety margin"))
        if self.host_cache:
            rows.append(("prefix cache, host tier", format_bytes(self.host_cache),
                         "host RAM at most (cache_ram_mb), beyond the weights"))
        lines = _format_rows(rows)
        if self.kv_note:
            lines.append(f"note: {self.kv_note}")
        return "\n".join(lines)


def estimate(info: GGUFFile, options: LoadOptions | None = None) -> MemoryEstimate:
    """Memory summary for ``info`` under ``options`` (devices are not considered)."""
    opts = options or LoadOptions()
    flash = opts.flash_attention and supports_flash_attention(info)
    type_k, note_k = effective_kv_type(info, opts.kv_type, flash)
    type_v, note_v = effective_kv_type(info, opts.kv_type_v or opts.kv_type, flash)
    note = note_k or note_v
    if note_v and note_v != note_k:
        note = f"{note_k}; V: {note_v}" if note_k else f"V: {note_v}"
    kv = kv_cache_size(
        info,
        n_ctx=opts.n_ctx,
        parallel=opts.parallel,
        type_k=type_k,
        type_v=type_v,
        flash_attention=flash,
        n_batch=opts.n_batch,
        n_ubatch=opts.n_ubatch,
        unified=opts.kv_unified,
        swa_full=opts.swa_full,
    )
    graph = graph_size(info, kv_cells=kv.shape.kv_size, n_ubatch=kv.shape.n_ubatch, flash_attention=flash)
    proj = projector_size(opts.projector) if opts.projector is not None else None
    return MemoryEstimate(layer_weights(info), kv, graph, proj, note, opts.cache_ram)


# ---------------------------------------------------------------------------
# formatting


def format_bytes(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (two decimals)."""
    if n == 0:
        return "0"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _layer_ranges(layers: Sequence[int], output: bool) -> str:
    parts = []
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    if output:
        parts.append("output")
    return ",".join(parts) or "-"


def _format_rows(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
