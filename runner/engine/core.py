"""The in-process engine: one model, one context, ``parallel`` sequences.

A loop step is three calls, in the shape of vLLM v1's engine core:
``plan = scheduler.schedule()`` (runner.engine.scheduler: admission, prefill budget,
room-making; no Context), ``n = executor.execute(plan)`` (runner.engine.executor:
the batch and the decode), ``scheduler.update(plan, n)``; then the executor
samples the plan's output rows and the engine's update phase turns each token
into generated text, an end, or the next step's input.  Delivery
(runner.engine.delivery) turns tokens into text events.

Threads and who owns what:

* callers (any thread) tokenize their prompt in :meth:`Engine.submit` and put
  a :class:`runner.engine.sequence.Sequence` on the scheduler's wait queue (guarded
  by ``Engine._lock``);
* the **loop thread** owns the context, the batches, the samplers and the
  slot cache; the decode releases the GIL;
* the **delivery thread** turns sampled tokens into text (UTF-8 hold-back,
  stop strings) and calls the request's event sink.  It runs while the next
  decode computes.  When the decode threads already use every core, the loop
  thread does this work itself instead (``delivery="auto"``; see
  :meth:`Engine._pick_delivery`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from runner import _llama
from runner.engine import limits
from runner.model import rpc
from runner.engine.requests import (
    BadRequest, Busy, Chunk, CompletionOptions, CompletionRequest, DeviceLost, EmbeddingResult,
    EngineError, Final, InputTooLong, InternalError, NotReady,
)
from runner.engine import lora as lora_sets
from runner.engine import slotfile
from runner.engine.delivery import Delivery, SeqEnded, SeqReleased, Shutdown, StepTokens
from runner.engine.drafter import Drafter
from runner.engine.embedwait import EmbedWindow
from runner.engine.executor import Executor, PickResolver, device_lost
from runner.engine.handoff import new_handoff
from runner.engine.hostbuffers import touched
from runner.engine.hostcache import HostCache
from runner.engine.media import DEFAULT_CACHE_BYTES, MediaCache, MediaSpan, build_prompt
from runner.engine.metrics import EngineTotals
from runner.engine.rerank import rerank_inputs
from runner.engine.sampling import in_graph, logprob_entry, make_sampler, prompt_tokens_to_accept
from runner.engine.scheduler import Scheduler, StepPlan
from runner.engine.sequence import Sequence
from runner.engine.slots import NoFreeSlot, PositionedKV, Slot, SlotCache, truncate_prompt
from runner.engine.speculative import next_cap, wait_after
from runner.model import placement
from runner.model.load_checks import ModelFileError, check_model_file

log = logging.getLogger("runner.engine")

Event = Chunk | Final
Sink = Callable[[Event], None]

# Rounds of a slot job whose state buffer may be short (Engine._slot_job);
# the second has the size the loop measured, so a third means the slot
# changed between them; the last copies into fresh memory.
SLOT_JOB_ROUNDS = 3
# Where a slot job's state copy went (Engine.slot_copies): the caller's
# touched buffer, a round answered with the size instead, fresh memory.
SLOT_COPY_ROUNDS = ("touched", "short", "fresh")


@dataclass
class EngineConfig:
    """Load parameters (the fields of Ollama's load request)."""

    model_path: str                   # GGUF file
    n_ctx: int = 4096                 # total context, split evenly across slots
    n_batch: int = 512                # most inputs decoded in one step
    parallel: int = 1                 # slots = concurrent sequences
    n_threads: int | None = None      # CPU threads (None: all cores)
    n_gpu_layers: int | str = "auto"  # layers to offload: "auto" (placed by runner.model.placement), N, or -1 (all)
    main_gpu: int | None = None       # one GPU (index among the GPUs llama.cpp uses) for the whole model; None: split
    tensor_split: list[float] | None = None  # share of the model per GPU
    devices: list[str] | None = None  # ggml device names to use (None: all)
    rpc_servers: list[str] | None = None  # HOST:PORT of rpc-servers whose devices join before the load (runner.model.rpc)
    flash_attn: str = "auto"          # auto | on | off
    type_k: str = "f16"               # K cache type (f16, q8_0, q4_0)
    type_v: str = "f16"               # V cache type
    use_mmap: bool = True             # map the model file instead of reading it
    lora_paths: tuple = ()            # LoRA adapters, ids 0.. in order (runner.engine.lora; default scale 1)
    projector_path: str | None = None # multimodal projector (mmproj GGUF) for media inputs
    media_cache_bytes: int = DEFAULT_CACHE_BYTES  # bound on cached media embeddings
    cache_policy: str = "single"      # single | multi (see runner.engine.slots)
    cache_ram_mb: int = 256           # host-memory tier of the prefix cache, MiB (0: off; runner.engine.hostcache)
    swa_full: bool = False            # sliding-window layers keep every position: prefixes stay reusable
    max_queue: int = 64               # requests waiting beyond `parallel` before "busy"
    embeddings: bool = False          # an embedding runner: completions refused, context kept in embeddings mode
    pooling: str | None = None        # none | mean | cls | last | rank; None: the model's own (mean without one)
    prefill_budget: int = 256         # prompt inputs per step while others generate
    kv_unified: bool = False          # one KV buffer shared by all slots (see _StreamKV)
    delivery: str = "auto"            # thread | inline | auto (see Engine.delivery_mode)
    native_sampler: bool = True       # False: llama.cpp's CPU chain for every request (see _llama.Sampler)
    backend_sampling: bool = False    # requests that leave options.backend_sampling out sample inside the decode graph (sampling.in_graph)
    slot_save_dir: str | None = None  # directory of save_slot/restore_slot files (None: those ops are off)
    draft_room: int = 16              # speculative proposals fill a step up to this many inputs (0: never)
    draft_model: str | None = None    # GGUF of a draft model with the same vocabulary (None: prompt lookup)
    burst_ms: float = 30.0            # generation steps run natively for up to this long (0: one step at a time; see _burst_steps)


@dataclass
class StepTiming:
    """Wall-clock cost of the phases of one loop step, in seconds."""

    build: float        # finish + admit + build the batch
    decode: float       # llama_decode (GIL released)
    sample: float       # sampling every output of the batch
    idle_gap: float     # end of the previous decode to the start of this one
    n_tokens: int       # inputs in the batch (all its decodes)
    n_generating: int   # of which one-token generation steps
    steps: int = 1      # decodes in this record: a native run (Engine._run_burst) holds several


@dataclass(slots=True)
class EmbeddingJob:
    """One embedding or rerank request, from the caller's thread to the loop
    and back.  The loop decodes its texts a batch at a time, one batch per
    loop step, so running completions keep their pace."""

    texts: list[list[int]]                                   # each text's tokens
    results: list = field(default_factory=list)              # per text: its rows (see embed_many); None until decoded
    n_done: int = 0                                          # texts decoded
    done: threading.Event = field(default_factory=threading.Event)  # set when results or error are
    error: Exception | None = None                           # why it failed


@dataclass(slots=True)
class SlotJob:
    """A save or restore of one slot's sequence, from a caller's thread to the
    loop (which owns the context) and back.  The file is read, checked and
    written on the caller's thread; the loop only copies the state."""

    slot: int                                                # slot (sequence) id
    restore: slotfile.SlotFile | None = None                 # the checked file to restore; None: save
    buffer: np.ndarray | None = None                         # touched by the caller: the loop copies the slot's state here (save: to write; restore: to put back if refused)
    last: bool = False                                       # last round: a short buffer is replaced by fresh memory
    done: threading.Event = field(default_factory=threading.Event)  # set when done or failed
    need: int = 0                                            # > 0: the buffer was short, the state takes this many bytes (nothing done)
    tokens: list[int] | None = None                          # save: the slot's inputs
    state: np.ndarray | None = None                          # save: its sequence state (a view of buffer)
    seconds: float = 0.0                                     # time the loop spent on it
    error: Exception | None = None                           # why it failed


@dataclass(frozen=True)
class SlotFileResult:
    """What save_slot / restore_slot did."""

    slot: int          # the slot saved or restored
    name: str          # the file's name (without directory or suffix)
    n_inputs: int      # tokens the slot holds
    n_bytes: int       # size of the file
    loop_seconds: float  # time the loop thread spent copying the state (other sequences wait)
    seconds: float     # the whole operation, file I/O and checks included


class Handle:
    """A submitted completion: iterate it for events, or pass ``on_event``.

    Iteration yields :class:`Chunk` events and ends after the :class:`Final`.
    ``cancel()`` may be called from any thread.
    """

    def __init__(self, engine: "Engine", request_id: str, sink: Sink | None):
        self.id = request_id              # engine-unique request id
        self._engine = engine
        self._queue = None if sink else new_handoff()  # events, when there is no sink
        self._sink = sink or self._queue.put  # called by the delivery thread only
        self.final: Final | None = None   # set once the Final event was delivered

    def cancel(self) -> None:
        self._engine.cancel(self.id)

    def __iter__(self) -> Iterator[Event]:
        if self._queue is None:
            raise TypeError("this request delivers events to its on_event callback")
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, Final):
                return

    def result(self) -> tuple[str, Final]:
        """Wait for the end; return the whole text and the Final event."""
        parts = []
        final = None
        for event in self:
            if isinstance(event, Chunk):
                parts.append(event.text)
            else:
                final = event
        return "".join(parts), final


