"""Tests for runner.model.gguf: GGUF header reading, the ggml type table and malformed-file handling."""

from __future__ import annotations

import glob
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from runner.model.gguf import (  # noqa: E402
    DEFAULT_ALIGNMENT,
    GGML_TYPES,
    MAX_ARRAY_DEPTH,
    Field,
    GGUFError,
    SkippedArray,
    ValueType,
    ggml_type,
    layer_group,
    parse_gguf,
    read_gguf,
)

REPO = Path(__file__).resolve().parent.parent
VOCAB_FILES = sorted(glob.glob(str(REPO / "vendor" / "llama.cpp" / "models" / "ggml-vocab-*.gguf")))
VT = gguf.GGUFValueType


# ---------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def default_model() -> str:
    try:
        from runner.model.models import default_model_path

        path = str(default_model_path())
    except (ImportError, OSError) as exc:  # no runner.model.models, or the model is not installed
        pytest.skip(f"default model unavailable: runner.model.models.default_model_path() raised {exc!r}")
    if not os.path.exists(path):
        pytest.skip(f"default model {path} is not downloaded")
    return path


# (key, value, value type, element type for arrays): every value type, nested arrays included
ALL_VALUES = [
    ("t.u8", 200, VT.UINT8, None),
    ("t.i8", -100, VT.INT8, None),
    ("t.u16", 60000, VT.UINT16, None),
    ("t.i16", -30000, VT.INT16, None),
    ("t.u32", 4_000_000_000, VT.UINT32, None),
    ("t.i32", -2_000_000_000, VT.INT32, None),
    ("t.f32", 0.5, VT.FLOAT32, None),
    ("t.bool", True, VT.BOOL, None),
    ("t.bool_false", False, VT.BOOL, None),
    ("t.str", "héllo wörld", VT.STRING, None),
    ("t.empty_str", "", VT.STRING, None),
    ("t.u64", 2**63 + 5, VT.UINT64, None),
    ("t.i64", -(2**62), VT.INT64, None),
    ("t.f64", 1.25e300, VT.FLOAT64, None),
    ("t.arr_u8", [1, 2, 255], VT.ARRAY, VT.UINT8),
    ("t.arr_i8", [-1, 2], VT.ARRAY, VT.INT8),
    ("t.arr_u16", [1, 65535], VT.ARRAY, VT.UINT16),
    ("t.arr_i16", [-5, 5], VT.ARRAY, VT.INT16),
    ("t.arr_u32", [7, 8, 9], VT.ARRAY, VT.UINT32),
    ("t.arr_i32", [-7, 8], VT.ARRAY, VT.INT32),
    ("t.arr_f32", [0.25, -1.5], VT.ARRAY, VT.FLOAT32),
    ("t.arr_bool", [True, False, True], VT.ARRAY, VT.BOOL),
    ("t.arr_str", ["a", "", "ccc"], VT.ARRAY, VT.STRING),
    ("t.arr_u64", [2**64 - 1], VT.ARRAY, VT.UINT64),
    ("t.arr_i64", [-(2**63)], VT.ARRAY, VT.INT64),
    ("t.arr_f64", [3.5, -0.125], VT.ARRAY, VT.FLOAT64),
    ("t.nested_i32", [[1, 2], [3], [4, 5, 6]], VT.ARRAY, VT.ARRAY),
    ("t.nested_str", [["x", "yy"], ["zzz"]], VT.ARRAY, VT.ARRAY),
    ("t.nested3", [[[1.5], [2.5, 3.5]], [[4.5]]], VT.ARRAY, VT.ARRAY),
]


