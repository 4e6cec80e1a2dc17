"""Wire messages between a runner process and its clients (docs/protocol.md).

Every message is one ZeroMQ frame holding one MessagePack map.  Requests are
tagged by their ``op`` field, replies by their ``type`` field; both are
msgspec Structs, so a request is typed and validated in the single call that
decodes it, and nothing untyped reaches the engine.  The bytes on the wire
stay plain MessagePack: any msgpack library can speak the protocol.

Requests are strict (unknown fields are refused, so a misspelt option is an
error rather than silently ignored); replies are lenient (a client ignores
fields it does not know, so adding an optional reply field is compatible).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Union

import msgspec

from runner.engine import limits
from runner.process.chatparse import ChatMessage
from runner.engine.requests import (BadRequest, Busy, Cancelled, EngineError, InputTooLong,
                             InternalError, NotReady)

PROTOCOL_VERSION = 1

# A request larger than this gets a ``bad_request`` reply; one larger than
# HARD_LIMIT_FACTOR times this is refused by ZeroMQ itself (MAXMSGSIZE), which
# closes the sender's connection without reading the message into memory.
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
HARD_LIMIT_FACTOR = 2

# Per-peer queue bounds (messages) on both ends; the runner never drops a reply
# silently when a peer's queue is full (ROUTER_MANDATORY + its own backlog).
HIGH_WATER_MARK = 10_000

# What the runner's ROUTER queues from one connection before it stops reading
# from it (the sender then waits): a bound in messages, so in bytes at most
# (RECEIVE_HIGH_WATER_MARK + 1) * HARD_LIMIT_FACTOR * max_message_bytes per
# connection, whatever the I/O thread is doing.  Small, because a request is
# answered only after the I/O thread takes it; clients keep their own queue.
RECEIVE_HIGH_WATER_MARK = 4

# Requests accepted and waiting for (or running on) a worker thread are bounded
# by this many times max_message_bytes, as received; more get ``busy``.
PENDING_BYTES_FACTOR = 4

# ZMTP heartbeats: a peer that stops answering is disconnected after
# HEARTBEAT_TIMEOUT_MS, which cancels its in-flight requests in the runner.
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 10_000
HEARTBEAT_TTL_MS = 20_000

# Every failure's code, and the exception a client raises for it (each
# exception class carries its code).
_ERRORS: dict[str, type[EngineError]] = {
    cls.code: cls for cls in (BadRequest, InputTooLong, Busy, NotReady, Cancelled, InternalError)}
ERROR_CODES = tuple(_ERRORS)
ErrorCode = Literal[ERROR_CODES]
State = Literal["launched", "loading", "ready", "error", "stopping"]

RequestId = Union[Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)],
                  Annotated[str, msgspec.Meta(min_length=1, max_length=128)]]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
TokenList = Annotated[list[TokenId], msgspec.Meta(max_length=limits.MAX_TOKENS)]
KVType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Positive = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
# Load parameters that reach llama.cpp as 32-bit integers.
Count32 = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Positive32 = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]


# -- requests ----------------------------------------------------------------

class Request(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    """Fields every request carries."""

    id: RequestId                        # chosen by the client, echoed in every reply
    v: Literal[1] = 1                    # protocol version the client speaks


class Health(Request, tag="health"):
    """State and load progress; answered in every state."""


class Discover(Request, tag="discover"):
    """Devices ggml sees, with free/total memory; answered in every state."""


class Load(Request, tag="load"):
    """Load the runner's model with these parameters (EngineConfig's names).

    Answered at once; the load itself is followed through ``health``.
    """

    n_ctx: Count32 = 4096                # context tokens, shared by the slots; 0 = the model's
    n_batch: Positive32 = 512            # tokens per decode call
    parallel: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1  # slots decoded together
    n_threads: Positive32 | None = None  # CPU threads; None = all cores
    n_gpu_layers: Literal["auto"] | Annotated[int, msgspec.Meta(ge=-1, le=2**31 - 1)] = "auto"  # "auto": placed by the runner; N; -1 = all
    main_gpu: Count32 | None = None      # one GPU for the whole model (llama.cpp split "none"); None: split by layers
    tensor_split: list[Annotated[float, msgspec.Meta(ge=0, le=1e30)]] | None = None  # per-device share
    devices: list[str] | None = None     # device names to use (as ``discover`` lists them)
    rpc_servers: list[str] | None = None  # HOST:PORT of rpc-servers whose devices are added first
    flash_attn: Literal["auto", "on", "off"] = "auto"
    type_k: KVType = "f16"               # KV cache type of keys
    type_v: KVType = "f16"               # KV cache type of values
    use_mmap: bool = True
    lora_paths: list[str] = []           # LoRA adapters, ids 0.. in order; requests pick scales (option lora)
    projector_path: str | None = None    # multimodal projector (mmproj) file
    media_cache_bytes: NonNegative = 256 << 20  # bound on cached media embeddings (0: no cache)
    cache_policy: Literal["single", "multi"] = "single"  # slot choice (runner/engine/slots.py)
    cache_ram_mb: Count32 = 256          # host-memory tier of the prefix cache, MiB (0: off)
    swa_full: bool = False               # full-size sliding-window cache: prefixes stay reusable
    max_queue: Count32 = 64              # requests waiting beyond the slots
    embeddings: bool = False             # an embedding runner: completions are refused
    pooling: Literal["none", "mean", "cls", "last", "rank"] | None = None  # embedding pooling; None: the model's (mean without one)
    prefill_budget: Positive32 = 256     # prompt inputs per step while other sequences generate
    kv_unified: bool = False             # one KV buffer shared by all slots (else one stream per slot)
    delivery: Literal["auto", "thread", "inline"] = "auto"  # where tokens become text and events
    native_sampler: bool = True          # False: llama.cpp's CPU sampler chain for every request
    backend_sampling: bool = False       # the default of the completion option backend_sampling
    slot_save_dir: str | None = None     # directory of save_slot/restore_slot files (None: ops off)
    draft_room: Count32 = 16             # speculative proposals fill a step up to this many inputs (0: never)
    draft_model: str | None = None       # draft model GGUF, same vocabulary (None: prompt lookup)
    burst_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 30.0  # generation steps run natively this long (0: off)


class Estimate(Load, tag="estimate"):
    """What a ``load`` with these fields would take and where it would put
    the model, without loading (runner/model/placement.py); answered in every state."""


class Media(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An image or audio file attached to a completion."""

    id: NonNegative                      # placed in the prompt by [img-<id>]
    data: bytes                          # the file's bytes (MessagePack bin)


