"""The test projector generator (tests/mmproj.py), checked with the gguf reader only.

That llama.cpp's mtmd loads these files and encodes with them is checked by the
tests that load a projector next to the default model; here nothing needs the
extension or a model.
"""

from __future__ import annotations

import io
import struct
import wave
import zlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from mmproj import (  # noqa: E402
    AUDIO_FRAMES,
    AUDIO_SAMPLE_RATE,
    TEXT_N_EMBD,
    AudioEncoder,
    VisionEncoder,
    png_bytes,
    wav_bytes,
    write_audio_projector,
    write_projector,
    write_vision_projector,
)
from runner.model.gguf import read_gguf  # noqa: E402

VT = gguf.GGUFValueType

# key -> value type that clip.cpp's getters accept (gguf_get_val_u32 & co. abort on any other)
COMMON_KEYS = {
    "general.architecture": VT.STRING,
    "clip.has_vision_encoder": VT.BOOL,
    "clip.has_audio_encoder": VT.BOOL,
}
ENCODER_KEYS = {
    "embedding_length": VT.UINT32,
    "attention.head_count": VT.UINT32,
    "feed_forward_length": VT.UINT32,
    "block_count": VT.UINT32,
    "projection_dim": VT.UINT32,
    "attention.layer_norm_epsilon": VT.FLOAT32,
}
VISION_KEYS = {
    **{f"clip.vision.{k}": t for k, t in ENCODER_KEYS.items()},
    "clip.vision.image_size": VT.UINT32,
    "clip.vision.patch_size": VT.UINT32,
    "clip.vision.image_mean": VT.ARRAY,
    "clip.vision.image_std": VT.ARRAY,
}
AUDIO_KEYS = {
    **{f"clip.audio.{k}": t for k, t in ENCODER_KEYS.items()},
    "clip.audio.num_mel_bins": VT.UINT32,
    "clip.audio.projector.stack_factor": VT.UINT32,
}


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _value(field):
    return field.contents()


def _ne(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in tensor.shape)  # ggml order: ne[0] first


@pytest.fixture(scope="module")
def vision_path(tmp_path_factory):
    return write_vision_projector(tmp_path_factory.mktemp("mmproj") / "vision.gguf")


@pytest.fixture(scope="module")
def audio_path(tmp_path_factory):
    return write_audio_projector(tmp_path_factory.mktemp("mmproj") / "audio.gguf")


# ---------------------------------------------------------------------------
# vision


def test_vision_keys_and_types(vision_path):
    fields, _ = _read(vision_path)
    for key, vtype in {**COMMON_KEYS, **VISION_KEYS, "clip.projector_type": VT.STRING}.items():
        assert key in fields, key
        assert fields[key].types[0] == vtype, key
    assert _value(fields["general.architecture"]) == "clip"
    assert _value(fields["clip.projector_type"]) == "mlp"
    assert _value(fields["clip.has_vision_encoder"]) is True
    assert _value(fields["clip.has_audio_encoder"]) is False
    assert fields["clip.vision.image_mean"].types[-1] == VT.FLOAT32
    assert len(_value(fields["clip.vision.image_mean"])) == 3
    assert _value(fields["clip.vision.projection_dim"]) == TEXT_N_EMBD
    assert not any(k.startswith("clip.audio.") for k in fields)


