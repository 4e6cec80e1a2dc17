"""Tiny multimodal projector (mmproj) GGUFs with random weights, and small media files, for tests.

No small real vision or audio model can be fetched here, so tests build their own
projector: the smallest files mtmd's clip loader (vendor/llama.cpp/tools/mtmd/clip.cpp)
accepts, with the keys and tensor names it reads.  The weights are random, so the
embeddings mean nothing, but loading, preprocessing, encoding and decoding them
next to the default text model run the real code paths in milliseconds.

- Vision: projector type ``mlp`` (LLaVA-1.5): a CLIP-style ViT whose
  second-to-last layer feeds a two-layer MLP.  Any image is resized to
  ``image_size`` squared and gives ``(image_size // patch_size) ** 2`` embeddings,
  with no marker tokens around them, causal attention and ordinary positions
  in the text model (no M-RoPE).
- Audio: projector type ``ultravox``: a Whisper encoder (two 1-D convolutions,
  then a transformer over 1500 frames) whose output is stacked ``stack_factor``
  frames at a time and projected by a SwiGLU MLP.  Audio is cut into 30 s
  windows (the last one padded with silence); each gives
  ``1500 // stack_factor`` embeddings, with no marker tokens.

The same seed gives the same bytes.  ``n_embd_out`` other than the text model's
width (576 for SmolLM2-135M) makes a projector that mtmd refuses with
"mismatch between text model (n_embd = 576) and mmproj (n_embd = ...)".
"""

from __future__ import annotations

import io
import struct
import wave
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# width of the default text model (SmolLM2-135M), which the projector's output must match
TEXT_N_EMBD = 576

# Whisper: 30 s of audio is 3000 mel frames, halved by the stride-2 convolution
AUDIO_FRAMES = 1500
AUDIO_SAMPLE_RATE = 16000  # what mtmd resamples audio to before the mel spectrogram