def write_gguf(
    path: Path,
    values=(),
    tensors=(),
    *,
    arch: str = "llama",
    big_endian: bool = False,
    alignment: int | None = None,
) -> Path:
    """Write a GGUF file with GGUFWriter. tensors: (name, numpy array, raw ggml type or None)."""
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), arch, endianess=endian)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype, sub in values:
        w.add_key_value(key, value, vtype, sub_type=sub if sub not in (None, VT.ARRAY) else None)
    for name, array, raw in tensors:
        w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def small_tensors():
    """Tensors whose data sizes are multiples of 32 bytes, so the file ends exactly at the last byte of data."""
    q8 = np.zeros((2, 2 * 34), dtype=np.uint8)  # 2 rows of 64 q8_0 elements
    return [
        ("token_embd.weight", np.arange(16, dtype=np.float32).reshape(2, 8), None),
        ("blk.0.attn_q.weight", np.ones((4, 8), dtype=np.float16), None),
        ("blk.0.ffn_up.weight", q8, gguf.GGMLQuantizationType.Q8_0),
        ("output.weight", np.zeros(8, dtype=np.float32), None),
    ]


def set_version(data: bytes, version: int, big_endian: bool) -> bytes:
    return data[:4] + struct.pack(">I" if big_endian else "<I", version) + data[8:]


# ---------------------------------------------------------------------------
# value types, endianness, versions


@pytest.mark.parametrize("big_endian", [False, True], ids=["le", "be"])
@pytest.mark.parametrize("version", [2, 3])
def test_every_value_type_round_trips(tmp_path, big_endian, version):
    path = write_gguf(tmp_path / "v.gguf", ALL_VALUES, small_tensors(), big_endian=big_endian)
    data = set_version(path.read_bytes(), version, big_endian)
    f = parse_gguf(data)
    assert f.version == version
    assert f.byte_order == (">" if big_endian else "<")
    assert f.architecture == "llama"
    for key, value, vtype, sub in ALL_VALUES:
        field = f.fields[key]
        assert field.type == ValueType(vtype), key
        if vtype == VT.ARRAY:
            assert field.element_type == ValueType(sub), key
        assert f.get(key) == value, key
    assert f.fields["t.nested_i32"].value[1] == [3]


def test_big_endian_tensors_match_little_endian(tmp_path):
    le = read_gguf(write_gguf(tmp_path / "le.gguf", ALL_VALUES, small_tensors()))
    be = read_gguf(write_gguf(tmp_path / "be.gguf", ALL_VALUES, small_tensors(), big_endian=True))
    assert [(t.name, t.type.name, t.shape, t.offset) for t in le.tensors] == [
        (t.name, t.type.name, t.shape, t.offset) for t in be.tensors
    ]
    assert le.data_offset == be.data_offset


