"""Slot files: one slot's inputs and sequence state on disk (the ``save_slot``
and ``restore_slot`` ops).

Layout (version 1, integers little-endian)::

    magic        8 bytes   b"LLRSLOT\\0"
    version      u32       FORMAT_VERSION
    header_len   u32       bytes of the header that follows
    header       MessagePack map (SlotHeader)
    tokens       n_inputs x u32   the slot's inputs, token ids
    state        n_state bytes    llama_state_seq_get_data of the slot's sequence
    checksum     32 bytes  sha256 of everything before it

Only slots holding tokens are saved: a slot holding media rows is refused
(its rows would need the media and the projector to mean anything).

Reading checks, in this order, before anything touches a slot: the magic,
the version, the length the header announces (a truncated file), the
checksum (a corrupted one), the model identity, the KV cache types, the KV
streams, and the slot's capacity.  Every refusal is a :class:`BadRequest`
naming what is wrong.

KV streams: llama.cpp writes a sequence's state as one block per KV stream of
the context (every block but the sequence's own empty) and reads it back only
into a context with as many streams.  For an ordinary KV cache the state is
rewritten to the reading context's stream count (:func:`restream`); the
states of sliding-window, recurrent and hybrid memories chain several
caches whose block lengths only llama.cpp can parse, so theirs restore only
where the stream count is the same.

File names are confined to one directory given at load (``slot_save_dir``):
a name is a plain file name (no separator, no ``..``, not absolute) and the
file is ``<dir>/<name>.slot``.  Writes go to a temporary file in the same
directory, then replace the target; reads do not follow a symlink.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

from runner.engine.requests import BadRequest
from runner.model.gguf import read_gguf

__all__ = ["FORMAT_VERSION", "MAGIC", "MAX_FILE_BYTES", "SlotFile", "SlotHeader", "encode", "decode",
           "model_identity", "restream", "slot_path", "write_atomic", "read_file"]

MAGIC = b"LLRSLOT\0"
FORMAT_VERSION = 1
SUFFIX = ".slot"
_PREFIX = struct.Struct("<8sII")  # magic, version, header_len
_DIGEST = 32                        # sha256
MAX_HEADER_BYTES = 64 << 10         # a header is a few hundred bytes; more is not a slot file
MAX_FILE_BYTES = 16 << 30           # larger files are refused before they are read
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A sequence state as llama_state_seq_get_data writes it starts with this
# magic (llama-context.cpp io_magic) and the sequence id, then the memory's
# part: for an ordinary KV cache, the stream count and one u32 cell count
# per stream, each followed by that stream's cells when not zero.
STATE_MAGIC = 0xAF143CD8
_STATE_HEAD = struct.Struct("<IiI")  # magic, seq_id, n_stream


class SlotHeader(msgspec.Struct, forbid_unknown_fields=False):
    """What a slot file says about itself (MessagePack, after the prefix)."""

    model: str          # model_identity() of the model that wrote it (hex sha256)
    model_name: str     # that model's file name, for messages
    type_k: str         # K cache type the state was written with
    type_v: str         # V cache type
    kv_streams: int     # KV streams of the context that wrote it (1 if kv_unified, else parallel)
    n_inputs: int       # tokens in the slot
    n_state: int        # bytes of sequence state


@dataclass(frozen=True)
class SlotFile:
    """A decoded slot file."""

    header: SlotHeader     # identity and sizes
    tokens: list[int]      # the slot's inputs, in KV order
    state: memoryview      # sequence state bytes (a view into the file's data)


def slot_path(directory: str | None, name: str) -> str:
    """``<directory>/<name>.slot`` for a plain file name; BadRequest otherwise,
    or when no directory was configured."""
    if not directory:
        raise BadRequest("slot files are off: load with slot_save_dir (serve --slot-save-dir DIR) "
                         "to enable save_slot and restore_slot")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadRequest(f"name: {name!r} is not a plain file name (letters, digits, '.', '_', '-'; "
                         "starting with a letter or digit; at most 128; no path separators or '..')")
    return os.path.join(directory, name + SUFFIX)


def model_identity(model_path: str, lora_paths: Sequence[str] = ()) -> str:
    """sha256 over the GGUF header (metadata and tensor table, up to the
    tensor data) of the model and of each LoRA adapter, in order: a state is
    valid only for the weights that computed it."""
    digest = hashlib.sha256()
    for path in (model_path, *lora_paths):
        size = read_gguf(path).data_offset
        with open(path, "rb") as f:
            digest.update(struct.pack("<Q", size))
            digest.update(f.read(size))
    return digest.hexdigest()


def encode(header: SlotHeader, tokens: Sequence[int], state: bytes) -> list[bytes]:
    """The file's bytes, as parts to write in order (the state is not copied)."""
    head = msgspec.msgpack.encode(header)
    parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head,
             np.asarray(tokens, dtype="<u4").tobytes(), state]
    digest = hashlib.sha256()
    for p in parts:
        digest.update(p)
    parts.append(digest.digest())
    return parts