# CLIP's normalisation constants, as LLaVA's converter writes them
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class VisionEncoder:
    """Shape of the tiny ViT + LLaVA MLP projector (``clip.vision.*``)."""

    image_size: int = 32  # side of the square every image is resized to, in pixels
    patch_size: int = 8  # side of one patch in pixels; must divide image_size
    hidden: int = 32  # encoder width (clip.vision.embedding_length)
    n_head: int = 4  # attention heads; must divide hidden
    n_ff: int = 48  # encoder FFN width; must differ from hidden (else clip.cpp swaps up/down)
    n_layer: int = 2  # encoder layers; the llava graph runs the first n_layer - 1 of them
    proj_hidden: int = 64  # width between mm.0 and mm.2

    @property
    def n_tokens(self) -> int:
        """Embeddings (text-model positions) one image takes."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class AudioEncoder:
    """Shape of the tiny Whisper encoder + Ultravox projector (``clip.audio.*``)."""

    n_mel: int = 80  # mel bins of the spectrogram (1..256)
    hidden: int = 32  # encoder width (clip.audio.embedding_length)
    n_head: int = 4  # attention heads; must divide hidden
    n_ff: int = 48  # encoder FFN width
    n_layer: int = 1  # encoder layers, all of them run
    stack_factor: int = 20  # frames stacked into one embedding; should divide 1500
    proj_hidden: int = 64  # width after the SwiGLU of the projector

    @property
    def n_tokens_per_window(self) -> int:
        """Embeddings one 30 s window of audio takes (any shorter clip is one window)."""
        return AUDIO_FRAMES // self.stack_factor


def write_projector(
    path: str | Path,
    *,
    vision: VisionEncoder | None = None,
    audio: AudioEncoder | None = None,
    n_embd_out: int = TEXT_N_EMBD,
    seed: int = 0,
) -> Path:
    """Write a projector with a vision encoder, an audio encoder or both; return its path."""
    import gguf  # test dependency only: keep importing this module cheap

    if vision is None and audio is None:
        raise ValueError("a projector needs a vision or an audio encoder")
    path = Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_string("general.name", "llama-runner test projector")
    w.add_string("general.description", f"random weights, seed {seed}")
    w.add_bool("clip.has_vision_encoder", vision is not None)
    w.add_bool("clip.has_audio_encoder", audio is not None)
    if vision is not None and audio is not None:
        w.add_string("clip.vision.projector_type", "mlp")
        w.add_string("clip.audio.projector_type", "ultravox")
    else:
        w.add_string("clip.projector_type", "mlp" if vision is not None else "ultravox")
    if vision is not None:
        _add_vision(w, vision, n_embd_out, rng)
    if audio is not None:
        _add_audio(w, audio, n_embd_out, rng)
    finish_gguf(w)
    return path


def finish_gguf(w) -> None:
    """Write a GGUFWriter's header, key/values and tensors, then close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def text_model_writer(path, arch: str, seed: int, *, n_ctx: int, n_embd: int, n_layer: int,
                      n_ff: int, n_head: int, n_head_kv: int, rope_freq_base: float,
                      vocab_from=None, tokenizer_replace: dict | None = None):
    """A GGUFWriter for a tiny random-weight text model of ``arch``, holding
    the keys every architecture reads (llama.cpp's get_key: u32 / f32; names
    from src/llama-arch.cpp) and the tokenizer of ``vocab_from`` (default:
    the default model) with ``tokenizer_replace``'s keys put in.  Returns
    (writer, vocabulary size); the caller adds its own keys and tensors, then
    calls :func:`finish_gguf`."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)  # writes general.architecture
    w.add_string("general.name", f"llama-runner test {arch}")
    w.add_string("general.description", f"random weights, seed {seed}")
    w.add_uint32(f"{arch}.context_length", n_ctx)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_uint32(f"{arch}.feed_forward_length", n_ff)
    w.add_uint32(f"{arch}.attention.head_count", n_head)
    w.add_uint32(f"{arch}.attention.head_count_kv", n_head_kv)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", rope_freq_base)
    return w, copy_tokenizer(w, vocab_from, tokenizer_replace)


def copy_tokenizer(w, src=None, replace: dict | None = None) -> int:
    """Copy every ``tokenizer.*`` key of the GGUF at ``src`` (default: the
    default model) into the writer ``w``; returns the vocabulary size.
    ``replace`` maps keys to values that take the place of the copied ones
    (same type) or are added (strings and booleans)."""
    import gguf

    from runner.model.gguf import read_gguf  # the project's header reader: 50x faster than GGUFReader

    if src is None:
        from runner.model.models import default_model_path

        src = default_model_path()
    n_vocab = 0
    copied: set[str] = set()
    for key, field in read_gguf(src).fields.items():
        if not key.startswith("tokenizer."):
            continue
        # runner.model.gguf and gguf.GGUFValueType number the value types as the spec does
        sub = None if field.element_type is None else gguf.GGUFValueType(int(field.element_type))
        value = replace[key] if replace and key in replace else field.value
        w.add_key_value(key, value, gguf.GGUFValueType(int(field.type)), sub_type=sub)
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        copied.add(key)
    if not n_vocab:
        raise ValueError(f"{src} has no tokenizer.ggml.tokens")
    for key, value in (replace or {}).items():
        if key not in copied:
            kind = gguf.GGUFValueType.BOOL if isinstance(value, bool) else gguf.GGUFValueType.STRING
            w.add_key_value(key, value, kind)
    return n_vocab


def write_vision_projector(
    path: str | Path, *, n_embd_out: int = TEXT_N_EMBD, seed: int = 0, **shape: int
) -> Path:
    """Write an ``mlp`` vision projector; ``shape`` overrides fields of VisionEncoder."""
    return write_projector(path, vision=VisionEncoder(**shape), n_embd_out=n_embd_out, seed=seed)


def write_audio_projector(
    path: str | Path, *, n_embd_out: int = TEXT_N_EMBD, seed: int = 0, **shape: int
) -> Path:
    """Write an ``ultravox`` audio projector; ``shape`` overrides fields of AudioEncoder."""
    return write_projector(path, audio=AudioEncoder(**shape), n_embd_out=n_embd_out, seed=seed)


# ---------------------------------------------------------------------------
# encoders


def _add_encoder_hparams(
    w, prefix: str, hidden: int, n_head: int, n_ff: int, n_layer: int, n_embd_out: int
) -> None:
    # clip.cpp reads these with gguf_get_val_u32 / _f32, which abort on any other value type
    w.add_uint32(f"clip.{prefix}.embedding_length", hidden)
    w.add_uint32(f"clip.{prefix}.attention.head_count", n_head)
    w.add_uint32(f"clip.{prefix}.feed_forward_length", n_ff)
    w.add_uint32(f"clip.{prefix}.block_count", n_layer)
    w.add_uint32(f"clip.{prefix}.projection_dim", n_embd_out)
    w.add_float32(f"clip.{prefix}.attention.layer_norm_epsilon", 1e-5)


def _add_vision(w, v: VisionEncoder, n_embd_out: int, rng: np.random.Generator) -> None:
    if v.image_size % v.patch_size or v.hidden % v.n_head or v.hidden == v.n_ff:
        raise ValueError(f"inconsistent vision encoder shape {v}")
    _add_encoder_hparams(w, "vision", v.hidden, v.n_head, v.n_ff, v.n_layer, n_embd_out)
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_array("clip.vision.image_mean", _CLIP_MEAN)
    w.add_array("clip.vision.image_std", _CLIP_STD)

    # conv2d kernel, numpy (out, in, kh, kw) = ggml ne [kw, kh, in, out]
    w.add_tensor("v.patch_embd.weight", _matrix(rng, v.hidden, 3, v.patch_size, v.patch_size))
    w.add_tensor("v.patch_embd.bias", _zeros(v.hidden))
    w.add_tensor("v.position_embd.weight", _normal(rng, v.n_tokens, v.hidden))
    w.add_tensor("v.pre_ln.weight", _ones(v.hidden))
    w.add_tensor("v.pre_ln.bias", _zeros(v.hidden))
    for il in range(v.n_layer):
        _add_block(w, rng, f"v.blk.{il}", v.hidden, v.n_ff, k_bias=True)
    w.add_tensor("mm.0.weight", _matrix(rng, v.proj_hidden, v.hidden))
    w.add_tensor("mm.0.bias", _zeros(v.proj_hidden))
    # mtmd checks the text model's width against this tensor's ne[1]
    w.add_tensor("mm.2.weight", _matrix(rng, n_embd_out, v.proj_hidden))
    w.add_tensor("mm.2.bias", _zeros(n_embd_out))


def _add_audio(w, a: AudioEncoder, n_embd_out: int, rng: np.random.Generator) -> None:
    if a.hidden % a.n_head or not 1 <= a.n_mel <= 256:
        raise ValueError(f"inconsistent audio encoder shape {a}")
    _add_encoder_hparams(w, "audio", a.hidden, a.n_head, a.n_ff, a.n_layer, n_embd_out)
    w.add_uint32("clip.audio.num_mel_bins", a.n_mel)
    w.add_uint32("clip.audio.projector.stack_factor", a.stack_factor)

    # conv1d kernels, numpy (out, in, k); their biases (out, 1) broadcast over frames
    w.add_tensor("a.conv1d.1.weight", _matrix(rng, a.hidden, a.n_mel, 3))
    w.add_tensor("a.conv1d.1.bias", _zeros(a.hidden, 1))
    w.add_tensor("a.conv1d.2.weight", _matrix(rng, a.hidden, a.hidden, 3))
    w.add_tensor("a.conv1d.2.bias", _zeros(a.hidden, 1))
    w.add_tensor("a.position_embd.weight", _normal(rng, AUDIO_FRAMES, a.hidden))
    for il in range(a.n_layer):
        _add_block(w, rng, f"a.blk.{il}", a.hidden, a.n_ff, k_bias=False)  # Whisper: no bias on k
    w.add_tensor("a.post_ln.weight", _ones(a.hidden))
    w.add_tensor("a.post_ln.bias", _zeros(a.hidden))
    stacked = a.hidden * a.stack_factor
    w.add_tensor("mm.a.norm_pre.weight", _ones(stacked))
    w.add_tensor("mm.a.mlp.1.weight", _matrix(rng, 2 * a.proj_hidden, stacked))  # halves for SwiGLU
    w.add_tensor("mm.a.norm_mid.weight", _ones(a.proj_hidden))
    w.add_tensor("mm.a.mlp.2.weight", _matrix(rng, n_embd_out, a.proj_hidden))


def _add_block(w, rng: np.random.Generator, blk: str, hidden: int, n_ff: int, *, k_bias: bool) -> None:
    """One pre-norm transformer layer: ln1, attention with biases, ln2, up/down FFN."""
    w.add_tensor(f"{blk}.ln1.weight", _ones(hidden))
    w.add_tensor(f"{blk}.ln1.bias", _zeros(hidden))
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
        w.add_tensor(f"{blk}.{name}.weight", _matrix(rng, hidden, hidden))
        if name != "attn_k" or k_bias:
            w.add_tensor(f"{blk}.{name}.bias", _zeros(hidden))
    w.add_tensor(f"{blk}.ln2.weight", _ones(hidden))
    w.add_tensor(f"{blk}.ln2.bias", _zeros(hidden))
    w.add_tensor(f"{blk}.ffn_up.weight", _matrix(rng, n_ff, hidden))
    w.add_tensor(f"{blk}.ffn_up.bias", _zeros(n_ff))
    w.add_tensor(f"{blk}.ffn_down.weight", _matrix(rng, hidden, n_ff))
    w.add_tensor(f"{blk}.ffn_down.bias", _zeros(hidden))


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    # numpy shape is ggml's ne reversed: (rows = outputs, cols = inputs) for a matrix
    return (rng.standard_normal(shape) * 0.05).astype(np.float32)


def _matrix(rng: np.random.Generator, *shape: int) -> np.ndarray:
    # weights that ggml multiplies or convolves are F16, as the converters write them
    return _normal(rng, *shape).astype(np.float16)


def _ones(*shape: int) -> np.ndarray:
    return np.ones(shape, np.float32)


def _zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


# ---------------------------------------------------------------------------
# media


def png_bytes(width: int = 32, height: int = 32, seed: int = 0) -> bytes:
    """An 8-bit RGB PNG of random pixels; distinct seeds give distinct images."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    # each scanline starts with its filter type, 0 = none
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, RGB, deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def wav_bytes(
    seconds: float = 1.0, *, freq: float = 440.0, seed: int = 0, sample_rate: int = AUDIO_SAMPLE_RATE
) -> bytes:
    """A mono 16-bit PCM WAV: a sine at ``freq`` Hz plus seeded noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    signal = 0.5 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)
    samples = (np.clip(signal, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(samples.tobytes())
    return buf.getvalue()