class Completion(Request, tag="completion"):
    """Generate from a prompt; replies are ``chunk``* then ``final``."""

    prompt: str | TokenList              # text (special tokens parsed) or token ids
    options: dict[str, Any] = {}         # CompletionOptions fields (runner/engine/requests.py)
    add_special: bool = True             # add BOS etc. as the model asks (text prompts)
    media: list[Media] = []              # placed by [img-N] or the projector's marker
    batch_chunks: bool = False           # this client reads `chunks` replies (one per step for all its streams)


class Chat(Request, tag="chat"):
    """Render ``messages`` with the model's chat template, then complete like
    ``completion``; the final also carries the parsed answer (``message``)."""

    messages: list[dict[str, Any]]       # {role, content, tool_calls?, ...} as OpenAI's chat API
    tools: list[dict[str, Any]] | None = None  # function tools ({type: "function", function: {...}})
    options: dict[str, Any] = {}         # CompletionOptions fields (runner/engine/requests.py)
    add_generation_prompt: bool = True   # end the prompt with the assistant's turn opening
    template_kwargs: dict[str, Any] = {}  # extra template variables (enable_thinking, ...)
    reasoning_format: Literal["auto", "none"] = "auto"  # none: <think> text stays in content
    media: list[Media] = []              # placed by [img-N] or the projector's marker
    batch_chunks: bool = False           # this client reads `chunks` replies (as completion's)


EmbedTexts = Annotated[list[str], msgspec.Meta(min_length=1, max_length=limits.MAX_EMBED_TEXTS)]


class Embedding(Request, tag="embedding"):
    """Embeddings of one text, or of a list of texts (batched together)."""

    text: str | EmbedTexts               # one text, or several: the reply then carries `embeddings`
    normalize: bool = False              # scale each vector (each token row) to unit L2 norm
    truncate: bool = False               # cut a text over the embedding limit instead of failing


class Rerank(Request, tag="rerank"):
    """Relevance scores of documents for a query (a reranker: pooling rank)."""

    query: str
    documents: EmbedTexts                # scored in this order
    truncate: bool = False               # cut a pair over the embedding limit instead of failing


