"""Read the header of a GGUF file: metadata, tensor infos and layout facts.

Only the header is read, through a read-only mmap and ``struct.unpack_from``;
tensor data is never touched. Arrays longer than ``max_array_size`` are
skipped (only their element type and length are kept), so a 150k-entry vocab
costs a walk over its length prefixes and nothing else.

Every malformed input (truncation, counts or lengths past the end of the file,
unknown value or ggml types, arrays nested deeper than ``MAX_ARRAY_DEPTH``)
raises ``GGUFError``; nothing is allocated before it is known to fit in the
file.

Format facts (GGUF v2/v3): magic ``b"GGUF"``, ``u32`` version, ``u64`` tensor
count, ``u64`` key/value count, the key/value pairs, the tensor infos, padding
to ``general.alignment`` (default 32), then the tensor data. A big-endian file
stores the same magic bytes and everything after it big-endian; the byte order
is detected from the version field.
"""

from __future__ import annotations

import enum
import math
import mmap
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 8  # arrays of arrays deeper than this are rejected
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME - 1 (the C buffer keeps a NUL)
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS (src/llama-hparams.h): the most repeating layers llama.cpp loads
_INT64_MAX = (1 << 63) - 1
_HEADER_SIZE = 24  # magic, version, tensor count, key/value count


class GGUFError(ValueError):
    """The file is not a GGUF file this reader accepts (malformed, truncated, unsupported)."""