class Engine:
    """Continuous batching over one llama context with a prefix KV cache."""

    def __init__(self, config: EngineConfig, progress: Callable[[float], object] | None = None):
        if config.parallel < 1:
            raise BadRequest(f"parallel must be at least 1, got {config.parallel}")
        if config.n_ctx and config.n_ctx < config.parallel * 2:
            raise BadRequest(f"n_ctx {config.n_ctx} is too small for parallel {config.parallel}: "
                             f"each slot needs at least 2 tokens")
        if config.cache_policy not in ("single", "multi"):
            raise BadRequest("cache_policy must be 'single' or 'multi'")
        if config.cache_ram_mb < 0:
            raise BadRequest(f"cache_ram_mb must be >= 0 (0: off), got {config.cache_ram_mb}")
        self.config = config
        t_load = time.perf_counter()
        _llama.backend_init()
        check_model_file(config.model_path)  # refuse what llama.cpp would abort on
        self._slot_dir, self._identity = self._slot_files(config)  # slot files: directory, model identity
        if config.rpc_servers:  # before the placement: their devices count in it
            try:
                rpc.add_servers(config.rpc_servers)
            except rpc.RpcError as exc:
                raise BadRequest(str(exc)) from None
        self.placement = placement.place_load(config)  # n_gpu_layers and tensor_split, with their estimate
        self.model = _llama.Model(config.model_path, n_gpu_layers=self.placement.n_gpu_layers,
                                  main_gpu=config.main_gpu or 0, tensor_split=self.placement.tensor_split,
                                  split_mode="layer" if config.main_gpu is None else "none",
                                  devices=config.devices, use_mmap=config.use_mmap,
                                  progress=progress)
        try:
            self.ctx = self._make_context(config, self._pooling(config))
            self._loras = self._load_adapters(config.lora_paths)
            self.lora_default = lora_sets.default_key(len(self._loras))  # requests without `lora`
            if config.embeddings:  # an embedding runner: no per-request switching
                self.ctx.set_embeddings(True)
            if self._loras:
                self.ctx.set_loras([(a, s) for a, s in zip(self._loras, self.lora_default)])
        except BaseException:
            if getattr(self, "ctx", None) is not None:  # a model with an open context will not close
                self.ctx.close()
            self.model.close()
            raise
        self.mtmd = None
        if config.projector_path:
            try:
                self._load_projector(config)
            except BaseException:
                self.ctx.close()
                self.model.close()
                raise
        self.drafter: Drafter | None = None  # proposes for speculative requests (None: prompt lookup)
        if config.draft_model:
            try:
                self.drafter = self._load_drafter(config)
            except BaseException:
                if self.mtmd is not None:
                    self.mtmd.close()
                self.ctx.close()
                self.model.close()
                raise
        self.media_cache = MediaCache(config.media_cache_bytes)
        self.n_batch = self.ctx.n_batch
        self.slot_ctx = self.ctx.n_ctx // config.parallel
        kv = self.ctx if config.kv_unified else _StreamKV(self.ctx)
        if self.mtmd is not None and self.mtmd.uses_mrope:
            # KV positions are not input indices after an M-RoPE image.
            kv = PositionedKV(kv)
        # Slots about to be reused are saved to host memory, and restored
        # when a prompt returns (runner.engine.hostcache).
        self._states = _StateKV(self.ctx, self.model)  # per-sequence state copies (loop thread)
        self.host_cache = HostCache(self._states, config.cache_ram_mb << 20)
        self.slots = SlotCache(kv, config.parallel, self.slot_ctx, config.cache_policy,
                               host=self.host_cache if self.host_cache.enabled else None,
                               base_lora=self.lora_default, adjacent=not config.kv_unified)
        if isinstance(kv, PositionedKV):
            kv.inputs_of = lambda seq: self.slots.slots[seq].inputs
        self.executor = Executor(self.ctx, self.model.n_embd_inp, self.mtmd, self.media_cache,
                                 loras=self._loras, lora=self.lora_default)
        self.timings: collections.deque[StepTiming] = collections.deque(maxlen=4096)
        self.totals = EngineTotals()              # running totals (runner.engine.metrics; any thread)

        self._lock = threading.Lock()           # guards the wait queue, _embeds, _slot_jobs, _by_id, _closing, _ready
        # Set by every wake-up: ends a native run of steps after the step in progress.
        self._interrupt = _llama.StepInterrupt()
        self._wake = _Wake(self._lock, self._interrupt)
        self._burst_seconds = max(0.0, config.burst_ms) / 1000.0
        self._gen_step_seconds = 0.0            # loop thread: decode + sampling of the last generation-only step
        self.scheduler = Scheduler(self.slots, n_batch=self.n_batch, slot_ctx=self.slot_ctx,
                                   prefill_budget=config.prefill_budget, lock=self._lock,
                                   n_swa=self.model.n_swa, pos_min=self.ctx.seq_pos_min,
                                   draft_room=self._draft_room(config),
                                   draft_model=self.drafter is not None)
        self._switch_cost = lora_sets.SwitchCost()  # adapter switch cost -> the scheduler's turn (loop thread)
        self._embeds: collections.deque[EmbeddingJob] = collections.deque()  # pending embedding jobs
        self._embed_window = EmbedWindow()      # when an embedding decode waits for more texts (loop thread)
        self._slot_jobs: collections.deque[SlotJob] = collections.deque()  # pending slot saves/restores
        self._state_bytes_per_input = 0.0      # state size / inputs of the last slot job's slot (loop writes)
        # where slot jobs copied a state: "touched" (the caller's buffer),
        # "short" (rounds answered with the size instead), "fresh" (loop
        # thread writes; info() and metrics() read them as slot_copy_counts())
        self.slot_copies: collections.Counter[str] = collections.Counter()
        self._by_id: dict[str, Sequence] = {}   # every unfinished request
        self._closing = False                   # no new requests accepted
        self._drain = False                     # finish running requests before stopping
        # Why the model cannot compute any more (a remote device holding part
        # of it was lost), or None: set once under _lock, never cleared, read
        # anywhere; see failure().
        self.failed: str | None = None
        self._ids = itertools.count(1)
        self._ready: list[Sequence] = []        # ended, text flushed, slot to release
        # Grammar picks finished off the loop (executor.PickResolver): the
        # sequences waiting for one (loop thread only), and the (seq, token
        # or exception, logits or None) results not yet taken (under _lock).
        self._resolver = PickResolver(self.executor.sample_threads)
        self._pending: set[Sequence] = set()
        self._resolved: list[tuple] = []
        self._last_decode_end = 0.0             # loop thread: for the idle-gap timing
        self.delivery_mode = self._pick_delivery(config)
        self._loop = threading.Thread(target=self._run_loop, name="runner-loop", daemon=True)
        self.delivery = Delivery(_DeliveryHooks(self), self.model.token_to_piece, self.model.n_vocab,
                                 self.delivery_mode)
        self._out = self.delivery                # where the loop's delivery records go
        self.executor.claim_doorbell = self.delivery.claim_ring
        self._loop.start()
        self.load_seconds = time.perf_counter() - t_load  # model, context, projector, threads

    @staticmethod
    def _slot_files(config: EngineConfig) -> tuple[str | None, str | None]:
        """The slot file directory (created if missing) and the model's
        identity (runner.engine.slotfile.model_identity); (None, None) when off."""
        if not config.slot_save_dir:
            return None, None
        path = os.path.realpath(config.slot_save_dir)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise BadRequest(f"slot_save_dir: cannot create {path}: {exc.strerror}") from None
        if not os.path.isdir(path):
            raise BadRequest(f"slot_save_dir: {path} is not a directory")
        return path, slotfile.model_identity(config.model_path, config.lora_paths)

    def _pooling(self, config: EngineConfig) -> str | None:
        """The context's pooling: the load's choice, else the model's own
        (None lets llama.cpp read it), else mean.  Rank needs the classifier
        head of a reranker (``cls.*`` tensors) or a model that declares it."""
        declared = self.model.meta(f"{self._arch}.pooling_type")
        if config.pooling is None:
            return None if declared else "mean"
        if config.pooling not in ("none", "mean", "cls", "last", "rank"):
            raise BadRequest(f"pooling must be none, mean, cls, last or rank, got {config.pooling!r}")
        if config.pooling == "rank" and declared != str(4) and not self._has_classifier(config):
            raise BadRequest("pooling 'rank' needs a reranker: this model has no classifier head "
                             "(cls.* tensors) and does not declare rank pooling")
        return config.pooling

    @staticmethod
    def _has_classifier(config: EngineConfig) -> bool:
        from runner.model.gguf import read_gguf

        return any(t.name.startswith("cls.") for t in read_gguf(config.model_path).tensors)

    def _make_context(self, config: EngineConfig, pooling: str | None) -> _llama.Context:
        """The llama context; ``n_ctx`` 0 takes the model's trained context,
        and a failure says how large that was."""
        n_ctx = config.n_ctx or self.model.n_ctx_train
        trained = "" if config.n_ctx else (
            f"n_ctx 0 asks for the model's trained context of {n_ctx} tokens")
        if n_ctx < config.parallel * 2:
            raise BadRequest(f"{trained or f'n_ctx {n_ctx}'} is too small for parallel "
                             f"{config.parallel}: each slot needs at least 2 tokens")
        try:
            return _llama.Context(
                self.model, n_ctx=n_ctx, n_batch=config.n_batch, n_seq_max=config.parallel,
                n_threads=config.n_threads, flash_attn=config.flash_attn, type_k=config.type_k,
                type_v=config.type_v, pooling=pooling, kv_unified=config.kv_unified,
                swa_full=config.swa_full,
                graph_sampling=not config.embeddings)  # requests choose (options.backend_sampling)
        except _llama.ContextError as exc:
            if not trained:
                raise
            raise type(exc)(f"{exc} ({trained}; give a smaller n_ctx)") from exc

    def _load_adapters(self, paths) -> list:
        """The LoRA adapters, in order.  The files' headers were checked
        before the model loaded (runner.engine.lora.check_adapter_files); one whose
        tensors llama.cpp refuses (other shapes, no memory for them) fails
        the load with bad_request naming it, the others closed."""
        loaded = []
        try:
            for path in paths:
                try:
                    loaded.append(_llama.LoraAdapter(self.model, path))
                except _llama.ModelLoadError as exc:
                    raise BadRequest(f"LoRA adapter {path} cannot be used with this model: {exc}") from None
        except BaseException:
            for adapter in loaded:
                adapter.close()
            raise
        return loaded

    def _load_projector(self, config: EngineConfig) -> None:
        """The projector; a path that is not a file, or a projector mtmd
        refuses for this model (another width, not a projector), fails the
        load with bad_request naming it."""
        path = config.projector_path
        if not os.path.isfile(path):
            raise BadRequest(f"projector_path {path}: no such file" if not os.path.exists(path)
                             else f"projector_path {path}: not a regular file")
        try:
            # warmup: the first encode's graph setup happens at load, not in
            # the first request's time to first token.
            self.mtmd = _llama.MtmdContext(self.model, path, n_threads=config.n_threads,
                                           use_gpu=self.placement.n_gpu_layers != 0, warmup=True)
        except _llama.ModelLoadError as exc:
            raise BadRequest(f"projector {path} cannot be used with this model: {exc}") from None

    def _load_drafter(self, config: EngineConfig) -> Drafter:
        """The draft model, on the GPU when the model is (all its layers),
        with a context of the model's cells and sequences."""
        path = config.draft_model
        if not os.path.isfile(path):
            raise BadRequest(f"draft_model {path}: no such file")
        try:
            check_model_file(path)
            return Drafter.load(path, self.model, n_ctx=self.ctx.n_ctx, n_batch=self.ctx.n_batch,
                                parallel=config.parallel, n_threads=config.n_threads,
                                n_gpu_layers=-1 if self.placement.n_gpu_layers != 0 else 0,
                                kv_unified=config.kv_unified)
        except (ModelFileError, _llama.LlamaError) as exc:
            raise BadRequest(f"draft_model {path}: {exc}") from None

    def _draft_room(self, config: EngineConfig) -> int:
        """Inputs a step may reach with speculative proposals.  0 where the
        memory cannot drop rejected proposals exactly: a recurrent state
        cannot be cut back, and a sliding-window cache (without swa_full)
        may already have dropped the cells the proposals pushed out of the
        window."""
        if config.draft_room < 0:
            raise BadRequest(f"draft_room must be >= 0, got {config.draft_room}")
        if self.model.is_recurrent or (self.model.n_swa > 0 and not config.swa_full):
            return 0
        return config.draft_room

    @staticmethod
    def _pick_delivery(config: EngineConfig) -> str:
        """Where detokenizing, stop checks and event delivery run.

        "thread": a delivery thread, overlapping the next decode.  That only
        pays when a core is free for it: when the decode threads use every
        core, its wake-ups preempt a compute thread and ggml's per-op barriers
        wait for it (measured on 2 cores with 2 threads, default model, one
        stream: 94 tok/s with the thread, 108-118 tok/s inline, where the same
        work costs ~15 us per token).  "auto" picks inline then.
        """
        if config.delivery not in ("auto", "thread", "inline"):
            raise BadRequest("delivery must be 'auto', 'thread' or 'inline'")
        if config.delivery != "auto":
            return config.delivery
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = config.n_threads or cores
        return "thread" if cores > threads else "inline"

    @property
    def _arch(self) -> str:
        return self.model.meta("general.architecture") or "llama"

    @property
    def on_delivered(self) -> Callable[[], object] | None:
        """Called on the delivering thread after each burst of events (a
        step's worth); a sink that buffers its events flushes them here."""
        return self.delivery.on_delivered

    @on_delivered.setter
    def on_delivered(self, fn: Callable[[], object] | None) -> None:
        self.delivery.on_delivered = fn

    # ------------------------------------------------------------------
    # public API (any thread)
    # ------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        data = limits.text_bytes("text", text)
        return self.model.tokenize(data, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        limits.check_tokens("tokens", len(tokens))
        try:
            return self.model.detokenize(tokens)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc

    def submit(self, request: CompletionRequest, on_event: Sink | None = None) -> Handle:
        """Queue a completion.  Raises Busy, BadRequest or InputTooLong at once
        (each refusal is counted in :attr:`totals`)."""
        try:
            return self._submit(request, on_event)
        except EngineError as exc:
            self.totals.refused(exc.code)
            raise

    def _submit(self, request: CompletionRequest, on_event: Sink | None) -> Handle:
        if self.config.embeddings:
            raise BadRequest("this runner was loaded with embeddings: true; it serves embeddings only")
        self._check_usable()
        options = request.options.validate()
        t0 = time.perf_counter()
        inputs, spans = self._prompt_inputs(request)
        t_tok = time.perf_counter() - t0
        if len(inputs) >= self.slot_ctx:
            if spans:
                raise InputTooLong(f"prompt of {len(inputs)} inputs with media does not fit the slot "
                                   f"context of {self.slot_ctx} (prompts with media are not truncated)")
            if not options.truncate:
                raise InputTooLong(f"prompt of {len(inputs)} tokens does not fit the slot context "
                                   f"of {self.slot_ctx} tokens (n_ctx {self.ctx.n_ctx} / parallel "
                                   f"{self.config.parallel})")
            inputs = truncate_prompt(inputs, self.slot_ctx, options.num_keep)
        lora_key = lora_sets.resolve(options.lora, len(self._loras))
        graph = (self.config.backend_sampling if options.backend_sampling is None
                 else options.backend_sampling) and in_graph(options)
        sampler = make_sampler(self.model, options, self.slot_ctx,  # grammar errors surface here
                               self.config.native_sampler and not graph)
        rid = request.id or f"r{next(self._ids)}"
        handle = Handle(self, rid, on_event)
        seq = Sequence(handle=handle, options=options, inputs=inputs, spans=spans, t_tokenize=t_tok,
                   t_queued=time.perf_counter(), sampler=sampler, lora=lora_key, in_graph=graph)
        seq.n_predict = options.num_predict if options.num_predict > 0 else 0
        if options.num_predict == 0:
            seq.n_predict = -1  # nothing to generate: finish right after the prompt
        with self._lock:
            if self._closing:
                sampler.close()
                raise NotReady("the engine is shutting down")
            if self.failed is not None:
                sampler.close()
                raise NotReady(self.failed)
            if rid in self._by_id:
                sampler.close()
                raise BadRequest(f"request id {rid!r} is already in use")
            if len(self._by_id) >= self.config.parallel + self.config.max_queue:
                sampler.close()
                raise Busy(f"server busy: {self.config.parallel} requests running and "
                           f"{self.config.max_queue} queued (max_queue)")
            self.scheduler.waiting.append(seq)
            self._by_id[rid] = seq
            self._wake.notify()
        return handle

    def complete(self, prompt: str | list[int], **options) -> tuple[str, Final]:
        """Convenience: run one completion to the end."""
        req = CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(options))
        return self.submit(req).result()

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; False if it is unknown or done."""
        with self._lock:
            seq = self._by_id.get(request_id)
            if seq is None:
                return False
            seq.cancelled = True
            self._wake.notify()
        return True

    def embed(self, text: str, normalize: bool = False, timeout: float | None = None,
              truncate: bool = False) -> EmbeddingResult:
        """Embedding of ``text`` with the context's pooling (see :meth:`embed_many`)."""
        return self.embed_many([text], normalize, timeout, truncate)[0]

    def embed_many(self, texts: list[str], normalize: bool = False, timeout: float | None = None,
                   truncate: bool = False) -> list[EmbeddingResult]:
        """Embeddings of ``texts``, in order, decoded several texts per
        batch (one sequence each, as many as there are free slots and room
        in ``n_batch``).  Each result is the pooled vector (n_embd values;
        under rank pooling the classifier's n_cls_out scores), or under
        pooling ``none`` one row per token.  ``normalize`` scales each
        vector (each row) to unit L2 norm.  A text longer than the
        embedding limit (min(n_batch, slot context)) is refused, or with
        ``truncate`` cut to its first tokens."""
        if not texts:
            raise BadRequest("no text to embed")
        limits.check_count("texts", len(texts), limits.MAX_EMBED_TEXTS)
        token_lists = []
        for i, text in enumerate(texts):
            data = limits.text_bytes("text", text, InputTooLong)
            tokens = self.model.tokenize(data, add_special=True, parse_special=False)
            if not tokens:
                raise BadRequest("cannot embed empty text" if len(texts) == 1
                                 else f"cannot embed empty text (text {i})")
            token_lists.append(self._embedding_tokens(tokens, truncate, i if len(texts) > 1 else None))
        job = self._hand_to_loop(self._embeds, self._embedding_job(token_lists), timeout, "embedding")
        out = []
        for tokens, vec in zip(token_lists, job.results):
            if normalize and self.ctx.pooling != "rank":
                norms = np.linalg.norm(vec, axis=-1, keepdims=True)
                vec = np.divide(vec, norms, out=np.zeros_like(vec), where=norms > 0)
            out.append(EmbeddingResult(embedding=vec, prompt_eval_count=len(tokens)))
        return out

    def rerank(self, query: str, documents: list[str], timeout: float | None = None,
               truncate: bool = False) -> tuple[list[float], int]:
        """The relevance score of each document for ``query`` (a reranker
        model, loaded with pooling ``rank``), in the documents' order, and
        the tokens evaluated.  Each pair is one sequence, formatted as
        llama-server's /rerank does (runner.engine.rerank)."""
        if self.ctx.pooling != "rank":
            raise BadRequest(f"rerank needs a reranker loaded with pooling 'rank'; this runner's "
                             f"pooling is {self.ctx.pooling!r}")
        if not documents:
            raise BadRequest("rerank needs at least one document")
        limits.check_count("documents", len(documents), limits.MAX_EMBED_TEXTS)
        q = limits.text_bytes("query", query, InputTooLong)
        docs = [limits.text_bytes("documents", d, InputTooLong) for d in documents]
        pairs = [self._embedding_tokens(t, truncate, i) for i, t in
                 enumerate(rerank_inputs(self.model, q, docs))]
        job = self._hand_to_loop(self._embeds, self._embedding_job(pairs), timeout, "rerank")
        return [float(r[0]) for r in job.results], sum(len(t) for t in pairs)

    @staticmethod
    def _embedding_job(texts: list[list[int]]) -> EmbeddingJob:
        return EmbeddingJob(texts, [None] * len(texts))

    def _embedding_tokens(self, tokens: list[int], truncate: bool, index: int | None) -> list[int]:
        """``tokens`` if they fit one embedding decode, else cut (``truncate``) or refused."""
        limit = min(self.n_batch, self.slot_ctx)
        if len(tokens) <= limit:
            return tokens
        if truncate:
            return tokens[:limit]
        which = "" if index is None else f" (text {index})"
        raise InputTooLong(f"input of {len(tokens)} tokens{which} exceeds the embedding limit of "
                           f"{limit} (min of n_batch and the slot context); truncate cuts it")

    def save_slot(self, slot: int, name: str, timeout: float | None = None) -> SlotFileResult:
        """Write slot ``slot``'s inputs and sequence state to the file ``name``
        in ``slot_save_dir`` (runner.engine.slotfile).  Busy while a request holds
        the slot; BadRequest for an empty slot, one holding media, a bad name."""
        t0 = time.perf_counter()
        path = slotfile.slot_path(self._slot_dir, name)
        job, loop_seconds = self._slot_job(self._slot_id(slot), None, timeout)
        header = slotfile.SlotHeader(
            model=self._identity, model_name=os.path.basename(self.config.model_path),
            type_k=self.config.type_k, type_v=self.config.type_v, kv_streams=self._kv_streams,
            n_inputs=len(job.tokens), n_state=len(job.state))
        n_bytes = slotfile.write_atomic(path, slotfile.encode(header, job.tokens, job.state))
        return SlotFileResult(slot, name, len(job.tokens), n_bytes, loop_seconds,
                              time.perf_counter() - t0)

    def restore_slot(self, slot: int, name: str, timeout: float | None = None) -> SlotFileResult:
        """Replace what slot ``slot`` holds with the file ``name`` from
        ``slot_save_dir``; the next prompt starting with its inputs reuses
        them.  The file is checked first (runner.engine.slotfile.decode); any refusal
        leaves the slot as it was.  Busy while a request holds the slot."""
        t0 = time.perf_counter()
        path = slotfile.slot_path(self._slot_dir, name)
        data = slotfile.read_file(path, name, slotfile.MAX_FILE_BYTES)
        saved = slotfile.decode(data, model=self._identity, type_k=self.config.type_k,
                                type_v=self.config.type_v, kv_streams=self._kv_streams,
                                max_inputs=self.slot_ctx, name=name,
                                plain_kv=not self.model.is_recurrent and self.model.n_swa == 0)
        _, loop_seconds = self._slot_job(self._slot_id(slot), saved, timeout)
        return SlotFileResult(slot, name, len(saved.tokens), len(data), loop_seconds,
                              time.perf_counter() - t0)

    @property
    def _kv_streams(self) -> int:
        """KV streams of the context: a sequence state carries one block per stream."""
        return 1 if self.config.kv_unified else self.config.parallel

    def _slot_id(self, slot: int) -> int:
        if not 0 <= slot < self.config.parallel:
            raise BadRequest(f"slot: {slot} is not a slot (0..{self.config.parallel - 1})")
        return slot

    def _slot_job(self, slot: int, restore: slotfile.SlotFile | None,
                  timeout: float | None) -> tuple[SlotJob, float]:
        """Run a save (``restore`` None) or restore of ``slot`` on the loop;
        returns the job and the loop's time on it.

        The loop copies the slot's state into a buffer this thread touched
        (runner.engine.hostbuffers.touched), so that no page of it faults in on the
        loop: a save's state to write, a restore's prior state to put back
        if the memory refuses the file's.  Its size is the measured state
        bytes per input times the inputs the slot holds, with some slack.
        When that is short (nothing measured yet, or the slot changed), the
        loop does nothing but say how many bytes the state takes, and the
        job goes again with a buffer that large; the last of
        SLOT_JOB_ROUNDS copies into fresh memory on the loop instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        size = self._state_estimate(slot)
        loop_seconds = 0.0
        rounds = SLOT_JOB_ROUNDS
        while True:
            rounds -= 1
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            job = SlotJob(slot, restore=restore, buffer=touched(size) if size else None,
                          last=rounds == 0)
            try:
                self._hand_to_loop(self._slot_jobs, job, left, "slot operation")
            finally:
                loop_seconds += job.seconds
            if not job.need:
                return job, loop_seconds
            size = _with_slack(job.need)

    def _state_estimate(self, slot: int) -> int:
        """Bytes to touch for a copy of ``slot``'s state (0: no estimate).
        Reads the slot's input count without the loop: an estimate only."""
        rate = self._state_bytes_per_input or self.host_cache.bytes_per_input
        n = len(self.slots.slots[slot].inputs)
        return _with_slack(int(rate * n)) if rate and n else 0

    def _hand_to_loop(self, jobs: collections.deque, job, timeout: float | None, what: str):
        """Queue a job (EmbeddingJob, SlotJob: ``done`` and ``error``) for the
        loop thread and wait for it; its error is raised here."""
        self._check_usable()
        with self._lock:
            if self._closing:
                raise NotReady("the engine is shutting down")
            if self.failed is not None:
                raise NotReady(self.failed)
            jobs.append(job)
            self._wake.notify()
        if not job.done.wait(timeout):
            raise InternalError(f"{what} timed out")
        if job.error is not None:
            raise job.error
        return job

    def failure(self) -> str | None:
        """Why this engine can no longer compute, or None (any thread).

        Set for good when a remote device holding part of the model is lost:
        by the decode that met the lost connection, or here as soon as ggml
        knows of it (a ``discover`` that asked the server, say), so that
        ``health`` reports it before the next decode."""
        if self.failed is None and self.config.rpc_servers:
            lost = [e for e in _llama.rpc_lost() if e in self.config.rpc_servers]
            if lost:
                self._lose(DeviceLost(rpc.lost_message(lost)))
        return self.failed

    def _check_usable(self) -> None:
        reason = self.failure()
        if reason is not None:
            raise NotReady(reason)

    def _lose(self, error: DeviceLost) -> None:
        """Record that the model cannot compute any more; the loop fails what
        is queued or running at its next step."""
        with self._lock:
            if self.failed is not None:
                return
            self.failed = str(error)
            self._wake.notify()
        log.error("%s", error)

    def info(self) -> dict:
        """Model, configuration, slots and queue, as plain data."""
        with self._lock:
            waiting = len(self.scheduler.waiting)
            running = len(self._by_id) - waiting
        return {
            "model": {
                "path": self.model.path, "description": self.model.description,
                "architecture": self._arch, "n_params": self.model.n_params,
                "size": self.model.size, "ftype": self.model.ftype_name,
                "n_ctx_train": self.model.n_ctx_train, "n_embd": self.model.n_embd,
                "n_vocab": self.model.n_vocab,
            },
            "config": {k: v for k, v in dataclasses.asdict(self.config).items()},
            "placement": self.placement.to_dict(),
            "n_ctx": self.ctx.n_ctx, "n_batch": self.n_batch, "slot_ctx": self.slot_ctx,
            "delivery": self.delivery_mode,
            "slots": self.slots.snapshot(), "waiting": waiting, "running": running,
            "projector": None if self.mtmd is None else {
                "path": self.mtmd.path, "vision": self.mtmd.supports_vision,
                "audio": self.mtmd.supports_audio, "marker": self.mtmd.marker,
                "audio_sample_rate": self.mtmd.audio_sample_rate,
                "mrope": self.mtmd.uses_mrope},
            "media_cache": self.media_cache.info(),
            "host_cache": self.host_cache.info(),
            "slot_copies": self.slot_copy_counts(),
            "lora": {"adapters": [{"id": i, "path": a.path, "scale": s}
                                  for i, (a, s) in enumerate(zip(self._loras, self.lora_default))],
                     "switches": self.executor.lora_switches,
                     "turn_steps": self.scheduler.lora_turn_steps},
            "steps": self.step_summary(),
            "totals": self.totals.snapshot(),
            "load_seconds": round(self.load_seconds, 6),
            "layer_devices": self.model.placement,
        }

    def metrics(self) -> dict:
        """Running totals and gauges, as the ``metrics`` op carries them (runner.engine.metrics)."""
        with self._lock:
            waiting = len(self.scheduler.waiting)
            running = len(self._by_id) - waiting
        return {**self.totals.snapshot(), "queue_depth": waiting, "running": running,
                "slot_kv_cells": [s["n_inputs"] for s in self.slots.snapshot()],
                "media_cache": self.media_cache.info(), "host_cache": self.host_cache.info(),
                "slot_copies": self.slot_copy_counts(), "load_seconds": round(self.load_seconds, 6)}

    def slot_copy_counts(self) -> dict[str, int]:
        """``slot_copies`` with every round named, 0 included (any thread:
        reading a key never inserts it, so the loop's counter is not iterated
        while it may grow)."""
        return {name: self.slot_copies[name] for name in SLOT_COPY_ROUNDS}

    def step_summary(self, last: int = 256) -> dict:
        """Medians over the last ``last`` loop steps, in milliseconds: where
        the time between two decodes goes (see StepTiming)."""
        steps = list(self.timings)[-last:]
        if not steps:
            return {"n": 0}

        def med(values):
            return round(float(np.median(values)) * 1000, 3)

        return {"n": len(steps), "decode_ms": med([t.decode for t in steps]),
                "build_ms": med([t.build for t in steps]), "sample_ms": med([t.sample for t in steps]),
                "idle_gap_ms": med([t.idle_gap for t in steps]),
                "n_tokens": round(float(np.mean([t.n_tokens for t in steps])), 2),
                "n_generating": round(float(np.mean([t.n_generating for t in steps])), 2)}

    def close(self, drain: bool = False, timeout: float = 30.0) -> None:
        """Stop the engine.  ``drain`` lets running requests finish first;
        queued ones are cancelled either way."""
        with self._lock:
            if self._closing and not self._loop.is_alive():
                return
            self._closing = True
            self._drain = drain
            for seq in self.scheduler.waiting:
                seq.cancelled = True
            for seq in self._by_id.values():
                if not drain:
                    seq.cancelled = True
            self._wake.notify()
        if not drain:
            self.ctx.abort()
        self._loop.join(timeout)
        self.delivery.close(timeout)
        if self._loop.is_alive():
            log.error("engine loop did not stop within %.0f s", timeout)
            return
        self.executor.close()
        if self.mtmd is not None:
            self.mtmd.close()
        if self.drafter is not None:
            self.drafter.close()
        self.host_cache.close()
        self.ctx.close()
        for a in self._loras:
            a.close()
        self.model.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------
    # helpers for callers
    # ------------------------------------------------------------------

    def _prompt_inputs(self, request: CompletionRequest) -> tuple[list, list[MediaSpan]]:
        """The prompt as KV inputs, and its media chunks (caller's thread).
        A prompt over runner.engine.limits is refused before any work on it."""
        if isinstance(request.prompt, str):
            data = limits.text_bytes("prompt", request.prompt, InputTooLong)
        else:
            limits.check_tokens("prompt", len(request.prompt), InputTooLong)
        if request.media or (self.mtmd is not None and isinstance(request.prompt, str)
                             and self._mentions_media(request.prompt)):
            if not isinstance(request.prompt, str):
                raise BadRequest("media need a text prompt with placeholders, not token ids")
            mp = build_prompt(self.mtmd, request.prompt, list(request.media), request.add_special)
            if not mp.inputs:
                raise BadRequest("the prompt is empty")
            for span in mp.spans:
                if span.non_causal and span.n_tokens > self.ctx.n_ubatch:
                    raise BadRequest(f"a {span.chunk.kind} of {span.n_tokens} embeddings needs "
                                     f"n_batch >= {span.n_tokens} (n_batch is {self.ctx.n_ubatch})")
            return mp.inputs, mp.spans
        if isinstance(request.prompt, str):
            try:
                inputs = self.model.tokenize(data, add_special=request.add_special, parse_special=True)
            except _llama.LlamaError as exc:  # the model's vocabulary, not the request, is at fault
                raise InternalError(str(exc)) from None
        else:
            inputs = list(request.prompt)
            n_vocab = self.model.n_vocab
            ids = np.asarray(inputs)  # one pass in C, not one Python comparison per id
            if inputs and (ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.min() < 0
                           or ids.max() >= n_vocab):
                raise BadRequest(f"prompt token ids must be integers in [0, {n_vocab})")
        if not inputs:
            raise BadRequest("the prompt is empty")
        return inputs, []

    def _mentions_media(self, text: str) -> bool:
        return self.mtmd.marker in text or "[img-" in text

    # ------------------------------------------------------------------
    # loop thread
    # ------------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self.scheduler.waiting or self._embeds or self._slot_jobs
                               or len(self.scheduler.active) > len(self._pending)
                               or self._resolved or self._ready or self._closing):
                        self._wake.wait()
                    stopping = self._closing and (not self._drain or not self.scheduler.active)
                if stopping:
                    break
                more = False
                try:
                    more = self._step()
                finally:
                    # A decode follows at once: it rings the delivery thread
                    # with the GIL released (Executor.claim_doorbell).
                    self.delivery.step_done(ring=not more)
        except BaseException:
            log.exception("engine loop crashed")
            for seq in list(self.scheduler.active):
                self._end(seq, "error", InternalError("engine loop crashed"))
        finally:
            for seq in list(self.scheduler.active):
                self._end(seq, "cancelled")
            with self._lock:
                waiting = list(self.scheduler.waiting)
                self.scheduler.waiting.clear()
                embeds = list(self._embeds)
                self._embeds.clear()
                embeds += self._slot_jobs
                self._slot_jobs.clear()
            for seq in waiting:
                self._end(seq, "cancelled")
            self._resolver.close()  # before the model can be freed
            self._out.put(Shutdown())
            self.delivery.ring()
            for job in embeds:
                job.error = NotReady("the engine is shutting down")
                job.done.set()

    def _step(self) -> bool:
        """One step; True when it decoded text and sequences remain active
        (the next step's decode follows at once)."""
        t0 = time.perf_counter()
        self._interrupt.clear()  # what woke the loop before this is seen below
        self._finish_flagged()
        if self.failed is not None:
            self._fail_all()
            return False
        if self._resolved:
            self._take_resolved()
        if self.scheduler.waiting or self._embeds or self._slot_jobs:
            self.delivery.ring()  # admission, embeddings or slot files may take a while
        for seq in self.scheduler.admit(self._accepting):
            self._started(seq)
        if self._embeds:
            if not (self.scheduler.active or self.scheduler.waiting or self._slot_jobs
                    or self._embeds_equal_length()):
                self._hold_embeds()
            self._run_embeddings()
        if self._slot_jobs:
            self._run_slot_jobs()
        if self.mtmd is not None:
            media = self.scheduler.schedule_media()
            if media is not None and self._execute(media):
                self._sample(media)
        if self.failed is not None:  # met by an embedding or media decode: next step
            return False
        plan = self.scheduler.schedule()
        for seq, reason in plan.ended:
            self._end(seq, reason)
        if not plan.entries:
            return False
        if self.drafter is not None:
            try:
                self.drafter.fill(plan)
            except _llama.DeviceLostError as exc:
                self._lose(device_lost(exc))
                return False
        t1 = time.perf_counter()
        idle = t1 - self._last_decode_end if self._last_decode_end else 0.0
        steps = self._burst_steps(plan)
        if steps > 1 and self._run_burst(plan, steps, t0, t1, idle):
            return bool(self.scheduler.active)
        n_tokens = plan.n_inputs()
        n_prompt = plan.n_prompt()
        switches = self.executor.lora_switches
        decoded = self._execute(plan)
        t2 = time.perf_counter()
        self._last_decode_end = t2
        if not decoded:
            return False
        if self._loras and n_prompt == 0:  # adapter switches: what one costs sets the turn
            self._switch_cost.note(t2 - t1, self.executor.lora_switches != switches)
            self.scheduler.lora_turn_steps = self._switch_cost.turn_steps()
        if n_prompt >= 32:  # mostly prompt: the tier's evaluation rate
            self.host_cache.note_eval(n_tokens, t2 - t1)
        n_gen = self._sample(plan)
        t3 = time.perf_counter()
        if self._burst_seconds > 0.0:  # what a native run of these sequences would take per step
            plain = n_prompt == 0 and len(plan.entries) == len(self.scheduler.active) and not any(
                e.draft for e in plan.entries)
            self._gen_step_seconds = t3 - t1 if plain else 0.0
        self.timings.append(StepTiming(build=t1 - t0, decode=t2 - t1, sample=t3 - t2,
                                       idle_gap=idle, n_tokens=n_tokens, n_generating=n_gen))
        self.totals.step(t2 - t1, n_tokens)
        return bool(self.scheduler.active)

    # -- native steps (docs/design.md, "Native steps") -------------------

    def _burst_steps(self, plan: StepPlan) -> int:
        """How many steps ``plan`` may run in native code (_run_burst); 0 or
        1: the ordinary step.  Only when every running sequence is in the
        plan and only generates, with a native sampler and nothing that needs
        Python between two tokens, nothing else waits, and the last such
        step was timed: as many steps as fit in ``burst_ms``, at most
        MAX_BURST, within every slot's room and n_predict."""
        if self._burst_seconds <= 0.0 or self._gen_step_seconds <= 0.0:
            return 0
        entries = plan.entries
        if (plan.media or plan.ended or len(entries) != len(self.scheduler.active)
                or self.scheduler.waiting or self._embeds or self._slot_jobs
                or self.config.rpc_servers):
            return 0
        steps = min(MAX_BURST, int(self._burst_seconds / self._gen_step_seconds))
        if steps < 2:  # a step longer than half of burst_ms: no run (and no walk over the plan)
            return 0
        for e in entries:
            seq, opts = e.seq, e.seq.options
            if (not e.generating or e.draft or e.draft_limit or seq.spans or opts.speculative
                    or opts.logprobs or opts.top_logprobs
                    or not (seq.sampler.native_chain or seq.in_graph)):
                return 0
            steps = min(steps, self.slot_ctx - e.start)
            if seq.n_predict:
                steps = min(steps, seq.n_predict - len(seq.generated))
        return steps

    def _run_burst(self, plan: StepPlan, steps: int, t0: float, t1: float, idle: float) -> bool:
        """Run up to ``steps`` generation steps of ``plan`` without coming
        back to Python (_llama.decode_steps), then record them as ordinary
        steps would: each sequence's decoded tokens into its slot, every
        sampled token through _take (text, ends) and to delivery at once.
        False when not even the first step was decoded: the ordinary step
        then decodes the plan again and reports what failed."""
        entries = plan.entries
        seqs = [e.seq for e in entries]
        try:
            sampled, _ = self.executor.decode_steps(plan, steps, self._interrupt)
        except ValueError as exc:  # a condition _burst_steps should have caught
            log.warning("native steps refused the plan: %s", exc)
            self._gen_step_seconds = 0.0
            return False
        n_steps = len(sampled[0])
        if n_steps == 0:
            return False
        t2 = time.perf_counter()
        record = self.slots.record
        for seq, run in zip(seqs, sampled):
            record(seq.slot, [seq.next_token, *run[:-1]])
            seq.next_token = None
        n_gen = self._hand_on_run(seqs, sampled, t2)
        self._last_decode_end = t2
        per_step = (t2 - t1) / n_steps
        self._gen_step_seconds = per_step
        self.timings.append(StepTiming(build=t1 - t0, decode=t2 - t1, sample=0.0, idle_gap=idle,
                                       n_tokens=n_steps * len(entries), n_generating=n_gen,
                                       steps=n_steps))
        self.totals.step(per_step, len(entries), n_steps)
        return True

    def _hand_on_run(self, seqs: list[Sequence], sampled: list[list], now: float) -> int:
        """_hand_on for a native run's tokens, ``sampled[i]`` those of
        ``seqs[i]``.  decode_steps stops a run after the step in which any
        token ends its sequence (an end token where it ends one, the budget
        of n_predict, -1, a grammar's DEFERRED or error), so every token but
        a sequence's last is one that _take would only append: those go in
        bulk, and the last through _take.  On a fast decode this is most of
        the loop's Python per generated token (~1 us each in _take)."""
        toks: list[tuple] = []  # as in _hand_on
        ends: list[tuple] = []
        take = self._take
        for seq, run in zip(seqs, sampled):
            if len(run) > 1 and seq.t_first:  # (a first token sets t_first in _take)
                head = run[:-1]
                seq.generated += head
                toks += zip(itertools.repeat(seq), head, itertools.repeat(None))
                run = run[-1:]
            for token in run:
                # A token, -1 (no number among the logits), or a grammar's
                # DEFERRED or error, which ends the run.
                if type(token) is int and token < 0:
                    token = _NO_NUMBER
                end = take(seq, token, None, now, toks)
                if end is not None:
                    ends.append(end)
                    break
        return self._hand_over(toks, ends)

    def _accepting(self) -> bool:
        """Whether queued requests may still start (called under the lock)."""
        return not (self._closing and not self._drain)

    def _fail_all(self) -> None:
        """The model cannot compute any more (:attr:`failed`): end every
        running and queued request, and every waiting job, with that error.
        Slots come back as usual, once delivery has flushed their text."""
        error = DeviceLost(self.failed)
        for seq in list(self.scheduler.active):
            self._end(seq, "error", error)
        with self._lock:
            waiting = list(self.scheduler.waiting)
            self.scheduler.waiting.clear()
            jobs = [*self._embeds, *self._slot_jobs]
            self._embeds.clear()
            self._slot_jobs.clear()
        for seq in waiting:
            self._end(seq, "error", error)
        for job in jobs:
            job.error = error
            job.done.set()

    # -- finish and admit -------------------------------------------------

    def _finish_flagged(self) -> None:
        """End sequences that were cancelled or hit a stop string, and release
        the slots of ended sequences whose text the delivery side flushed."""
        cancelled = self.scheduler.take_cancelled()
        with self._lock:
            ready, self._ready = self._ready, []
        for seq in cancelled:
            self._end(seq, "cancelled")
        for seq, reason in self.scheduler.flagged():
            self._end(seq, reason)
        for seq in ready:
            self.scheduler.release(seq)
            self._out.put(SeqReleased(seq))

    def _end(self, seq: Sequence, reason: str, error: EngineError | None = None) -> None:
        """Stop a sequence and send its end record.  The slot stays lent until
        the delivery side says how many tokens were returned."""
        if seq.ended:
            return
        seq.ended = True
        seq.error = error
        self.scheduler.remove(seq)
        self._pending.discard(seq)  # a resolve in progress frees the sampler when it returns
        if seq.sampler is not None:
            seq.sampler.close()
        for span in seq.spans:
            span.chunk.close()  # the preprocessed media; the rows stay in the media cache
        now = time.perf_counter()
        final = Final(
            done_reason=reason,
            prompt_eval_count=max(0, min(seq.n_sched, len(seq.inputs)) - seq.n_cached),
            prompt_eval_duration=seq.prompt_duration or (now - seq.t_admitted if seq.t_admitted else 0.0),
            eval_count=len(seq.generated),
            eval_duration=(now - seq.t_first) if seq.t_first else 0.0,
            cached_count=seq.n_cached, prompt_count=len(seq.inputs),
            slot=seq.slot.id if seq.slot is not None else -1,
            draft_proposed=seq.n_proposed, draft_accepted=seq.n_accepted,
            error=str(error) if error else None, error_code=error.code if error else None)
        self._out.put(SeqEnded(seq, final))

    def _started(self, seq: Sequence) -> None:
        """A sequence was admitted into a slot."""
        seq.t_admitted = time.perf_counter()
        self.totals.admitted(seq.t_admitted - seq.t_queued)
        # The penalties and DRY look at the prompt too (the grammar does
        # not: it constrains the generated text only; see _llama.Sampler).
        n_seen = prompt_tokens_to_accept(seq.options, self.slot_ctx)
        if n_seen:
            for tok in seq.inputs[-n_seen:]:
                if type(tok) is int:  # media rows are not tokens
                    seq.sampler.accept(tok)
        if seq.in_graph:
            self._attach(seq)

    def _attach(self, seq: Sequence) -> None:
        """Hand the sequence's sampler to the decode graph for its slot.
        Should llama.cpp refuse the chain, the sequence samples on the CPU
        with the same chain; should it throw, the request fails."""
        try:
            if seq.sampler.attach(self.ctx, seq.slot.id):
                return
            log.warning("backend sampling: llama.cpp kept the chain of request %s on the CPU",
                        seq.handle.id)
            seq.in_graph = False
        except _llama.SamplerError as exc:  # the chain is spoilt: only this request fails
            seq.in_graph = False
            self._end(seq, "error", InternalError(f"backend sampling: {exc}"))

    # -- execute --------------------------------------------------------

    def _execute(self, plan: StepPlan) -> int:
        """Decode the plan and record what was decoded; a failed decode
        fails the plan's sequences.  Returns the inputs decoded."""
        try:
            n = self.executor.execute(plan)
        except EngineError as exc:
            if isinstance(exc, DeviceLost):
                self._lose(exc)
            for entry in plan.entries:
                self._end(entry.seq, "error", exc)
            return 0
        self.scheduler.update(plan, n)
        return n

    # -- sample and update ------------------------------------------------

    def _sample(self, plan: StepPlan) -> int:
        """Sample the next token of every sequence with an output row; returns
        how many tokens were generated.  One binding call samples the whole
        step (the GIL released once), and the step's tokens go to delivery as
        one record; ends follow their sequence's last token.  A speculating
        sequence may take several tokens in one step (:meth:`_verify`)."""
        entries, rows = [], []
        for entry in plan.entries:
            seq, idx = entry.seq, entry.out_index
            if idx < 0 or seq.ended:
                continue
            if seq.n_predict < 0:  # num_predict 0: evaluate the prompt only
                seq.prompt_duration = seq.t_tokenize + (time.perf_counter() - seq.t_admitted)
                self._end(seq, "length")
                continue
            entries.append(entry)
            rows.append(idx)
        if not entries:
            return 0
        runs = self._verify(entries, rows)
        now = time.perf_counter()
        for entry, run in zip(entries, runs):
            if entry.draft:
                seq = entry.seq
                accepted = len(run) - 1  # each sampled token after the first confirmed a proposal
                self.scheduler.keep_accepted(entry, accepted)
                seq.n_proposed += len(entry.draft)
                seq.n_accepted += accepted
                seq.draft_cap = next_cap(seq.draft_cap, len(entry.draft), accepted)
                seq.draft_misses = 0 if accepted else seq.draft_misses + 1
                seq.draft_wait = wait_after(seq.draft_misses)
        return self._hand_on(((entry.seq, run) for entry, run in zip(entries, runs)), now)

    def _hand_on(self, runs, now: float) -> int:
        """Each sequence's sampled ``(token, logits or None)`` pairs, from
        ``runs`` of (seq, pairs), through _take in order up to the one that
        ends it; the tokens to delivery as one record, then the ends.
        Returns the tokens handed on."""
        toks: list[tuple] = []  # (seq, token, logprob entry or None), for delivery
        ends: list[tuple] = []  # (seq, reason, error), after the tokens
        take = self._take
        for seq, run in runs:
            for token, logits in run:
                end = take(seq, token, logits, now, toks)
                if end is not None:
                    ends.append(end)
                    break
        return self._hand_over(toks, ends)

    def _hand_over(self, toks: list[tuple], ends: list[tuple]) -> int:
        """A step's tokens to delivery as one record, then the ends; the
        number of tokens."""
        if toks:
            self._out.put(StepTokens(toks))
        for seq, reason, error in ends:
            self._end(seq, reason, error)
        return len(toks)

    def _verify(self, entries: list, rows: list[int]) -> list[list[tuple]]:
        """Per entry, the tokens sampled from its output rows, in order, each
        with its row's logits (or None): (token or exception, logits) pairs.

        Every entry's first row is sampled; a speculating entry's row i+1
        only when the token sampled from row i equals proposal i and ends
        nothing.  The sampler draws each token from the target model's
        distribution given exactly the tokens before it, as one token per
        step would; a proposal is accepted when the draw equals it.  For a
        proposal fixed before the draw (prompt lookup) this keeps the output
        distribution of the target model: every returned token is a draw
        from it, and a seeded request returns the same tokens with
        speculation on and off.  Rounds sample all entries still accepting
        in one binding call each (one sampler per call)."""
        want = [e.seq.options.logprobs or e.seq.options.top_logprobs > 0 for e in entries]
        sampled, lps = self.executor.sample([e.seq.sampler for e in entries], rows, want, defer=True)
        runs = [[pair] for pair in zip(sampled, lps)]
        live = [i for i, e in enumerate(entries) if e.draft]
        r = 0
        while live:
            going = []
            for i in live:
                seq, run = entries[i].seq, runs[i]
                token = run[-1][0]
                if (type(token) is int and token == entries[i].draft[r]
                        and not self._run_ends(seq, token, len(run))):
                    going.append(i)
            if not going:
                break
            sampled, lps = self.executor.sample(
                [entries[i].seq.sampler for i in going], [rows[i] + r + 1 for i in going],
                [want[i] for i in going])
            for i, token, logits in zip(going, sampled, lps):
                runs[i].append((token, logits))
            r += 1
            live = [i for i in going if r < len(entries[i].draft)]
        return runs

    def _run_ends(self, seq: Sequence, token: int, n_run: int) -> bool:
        """Whether ``token``, the ``n_run``-th token sampled for ``seq`` this
        step, ends it (an end of generation, or the n_predict limit)."""
        if self.model.is_eog(token) and (not seq.options.ignore_eos or seq.sampler.has_grammar):
            return True
        return bool(seq.n_predict) and len(seq.generated) + n_run >= seq.n_predict

    def _take(self, seq: Sequence, token, logits, now: float, toks: list) -> tuple | None:
        """Turn one sampled token of ``seq`` into generated text (appended to
        ``toks``) or an end; returns the end (seq, reason, error), or None
        when the token is the next step's input."""
        if token is _DEFERRED:  # (after a native run's tokens, which set next_token)
            seq.next_token = None
            self._defer(seq, logits)
            return None
        if type(token) is not int:
            if isinstance(token, _llama.NoTokenError):
                return (seq, "error", BadRequest(f"grammar cannot be satisfied: {token}"))
            # this request fails; the others go on
            log.error("sampling failed for request %s: %s", seq.handle.id, token)
            return (seq, "error", InternalError(f"sampling failed: {token}"))
        if not seq.t_first:
            seq.t_first = now
            seq.prompt_duration = seq.t_tokenize + (now - seq.t_admitted)
        if self.model.is_eog(token) and (not seq.options.ignore_eos or seq.sampler.has_grammar):
            # The EOG token is neither returned nor cached.  A grammar
            # offers it only once its text is complete: that ends the
            # request even with ignore_eos, which would otherwise go on
            # generating end tokens with no text forever.
            return (seq, "stop", None)
        lp = None if logits is None else logprob_entry(self.model, logits, token,
                                                       seq.options.top_logprobs)
        seq.generated.append(token)
        toks.append((seq, token, lp))
        if seq.n_predict and len(seq.generated) >= seq.n_predict:
            return (seq, "length", None)  # the last token is returned, never decoded
        seq.next_token = token
        return None

    def _defer(self, seq: Sequence, logits) -> None:
        """The grammar rejected ``seq``'s pick: the resolver finishes it on a
        worker thread while the other sequences go on; ``seq`` sits out the
        steps until then (it has no next token).  ``logits`` (for
        log-probabilities) are copied: the view ends with the next decode."""
        kept = None if logits is None else np.array(logits, dtype=np.float32)
        self._pending.add(seq)

        def done(token, seconds: float) -> None:  # on the worker thread
            self.totals.grammar_redraw(seconds)
            with self._lock:
                self._resolved.append((seq, token, kept))
                self._wake.notify()

        self._resolver.submit(seq.sampler, done)

    def _take_resolved(self) -> None:
        """Hand on the tokens of finished grammar picks (ended sequences'
        are dropped)."""
        with self._lock:
            resolved, self._resolved = self._resolved, []
        runs = []
        for seq, token, logits in resolved:
            if seq in self._pending:
                self._pending.discard(seq)
                runs.append((seq, [(token, logits)]))
        if runs:
            self._hand_on(runs, time.perf_counter())

    # -- embeddings -----------------------------------------------------

    def _embeds_equal_length(self) -> bool:
        """Whether only texts of one length can share an embedding decode
        (see _run_embeddings)."""
        return not self.config.kv_unified and self.ctx.pooling != "none"

    def _hold_embeds(self) -> None:
        """Wait a moment for the callers answered by the last embedding
        decode to send again, so that their texts share the next decode
        (runner.engine.embedwait); only called while no completion runs or waits."""
        free = self.slots.n_free
        with self._lock:
            while True:
                n_texts = n_tokens = 0
                for job in self._embeds:
                    for i, tokens in enumerate(job.texts):
                        if job.results[i] is None:
                            n_texts += 1
                            n_tokens += len(tokens)
                now = time.perf_counter()
                until = self._embed_window.wait_until(
                    now, len(self._embeds), full=n_texts >= free or n_tokens >= self.n_batch)
                if (until is None or self._closing or self.failed is not None
                        or self.scheduler.waiting or self._slot_jobs):
                    return
                self._wake.wait(until - now)

    def _run_embeddings(self) -> None:
        """One decode of queued embedding texts, taken from the jobs in
        arrival order, each in a slot of its own that neither reuses nor
        keeps a cached prompt; a job is answered once all its texts are.

        A pooled embedding needs its whole text in one micro-batch, and with
        one KV stream per slot llama.cpp splits a batch into micro-batches
        of equal tokens per sequence (``split_equal``), taking consecutive
        sequence ids together.  So without ``kv_unified`` (and unless the
        pooling is ``none``) a decode holds texts of one length only, in
        increasing slot order: consecutive ids then share a micro-batch
        whole, others get one each."""
        with self._lock:
            jobs = list(self._embeds)
        equal = self._embeds_equal_length()
        free = self.slots.n_free
        picked: list[tuple[EmbeddingJob, int]] = []  # (job, text index)
        n = 0
        for job in jobs:
            for i, tokens in enumerate(job.texts):
                if len(picked) == free:
                    break
                if job.results[i] is not None or (picked and n + len(tokens) > self.n_batch):
                    continue
                if equal and picked and len(tokens) != len(picked[0][0].texts[picked[0][1]]):
                    continue
                picked.append((job, i))
                n += len(tokens)
        if not picked:
            return  # no free slot: the next step tries again
        slots = []
        decode_seconds = 0.0
        try:
            for _ in picked:
                slots.append(self.slots.acquire_uncached())
            slots.sort(key=lambda slot: slot.id)
            items = [(job.texts[i], slot.id) for (job, i), slot in zip(picked, slots)]
            self.executor.use_lora(self.lora_default)
            t0 = time.perf_counter()
            for (job, i), rows in zip(picked, self.executor.embed(items, self.config.embeddings)):
                job.results[i] = rows
                job.n_done += 1
            decode_seconds = time.perf_counter() - t0
            for slot, (tokens, _) in zip(slots, items):
                self.slots.record(slot, tokens)
        except Exception as exc:  # these requests fail, the engine goes on
            error = exc if isinstance(exc, EngineError) else InternalError(f"embedding failed: {exc}")
            if isinstance(error, DeviceLost):
                self._lose(error)
            for job, _ in picked:
                job.error = error
        finally:
            for slot in slots:
                self.slots.release(slot)
        finished = list({id(job): job for job, _ in picked
                         if job.error is not None or job.n_done == len(job.texts)}.values())
        with self._lock:
            for job in finished:
                self._embeds.remove(job)
            n_left = len(self._embeds)
        for job in finished:
            if job.error is None:
                self.totals.embedded()
            job.done.set()
        self._embed_window.answered(time.perf_counter(), len(finished), n_left, decode_seconds)

    # -- slot files -----------------------------------------------------

    def _run_slot_jobs(self) -> None:
        """Copy slot states out of (save) or into (restore) the context,
        between two decodes; a slot a request holds is refused (busy)."""
        while True:
            with self._lock:
                if not self._slot_jobs:
                    return
                job = self._slot_jobs.popleft()
            t0 = time.perf_counter()
            try:
                slot = self.slots.slots[job.slot]
                if slot.in_use:
                    raise Busy(f"slot: slot {slot.id} is in use by a request")
                if job.restore is None:
                    self._save_slot(job, slot)
                else:
                    self._restore_slot(job, slot)
            except Exception as exc:  # the request fails, the engine goes on
                job.error = exc if isinstance(exc, EngineError) else InternalError(
                    f"slot operation failed: {exc}")
            finally:
                job.seconds = time.perf_counter() - t0
                job.done.set()

    def _save_slot(self, job: SlotJob, slot: Slot) -> None:
        if not slot.inputs:
            raise BadRequest(f"slot: slot {slot.id} is empty")
        if any(type(t) is not int for t in slot.inputs):
            raise BadRequest(f"slot: slot {slot.id} holds media inputs; only slots of tokens "
                             "can be saved")
        if slot.lora != self.lora_default:
            raise BadRequest(f"slot: slot {slot.id} was computed under LoRA scales "
                             f"{lora_sets.describe(slot.lora)}; only slots of the load's default "
                             f"adapter set ({lora_sets.describe(self.lora_default)}) can be saved")
        state = self._slot_state(job, slot)
        if state is not None:
            job.tokens, job.state = list(slot.inputs), state

    def _restore_slot(self, job: SlotJob, slot: Slot) -> None:
        """Put the file's state in ``slot``; if the memory refuses it (no
        room, another shape), put back what the slot held.  Nothing changes
        when the job's buffer cannot take what the slot holds (job.need)."""
        saved = job.restore
        prior = None
        if slot.inputs:
            state = self._slot_state(job, slot)
            if state is None:
                return
            prior = (list(slot.inputs), state)
        if self.slots.put(slot, saved.tokens, lambda: self._states.state_set(slot.id, saved.state)):
            return
        if prior is not None and not self.slots.put(
                slot, prior[0], lambda: self._states.state_set(slot.id, prior[1])):
            log.warning("slot %d: its earlier state could not be put back; it is empty", slot.id)
        raise BadRequest(f"slot {slot.id}: the model's memory refused the saved state "
                         f"({saved.header.n_inputs} inputs, {saved.header.n_state} bytes)")

    def _slot_state(self, job: SlotJob, slot: Slot) -> np.ndarray | None:
        """``slot``'s sequence state, copied into the job's buffer (a view of
        its first bytes).  None when the buffer is short: ``job.need`` is then
        the size, except on the last round, which copies into fresh memory."""
        size = self._states.state_size(slot.id)
        self._state_bytes_per_input = size / len(slot.inputs)
        buf = job.buffer
        if buf is None or len(buf) < size:
            if size and not job.last:
                job.need = size
                self.slot_copies["short"] += 1
                return None
            buf = np.empty(size, dtype=np.uint8)
            self.slot_copies["fresh"] += 1
        else:
            self.slot_copies["touched"] += 1
        n = self._states.state_get_into(slot.id, buf)
        return buf[:n]