class Tokenize(Request, tag="tokenize"):
    text: str
    add_special: bool = False            # add BOS etc. as the model asks
    parse_special: bool = False          # turn special-token text into special tokens


class Detokenize(Request, tag="detokenize"):
    tokens: TokenList


class Cancel(Request, tag="cancel"):
    """Cancel this client's request ``target``; the target still gets its final reply."""

    target: RequestId


class Info(Request, tag="info"):
    """Build, backends, devices, model metadata and slot state."""


class Metrics(Request, tag="metrics"):
    """Running totals and gauges of the loaded model (runner/engine/metrics.py)."""


SlotName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class SaveSlot(Request, tag="save_slot"):
    """Write a free slot's tokens and sequence state to ``<slot_save_dir>/<name>.slot``."""

    slot: Count32                        # slot id, 0..parallel-1
    name: SlotName                       # a plain file name (runner/engine/slotfile.py)


class RestoreSlot(Request, tag="restore_slot"):
    """Replace a free slot's content with a file written by ``save_slot``."""

    slot: Count32                        # slot id, 0..parallel-1
    name: SlotName                       # a plain file name (runner/engine/slotfile.py)


class Shutdown(Request, tag="shutdown"):
    """Stop the runner: with ``drain``, in-flight requests finish first."""

    drain: bool = True


REQUEST_TYPES = (Health, Discover, Load, Estimate, Completion, Chat, Embedding, Rerank, Tokenize, Detokenize,
                 Cancel, Info, Metrics, SaveSlot, RestoreSlot, Shutdown)
OPS = tuple(t.__struct_config__.tag for t in REQUEST_TYPES)
AnyRequest = Union[REQUEST_TYPES]  # type: ignore[valid-type]


# -- replies -----------------------------------------------------------------

class Reply(msgspec.Struct, tag_field="type", kw_only=True):
    """Fields every reply carries."""

    id: RequestId | None                 # the request's id; None when it could not be read


class ErrorReply(Reply, tag="error"):
    """The request failed; terminal."""

    code: ErrorCode
    message: str                         # for humans


class ChunkReply(Reply, tag="chunk", omit_defaults=True):
    """A piece of a completion's text (never a partial UTF-8 character)."""

    text: str
    tokens: list[int]                    # tokens that produced the text
    logprobs: list[dict[str, Any]] | None = None  # when asked: per token {token, text, logprob, top}


class ChunksReply(Reply, tag="chunks"):
    """The chunks one engine step produced for several completions of one
    client, in one message; only for completions sent with
    ``batch_chunks``.  ``id`` is None: each chunk names its request."""

    chunks: list[ChunkReply]             # in step order; at most one per request


class FinalReply(Reply, tag="final"):
    """A completion's last message, with its metrics; terminal."""

    done_reason: str                     # stop | length | cancelled | error
    prompt_eval_count: int = 0           # prompt inputs evaluated (cached ones not counted)
    prompt_eval_duration: float = 0.0    # seconds: tokenize + prompt decode
    eval_count: int = 0                  # tokens generated
    eval_duration: float = 0.0           # seconds from the first generated token to the end
    cached_count: int = 0                # prompt inputs reused from the slot's KV cache
    prompt_count: int = 0                # prompt inputs in total
    slot: int = -1                       # slot the request ran in
    error: str | None = None             # message when done_reason is "error"
    error_code: ErrorCode | None = None  # its code
    message: ChatMessage | None = None   # chat requests: the answer parsed (runner/process/chatparse.py)
    draft_proposed: int = 0              # speculative: tokens proposed and verified
    draft_accepted: int = 0              # of those, accepted


class HealthReply(Reply, tag="health"):
    state: State
    progress: float                      # load progress, 0..1
    error: str | None = None             # why the load failed (state "error")
    error_code: ErrorCode | None = None
    protocol: int = PROTOCOL_VERSION
    pid: int = 0                         # the runner's process id
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # larger requests are refused
    host_cache: dict[str, Any] | None = None  # once loaded: the prefix cache's host tier (info's)


class LoadReply(Reply, tag="load"):
    state: State                         # "loading" once accepted


class EmbeddingReply(Reply, tag="embedding", omit_defaults=True):
    embedding: bytes                     # the (first) text's: little-endian float32, rows of n_embd
    prompt_eval_count: int               # tokens evaluated (all texts)
    embeddings: list[bytes] | None = None  # `text` was a list: each text's, in order
    token_counts: list[int] | None = None  # `text` was a list: each text's tokens
    n_embd: int = 0                      # values per row (pooled: one row; pooling none: one per token)
    pooling: str = ""                    # the runner's pooling: none | mean | cls | last | rank