class ValueType(enum.IntEnum):
    """Metadata value types (gguf_type)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct code and size of each fixed-size value type
_SCALAR_CODES: dict[ValueType, str] = {
    ValueType.UINT8: "B",
    ValueType.INT8: "b",
    ValueType.UINT16: "H",
    ValueType.INT16: "h",
    ValueType.UINT32: "I",
    ValueType.INT32: "i",
    ValueType.FLOAT32: "f",
    ValueType.BOOL: "?",
    ValueType.UINT64: "Q",
    ValueType.INT64: "q",
    ValueType.FLOAT64: "d",
}
_SCALAR_SIZES = {t: struct.calcsize("<" + c) for t, c in _SCALAR_CODES.items()}
_INTEGER_TYPES = frozenset(
    {
        ValueType.UINT8,
        ValueType.INT8,
        ValueType.UINT16,
        ValueType.INT16,
        ValueType.UINT32,
        ValueType.INT32,
        ValueType.UINT64,
        ValueType.INT64,
    }
)
# smallest encoding of one array element: a string is at least its u64 length,
# an array at least its u32 element type and u64 count
_MIN_ELEMENT_SIZE = {**_SCALAR_SIZES, ValueType.STRING: 8, ValueType.ARRAY: 12}


# ---------------------------------------------------------------------------
# ggml types


@dataclass(frozen=True, slots=True)
class GGMLType:
    """Storage facts of one ggml tensor type (ggml.c type_traits)."""

    id: int  # value of enum ggml_type
    name: str  # ggml_type_name()
    block_size: int  # elements per block (blck_size)
    type_size: int  # bytes per block (type_size)
    quantized: bool  # is_quantized

    def row_size(self, n: int) -> int:
        """Bytes of ``n`` consecutive elements (ggml_row_size); ``n`` must be a multiple of the block size."""
        return self.type_size * (n // self.block_size)


def _ggml_types(*rows: tuple[int, str, int, int, bool]) -> dict[int, GGMLType]:
    return {r[0]: GGMLType(*r) for r in rows}


# Every type of the pinned ggml (ggml.h, GGML_TYPE_COUNT = 43). Ids 4, 5,
# 31-33 and 36-38 were removed upstream and are rejected. Sizes follow the
# block structs of ggml-common.h (ggml_half = 2 bytes, QK_K = 256).
GGML_TYPES: dict[int, GGMLType] = _ggml_types(
    (0, "f32", 1, 4, False),
    (1, "f16", 1, 2, False),
    (2, "q4_0", 32, 18, True),
    (3, "q4_1", 32, 20, True),
    (6, "q5_0", 32, 22, True),
    (7, "q5_1", 32, 24, True),
    (8, "q8_0", 32, 34, True),
    (9, "q8_1", 32, 36, True),
    (10, "q2_K", 256, 84, True),
    (11, "q3_K", 256, 110, True),
    (12, "q4_K", 256, 144, True),
    (13, "q5_K", 256, 176, True),
    (14, "q6_K", 256, 210, True),
    (15, "q8_K", 256, 292, True),
    (16, "iq2_xxs", 256, 66, True),
    (17, "iq2_xs", 256, 74, True),
    (18, "iq3_xxs", 256, 98, True),
    (19, "iq1_s", 256, 50, True),
    (20, "iq4_nl", 32, 18, True),
    (21, "iq3_s", 256, 110, True),
    (22, "iq2_s", 256, 82, True),
    (23, "iq4_xs", 256, 136, True),
    (24, "i8", 1, 1, False),
    (25, "i16", 1, 2, False),
    (26, "i32", 1, 4, False),
    (27, "i64", 1, 8, False),
    (28, "f64", 1, 8, False),
    (29, "iq1_m", 256, 56, True),
    (30, "bf16", 1, 2, False),
    (34, "tq1_0", 256, 54, True),
    (35, "tq2_0", 256, 66, True),
    (39, "mxfp4", 32, 17, True),
    (40, "nvfp4", 64, 36, True),
    (41, "q1_0", 128, 18, True),
    (42, "q2_0", 64, 18, True),
)
GGML_TYPES_BY_NAME: dict[str, GGMLType] = {t.name.lower(): t for t in GGML_TYPES.values()}


def ggml_type(type_id_or_name: int | str) -> GGMLType:
    """Look up a ggml type by id or (case-insensitive) name; raises GGUFError if unknown."""
    if isinstance(type_id_or_name, str):
        found = GGML_TYPES_BY_NAME.get(type_id_or_name.lower())
    else:
        found = GGML_TYPES.get(type_id_or_name)
    if found is None:
        raise GGUFError(f"unknown ggml type {type_id_or_name!r}")
    return found


# llama_ftype (general.file_type) -> quantization name as llama.cpp prints it
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
    1024: "GUESSED",
}

# llama_pooling_type ({arch}.pooling_type)
POOLING_TYPE_NAMES: dict[int, str] = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


# ---------------------------------------------------------------------------
# parsed records


@dataclass(frozen=True, slots=True)
class SkippedArray:
    """An array longer than ``max_array_size``: its elements were not read."""

    element_type: ValueType  # type of the elements left in the file
    length: int  # number of elements in the file

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True, slots=True)
class Field:
    """One metadata key/value pair."""

    type: ValueType  # value type as stored
    value: Any  # int/float/bool/str, a list for arrays, or SkippedArray
    element_type: ValueType | None  # element type when ``type`` is ARRAY, else None
    offset: int  # file offset of the pair (its key length), for diagnostics


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor info record; shape is in ggml order (ne[0], the row length, first)."""

    name: str  # tensor name, e.g. "blk.0.attn_q.weight"
    type: GGMLType  # storage type
    shape: tuple[int, ...]  # element counts per dimension, ne[0] first
    offset: int  # byte offset of the data, relative to the data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        """Size of the tensor data (ggml_nbytes for a contiguous tensor)."""
        if not self.shape:
            return self.type.row_size(1)
        return self.type.row_size(self.shape[0]) * math.prod(self.shape[1:])


_LAYER_GROUP = re.compile(r"^((?:[a-z]+\.)?(?:blk|mm|layers?)\.\d+)\.")


