"""Media in prompts: placeholders, media chunks and the embedding cache.

A completion request may carry media items (image or audio bytes, each with an
integer id).  The prompt places them with ``[img-N]`` (the item whose id is N,
as Ollama's runner did) or with the projector's own marker (``<__media__>``;
the k-th such marker takes the k-th item).  :func:`build_prompt` turns text
plus items into the engine's inputs: token ids, and one
:class:`~runner.engine.slots.SpanInput` per embedding row of each media chunk, keyed
by the SHA-256 of the media bytes so that the prefix cache tells images apart
by content.

:class:`MediaCache` keeps encoded chunks (the projector's output rows) under
the same keys, least recently used first out, bounded in bytes: an image seen
again in a conversation is never encoded twice while it stays cached.
"""

from __future__ import annotations

import collections
import hashlib
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from runner.engine.requests import BadRequest
from runner.engine.slots import SpanInput

PLACEHOLDER = re.compile(r"\[img-(\d+)\]")
DEFAULT_CACHE_BYTES = 256 << 20   # ~27 images of 576 rows x 4096 floats


@dataclass(frozen=True)
class MediaItem:
    """Media attached to a request."""

    id: int       # referenced in the prompt as [img-<id>]
    data: bytes   # the file's bytes (PNG, JPEG, WebP, GIF, BMP; WAV, MP3, FLAC)


@dataclass(eq=False)
class MediaSpan:
    """A media chunk placed in a prompt: rows ``start .. start + n_tokens - 1``."""

    start: int            # index of its first row in the prompt's inputs
    key: tuple            # (sha256 hex of the media, chunk number within the media)
    chunk: Any            # runner._llama.MediaChunk (preprocessed, not encoded)
    non_causal: bool      # decode all rows in one batch with non-causal attention

    @property
    def n_tokens(self) -> int:
        return self.chunk.n_tokens

    @property
    def end(self) -> int:
        return self.start + self.chunk.n_tokens


@dataclass
class MediaPrompt:
    """A tokenized prompt with media: inputs plus where each chunk sits."""

    inputs: list                 # token ids and SpanInputs, one per KV position
    spans: list[MediaSpan]       # in prompt order


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_webp(data: bytes) -> bool:
    return len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def looks_like_audio(data: bytes) -> bool:
    """WAV, FLAC or MP3 by their magic bytes (what mtmd's decoder accepts)."""
    return ((data[:4] == b"RIFF" and data[8:12] == b"WAVE") or data[:4] == b"fLaC"
            or data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0))


def _bitmap(mtmd, data: bytes, key: str):
    """Decode media bytes into an mtmd bitmap; WebP goes through Pillow
    (mtmd decodes WebP only in builds with ffmpeg)."""
    if _is_webp(data):
        try:
            from PIL import Image
        except ImportError:
            raise BadRequest("WebP images need Pillow (pip install pillow)") from None
        import io
        try:
            with Image.open(io.BytesIO(data)) as im:
                pixels = np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise BadRequest(f"cannot decode the WebP image: {exc}") from None
        return mtmd.bitmap_from_rgb(pixels, key)
    return mtmd.bitmap(data, key)


