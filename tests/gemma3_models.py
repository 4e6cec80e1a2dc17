"""A tiny random-weight Gemma 3 text model and ``gemma3`` vision projector, for tests.

libmtmd decodes the embeddings of some projectors with NON-CAUSAL attention
(``mtmd_decode_use_non_causal``, vendor/llama.cpp/tools/mtmd/mtmd.cpp): every
image row attends to every other, so an image must go into the KV cache in one
ubatch with causal attention switched off.  Projector type ``gemma3`` is one of
them, and it only loads next to a text model with ``general.architecture =
gemma3`` of the same width.  No small real Gemma 3 model can be downloaded here,
so tests write both files, with random weights, the keys and tensor names that
vendor/llama.cpp/src/models/gemma3.cpp and tools/mtmd/clip.cpp read:

- Text (``write_gemma3_text_model``): a 2-layer Gemma 3 (RMS norms before and
  after attention and FFN, per-head q/k norms, GELU-gated FFN, embeddings
  scaled by sqrt(n_embd), output tied to ``token_embd``), with interleaved
  sliding-window attention: with pattern 2, layer 0 is SWA and layer 1 global,
  so llama.cpp builds its two-part (iSWA) KV cache.  Real Gemma 3 has a
  SentencePiece vocab; this one carries every ``tokenizer.*`` key of the default
  model (SmolLM2's 49152-token BPE and chat template), which llama.cpp accepts
  with any architecture.  ``<start_of_image>`` / ``<end_of_image>`` are not
  tokens of that vocab, so the text mtmd puts around an image is ordinary text.
- Vision (``write_gemma3_projector``): a SigLIP-style ViT (conv patch
  embedding, learned positions, LayerNorm blocks with GELU, post-LayerNorm),
  then Gemma 3's projection: average pooling ``merge`` x ``merge`` patches into
  one, an RMS "soft embedding" norm and ``mm.input_projection``.  Any image is
  resized to ``image_size`` squared and gives
  ``(image_size // patch_size // merge) ** 2`` embeddings, framed by the text
  "<start_of_image>" before and "<end_of_image>" after.

The same seed gives the same bytes.  ``n_embd_out`` other than the text model's
width makes a projector that mtmd refuses ("mismatch between text model ...").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mmproj import _add_block, _matrix, _normal, _ones, _zeros, finish_gguf, text_model_writer

GEMMA3_N_EMBD = 64  # width of the tiny text model, which the projector's output must match

# SigLIP's normalisation (what Gemma 3's converter writes)
_SIGLIP_MEAN = [0.5, 0.5, 0.5]
_SIGLIP_STD = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class Gemma3Text:
    """Shape of the tiny Gemma 3 text model (``gemma3.*`` keys)."""

    n_embd: int = GEMMA3_N_EMBD
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2  # grouped-query attention: 2 query heads per KV head
    head_dim: int = 16  # n_head * head_dim need not equal n_embd for Gemma, but does here
    n_ff: int = 128
    n_ctx_train: int = 4096
    sliding_window: int = 512  # tokens an SWA layer sees; larger than any test prompt
    swa_pattern: int = 2  # every swa_pattern-th layer is global, the others SWA; 0 = all SWA


@dataclass(frozen=True)
class Gemma3Vision:
    """Shape of the tiny SigLIP encoder + Gemma 3 projector (``clip.vision.*``)."""

    image_size: int = 112  # side of the square every image is resized to, in pixels
    patch_size: int = 14  # as in SigLIP-so400m; must divide image_size
    hidden: int = 32  # encoder width
    n_head: int = 4
    n_ff: int = 48  # must differ from hidden (else clip.cpp swaps ffn up/down)
    n_layer: int = 2  # all of them run
    merge: int = 2  # pooling kernel per side (real Gemma 3: 4, 64x64 patches -> 256 tokens)

    @property
    def n_tokens(self) -> int:
        """Embeddings (text-model positions) one image takes."""
        return (self.image_size // self.patch_size // self.merge) ** 2


def write_gemma3_text_model(
    path: str | Path, seed: int = 0, *, vocab_from: str | Path | None = None, **shape: int
) -> Path:
    """Write a tiny ``gemma3`` text model; ``shape`` overrides fields of Gemma3Text.

    The tokenizer keys come from ``vocab_from`` (default: the default model).
    """
    t = Gemma3Text(**shape)
    if t.n_head % t.n_head_kv or t.n_layer < 1:
        raise ValueError(f"inconsistent text model shape {t}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    arch = "gemma3"
    w, n_vocab = text_model_writer(
        path, arch, seed, n_ctx=t.n_ctx_train, n_embd=t.n_embd, n_layer=t.n_layer, n_ff=t.n_ff,
        n_head=t.n_head, n_head_kv=t.n_head_kv, rope_freq_base=1_000_000.0,  # global layers
        vocab_from=vocab_from)
    w.add_uint32(f"{arch}.attention.key_length", t.head_dim)
    w.add_uint32(f"{arch}.attention.value_length", t.head_dim)
    w.add_float32(f"{arch}.rope.freq_base_swa", 10_000.0)  # SWA layers
    # without a window > 0 gemma3 has no SWA at all; the pattern defaults to 6
    # (5 SWA layers, then a global one), which would make both of ours SWA
    w.add_uint32(f"{arch}.attention.sliding_window", t.sliding_window)
    w.add_uint32(f"{arch}.attention.sliding_window_pattern", t.swa_pattern)

    e, q, kv = t.n_embd, t.n_head * t.head_dim, t.n_head_kv * t.head_dim
    # numpy shapes are ggml's ne reversed: (rows = outputs, cols = inputs); no
    # output.weight, so the LM head is token_embd (the largest tensor: F16)
    w.add_tensor("token_embd.weight", _matrix(rng, n_vocab, e))
    w.add_tensor("output_norm.weight", _ones(e))
    for il in range(t.n_layer):
        blk = f"blk.{il}"
        w.add_tensor(f"{blk}.attn_norm.weight", _ones(e))
        w.add_tensor(f"{blk}.attn_q.weight", _matrix(rng, q, e))
        w.add_tensor(f"{blk}.attn_k.weight", _matrix(rng, kv, e))
        w.add_tensor(f"{blk}.attn_v.weight", _matrix(rng, kv, e))
        w.add_tensor(f"{blk}.attn_q_norm.weight", _ones(t.head_dim))
        w.add_tensor(f"{blk}.attn_k_norm.weight", _ones(t.head_dim))
        w.add_tensor(f"{blk}.attn_output.weight", _matrix(rng, e, q))
        w.add_tensor(f"{blk}.post_attention_norm.weight", _ones(e))
        w.add_tensor(f"{blk}.ffn_norm.weight", _ones(e))
        w.add_tensor(f"{blk}.ffn_gate.weight", _matrix(rng, t.n_ff, e))
        w.add_tensor(f"{blk}.ffn_up.weight", _matrix(rng, t.n_ff, e))
        w.add_tensor(f"{blk}.ffn_down.weight", _matrix(rng, e, t.n_ff))
        w.add_tensor(f"{blk}.post_ffw_norm.weight", _ones(e))
    finish_gguf(w)
    return path


def write_gemma3_projector(
    path: str | Path, n_embd_out: int = GEMMA3_N_EMBD, seed: int = 0, **shape: int
) -> Path:
    """Write a ``gemma3`` vision projector; ``shape`` overrides fields of Gemma3Vision."""
    import gguf

    v = Gemma3Vision(**shape)
    n_side = v.image_size // v.patch_size
    if v.image_size % v.patch_size or n_side % v.merge or v.hidden % v.n_head or v.hidden == v.n_ff:
        raise ValueError(f"inconsistent vision encoder shape {v}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_string("general.name", "llama-runner test gemma3 projector")
    w.add_string("general.description", f"random weights, seed {seed}")
    w.add_string("clip.projector_type", "gemma3")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_audio_encoder", False)
    w.add_bool("clip.use_gelu", True)  # SigLIP's FFN (else clip.cpp uses quick GELU)
    # clip.cpp reads these with gguf_get_val_u32 / _f32, which abort on any other value type
    w.add_uint32("clip.vision.embedding_length", v.hidden)
    w.add_uint32("clip.vision.attention.head_count", v.n_head)
    w.add_uint32("clip.vision.feed_forward_length", v.n_ff)
    w.add_uint32("clip.vision.block_count", v.n_layer)
    w.add_uint32("clip.vision.projection_dim", n_embd_out)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.projector.scale_factor", v.merge)  # clip.cpp's default for gemma3: 4
    w.add_array("clip.vision.image_mean", _SIGLIP_MEAN)
    w.add_array("clip.vision.image_std", _SIGLIP_STD)

    # conv2d kernel, numpy (out, in, kh, kw) = ggml ne [kw, kh, in, out]
    w.add_tensor("v.patch_embd.weight", _matrix(rng, v.hidden, 3, v.patch_size, v.patch_size))
    w.add_tensor("v.patch_embd.bias", _zeros(v.hidden))
    w.add_tensor("v.position_embd.weight", _normal(rng, n_side * n_side, v.hidden))  # no class token
    for il in range(v.n_layer):
        _add_block(w, rng, f"v.blk.{il}", v.hidden, v.n_ff, k_bias=True)
    w.add_tensor("v.post_ln.weight", _ones(v.hidden))  # SigLIP: post-norm, no pre-norm
    w.add_tensor("v.post_ln.bias", _zeros(v.hidden))
    w.add_tensor("mm.soft_emb_norm.weight", _ones(v.hidden))
    # stored (in, out) = ggml ne [n_embd_out, hidden]: clip.cpp transposes it, and
    # mtmd checks the text model's width against its ne[0]
    w.add_tensor("mm.input_projection.weight", _matrix(rng, v.hidden, n_embd_out))
    finish_gguf(w)
    return path