def decode(data: bytes, *, model: str, type_k: str, type_v: str, kv_streams: int,
           max_inputs: int, name: str = "", plain_kv: bool = False) -> SlotFile:
    """Check and decode a slot file's bytes; BadRequest says why it is refused.
    ``plain_kv``: the reading model's memory is an ordinary KV cache, whose
    state :func:`restream` can move to another stream count."""
    what = f"slot file {name!r}" if name else "slot file"
    if not data or data[:len(MAGIC)] != MAGIC[:len(data)]:
        raise BadRequest(f"{what} is not a llama-runner slot file (bad magic)")
    if len(data) < _PREFIX.size:
        raise BadRequest(f"{what} is truncated: {len(data)} bytes")
    _, version, head_len = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise BadRequest(f"{what} has format version {version}; this runner reads version "
                         f"{FORMAT_VERSION}")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(data):
        raise BadRequest(f"{what} is truncated or corrupted: header of {head_len} bytes, "
                         f"file of {len(data)}")
    try:
        header = msgspec.msgpack.decode(data[_PREFIX.size:_PREFIX.size + head_len], type=SlotHeader)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"{what} is corrupted: unreadable header ({exc})") from None
    if header.n_inputs < 0 or header.n_state < 0:
        raise BadRequest(f"{what} is corrupted: negative sizes in its header")
    body = _PREFIX.size + head_len
    expected = body + 4 * header.n_inputs + header.n_state + _DIGEST
    if len(data) != expected:
        raise BadRequest(f"{what} is truncated or corrupted: {len(data)} bytes, its header "
                         f"announces {expected}")
    if hashlib.sha256(memoryview(data)[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise BadRequest(f"{what} is corrupted: checksum mismatch")
    if header.model != model:
        raise BadRequest(f"{what} was saved from another model ({header.model_name}, identity "
                         f"{header.model[:12]}); this runner's is {model[:12]}")
    if (header.type_k, header.type_v) != (type_k, type_v):
        raise BadRequest(f"{what} holds a {header.type_k}/{header.type_v} KV cache; this runner's "
                         f"is {type_k}/{type_v}")
    if header.kv_streams != kv_streams and not plain_kv:
        raise BadRequest(f"{what} was saved by a context with {header.kv_streams} KV stream(s) "
                         f"and this runner has {kv_streams}; the state of a sliding-window, "
                         "recurrent or hybrid model restores only into as many streams: load "
                         f"with parallel={header.kv_streams}, or kv_unified on both")
    if header.n_inputs > max_inputs:
        raise BadRequest(f"{what} holds {header.n_inputs} inputs; a slot holds at most {max_inputs}")
    tokens_end = body + 4 * header.n_inputs
    tokens = np.frombuffer(data, dtype="<u4", count=header.n_inputs, offset=body).tolist()
    state = memoryview(data)[tokens_end:tokens_end + header.n_state]
    if header.kv_streams != kv_streams:
        try:
            state = memoryview(restream(state, kv_streams))
        except ValueError as exc:
            raise BadRequest(f"{what}: its state cannot be moved from {header.kv_streams} to "
                             f"{kv_streams} KV streams ({exc})") from None
    return SlotFile(header, tokens, state)


def restream(state: bytes | memoryview, n_stream: int) -> bytes:
    """An ordinary KV cache's sequence state rewritten for a context with
    ``n_stream`` KV streams.  The state holds the cells of one sequence,
    so all its stream blocks but one are empty (a u32 zero); the other
    block moves to the first stream, which llama.cpp reads into the
    restored sequence's own stream whatever its index.  ValueError when
    the bytes are not laid out that way (another kind of memory)."""
    if n_stream < 1:
        raise ValueError(f"n_stream must be >= 1, got {n_stream}")
    view = memoryview(state).cast("B")
    if len(view) < _STATE_HEAD.size:
        raise ValueError("the state is too short")
    magic, seq_id, n_old = _STATE_HEAD.unpack_from(view)
    if magic != STATE_MAGIC:
        raise ValueError("the state does not start with llama.cpp's sequence state magic")
    counts = _STATE_HEAD.size
    if n_old < 1 or counts + 4 * n_old > len(view):
        raise ValueError(f"the state announces {n_old} streams")
    # Only the counts up to the first non-empty stream sit at fixed offsets;
    # that stream's cells follow its count, and the streams after it, all
    # empty, leave their zero counts at the very end.
    first = next((k for k in range(n_old)
                  if struct.unpack_from("<I", view, counts + 4 * k)[0]), None)
    head = _STATE_HEAD.pack(magic, seq_id, n_stream)
    if first is None:  # no cells at all
        if len(view) != counts + 4 * n_old:
            raise ValueError("an empty state with trailing bytes")
        return head + bytes(4 * n_stream)
    tail = 4 * (n_old - first - 1)
    end = len(view) - tail
    if end <= counts + 4 * first + 4 or any(view[end:]):
        raise ValueError("more than one stream holds cells")
    block = view[counts + 4 * first:end]
    rest = n_stream - 1
    return b"".join((head, block, bytes(4 * rest)))


def write_atomic(path: str, parts: Sequence[bytes]) -> int:
    """Write ``parts`` to ``path`` through a temporary file in its directory
    (a reader never sees half a file; a symlink at ``path`` is replaced, not
    followed); returns the bytes written."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                f.write(p)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return sum(len(p) for p in parts)


def read_file(path: str, name: str, max_bytes: int) -> bytes:
    """The bytes of a slot file, not following a symlink; BadRequest when it
    is missing, not a regular file, or larger than ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise BadRequest(f"name: no slot file {name!r} in the slot directory") from None
    except OSError as exc:
        raise BadRequest(f"name: slot file {name!r} cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not (st.st_mode & 0o170000 == 0o100000):
            raise BadRequest(f"name: {name!r} is not a regular file")
        if st.st_size > max_bytes:
            raise BadRequest(f"slot file {name!r} is {st.st_size} bytes; a slot's file is at most "
                             f"{max_bytes} here")
        return f.read(max_bytes + 1)