def test_read_file_and_buffer_agree(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", ALL_VALUES, small_tensors())
    from_file = read_gguf(path)
    from_buffer = parse_gguf(path.read_bytes())
    assert from_file.fields == from_buffer.fields
    assert from_file.tensors == from_buffer.tensors
    assert from_file.path == str(path) and from_buffer.path == "<buffer>"
    assert from_file.file_size == path.stat().st_size


def test_invalid_utf8_string_value_is_replaced():
    data = _raw_file([_raw_kv("k", 8, _raw_str(b"ab\xffc"))])
    assert parse_gguf(data).get("k") == "ab\ufffdc"


# ---------------------------------------------------------------------------
# max_array_size


def test_long_arrays_are_skipped_and_parsing_continues(tmp_path):
    values = [
        ("a.strings", [f"tok{i}" for i in range(1000)], VT.ARRAY, VT.STRING),
        ("a.ints", list(range(500)), VT.ARRAY, VT.INT32),
        ("a.nested", [[1, 2, 3]] * 20, VT.ARRAY, VT.ARRAY),
        ("a.inner_long", [list(range(50)), [1]], VT.ARRAY, VT.ARRAY),
        ("a.short", [1, 2], VT.ARRAY, VT.UINT8),
        ("a.after", "still here", VT.STRING, None),
    ]
    path = write_gguf(tmp_path / "s.gguf", values, small_tensors())
    f = read_gguf(path, max_array_size=10)
    assert f.get("a.strings") == SkippedArray(ValueType.STRING, 1000)
    assert len(f.get("a.strings")) == 1000
    assert f.get("a.ints") == SkippedArray(ValueType.INT32, 500)
    assert f.get("a.nested") == SkippedArray(ValueType.ARRAY, 20)
    assert f.get("a.inner_long") == [SkippedArray(ValueType.INT32, 50), [1]]
    assert f.get("a.short") == [1, 2]
    assert f.get("a.after") == "still here"
    assert f.tensors == read_gguf(path).tensors
    assert read_gguf(path, max_array_size=0).get("a.short") == SkippedArray(ValueType.UINT8, 2)


def test_vocab_size_survives_skipping(tmp_path):
    values = [("tokenizer.ggml.tokens", [f"t{i}" for i in range(300)], VT.ARRAY, VT.STRING)]
    path = write_gguf(tmp_path / "v.gguf", values)
    assert read_gguf(path, max_array_size=4).vocab_size == 300
    assert read_gguf(path).vocab_size == 300


def test_negative_max_array_size_is_rejected(tmp_path):
    path = write_gguf(tmp_path / "n.gguf")
    with pytest.raises(ValueError):
        read_gguf(path, max_array_size=-1)


# ---------------------------------------------------------------------------
# tensors and layout


def test_tensor_infos_and_data_offset_match_gguf_reader(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", [], small_tensors())
    f = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    assert f.alignment == DEFAULT_ALIGNMENT
    assert f.data_offset % 32 == 0
    for ours, theirs in zip(f.tensors, ref.tensors, strict=True):
        assert ours.name == theirs.name
        assert ours.type.id == int(theirs.tensor_type)
        assert list(ours.shape) == [int(x) for x in theirs.shape]
        assert f.data_offset + ours.offset == theirs.data_offset
        assert ours.n_bytes == theirs.n_bytes
        assert ours.n_elements == theirs.n_elements
    q8 = f.tensor("blk.0.ffn_up.weight")
    assert (q8.type.name, q8.shape, q8.n_bytes) == ("q8_0", (64, 2), 136)
    assert f.tensor("missing") is None
    assert f.parameter_count == 16 + 32 + 128 + 8
    assert f.tensor_bytes == 64 + 64 + 136 + 32


def test_custom_alignment(tmp_path):
    path = write_gguf(tmp_path / "al.gguf", [], small_tensors(), alignment=64)
    f = read_gguf(path)
    assert f.alignment == 64
    assert f.data_offset % 64 == 0
    assert all(t.offset % 64 == 0 for t in f.tensors)
    assert f.data_offset + f.tensors[-1].offset == gguf.GGUFReader(str(path)).tensors[-1].data_offset


def test_vocab_only_file_without_tensors(tmp_path):
    path = write_gguf(tmp_path / "e.gguf", [("general.name", "x", VT.STRING, None)])
    f = read_gguf(path)
    assert f.tensors == ()
    assert f.layers() == {}
    assert f.parameter_count == 0


@pytest.mark.parametrize(
    "name, group",
    [
        ("blk.0.attn_q.weight", "blk.0"),
        ("blk.12.ffn_gate_exps.weight", "blk.12"),
        ("mm.0.weight", "mm.0"),
        ("mm.input_projection.weight", "mm"),
        ("v.blk.3.attn_k.weight", "v.blk.3"),
        ("a.blk.1.ffn_up.weight", "a.blk.1"),
        ("v.patch_embd.weight", "v"),
        ("token_embd.weight", "token_embd"),
        ("output.weight", "output"),
        ("output_norm.weight", "output_norm"),
        ("rope_freqs.weight", "rope_freqs"),
    ],
)
def test_layer_group(name, group):
    assert layer_group(name) == group


def test_layers_grouping(tmp_path):
    f = read_gguf(write_gguf(tmp_path / "g.gguf", [], small_tensors()))
    assert list(f.layers()) == ["token_embd", "blk.0", "output"]
    assert [t.name for t in f.layers()["blk.0"]] == ["blk.0.attn_q.weight", "blk.0.ffn_up.weight"]
    assert f.layer_bytes() == {"token_embd": 64, "blk.0": 64 + 136, "output": 32}


# ---------------------------------------------------------------------------
# ggml type table


EXPECTED_TYPES = {
    # id: (name, block size, type size), from ggml.h / ggml-common.h of the pinned llama.cpp
    0: ("f32", 1, 4),
    1: ("f16", 1, 2),
    2: ("q4_0", 32, 18),
    3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22),
    7: ("q5_1", 32, 24),
    8: ("q8_0", 32, 34),
    9: ("q8_1", 32, 36),
    10: ("q2_K", 256, 84),
    11: ("q3_K", 256, 110),
    12: ("q4_K", 256, 144),
    13: ("q5_K", 256, 176),
    14: ("q6_K", 256, 210),
    15: ("q8_K", 256, 292),
    16: ("iq2_xxs", 256, 66),
    17: ("iq2_xs", 256, 74),
    18: ("iq3_xxs", 256, 98),
    19: ("iq1_s", 256, 50),
    20: ("iq4_nl", 32, 18),
    21: ("iq3_s", 256, 110),
    22: ("iq2_s", 256, 82),
    23: ("iq4_xs", 256, 136),
    24: ("i8", 1, 1),
    25: ("i16", 1, 2),
    26: ("i32", 1, 4),
    27: ("i64", 1, 8),
    28: ("f64", 1, 8),
    29: ("iq1_m", 256, 56),
    30: ("bf16", 1, 2),
    34: ("tq1_0", 256, 54),
    35: ("tq2_0", 256, 66),
    39: ("mxfp4", 32, 17),
    40: ("nvfp4", 64, 36),
    41: ("q1_0", 128, 18),
    42: ("q2_0", 64, 18),
}


def test_ggml_type_table_is_complete_and_exact():
    assert {i: (t.name, t.block_size, t.type_size) for i, t in GGML_TYPES.items()} == EXPECTED_TYPES
    removed = {4, 5, 31, 32, 33, 36, 37, 38}
    assert set(GGML_TYPES) | removed == set(range(43))


def test_ggml_type_table_agrees_with_gguf_py():
    # gguf-py still describes the pre-2024 q8_1 block (float d, s: 40 bytes); ggml's is 2 halves + 32 = 36
    for qtype, (block, size) in gguf.constants.GGML_QUANT_SIZES.items():
        if int(qtype) in GGML_TYPES and qtype.name != "Q8_1":
            t = GGML_TYPES[int(qtype)]
            assert (t.block_size, t.type_size) == (block, size), qtype.name


def test_ggml_type_lookup_and_row_size():
    assert ggml_type("Q4_K") is ggml_type(12)
    assert ggml_type("f16").row_size(192) == 384
    assert ggml_type("q8_0").row_size(192) == 204
    assert ggml_type("q4_0").row_size(64) == 36
    with pytest.raises(GGUFError):
        ggml_type(4)
    with pytest.raises(GGUFError):
        ggml_type("q4_2")


# ---------------------------------------------------------------------------
# malformed files (raw encoders for what GGUFWriter refuses to write)


def _raw_str(s: bytes | str) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _raw_kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _raw_str(key) + struct.pack("<I", vtype) + payload


def _raw_file(kvs=(), tensor_infos=(), *, n_kv=None, n_tensors=None, version=3, tail=b"") -> bytes:
    kvs, tensor_infos = list(kvs), list(tensor_infos)
    head = GGUF_MAGIC_BYTES + struct.pack(
        "<IQQ", version, len(tensor_infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    return head + b"".join(kvs) + b"".join(tensor_infos) + tail


def _raw_tensor(name: str, shape, ggml_id: int, offset: int = 0) -> bytes:
    return _raw_str(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, ggml_id, offset)


def _nested_array(depth: int) -> bytes:
    """An ARRAY value nested ``depth`` levels deep, innermost holding one u8."""
    inner = struct.pack("<IQ", 0, 1) + b"\x07"
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", 9, 1) + inner
    return inner


GGUF_MAGIC_BYTES = b"GGUF"
_F32_TENSOR = _raw_tensor("w", [8], 0)
_PADDED_DATA = b"\x00" * 64  # enough padding + data for one 8-element f32 tensor


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "too short"),
        (b"GGU", "too short"),
        (b"GGML" + bytes(20), "not a GGUF file"),
        (_raw_file(version=1), "v1"),
        (_raw_file(version=4), "unsupported GGUF version"),
        (_raw_file(n_kv=2**63), "cannot fit"),
        (_raw_file(n_tensors=2**64 - 1), "cannot fit"),
        (_raw_file([_raw_kv("k", 13, b"\x00" * 8)]), "unknown value type 13"),
        (_raw_file([_raw_kv("k", 9, struct.pack("<IQ", 99, 1) + b"\x00" * 8)]), "unknown value type 99"),
        (_raw_file([_raw_kv("k", 9, struct.pack("<IQ", 4, 2**61))]), "cannot fit"),
        (_raw_file([_raw_kv("k", 9, struct.pack("<IQ", 8, 2**60))]), "cannot fit"),
        (_raw_file([_raw_kv("k", 8, struct.pack("<Q", 2**64 - 1))]), "past the end"),
        (_raw_file([_raw_kv("k", 8, struct.pack("<Q", 5) + b"abcd")]), "past the end"),
        (_raw_file([struct.pack("<Q", 2**40) + b"key"], tail=bytes(32)), "past the end"),
        (_raw_file([_raw_kv("k", 9, struct.pack("<IQ", 8, 2) + _raw_str("a") + struct.pack("<Q", 99))]), "past"),
        (_raw_file([_raw_kv("k", 9, _nested_array(MAX_ARRAY_DEPTH + 1))]), "nested deeper"),
        (_raw_file([_raw_kv("k", 9, _nested_array(10_000))]), "nested deeper"),
        (_raw_file([_raw_kv("k", 0, b"\x01"), _raw_kv("k", 0, b"\x02")]), "duplicate key"),
        (_raw_file([_raw_kv("", 0, b"\x01")], tail=bytes(32)), "empty key"),
        (_raw_file([_raw_str(b"\xff\xfe") + struct.pack("<IB", 0, 1)]), "not valid UTF-8"),
        (_raw_file([_raw_kv("general.alignment", 5, struct.pack("<i", 64))]), "must be UINT32"),
        (_raw_file([_raw_kv("general.alignment", 4, struct.pack("<I", 48))]), "power of two"),
        (_raw_file([_raw_kv("general.alignment", 4, struct.pack("<I", 0))]), "power of two"),
        (_raw_file([], [_raw_tensor("w", [8], 4)], tail=_PADDED_DATA), "unknown ggml type 4"),
        (_raw_file([], [_raw_tensor("w", [8], 1000)], tail=_PADDED_DATA), "unknown ggml type 1000"),
        (_raw_file([], [_raw_tensor("w", [8, 1, 1, 1, 1], 0)], tail=_PADDED_DATA), "dimensions"),
        (_raw_file([], [_raw_tensor("w", [2**40, 2**40], 0)], tail=_PADDED_DATA), "overflows int64"),
        (_raw_file([], [_raw_tensor("w", [2**63], 0)], tail=_PADDED_DATA), "overflows int64"),
        (_raw_file([], [_raw_tensor("w", [33], 2)], tail=_PADDED_DATA), "block size"),
        (_raw_file([], [_raw_tensor("w", [8], 0, offset=4)], tail=_PADDED_DATA), "not aligned"),
        (_raw_file([], [_raw_tensor("w", [8], 0, offset=2**62)], tail=_PADDED_DATA), "truncated"),
        (_raw_file([], [_raw_tensor("w", [8], 0)], tail=b"\x00" * 8), "truncated"),
        (_raw_file([], [_F32_TENSOR, _F32_TENSOR], tail=_PADDED_DATA * 2), "duplicate tensor"),
        (_raw_file([], [_raw_tensor("x" * 64, [8], 0)], tail=_PADDED_DATA), "longer than 63"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_input_raises_gguf_error(data, message):
    with pytest.raises(GGUFError, match=message):
        parse_gguf(data)


def test_gguf_error_is_a_value_error():
    assert issubclass(GGUFError, ValueError)


def test_hostile_counts_allocate_nothing():
    data = _raw_file([_raw_kv("k", 9, struct.pack("<IQ", 8, 2**40) + b"\x00" * 64)], n_tensors=2**40)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError):
            parse_gguf(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_array_at_max_depth_is_accepted():
    f = parse_gguf(_raw_file([_raw_kv("k", 9, _nested_array(MAX_ARRAY_DEPTH))]))
    value = f.get("k")
    for _ in range(MAX_ARRAY_DEPTH - 1):
        value = value[0]
    assert value == [7]


def test_every_truncation_of_a_valid_file_raises(tmp_path):
    data = write_gguf(tmp_path / "t.gguf", ALL_VALUES, small_tensors()).read_bytes()
    assert parse_gguf(data).tensors  # the whole file parses
    for cut in range(len(data)):
        with pytest.raises(GGUFError):
            parse_gguf(data[:cut])


def test_truncated_file_on_disk(tmp_path):
    data = write_gguf(tmp_path / "t.gguf", ALL_VALUES, small_tensors()).read_bytes()
    for cut in (0, 10, 23, 100, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(GGUFError):
            read_gguf(path)


@pytest.mark.parametrize("field_key", ["t.str", "t.arr_str"])
def test_string_length_patched_past_eof(tmp_path, field_key):
    path = write_gguf(tmp_path / "p.gguf", ALL_VALUES, small_tensors())
    data = bytearray(path.read_bytes())
    f: Field = parse_gguf(bytes(data)).fields[field_key]
    value_at = f.offset + 8 + len(field_key) + 4  # past key length, key and value type
    if f.type == ValueType.ARRAY:
        value_at += 4 + 8  # past element type and count
    struct.pack_into("<Q", data, value_at, len(data))
    with pytest.raises(GGUFError):
        parse_gguf(bytes(data))


def test_typed_accessor_rejects_wrong_type(tmp_path):
    path = write_gguf(tmp_path / "w.gguf", [("llama.block_count", "thirty", VT.STRING, None)])
    f = read_gguf(path)
    with pytest.raises(GGUFError, match="expected an integer"):
        _ = f.block_count


# ---------------------------------------------------------------------------
# fuzzing


def _fuzz_seed() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return write_gguf(Path(tmp) / "seed.gguf", ALL_VALUES[:16] + ALL_VALUES[-3:], small_tensors()).read_bytes()


FUZZ_SEED = _fuzz_seed()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(FUZZ_SEED) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    cut=st.one_of(st.none(), st.integers(0, len(FUZZ_SEED))),
    max_array_size=st.sampled_from([None, 0, 2]),
)
def test_mutated_files_parse_or_raise_gguf_error(edits, cut, max_array_size):
    data = bytearray(FUZZ_SEED)
    for pos, byte in edits:
        data[pos] = byte
    if cut is not None:
        del data[cut:]
    try:
        f = parse_gguf(bytes(data), max_array_size=max_array_size)
    except GGUFError:
        return
    assert f.data_offset <= len(data) or not f.tensors
    for t in f.tensors:
        assert f.data_offset + t.offset + t.n_bytes <= len(data)


# ---------------------------------------------------------------------------
# accessors on hand-built model metadata


def test_model_accessors(tmp_path):
    values = [
        ("general.name", "tiny", VT.STRING, None),
        ("general.file_type", 15, VT.UINT32, None),
        ("llama.block_count", 3, VT.UINT32, None),
        ("llama.embedding_length", 64, VT.UINT32, None),
        ("llama.context_length", 4096, VT.UINT32, None),
        ("llama.feed_forward_length", [128, 256, 128], VT.ARRAY, VT.UINT32),
        ("llama.attention.head_count", 8, VT.UINT32, None),
        ("llama.attention.head_count_kv", [2, 4, 0], VT.ARRAY, VT.INT32),
        ("llama.attention.sliding_window", 512, VT.UINT32, None),
        ("llama.attention.sliding_window_pattern", [True, True, False], VT.ARRAY, VT.BOOL),
        ("llama.pooling_type", 1, VT.UINT32, None),
        ("tokenizer.chat_template", "{{ messages }}", VT.STRING, None),
        ("tokenizer.ggml.tokens", ["a", "b", "c"], VT.ARRAY, VT.STRING),
    ]
    f = read_gguf(write_gguf(tmp_path / "m.gguf", values, small_tensors()))
    assert f.name == "tiny"
    assert (f.block_count, f.embedding_length, f.context_length) == (3, 64, 4096)
    assert f.feed_forward_lengths() == (128, 256, 128) and f.feed_forward_length == 256
    assert f.head_count == 8 and f.head_counts() == (8, 8, 8)
    assert f.head_counts_kv() == (2, 4, 0) and f.head_count_kv == 4
    assert (f.key_length, f.value_length) == (8, 8)
    assert (f.key_length_swa, f.value_length_swa) == (8, 8)
    assert not f.is_mla
    assert f.sliding_window == 512
    assert f.sliding_window_pattern == [True, True, False]
    assert (f.pooling_type, f.pooling_type_name) == (1, "mean")
    assert (f.file_type, f.file_type_name) == (15, "Q4_K_M")
    assert f.chat_template == "{{ messages }}"
    assert f.vocab_size == 3
    assert f.arch_key("block_count") == "llama.block_count"


def test_per_layer_array_length_must_match(tmp_path):
    values = [
        ("llama.block_count", 4, VT.UINT32, None),
        ("llama.attention.head_count", [8, 8], VT.ARRAY, VT.UINT32),
    ]
    f = read_gguf(write_gguf(tmp_path / "m.gguf", values))
    with pytest.raises(GGUFError, match="2 entries for 4 layers"):
        f.head_counts()


def test_file_type_guessed_from_tensors(tmp_path):
    f = read_gguf(write_gguf(tmp_path / "g.gguf", [], small_tensors()))
    assert f.file_type is None
    assert f.file_type_name == "Q8_0"  # the most elements among 2-D tensors: 128 q8_0 vs 32 f16 and 16 f32


def test_projector_accessors(tmp_path):
    values = [
        ("clip.projector_type", "mlp", VT.STRING, None),
        ("clip.has_vision_encoder", True, VT.BOOL, None),
        ("clip.vision.image_size", 336, VT.UINT32, None),
        ("clip.vision.patch_size", 14, VT.UINT32, None),
        ("clip.vision.embedding_length", 1024, VT.UINT32, None),
        ("clip.vision.attention.head_count", 16, VT.UINT32, None),
        ("clip.vision.block_count", 23, VT.UINT32, None),
        ("clip.vision.feed_forward_length", 4096, VT.UINT32, None),
        ("clip.vision.projection_dim", 4096, VT.UINT32, None),
    ]
    f = read_gguf(write_gguf(tmp_path / "mmproj.gguf", values, arch="clip"))
    v = f.vision_info()
    assert f.projector_type == "mlp" and f.has_vision_encoder and not f.has_audio_encoder
    assert (v.image_size, v.patch_size, v.n_patches) == (336, 14, 576)
    assert (v.embedding_length, v.head_count, v.block_count) == (1024, 16, 23)
    assert (v.feed_forward_length, v.projection_dim, v.max_num_tiles) == (4096, 4096, 1)


def test_arch_prefixed_vision_keys(tmp_path):
    values = [
        ("mllama.vision.image_size", 560, VT.UINT32, None),
        ("mllama.vision.patch_size", 14, VT.UINT32, None),
        ("mllama.vision.max_num_tiles", 4, VT.UINT32, None),
    ]
    v = read_gguf(write_gguf(tmp_path / "mm.gguf", values, arch="mllama")).vision_info()
    assert (v.n_patches, v.max_num_tiles) == (1600, 4)
    assert read_gguf(write_gguf(tmp_path / "text.gguf", [])).vision_info() is None


# ---------------------------------------------------------------------------
# real files


@pytest.mark.model
def test_default_model_matches_gguf_reader(default_model):
    ours = read_gguf(default_model)
    ref = gguf.GGUFReader(default_model)
    for key, fld in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = fld.contents()
        if isinstance(expected, float):
            assert ours.get(key) == pytest.approx(expected, rel=1e-7), key
        else:
            assert ours.get(key) == expected, key
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.type.id, a.n_bytes) == (b.name, int(b.tensor_type), int(b.n_bytes))
        assert ours.data_offset + a.offset == b.data_offset
    assert ours.parameter_count == sum(int(t.n_elements) for t in ref.tensors)


@pytest.mark.model
def test_default_model_accessors(default_model):
    f = read_gguf(default_model, max_array_size=1024)
    assert f.architecture
    assert f.block_count > 0 and f.embedding_length > 0 and f.head_count > 0
    assert f.vocab_size == len(read_gguf(default_model).get("tokenizer.ggml.tokens"))
    assert sorted(n for n in f.layers() if n.startswith("blk.")) == sorted(f"blk.{i}" for i in range(f.block_count))
    if f.get("general.basename") == "smollm2" and f.get("general.size_label") == "135M":
        assert (f.architecture, f.block_count, f.embedding_length) == ("llama", 30, 576)
        assert (f.head_count, f.head_count_kv, f.key_length, f.value_length) == (9, 3, 64, 64)
        assert (f.context_length, f.vocab_size, len(f.tensors)) == (8192, 49152, 272)
        assert (f.file_type, f.file_type_name, f.parameter_count) == (3, "Q4_1", 134_515_008)
        assert (f.alignment, f.data_offset) == (32, 1_785_664)
        assert f.layer_bytes()["blk.0"] == 2_216_448
        assert f.chat_template.startswith("{% for message in messages %}")
        assert f.pooling_type is None and f.sliding_window is None


@pytest.mark.parametrize("path", VOCAB_FILES or [None], ids=lambda p: Path(p).name if p else "none")
def test_vocab_files(path):
    if path is None:
        pytest.skip("no vendor/llama.cpp/models/ggml-vocab-*.gguf (run the vendor sync step)")
    full = read_gguf(path)
    fast = read_gguf(path, max_array_size=64)
    assert full.tensors == fast.tensors
    for key, fld in full.fields.items():
        skipped = fast.fields[key]
        if isinstance(skipped.value, SkippedArray):
            assert len(skipped.value) == len(fld.value) > 64
            assert skipped.value.element_type == fld.element_type
        else:
            assert skipped == fld
    assert full.vocab_size == fast.vocab_size == len(full.get("tokenizer.ggml.tokens"))


@pytest.mark.parametrize("name", ["ggml-vocab-bert-bge.gguf", "ggml-vocab-llama-spm.gguf"])
def test_small_vocab_files_match_gguf_reader(name):
    path = next((p for p in VOCAB_FILES if Path(p).name == name), None)
    if path is None:
        pytest.skip(f"{name} not in vendor/llama.cpp/models")
    ours = read_gguf(path)
    for key, fld in gguf.GGUFReader(path).fields.items():
        if not key.startswith("GGUF.") and not isinstance(fld.contents(), float):
            assert ours.get(key) == fld.contents(), key