class RerankReply(Reply, tag="rerank"):
    scores: list[float]                  # one per document, in the request's order
    prompt_eval_count: int               # tokens evaluated (all pairs)


class TokenizeReply(Reply, tag="tokenize"):
    tokens: list[int]


class DetokenizeReply(Reply, tag="detokenize"):
    text: str


class Device(msgspec.Struct, kw_only=True):
    """One ggml device (runner._llama.devices())."""

    index: int                           # position in ggml's device list
    name: str                            # e.g. "CPU", "CUDA0"
    description: str
    type: str                            # cpu | gpu | igpu | accel
    backend: str                         # backend registry name
    device_id: str | None = None         # PCI bus id where known
    free: int                            # bytes
    total: int                           # bytes


class DiscoverReply(Reply, tag="discover"):
    devices: list[Device]


class EstimateReply(Reply, tag="estimate"):
    """The answer to ``estimate`` (bytes throughout; docs/protocol.md)."""

    model: dict[str, Any]                # path, architecture, n_layer, n_ctx_train
    memory: dict[str, Any]               # weights, kv_cache, graph, projector, full_offload, host_cache, note
    placement: dict[str, Any]            # n_gpu_layers, tensor_split, fits, problem, notes, devices[]


class InfoReply(Reply, tag="info"):
    protocol: int                        # PROTOCOL_VERSION
    version: str                         # runner package version
    pid: int
    state: State
    build: dict[str, Any]                # runner._llama.build_info(): versions, backends, features
    devices: list[Device]
    engine: dict[str, Any] | None = None  # Engine.info() once loaded: model, slots, queue, config
    metadata: dict[str, str] | None = None  # the model's GGUF key/values (arrays left out)
    in_flight: int = 0                   # requests the runner is working on, all clients


class Histogram(msgspec.Struct, kw_only=True):
    """Observations per bucket (not cumulative): ``counts[i]`` fell at or
    under ``bounds[i]`` and above the bound before; the last count is past
    every bound."""

    bounds: list[float]                  # upper bounds, ascending
    counts: list[int]                    # len(bounds) + 1 counts
    sum: float                           # of the observations
    count: int                           # observations


class MetricsReply(Reply, tag="metrics"):
    """Running totals since the load, and gauges now (docs/protocol.md)."""

    requests: dict[str, int]             # completions by outcome (done_reason, or the refusal's error code)
    prompt_tokens: int                   # prompt inputs of finished completions
    prompt_eval_tokens: int              # of which evaluated
    cached_tokens: int                   # of which reused from a slot or the host tier
    generated_tokens: int                # tokens returned by finished completions
    embeddings: int                      # embedding requests served
    steps: int                           # decodes
    step_seconds: Histogram              # decode time per step
    batch_tokens: Histogram              # inputs per decode
    queue_seconds: Histogram             # submission to a slot, per admitted completion
    queue_depth: int                     # completions waiting for a slot now
    running: int                         # completions holding a slot now
    in_flight: int                       # requests the runner is working on, all clients
    slot_kv_cells: list[int]             # KV cells each slot holds now, by slot id
    media_cache: dict[str, Any]          # counters and size of the media cache (info's media_cache)
    host_cache: dict[str, Any]           # counters and size of the prefix cache's host tier (info's)
    load_seconds: float                  # how long the load took
    # slot file state copies by where they went: touched, short, fresh (info's engine.slot_copies);
    # {} from a runner that predates it
    slot_copies: dict[str, int] = msgspec.field(default_factory=dict)
    # per pick a grammar rejected, its redraw off the loop; None from a runner that predates it
    grammar_redraw_seconds: Histogram | None = None


class CancelReply(Reply, tag="cancel"):
    found: bool                          # the target was in flight (it will end "cancelled")


class SlotFileReply(Reply, tag="slot_file"):
    """The answer to ``save_slot`` and ``restore_slot``."""

    slot: int                            # the slot saved or restored
    name: str                            # the file's name, as requested
    n_inputs: int                        # tokens the slot holds
    n_bytes: int                         # size of the file
    loop_seconds: float                  # time the engine loop spent copying the state
    seconds: float                       # the whole operation, file I/O and checks included


