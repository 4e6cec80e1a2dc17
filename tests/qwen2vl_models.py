"""A tiny random-weight Qwen2-VL pair (text model + ``qwen2vl_merger`` projector), for tests.

Qwen2-VL places image embeddings with M-RoPE: every KV position has four
coordinates (time, row, column, unused), and an image of ``nx`` by ``ny``
merged tokens advances the text position by only ``max(nx, ny)``
(``n_pos < n_tokens``).  The default model (SmolLM2, a llama) never does this,
and no small real Qwen2-VL model can be downloaded here, so tests build their
own pair with the ``gguf`` package:

- :func:`write_qwen2vl_text_model`: ``general.architecture = "qwen2vl"`` with
  the shapes in :data:`TEXT`; llama.cpp's loader (src/models/qwen2vl.cpp)
  wants token_embd, output_norm, per layer attn_norm, attn_q/k/v (+ biases),
  attn_output, ffn_norm, ffn_gate/up/down; ``output`` is left out, so the
  embeddings are tied.  ``qwen2vl.rope.dimension_sections`` splits the
  rotated pairs of a head (head_dim / 2 = 8) between time, rows and columns.
  The tokenizer (every ``tokenizer.*`` key) is copied from the default model,
  so it has SmolLM2's 49152 tokens and chat template; the token embeddings
  (F16, 6 MB) are most of the file.
- :func:`write_qwen2vl_projector`: ``clip.projector_type = "qwen2vl_merger"``
  (tools/mtmd/clip.cpp, models/qwen2vl.cpp): two patch convolutions summed (no
  bias), ViT blocks with 2-D M-RoPE and LayerNorm, a post-norm, then 2x2
  neighbouring patches concatenated and sent through a GELU MLP (mm.0, mm.2).

Images are resized (bicubic, aspect kept) to multiples of ``patch_size * 2``
with at least 8 and at most 4096 merged tokens -- limits fixed in clip.cpp for
this projector type, not read from the file -- see :func:`image_grid`.  With
patch size 8: 32x32 gives 3x3 = 9 tokens at 3 positions, 64x64 gives 4x4 = 16
tokens at 4 positions, 64x32 gives 4x2 = 8 tokens at 4 positions.  mtmd wraps
them in ``<|vision_start|>`` / ``<|vision_end|>``, which SmolLM2's vocabulary
tokenizes as plain text.

The weights are random, so outputs mean nothing; the same seed gives the same
bytes.  Writing the text model takes about half a second (8 MB, mostly the
vocabulary and token embeddings), the projector a few milliseconds.  The
vendored loader ignores ``qwen2vl.attention.layer_norm_rms_epsilon`` (it runs
with eps 0), which random non-zero activations do not mind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmproj import (
    _CLIP_MEAN, _CLIP_STD, _add_block, _add_encoder_hparams, _matrix, _ones, _zeros, finish_gguf,
    text_model_writer,
)

ARCH = "qwen2vl"


@dataclass(frozen=True)
class TextShape:
    """Hyperparameters of the tiny ``qwen2vl`` text model."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 4096
    # rotated pairs per head given to (time, row, column, unused); sum = head_dim / 2
    rope_sections: tuple[int, int, int, int] = (2, 3, 3, 0)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class VisionShape:
    """Hyperparameters of the tiny ``qwen2vl_merger`` projector."""

    patch_size: int = 8  # pixels per patch side; a merged token covers 2x2 patches
    hidden: int = 32  # ViT width; hidden / n_head must be a multiple of 4 (vision M-RoPE)
    n_head: int = 4
    n_ff: int = 48  # must differ from hidden (else clip.cpp swaps ffn_up / ffn_down)
    n_layer: int = 1
    image_size: int = 64  # unused by this projector type's preprocessing, but required

    @property
    def merge_px(self) -> int:
        return self.patch_size * 2


TEXT = TextShape()
VISION = VisionShape()

# clip.cpp: set_limit_image_tokens(8, 4096) for qwen2vl_merger
MIN_IMAGE_TOKENS = 8
MAX_IMAGE_TOKENS = 4096


def image_grid(width: int, height: int, vision: VisionShape = VISION) -> tuple[int, int]:
    """(nx, ny) merged tokens mtmd makes of a ``width`` x ``height`` image.

    n_tokens = nx * ny, n_pos = max(nx, ny).  Mirrors clip's smart resize (in
    doubles, not floats: an image exactly on a rounding edge may differ)."""
    f = vision.merge_px
    lo, hi = MIN_IMAGE_TOKENS * f * f, MAX_IMAGE_TOKENS * f * f
    w = max(f, math.floor(width / f + 0.5) * f)  # std::round: halves away from zero
    h = max(f, math.floor(height / f + 0.5) * f)
    if w * h > hi:
        beta = math.sqrt(width * height / hi)
        w, h = max(f, math.floor(width / beta / f) * f), max(f, math.floor(height / beta / f) * f)
    elif w * h < lo:
        beta = math.sqrt(lo / (width * height))
        w, h = math.ceil(width * beta / f) * f, math.ceil(height * beta / f) * f
    return w // f, h // f