def layer_group(tensor_name: str) -> str:
    """The layer a tensor belongs to.

    ``blk.N.*`` -> ``blk.N``; ``mm.N.*`` -> ``mm.N``; a prefixed block such as
    ``v.blk.N.*`` (vision), ``a.blk.N.*`` (audio) or ``enc.blk.N.*`` keeps
    its prefix; anything else groups under its first name component
    (``token_embd``, ``output``, ``output_norm``, ``v``, ``rope_freqs`` ...).
    """
    match = _LAYER_GROUP.match(tensor_name)
    if match:
        return match.group(1)
    return tensor_name.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class VisionInfo:
    """Vision-encoder hyperparameters of a projector (mmproj) file, from clip.vision.* or {arch}.vision.*."""

    projector_type: str | None  # clip.projector_type (e.g. "mlp", "gemma3", "qwen2.5vl_merger")
    image_size: int  # input image side in pixels
    patch_size: int  # patch side in pixels
    embedding_length: int  # encoder hidden size
    head_count: int  # encoder attention heads
    block_count: int  # encoder layers
    feed_forward_length: int  # encoder FFN size
    projection_dim: int  # output embedding size handed to the text model (0 = unknown)
    max_num_tiles: int  # tiles per image for tiling encoders (mllama), else 1

    @property
    def n_patches(self) -> int:
        side = self.image_size // self.patch_size if self.patch_size else 0
        return side * side


# ---------------------------------------------------------------------------
# the file