def test_vision_tensors(vision_path):
    v = VisionEncoder()
    _, tensors = _read(vision_path)
    assert _ne(tensors["v.patch_embd.weight"]) == (v.patch_size, v.patch_size, 3, v.hidden)
    assert _ne(tensors["v.position_embd.weight"]) == (v.hidden, v.n_tokens)
    assert _ne(tensors["mm.0.weight"]) == (v.hidden, v.proj_hidden)
    # mtmd takes the projector's output width from mm.2.weight ne[1]
    assert _ne(tensors["mm.2.weight"]) == (v.proj_hidden, TEXT_N_EMBD)
    assert _ne(tensors["mm.2.bias"]) == (TEXT_N_EMBD,)
    for il in range(v.n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down", "ln1", "ln2"):
            assert f"v.blk.{il}.{name}.weight" in tensors
            assert f"v.blk.{il}.{name}.bias" in tensors
    # clip.cpp swaps up and down when ffn_down's ne[0] equals the hidden size
    assert _ne(tensors["v.blk.0.ffn_down.weight"])[0] == v.n_ff != v.hidden
    # 1-D tensors are F32 (ggml adds and norms need it)
    for t in tensors.values():
        if len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name


def test_vision_small_and_tokens(vision_path):
    assert vision_path.stat().st_size < 1 << 20
    assert VisionEncoder().n_tokens == 16
    assert VisionEncoder(image_size=64, patch_size=8).n_tokens == 64


def test_vision_read_by_runner(vision_path):
    info = read_gguf(vision_path).vision_info()
    assert info is not None
    assert info.projector_type == "mlp"
    assert info.projection_dim == TEXT_N_EMBD
    assert info.n_patches == VisionEncoder().n_tokens


def test_wrong_width(tmp_path):
    _, tensors = _read(write_vision_projector(tmp_path / "narrow.gguf", n_embd_out=512))
    assert _ne(tensors["mm.2.weight"])[1] == 512


def test_deterministic(tmp_path, vision_path):
    again = write_vision_projector(tmp_path / "again.gguf")
    other = write_vision_projector(tmp_path / "other.gguf", seed=1)
    assert again.read_bytes() == vision_path.read_bytes()
    assert other.read_bytes() != vision_path.read_bytes()
    assert other.stat().st_size == vision_path.stat().st_size


@pytest.mark.parametrize(
    "shape", [{"image_size": 30, "patch_size": 8}, {"hidden": 30, "n_head": 4}, {"n_ff": 32}]
)
def test_vision_rejects_bad_shape(tmp_path, shape):
    with pytest.raises(ValueError):
        write_vision_projector(tmp_path / "bad.gguf", **shape)


# ---------------------------------------------------------------------------
# audio


def test_audio_keys_and_tensors(audio_path):
    a = AudioEncoder()
    fields, tensors = _read(audio_path)
    for key, vtype in {**COMMON_KEYS, **AUDIO_KEYS, "clip.projector_type": VT.STRING}.items():
        assert key in fields, key
        assert fields[key].types[0] == vtype, key
    assert _value(fields["clip.projector_type"]) == "ultravox"
    assert _value(fields["clip.has_audio_encoder"]) is True
    assert _value(fields["clip.has_vision_encoder"]) is False
    assert not any(k.startswith("clip.vision.") for k in fields)
    # Whisper: 1500 positions, no bias on k
    assert _ne(tensors["a.position_embd.weight"]) == (a.hidden, AUDIO_FRAMES)
    assert "a.blk.0.attn_k.bias" not in tensors
    assert _ne(tensors["a.conv1d.1.weight"]) == (3, a.n_mel, a.hidden)
    assert _ne(tensors["a.conv1d.1.bias"]) == (1, a.hidden)
    assert _ne(tensors["mm.a.mlp.1.weight"]) == (a.hidden * a.stack_factor, 2 * a.proj_hidden)
    assert _ne(tensors["mm.a.mlp.2.weight"]) == (a.proj_hidden, TEXT_N_EMBD)
    assert audio_path.stat().st_size < 1 << 20
    assert a.n_tokens_per_window == 75


def test_vision_and_audio(tmp_path):
    path = write_projector(tmp_path / "av.gguf", vision=VisionEncoder(), audio=AudioEncoder())
    fields, tensors = _read(path)
    # with two encoders the projector type is per modality
    assert "clip.projector_type" not in fields
    assert _value(fields["clip.vision.projector_type"]) == "mlp"
    assert _value(fields["clip.audio.projector_type"]) == "ultravox"
    assert _value(fields["clip.has_vision_encoder"]) is True
    assert _value(fields["clip.has_audio_encoder"]) is True
    assert "mm.2.weight" in tensors and "mm.a.mlp.2.weight" in tensors
    proj = read_gguf(path)
    assert proj.has_audio_encoder
    assert proj.vision_info().projector_type == "mlp"


def test_needs_an_encoder(tmp_path):
    with pytest.raises(ValueError):
        write_projector(tmp_path / "none.gguf")


# ---------------------------------------------------------------------------
# media


def _decode_png(data: bytes) -> np.ndarray:
    """Minimal decoder for what png_bytes writes: 8-bit RGB, one IDAT, filter 0."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + n
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color) == (8, 2)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any()
    assert b"IEND" in chunks
    return rows[:, 1:].reshape(height, width, 3)


def test_png_bytes():
    img = _decode_png(png_bytes(48, 40, seed=3))
    assert img.shape == (40, 48, 3)
    assert png_bytes(48, 40, seed=3) == png_bytes(48, 40, seed=3)
    assert not np.array_equal(_decode_png(png_bytes(48, 40, seed=4)), img)


def test_wav_bytes():
    data = wav_bytes(0.5, seed=1)
    with wave.open(io.BytesIO(data)) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, AUDIO_SAMPLE_RATE)
        assert f.getnframes() == AUDIO_SAMPLE_RATE // 2
    assert wav_bytes(0.5, seed=1) == data
    assert wav_bytes(0.5, seed=2) != data