class ShutdownReply(Reply, tag="shutdown"):
    drain: bool


REPLY_TYPES = (ErrorReply, ChunkReply, ChunksReply, FinalReply, HealthReply, LoadReply, EmbeddingReply, RerankReply,
               TokenizeReply, DetokenizeReply, DiscoverReply, EstimateReply, InfoReply, MetricsReply,
               CancelReply, SlotFileReply, ShutdownReply)
AnyReply = Union[REPLY_TYPES]  # type: ignore[valid-type]


# -- encoding and decoding ---------------------------------------------------

class ProtocolError(Exception):
    """A request that could not be accepted; becomes an ``error`` reply."""

    def __init__(self, message: str, request_id: Any = None, code: str = "bad_request"):
        super().__init__(message)
        self.request_id = request_id  # the id when it could be read, else None
        self.code = code

    def reply(self) -> ErrorReply:
        return ErrorReply(id=self.request_id, code=self.code, message=str(self))


class _Envelope(msgspec.Struct):
    """Just enough of a refused request to answer it (other fields ignored)."""

    id: Any = None
    op: Any = None


_request_decoder = msgspec.msgpack.Decoder(AnyRequest)
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_reply_decoder = msgspec.msgpack.Decoder(AnyReply)

encode = msgspec.msgpack.encode


def _readable_id(value: Any) -> Any:
    try:
        return msgspec.convert(value, RequestId)
    except msgspec.ValidationError:
        return None


def decode_request(data: bytes | memoryview, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Request:
    """One frame -> a validated request, or :class:`ProtocolError` naming what is wrong."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return _request_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        reason = str(exc) if not isinstance(exc, RecursionError) else "nesting too deep"
    try:
        envelope = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise ProtocolError(f"not a MessagePack map: {reason}") from None
    request_id = _readable_id(envelope.id)
    if isinstance(envelope.op, str) and envelope.op not in OPS:
        raise ProtocolError(f"unknown op {envelope.op[:64]!r}; known: {', '.join(OPS)}", request_id)
    what = envelope.op if isinstance(envelope.op, str) else "request"
    raise ProtocolError(f"invalid {what}: {reason.replace('`$.', '`')}", request_id)


def decode_reply(data: bytes | memoryview) -> Reply:
    """One frame from a runner -> a typed reply (unknown fields are ignored)."""
    return _reply_decoder.decode(data)


# -- errors <-> codes ---------------------------------------------------------

def known_code(code: str | None) -> str | None:
    """``code`` if the protocol defines it (or None), else ``internal``."""
    return code if code is None or code in _ERRORS else "internal"


def error_from_code(code: str | None, message: str) -> EngineError:
    """The exception a client raises for an ``error`` reply."""
    return _ERRORS.get(code or "internal", InternalError)(message)


def error_reply(request_id: Any, exc: BaseException) -> ErrorReply:
    """An exception raised while serving a request -> its ``error`` reply."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, EngineError):
        code = known_code(exc.code)
    elif isinstance(exc, (ValueError, TypeError, IndexError, OverflowError)):
        code = "bad_request"
    elif isinstance(exc, RecursionError):  # only input nests this deep
        code, message = "bad_request", f"request nested too deeply to process ({message})"
    else:
        code = "internal"
    return ErrorReply(id=request_id, code=code, message=message)


# -- transport ---------------------------------------------------------------

class WakePipe:
    """A non-blocking pipe whose read end sits in an I/O thread's poll set:
    another thread writes a byte to wake it.  Both ends of the protocol use
    one to hand work to the thread that owns their socket."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def fileno(self) -> int:
        return self.read_fd

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the reader is awake anyway

    def clear(self) -> None:
        """Read every pending byte (before looking for the work they announce)."""
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


def configure_router(sock, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
    """Options of the runner's ROUTER socket (set before bind)."""
    import zmq

    sock.setsockopt(zmq.LINGER, 2_000)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, RECEIVE_HIGH_WATER_MARK)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes * HARD_LIMIT_FACTOR)
    _heartbeats(sock)


def configure_dealer(sock) -> None:
    """Options of a client's DEALER socket (set before connect)."""
    import zmq

    sock.setsockopt(zmq.LINGER, 500)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.MAXMSGSIZE, 1 << 30)
    _heartbeats(sock)


def _heartbeats(sock) -> None:
    import zmq

    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)