@dataclass(frozen=True)
class GGUFFile:
    """Everything in a GGUF header, plus typed accessors for the model hyperparameters.

    Accessors for ``{arch}.*`` keys apply the ``general.architecture`` prefix.
    """

    path: str  # file the header was read from ("<buffer>" for in-memory data)
    version: int  # GGUF version (2 or 3)
    byte_order: str  # "<" little-endian or ">" big-endian
    fields: Mapping[str, Field] = field(repr=False)  # metadata in file order
    tensors: tuple[TensorInfo, ...] = field(repr=False)  # tensor infos in file order
    alignment: int  # data alignment (general.alignment or 32)
    data_offset: int  # file offset of the tensor data section
    file_size: int  # size of the file in bytes
    _groups: dict[str, tuple[TensorInfo, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)
    # get_int_or_array results by (key, n_layer, default): per-layer lookups cost O(1) after the first
    _per_layer: dict[tuple[str, int, int], tuple[int, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    # -- raw metadata -------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (list or SkippedArray for arrays), or ``default``."""
        f = self.fields.get(key)
        return default if f is None else f.value

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def arch_key(self, name: str) -> str:
        """``name`` with the architecture prefix: ``"block_count"`` -> ``"llama.block_count"``."""
        return f"{self.architecture}.{name}"

    def get_arch(self, name: str, default: Any = None) -> Any:
        return self.get(self.arch_key(name), default)

    def get_int(self, key: str, default: int | None = None) -> int | None:
        """An integer-valued key; GGUFError if present with another type."""
        f = self.fields.get(key)
        if f is None:
            return default
        if f.type not in _INTEGER_TYPES:
            raise GGUFError(f"{key}: expected an integer, file has {f.type.name}")
        return int(f.value)

    def get_str(self, key: str, default: str | None = None) -> str | None:
        f = self.fields.get(key)
        if f is None:
            return default
        if f.type is not ValueType.STRING:
            raise GGUFError(f"{key}: expected a string, file has {f.type.name}")
        return f.value

    def get_int_or_array(self, key: str, n_layer: int, default: int) -> tuple[int, ...]:
        """A per-layer integer that may be stored as one value or as an array (llama.cpp get_key_or_arr).

        ``n_layer`` above MAX_LAYERS raises GGUFError (llama.cpp refuses such
        a file; building the tuple could exhaust memory).
        """
        cached = self._per_layer.get((key, n_layer, default))
        if cached is None:
            cached = self._per_layer[(key, n_layer, default)] = self._int_or_array(key, n_layer, default)
        return cached

    def _int_or_array(self, key: str, n_layer: int, default: int) -> tuple[int, ...]:
        if not 0 <= n_layer <= MAX_LAYERS:
            raise self._block_count_error(n_layer)
        f = self.fields.get(key)
        if f is None:
            return (default,) * n_layer
        if f.type in _INTEGER_TYPES:
            return (int(f.value),) * n_layer
        if f.type is ValueType.ARRAY and f.element_type in _INTEGER_TYPES:
            if isinstance(f.value, SkippedArray):
                raise GGUFError(f"{key}: per-layer array was skipped; raise max_array_size")
            if len(f.value) != n_layer:
                raise GGUFError(f"{key}: array has {len(f.value)} entries for {n_layer} layers")
            return tuple(int(v) for v in f.value)
        raise GGUFError(f"{key}: expected an integer or integer array, file has {f.type.name}")

    # -- model hyperparameters ----------------------------------------------

    @property
    def architecture(self) -> str:
        return self.get_str("general.architecture", "") or ""

    @property
    def name(self) -> str | None:
        return self.get_str("general.name")

    @property
    def block_count(self) -> int:
        return self.get_int(self.arch_key("block_count"), 0) or 0

    def checked_block_count(self) -> int:
        """``block_count``, or GGUFError when it is outside 0..MAX_LAYERS (llama.cpp refuses the file)."""
        n = self.block_count
        if not 0 <= n <= MAX_LAYERS:
            raise self._block_count_error(n)
        return n

    def _block_count_error(self, n: int) -> GGUFError:
        return GGUFError(f"{self.arch_key('block_count')} = {n} is out of range: llama.cpp loads 1 to {MAX_LAYERS} layers")

    @property
    def embedding_length(self) -> int:
        return self.get_int(self.arch_key("embedding_length"), 0) or 0

    @property
    def context_length(self) -> int:
        return self.get_int(self.arch_key("context_length"), 0) or 0

    def feed_forward_lengths(self) -> tuple[int, ...]:
        return self.get_int_or_array(self.arch_key("feed_forward_length"), self.block_count, 0)

    @property
    def feed_forward_length(self) -> int:
        return max(self.feed_forward_lengths(), default=0)

    def head_counts(self) -> tuple[int, ...]:
        """Attention heads per layer."""
        return self.get_int_or_array(self.arch_key("attention.head_count"), self.block_count, 0)

    @property
    def head_count(self) -> int:
        """Attention heads of the first layer (llama.cpp's n_head())."""
        key = self.arch_key("attention.head_count")
        f = self.fields.get(key)
        if f is None or f.type in _INTEGER_TYPES or not self.block_count:
            return self.get_int(key, 0) or 0
        return self.head_counts()[0]

    def head_counts_kv(self) -> tuple[int, ...]:
        """KV heads per layer; defaults to the head count (no GQA). 0 marks a layer without attention."""
        key = self.arch_key("attention.head_count_kv")
        if key not in self.fields:
            return self.head_counts()
        return self.get_int_or_array(key, self.block_count, 0)

    @property
    def head_count_kv(self) -> int:
        """Largest KV head count over the layers."""
        return max(self.head_counts_kv(), default=0)

    @property
    def key_length(self) -> int:
        """Per-head K size; defaults to embedding_length / head_count."""
        default = self.embedding_length // self.head_count if self.head_count else 0
        return self.get_int(self.arch_key("attention.key_length"), default) or 0

    @property
    def value_length(self) -> int:
        """Per-head V size; defaults to embedding_length / head_count."""
        default = self.embedding_length // self.head_count if self.head_count else 0
        return self.get_int(self.arch_key("attention.value_length"), default) or 0

    @property
    def key_length_swa(self) -> int:
        return self.get_int(self.arch_key("attention.key_length_swa"), self.key_length) or 0

    @property
    def value_length_swa(self) -> int:
        return self.get_int(self.arch_key("attention.value_length_swa"), self.value_length) or 0

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-style): the cache holds one compressed K and no V."""
        k = self.get_int(self.arch_key("attention.key_length_mla"), 0)
        v = self.get_int(self.arch_key("attention.value_length_mla"), 0)
        return bool(k) and bool(v)

    @property
    def sliding_window(self) -> int | None:
        return self.get_int(self.arch_key("attention.sliding_window"))

    @property
    def sliding_window_pattern(self) -> int | list[bool] | None:
        """``{arch}.attention.sliding_window_pattern``: a period, or one flag per layer (True = sliding)."""
        f = self.fields.get(self.arch_key("attention.sliding_window_pattern"))
        if f is None:
            return None
        if f.type in _INTEGER_TYPES:
            return int(f.value)
        if f.type is ValueType.ARRAY and isinstance(f.value, list):
            return [bool(v) for v in f.value]
        raise GGUFError(f"{self.arch_key('attention.sliding_window_pattern')}: unusable value")

    @property
    def expert_count(self) -> int:
        return self.get_int(self.arch_key("expert_count"), 0) or 0

    @property
    def expert_used_count(self) -> int:
        return self.get_int(self.arch_key("expert_used_count"), 0) or 0

    @property
    def pooling_type(self) -> int | None:
        return self.get_int(self.arch_key("pooling_type"))

    @property
    def pooling_type_name(self) -> str | None:
        p = self.pooling_type
        return None if p is None else POOLING_TYPE_NAMES.get(p, f"unknown({p})")

    @property
    def file_type(self) -> int | None:
        return self.get_int("general.file_type")

    @property
    def file_type_name(self) -> str:
        """Quantization name of general.file_type, or one guessed from the most common weight type."""
        ft = self.file_type
        if ft is not None:
            return FILE_TYPE_NAMES.get(ft, f"unknown({ft})")
        counts: dict[str, int] = {}
        for t in self.tensors:
            if len(t.shape) >= 2:
                counts[t.type.name] = counts.get(t.type.name, 0) + t.n_elements
        return max(counts, key=counts.__getitem__).upper() if counts else "unknown"

    @property
    def chat_template(self) -> str | None:
        return self.get_str("tokenizer.chat_template")

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary (works with a skipped token array)."""
        tokens = self.fields.get("tokenizer.ggml.tokens")
        if tokens is not None and tokens.type is ValueType.ARRAY:
            return len(tokens.value)
        n = self.get_int(self.arch_key("vocab_size"))
        if n is not None:
            return n
        for name in ("output.weight", "token_embd.weight"):
            t = self.tensor(name)
            if t is not None and len(t.shape) == 2:
                return t.shape[1]
        return 0

    @property
    def parameter_count(self) -> int:
        """Sum of the elements of all tensors."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        """Sum of the data sizes of all tensors."""
        return sum(t.n_bytes for t in self.tensors)

    # -- projectors ---------------------------------------------------------

    @property
    def projector_type(self) -> str | None:
        return self.get_str("clip.projector_type") or self.get_str("clip.vision.projector_type")

    @property
    def has_vision_encoder(self) -> bool:
        if self.get("clip.has_vision_encoder") is True:
            return True
        return self._vision_int("image_size") > 0

    @property
    def has_audio_encoder(self) -> bool:
        return self.get("clip.has_audio_encoder") is True

    def _vision_int(self, name: str, default: int = 0) -> int:
        for key in (f"clip.vision.{name}", self.arch_key(f"vision.{name}")):
            value = self.get_int(key)
            if value is not None:
                return value
        return default

    def vision_info(self) -> VisionInfo | None:
        """Vision-encoder hyperparameters, or None when the file has no vision encoder."""
        if not self.has_vision_encoder:
            return None
        return VisionInfo(
            projector_type=self.projector_type,
            image_size=self._vision_int("image_size"),
            patch_size=self._vision_int("patch_size"),
            embedding_length=self._vision_int("embedding_length"),
            head_count=self._vision_int("attention.head_count"),
            block_count=self._vision_int("block_count"),
            feed_forward_length=self._vision_int("feed_forward_length"),
            projection_dim=self._vision_int("projection_dim"),
            max_num_tiles=max(1, self._vision_int("max_num_tiles", 1)),
        )

    # -- tensors ------------------------------------------------------------

    def tensor(self, name: str) -> TensorInfo | None:
        for group in self._group_map().get(layer_group(name), ()):
            if group.name == name:
                return group
        return None

    def layers(self) -> dict[str, tuple[TensorInfo, ...]]:
        """Tensors grouped by layer (see ``layer_group``), groups in first-seen order."""
        return dict(self._group_map())

    def layer_bytes(self) -> dict[str, int]:
        """Data bytes per layer group."""
        return {name: sum(t.n_bytes for t in ts) for name, ts in self._group_map().items()}

    def _group_map(self) -> dict[str, tuple[TensorInfo, ...]]:
        if not self._groups and self.tensors:
            grouped: dict[str, list[TensorInfo]] = {}
            for t in self.tensors:
                grouped.setdefault(layer_group(t.name), []).append(t)
            self._groups.update({k: tuple(v) for k, v in grouped.items()})
        return self._groups


# ---------------------------------------------------------------------------
# parsing


def read_gguf(path: str | os.PathLike[str], *, max_array_size: int | None = None) -> GGUFFile:
    """Read the header of the GGUF file at ``path``.

    ``max_array_size``: arrays with more elements are skipped (see
    ``SkippedArray``); None reads every array.
    Raises GGUFError for malformed files and OSError for I/O failures.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < _HEADER_SIZE:
            raise GGUFError(f"{os.fspath(path)}: {size} bytes is too short for a GGUF header")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _Parser(buf, size, max_array_size).parse(os.fspath(path))


def parse_gguf(data: bytes | bytearray | memoryview, *, max_array_size: int | None = None) -> GGUFFile:
    """Parse a GGUF header held in memory (the whole file, or at least its header and data extent)."""
    return _Parser(data, len(data), max_array_size).parse("<buffer>")


class _Parser:
    """Cursor over the file bytes; one instance per parse."""

    def __init__(self, buf: Any, size: int, max_array_size: int | None) -> None:
        if max_array_size is not None and max_array_size < 0:
            raise ValueError("max_array_size must be >= 0 or None")
        self.buf = buf  # the file bytes (mmap or bytes-like)
        self.end = size  # file size; nothing may be read at or past it
        self.pos = 0  # next byte to read
        self.max_array_size = max_array_size  # longer arrays are skipped

    # -- entry point --------------------------------------------------------

    def parse(self, path: str) -> GGUFFile:
        try:
            return self._parse(path)
        except (struct.error, IndexError, OverflowError, MemoryError) as exc:
            raise GGUFError(f"{path}: truncated or corrupt header near offset {self.pos} ({exc})") from None

    def _parse(self, path: str) -> GGUFFile:
        buf = self.buf
        if self.end < _HEADER_SIZE:
            raise GGUFError(f"{path}: {self.end} bytes is too short for a GGUF header")
        if bytes(buf[0:4]) != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (magic {bytes(buf[0:4])!r})")
        order = self._detect_byte_order(path)
        self._set_byte_order(order)
        version = self._u32(buf, 4)[0]
        self.pos = 8
        n_tensors = self._read_u64()
        n_kv = self._read_u64()
        # the smallest key/value pair is 14 bytes, the smallest tensor info 25
        self._check_count(n_kv, 14, "key/value pairs")
        self._check_count(n_tensors, 25, "tensors")

        fields: dict[str, Field] = {}
        for _ in range(n_kv):
            start = self.pos
            key = self._read_key("key")
            if key in fields:
                raise GGUFError(f"{path}: duplicate key {key!r} at offset {start}")
            vtype = self._value_type(self._read_u32(), key)
            if vtype is ValueType.ARRAY:
                etype = self._value_type(self._read_u32(), key)
                value = self._read_array_body(etype, 1)
                fields[key] = Field(vtype, value, etype, start)
            else:
                fields[key] = Field(vtype, self._read_scalar(vtype), None, start)

        alignment = DEFAULT_ALIGNMENT
        align_field = fields.get("general.alignment")
        if align_field is not None:
            if align_field.type is not ValueType.UINT32:
                raise GGUFError(f"{path}: general.alignment must be UINT32, not {align_field.type.name}")
            alignment = align_field.value
            if alignment == 0 or alignment & (alignment - 1):
                raise GGUFError(f"{path}: general.alignment {alignment} is not a power of two")

        tensors = self._read_tensor_infos(n_tensors, alignment, path)
        data_offset = -(-self.pos // alignment) * alignment
        data_end = max((t.offset + t.n_bytes for t in tensors), default=0)
        if tensors and data_offset + data_end > self.end:
            raise GGUFError(
                f"{path}: tensor data needs {data_offset + data_end} bytes, file has {self.end} (truncated?)"
            )
        return GGUFFile(
            path=path,
            version=version,
            byte_order=order,
            fields=fields,
            tensors=tensors,
            alignment=alignment,
            data_offset=data_offset,
            file_size=self.end,
        )

    def _detect_byte_order(self, path: str) -> str:
        little = struct.unpack_from("<I", self.buf, 4)[0]
        if little in SUPPORTED_VERSIONS:
            return "<"
        big = struct.unpack_from(">I", self.buf, 4)[0]
        if big in SUPPORTED_VERSIONS:
            return ">"
        if little == 1 or big == 1:
            raise GGUFError(f"{path}: GGUF v1 is not supported")
        raise GGUFError(f"{path}: unsupported GGUF version {little}")

    def _set_byte_order(self, order: str) -> None:
        self.order = order  # "<" or ">"
        self._u32 = struct.Struct(order + "I").unpack_from
        self._u64 = struct.Struct(order + "Q").unpack_from
        self._scalars = {t: struct.Struct(order + c).unpack_from for t, c in _SCALAR_CODES.items()}

    # -- primitives ---------------------------------------------------------

    def _read_u32(self) -> int:
        value = self._u32(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def _read_u64(self) -> int:
        value = self._u64(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def _check_count(self, count: int, min_size: int, what: str) -> None:
        if count * min_size > self.end - self.pos:
            raise GGUFError(f"{count} {what} at offset {self.pos} cannot fit in the {self.end}-byte file")

    def _read_bytes(self, what: str) -> bytes:
        start = self.pos
        length = self._read_u64()
        if length > self.end - self.pos:
            raise GGUFError(f"{what} at offset {start}: length {length} runs past the end of the file")
        data = self.buf[self.pos : self.pos + length]
        self.pos += length
        return bytes(data)

    def _read_key(self, what: str) -> str:
        start = self.pos
        raw = self._read_bytes(what)
        if not raw:
            raise GGUFError(f"empty {what} at offset {start}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{what} at offset {start} is not valid UTF-8") from None

    def _read_string(self) -> str:
        # values are decoded leniently: invalid UTF-8 becomes U+FFFD
        return self._read_bytes("string").decode("utf-8", "replace")

    def _value_type(self, raw: int, key: str) -> ValueType:
        try:
            return ValueType(raw)
        except ValueError:
            raise GGUFError(f"{key!r}: unknown value type {raw} at offset {self.pos - 4}") from None

    def _read_scalar(self, vtype: ValueType) -> Any:
        if vtype is ValueType.STRING:
            return self._read_string()
        value = self._scalars[vtype](self.buf, self.pos)[0]
        self.pos += _SCALAR_SIZES[vtype]
        return value

    # -- arrays -------------------------------------------------------------

    def _read_array_body(self, etype: ValueType, depth: int) -> list[Any] | SkippedArray:
        """Read an array's count and elements (its element type is already read)."""
        if depth > MAX_ARRAY_DEPTH:
            raise GGUFError(f"arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {self.pos}")
        count = self._read_u64()
        self._check_count(count, _MIN_ELEMENT_SIZE[etype], "array elements")
        keep = self.max_array_size is None or count <= self.max_array_size
        if etype is ValueType.STRING:
            if keep:
                return self._read_strings(count)
            self._skip_strings(count)
        elif etype is ValueType.ARRAY:
            items = []
            for _ in range(count):
                inner = self._value_type(self._read_u32(), "array element")
                item = self._read_array_body(inner, depth + 1)
                if keep:
                    items.append(item)
            if keep:
                return items
        else:
            nbytes = count * _SCALAR_SIZES[etype]
            if keep:
                values = struct.unpack_from(f"{self.order}{count}{_SCALAR_CODES[etype]}", self.buf, self.pos)
                self.pos += nbytes
                return list(values)
            self.pos += nbytes
        return SkippedArray(etype, count)

    def _read_strings(self, count: int) -> list[str]:
        buf, unpack, end = self.buf, self._u64, self.end
        pos = self.pos
        out = []
        for _ in range(count):
            length = unpack(buf, pos)[0]
            pos += 8
            if length > end - pos:
                raise GGUFError(f"string at offset {pos - 8}: length {length} runs past the end of the file")
            out.append(bytes(buf[pos : pos + length]).decode("utf-8", "replace"))
            pos += length
        self.pos = pos
        return out

    def _skip_strings(self, count: int) -> None:
        # Hot loop for 100k+ vocabularies: only the length prefixes are read.
        # A length past EOF makes the next unpack fail (struct.error), or the
        # final check below catches it.
        buf, unpack = self.buf, self._u64
        pos = self.pos
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]
        if pos > self.end:
            raise GGUFError(f"string array starting at offset {self.pos} runs past the end of the file")
        self.pos = pos

    # -- tensor infos -------------------------------------------------------

    def _read_tensor_infos(self, count: int, alignment: int, path: str) -> tuple[TensorInfo, ...]:
        infos: list[TensorInfo] = []
        names: set[str] = set()
        for _ in range(count):
            start = self.pos
            name = self._read_key("tensor name")
            if len(name.encode("utf-8")) > MAX_TENSOR_NAME:
                raise GGUFError(f"{path}: tensor name {name[:80]!r} is longer than {MAX_TENSOR_NAME} bytes")
            if name in names:
                raise GGUFError(f"{path}: duplicate tensor {name!r} at offset {start}")
            names.add(name)
            n_dims = self._read_u32()
            if n_dims > MAX_TENSOR_DIMS:
                raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions (max {MAX_TENSOR_DIMS})")
            shape = struct.unpack_from(f"{self.order}{n_dims}Q", self.buf, self.pos)
            self.pos += 8 * n_dims
            raw_type = self._read_u32()
            offset = self._read_u64()
            infos.append(self._check_tensor(path, name, shape, raw_type, offset, alignment))
        return tuple(infos)

    @staticmethod
    def _check_tensor(
        path: str, name: str, shape: Iterable[int], raw_type: int, offset: int, alignment: int
    ) -> TensorInfo:
        shape = tuple(shape)
        ttype = GGML_TYPES.get(raw_type)
        if ttype is None:
            raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type {raw_type}")
        n = 1
        for dim in shape:
            n *= dim
            if dim > _INT64_MAX or n > _INT64_MAX:
                raise GGUFError(f"{path}: tensor {name!r} shape {shape} overflows int64")
        row = shape[0] if shape else 1
        if row % ttype.block_size:
            raise GGUFError(
                f"{path}: tensor {name!r} row of {row} elements is not a multiple of "
                f"the {ttype.name} block size {ttype.block_size}"
            )
        if offset % alignment:
            raise GGUFError(f"{path}: tensor {name!r} offset {offset} is not aligned to {alignment}")
        return TensorInfo(name, ttype, shape, offset)