def build_prompt(mtmd, text: str, items: list[MediaItem], add_special: bool) -> MediaPrompt:
    """Tokenize ``text`` with its media.  Raises BadRequest for a missing or
    unused item, a duplicate id, or bytes that are not media."""
    from runner import _llama

    if mtmd is None:
        raise BadRequest("this model has no multimodal projector loaded; media cannot be used")
    by_id: dict[int, MediaItem] = {}
    for item in items:
        if not isinstance(item.id, int) or isinstance(item.id, bool) or item.id < 0:
            raise BadRequest(f"media id must be a non-negative integer, not {item.id!r}")
        if item.id in by_id:
            raise BadRequest(f"media id {item.id} is given twice")
        if not isinstance(item.data, (bytes, bytearray, memoryview)):
            raise BadRequest(f"media item {item.id}: data must be bytes")
        if len(item.data) == 0:
            raise BadRequest(f"media item {item.id} is empty (0 bytes)")
        by_id[item.id] = item

    # One pass over the text: each placeholder or marker becomes the marker,
    # and the item it names is appended to `order`.
    marker = mtmd.marker
    pattern = re.compile(PLACEHOLDER.pattern + "|" + re.escape(marker))
    order: list[MediaItem] = []
    n_default = 0

    def place(m: re.Match) -> str:
        nonlocal n_default
        if m.group(1) is not None:
            item = by_id.get(int(m.group(1)))
            if item is None:
                known = ", ".join(str(i) for i in by_id) or "none"
                raise BadRequest(f"placeholder {m.group(0)} names no media item (ids given: {known})")
        else:
            if n_default >= len(items):
                raise BadRequest(f"the prompt has more {marker} markers than media items ({len(items)})")
            item = items[n_default]
            n_default += 1
        order.append(item)
        return marker

    text = pattern.sub(place, text)
    unused = sorted(set(by_id) - {item.id for item in order})
    if unused:
        raise BadRequest(f"media item(s) {', '.join(map(str, unused))} not referenced in the prompt "
                         f"(place them with [img-N] or {marker})")

    keys: dict[int, str] = {}
    bitmaps = {}
    try:
        for item in order:
            if item.id not in bitmaps:
                audio = looks_like_audio(item.data)
                if audio and not mtmd.supports_audio:
                    raise BadRequest(f"media item {item.id} is audio; this projector has no audio encoder")
                if not audio and not mtmd.supports_vision:
                    raise BadRequest(f"media item {item.id} is not audio (WAV, MP3, FLAC); "
                                     f"this projector has no vision encoder")
                keys[item.id] = digest(bytes(item.data))
                try:
                    bitmaps[item.id] = _bitmap(mtmd, bytes(item.data), keys[item.id])
                except _llama.MediaError as exc:
                    raise BadRequest(f"media item {item.id}: {exc}") from None
        try:
            parts = mtmd.tokenize(text, [bitmaps[item.id] for item in order],
                                  add_special=add_special, parse_special=True)
        except _llama.MediaError as exc:
            raise BadRequest(str(exc)) from None
    finally:
        for bm in bitmaps.values():
            bm.close()

    # Chunk numbers restart for every occurrence of the same media, so the
    # same image placed twice gives the same keys twice.
    uses = collections.Counter(keys[item.id] for item in order)
    chunks_of = collections.Counter(p.id for p in parts if not isinstance(p, list))
    seen: collections.Counter = collections.Counter()
    inputs: list = []
    spans: list[MediaSpan] = []
    for part in parts:
        if isinstance(part, list):
            inputs.extend(part)
            continue
        per_use = max(1, chunks_of[part.id] // max(1, uses[part.id]))
        key = (part.id, seen[part.id] % per_use)
        seen[part.id] += 1
        spans.append(MediaSpan(start=len(inputs), key=key, chunk=part,
                               non_causal=mtmd.non_causal(part)))
        inputs.extend(SpanInput(key, i) for i in range(part.n_tokens - 1))
        # The last row carries the positions the chunk gives back (M-RoPE
        # images take fewer KV positions than rows; see runner.engine.slots).
        if part.n_tokens:
            inputs.append(SpanInput(key, part.n_tokens - 1, part.n_tokens - part.n_pos))
    return MediaPrompt(inputs=inputs, spans=spans)


@dataclass
class MediaCacheStats:
    hits: int = 0          # chunks served from the cache
    misses: int = 0        # chunks that had to be encoded
    evictions: int = 0     # entries dropped to stay under the byte bound
    encode_seconds: float = 0.0  # time spent in the encoder


class MediaCache:
    """Encoded media chunks by key, least recently used evicted first.

    Holds at most ``max_bytes`` of embedding rows; an entry larger than that
    is used once and not kept.  ``max_bytes == 0`` disables caching.
    Thread-safe (the engine's loop thread writes; ``info`` reads).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes  # bound on the sum of entry sizes
        self.bytes = 0              # sum of entry sizes now
        self.stats = MediaCacheStats()
        self._entries: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()  # guards _entries, bytes, stats

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def keys(self) -> list[tuple]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def get(self, key: tuple) -> np.ndarray | None:
        """The rows for ``key`` (marked most recently used), or None; counts a hit or miss."""
        with self._lock:
            rows = self._entries.get(key)
            if rows is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return rows

    def put(self, key: tuple, rows: np.ndarray) -> None:
        """Store ``rows`` (read-only from now on), evicting the least recently used."""
        size = rows.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            if size > self.max_bytes:
                return
            while self._entries and self.bytes + size > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.nbytes
                self.stats.evictions += 1
            rows.flags.writeable = False
            self._entries[key] = rows
            self.bytes += size

    def get_or_encode(self, key: tuple, encode) -> np.ndarray:
        """Cached rows for ``key``, or ``encode()``'s result (then cached)."""
        rows = self.get(key)
        if rows is not None:
            return rows
        t0 = time.perf_counter()
        rows = encode()
        with self._lock:
            self.stats.encode_seconds += time.perf_counter() - t0
        self.put(key, rows)
        return rows

    def info(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.stats.hits, "misses": self.stats.misses,
                    "evictions": self.stats.evictions,
                    "encode_seconds": round(self.stats.encode_seconds, 6)}