MAX_BURST = 64  # most steps of one native run (Engine._burst_steps)

# What _take is given for a row of a native run with no number among its logits.
_NO_NUMBER = _llama.SamplerError("sampling failed: no logit is a number")
_DEFERRED = _llama.DEFERRED  # a grammar's rejected pick, redrawn off the loop (Engine._defer)


class _Wake(threading.Condition):
    """The loop's condition variable.  Every notify also sets the interrupt
    that ends a native run of steps after the step in progress, so whatever
    woke the loop (a request, a cancellation, a stop string, a job) is seen
    within one step."""

    def __init__(self, lock: threading.Lock, interrupt: "_llama.StepInterrupt") -> None:
        super().__init__(lock)
        self._interrupt = interrupt

    def notify(self, n: int = 1) -> None:
        self._interrupt.set()
        super().notify(n)


class _DeliveryHooks:
    """The engine as the delivery side sees it (runner.engine.delivery.DeliveryOwner)."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def stop_found(self, seq: Sequence) -> None:
        with self._engine._lock:
            self._engine._wake.notify()

    def flushed(self, seq: Sequence) -> bool:
        e = self._engine
        with e._lock:
            if e._loop.is_alive() and not (e._closing and not e._drain):
                e._ready.append(seq)
                e._wake.notify()
                return True
        return False

    def unreleased(self) -> list[Sequence]:
        e = self._engine
        with e._lock:
            ready, e._ready = e._ready, []
        return ready

    def finishing(self, seq: Sequence) -> None:
        e = self._engine
        with e._lock:
            e._by_id.pop(seq.handle.id, None)
        f = seq.final
        e.totals.finished(f.done_reason, f.prompt_count, f.prompt_eval_count, f.cached_count,
                          f.eval_count)


class _StreamKV:
    """KV backend for a context with one KV stream per sequence (not unified).

    Each slot then owns its cells, and a decode attends only to its own
    sequence's cells: at 8 streams llama-batched-bench generates 172 tok/s
    against 155 with a unified buffer (default model, 2 threads).  llama.cpp
    copies between streams only whole sequences (a partial seq_cp asserts),
    so a fork copies everything and trims the copy.
    """

    def __init__(self, ctx: _llama.Context):
        self._ctx = ctx  # the context whose memory this drives (loop thread only)

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        return self._ctx.seq_rm(seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._ctx.seq_cp(src, dst, -1, -1)
        if p1 >= 0:
            self._ctx.seq_rm(dst, p1, -1)
        if p0 > 0:
            self._ctx.seq_rm(dst, 0, p0)

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        self._ctx.seq_add(seq, p0, p1, delta)

    def can_shift(self) -> bool:
        return self._ctx.can_shift()


class _StateKV:
    """State backend of the host tier (runner.engine.hostcache.StateBackend) over
    the context's per-sequence state calls."""

    def __init__(self, ctx: _llama.Context, model: _llama.Model):
        self._ctx = ctx  # the context whose sequences are saved (loop thread only)
        self._recurrent = model.is_recurrent  # recurrent or hybrid: states cannot be cut back
        self._n_swa = model.n_swa  # sliding window of the SWA layers (0: none)

    def state_size(self, seq: int) -> int:
        return self._ctx.state_seq_size(seq)

    def state_get_into(self, seq: int, out) -> int:
        return self._ctx.state_seq_get_into(seq, out)

    def state_set(self, seq: int, data) -> bool:
        try:
            self._ctx.state_seq_set(data, seq)
            return True
        except _llama.LlamaError as exc:
            log.warning("restoring a saved sequence state failed: %s", exc)
            self._ctx.seq_rm(seq, 0, -1)
            return False

    def min_keep(self, seq: int, inputs) -> int:
        """Recurrent and hybrid memories: only the whole state.  Sliding-window
        caches hold only the last ``n_swa`` positions, and llama.cpp saves
        only those (cells the window masks are left out): a cut at ``n``
        keeps the window the next input attends to when ``n - n_swa`` is at
        or after the smallest position saved (as Scheduler._window_kept checks
        after every acquire).  Counted in input indices, which equal
        positions without M-RoPE media; the check after the acquire is exact."""
        if self._recurrent:
            return len(inputs)
        if self._n_swa > 0:
            pos_min = max(self._ctx.seq_pos_min(seq), self._ctx.seq_pos_max(seq) - self._n_swa + 1)
            return 0 if pos_min <= 0 else min(len(inputs), pos_min + self._n_swa)
        return 0


def _with_slack(size: int) -> int:
    """A buffer size for a state estimated or measured at ``size`` bytes:
    room for the slot to grow a little before the loop copies it, and for
    the state's fixed head beside bytes-per-input estimates (the tail the
    copy leaves unused costs only its touch, on the caller's thread)."""
    return size + size // 64 + (64 << 10)