def write_qwen2vl_text_model(
    path: str | Path, seed: int = 0, *, shape: TextShape = TEXT, vocab_from: str | Path | None = None
) -> Path:
    """Write the text model; the tokenizer comes from ``vocab_from`` (default: the default model)."""
    if shape.n_embd % shape.n_head or shape.n_head % shape.n_head_kv:
        raise ValueError(f"inconsistent text model shape {shape}")
    if sum(shape.rope_sections) * 2 != shape.head_dim or len(shape.rope_sections) != 4:
        raise ValueError(f"rope sections {shape.rope_sections} must sum to head_dim / 2")

    path = Path(path)
    rng = np.random.default_rng(seed)
    w, n_vocab = text_model_writer(
        path, ARCH, seed, n_ctx=shape.n_ctx, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_ff=shape.n_ff, n_head=shape.n_head, n_head_kv=shape.n_head_kv, rope_freq_base=10000.0,
        vocab_from=vocab_from)
    w.add_array(f"{ARCH}.rope.dimension_sections", list(shape.rope_sections))  # INT32[4]

    d, d_kv = shape.n_embd, shape.head_dim * shape.n_head_kv
    # numpy shapes are ggml's ne reversed: (outputs, inputs)
    w.add_tensor("token_embd.weight", _matrix(rng, n_vocab, d))  # also the output head (tied)
    w.add_tensor("output_norm.weight", _ones(d))
    for il in range(shape.n_layer):
        blk = f"blk.{il}"
        w.add_tensor(f"{blk}.attn_norm.weight", _ones(d))
        for name, rows in (("attn_q", d), ("attn_k", d_kv), ("attn_v", d_kv)):
            w.add_tensor(f"{blk}.{name}.weight", _matrix(rng, rows, d))
            w.add_tensor(f"{blk}.{name}.bias", _zeros(rows))
        w.add_tensor(f"{blk}.attn_output.weight", _matrix(rng, d, d))
        w.add_tensor(f"{blk}.ffn_norm.weight", _ones(d))
        w.add_tensor(f"{blk}.ffn_gate.weight", _matrix(rng, shape.n_ff, d))
        w.add_tensor(f"{blk}.ffn_up.weight", _matrix(rng, shape.n_ff, d))
        w.add_tensor(f"{blk}.ffn_down.weight", _matrix(rng, d, shape.n_ff))
    finish_gguf(w)
    return path


def write_qwen2vl_projector(
    path: str | Path, n_embd_out: int = TEXT.n_embd, seed: int = 0, *, shape: VisionShape = VISION
) -> Path:
    """Write the ``qwen2vl_merger`` projector; ``n_embd_out`` must be the text model's width."""
    import gguf

    v = shape
    if v.hidden % v.n_head or (v.hidden // v.n_head) % 4 or v.hidden == v.n_ff:
        raise ValueError(f"inconsistent vision encoder shape {v}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_string("general.name", "llama-runner test qwen2vl projector")
    w.add_string("general.description", f"random weights, seed {seed}")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_audio_encoder", False)
    w.add_string("clip.projector_type", "qwen2vl_merger")
    _add_encoder_hparams(w, "vision", v.hidden, v.n_head, v.n_ff, v.n_layer, n_embd_out)
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.spatial_merge_size", 2)  # the graph hard-codes 2x2 merging
    w.add_array("clip.vision.image_mean", _CLIP_MEAN)
    w.add_array("clip.vision.image_std", _CLIP_STD)

    # two conv2d kernels (Qwen2-VL's temporal patch of 2 frames), numpy (out, in, kh, kw);
    # clip.cpp asserts there is no v.patch_embd.bias, position embedding or class embedding
    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
        w.add_tensor(name, _matrix(rng, v.hidden, 3, v.patch_size, v.patch_size))
    for il in range(v.n_layer):
        _add_block(w, rng, f"v.blk.{il}", v.hidden, v.n_ff, k_bias=True)
    w.add_tensor("v.post_ln.weight", _ones(v.hidden))
    w.add_tensor("v.post_ln.bias", _zeros(v.hidden))
    merged = 4 * v.hidden  # 2x2 patches concatenated
    w.add_tensor("mm.0.weight", _matrix(rng, merged, merged))
    w.add_tensor("mm.0.bias", _zeros(merged))
    w.add_tensor("mm.2.weight", _matrix(rng, n_embd_out, merged))
    w.add_tensor("mm.2.bias", _zeros(n_embd_out))  # mtmd takes the output width from this one
    finish_gguf(w)
    return path

