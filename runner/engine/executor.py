"""Execution: a step plan into a batch, the decode, and the sampled tokens.

The executor owns the context's batches and is the only code that decodes
(loop thread only).  It decides nothing: which inputs go into a step is the
scheduler's (runner.engine.scheduler), what a sampled token means is the engine's.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import Callable

import numpy as np

from runner import _llama
from runner.engine.media import MediaCache, MediaSpan
from runner.engine.requests import DeviceLost, InternalError
from runner.engine.scheduler import StepPlan
from runner.model import rpc

log = logging.getLogger("runner.engine")


def sample_threads() -> int:
    """Threads that sample a step's rows: LLAMA_RUNNER_SAMPLE_THREADS, else
    one per core up to 4.  The decode threads are idle while a step is
    sampled, so its rows (steps of 4 or more) spread over the cores.  Since
    the delivery thread works during the decode instead of beside the
    sampling (runner.engine.delivery's doorbell), the pool pays on the 2-core VM:
    tiny model, default options, in-process, medians of 5 alternating
    rounds, 1 decode thread: B=64 gap between decodes 3.97 -> 2.50 ms,
    2,809 -> 2,929 tok/s; B=8 2,645 -> 2,830 tok/s; 2 decode threads: B=64
    3,226 -> 3,306, B=16 3,276 -> 3,484 tok/s.  (Before the doorbell, at
    B=64 it lengthened the gap, 0.74 -> 0.89 ms.)"""
    value = os.environ.get("LLAMA_RUNNER_SAMPLE_THREADS", "")
    if value.strip().isdigit() and int(value) > 0:
        return int(value)
    return max(1, min(os.cpu_count() or 1, 4))


def device_lost(exc: "_llama.DeviceLostError") -> DeviceLost:
    """The engine's error for a decode that met a lost RPC connection."""
    return DeviceLost(rpc.lost_message(exc.endpoints))


class Executor:
    """Plan -> batch -> decode (halving the batch while no KV slot fits) ->
    sampled tokens, on one context."""

    def __init__(self, ctx: _llama.Context, n_embd_inp: int, mtmd: "_llama.MtmdContext | None",
                 media_cache: MediaCache, loras: list | None = None, lora: tuple | None = None):
        self.ctx = ctx                        # the context decoded into
        self.loras = loras or []              # the loaded LoraAdapters, in load order
        self.lora: tuple | None = lora        # the adapter scales applied to ctx (None: not yet set)
        self.lora_switches = 0                # times the applied set changed (each a graph reservation)
        self.batch = _llama.Batch(ctx.n_batch)  # token batch, rewritten each step
        self.mtmd = mtmd                      # media encoder (None: text only)
        self.media_cache = media_cache        # embedding rows of media seen before
        self.sample_threads = sample_threads()  # threads that sample a step's rows
        # Returns a file descriptor for the next decode to ring once the GIL
        # is released (-1: none); set by the engine to the delivery side's
        # Delivery.claim_ring.
        self.claim_doorbell: Callable[[], int] = lambda: -1
        # Media rows never share a batch with tokens: a batch of their own,
        # with four positions per row for M-RoPE.
        self.media_batch = None if mtmd is None else _llama.Batch(
            ctx.n_batch, embd=n_embd_inp, n_pos=4 if mtmd.uses_mrope else 1)

    def close(self) -> None:
        self.batch.close()
        if self.media_batch is not None:
            self.media_batch.close()

    # -- decode ---------------------------------------------------------------

    def execute(self, plan: StepPlan) -> int:
        """Write the plan into its batch and decode it; returns how many of
        its inputs were decoded (fewer after halving; 0 when aborted).
        Raises EngineError when the decode failed (the plan's sequences
        fail), after which nothing of the plan is in the KV memory that
        counts: the scheduler records only what :meth:`execute` returned;
        DeviceLost when a remote device holding part of the model was lost
        (nothing can be decoded any more)."""
        self.use_lora(plan.lora)
        if plan.media:
            return self._execute_media(plan)
        self._write(plan)
        return self._decode(self.batch)

    def use_lora(self, key: tuple) -> None:
        """Apply the adapter set ``key`` (runner.engine.lora.LoraKey) to the context
        unless it is applied already."""
        if key == self.lora:
            return
        try:
            self.ctx.set_loras([(a, s) for a, s in zip(self.loras, key) if s != 0.0])
        except (_llama.LlamaError, ValueError) as exc:
            raise InternalError(f"applying LoRA adapters failed: {exc}") from None
        if self.lora is not None:
            self.lora_switches += 1
        self.lora = key

    def _write(self, plan: StepPlan) -> None:
        batch = self.batch
        batch.clear()
        for e in plan.entries:
            seq = e.seq
            if e.generating:
                pos = seq.position(e.start)
                e.out_index = batch.add(seq.next_token, pos, seq.slot.id, True)
                for i, tok in enumerate(e.draft, 1):  # rows out_index + i verify the proposals
                    batch.add(tok, pos + i, seq.slot.id, True)
            else:
                idx = batch.add_tokens(seq.inputs[e.start:e.start + e.n_inputs],
                                       seq.position(e.start), seq.slot.id,
                                       output_last=e.wants_output)
                e.out_index = idx if e.wants_output else -1

    def _execute_media(self, plan: StepPlan) -> int:
        entry = plan.entries[0]
        seq, span = entry.seq, entry.span
        rows = self.media_rows(span)
        offset = entry.start - span.start
        n = entry.n_inputs
        batch = self.media_batch
        batch.clear()
        pos0 = seq.position(span.start)
        positions = None
        if batch.n_pos > 1:
            positions = span.chunk.mrope_positions(pos0)[:, offset:offset + n]
        idx = batch.add_embeddings(rows[offset:offset + n], pos0 + offset, seq.slot.id,
                                   output_last=entry.wants_output, positions=positions)
        entry.out_index = idx if entry.wants_output else -1
        if not span.non_causal:
            return self._decode(batch)
        self.ctx.set_causal_attn(False)
        try:
            return self._decode(batch)
        finally:
            self.ctx.set_causal_attn(True)

    def _decode(self, batch: _llama.Batch) -> int:
        n = len(batch)
        doorbell = self.claim_doorbell()
        while True:
            try:
                self.ctx.decode(batch, doorbell)
                return n
            except _llama.NoKVSlotError:
                if n <= 1:
                    raise InternalError("no KV cache slot even for one input") from None
                n //= 2
                batch.truncate(n)
                log.warning("no KV slot for the batch; retrying with %d inputs", n)
            except _llama.DecodeAbortedError:
                return 0
            except _llama.DeviceLostError as exc:
                raise device_lost(exc) from None
            except (_llama.DecodeError, ValueError) as exc:
                raise InternalError(f"decode failed: {exc}") from None

    def decode_steps(self, plan: StepPlan, steps: int,
                     interrupt: "_llama.StepInterrupt") -> tuple[list[list[int]], int]:
        """Up to ``steps`` generation steps of the plan's sequences (every
        entry generating one token, every sampler native) in native code:
        per entry the tokens sampled, and the return code of a decode that
        failed (0: none).  See _llama.decode_steps."""
        entries = plan.entries
        self.use_lora(plan.lora)
        seqs = [e.seq for e in entries]
        budget = 2**31 - 1
        return _llama.decode_steps(
            self.ctx, self.batch, [s.sampler for s in seqs], [s.slot.id for s in seqs],
            [s.position(e.start) for s, e in zip(seqs, entries)], [s.next_token for s in seqs],
            [(s.n_predict - len(s.generated)) if s.n_predict else budget for s in seqs],
            # a grammar ends at an end token even under ignore_eos (Engine._take)
            [not s.options.ignore_eos or s.sampler.has_grammar for s in seqs], steps, interrupt,
            self.claim_doorbell(),
            self.sample_threads)

    def media_rows(self, span: MediaSpan) -> np.ndarray:
        """The embedding rows of ``span``: cached, or encoded now (the GIL
        released inside) and cached."""
        def encode() -> np.ndarray:
            try:
                return self.mtmd.encode(span.chunk)
            except _llama.LlamaError as exc:
                lost = _llama.rpc_lost()  # the projector may sit on a remote device
                if lost:
                    raise DeviceLost(rpc.lost_message(lost)) from None
                raise InternalError(f"{span.chunk.kind} encoding failed: {exc}") from None
        return self.media_cache.get_or_encode(span.key, encode)

    # -- sample ---------------------------------------------------------------

    def sample(self, samplers: list, rows: list[int], want_logits: list[bool],
               defer: bool = False) -> tuple[list, list]:
        """One token (or the exception its sampler raised) per (sampler,
        row), and the row's logits where ``want_logits`` (for
        log-probabilities; read before sampling, valid until the next
        decode).  The whole step is sampled in one binding call, the GIL
        released once, its rows spread over the cores.  With ``defer``, a
        grammar's rejected pick comes back as _llama.DEFERRED, for
        :class:`PickResolver`."""
        logits = [self.ctx.logits(row) if want else None for row, want in zip(rows, want_logits)]
        return _llama.sample_batch(self.ctx, samplers, rows, self.sample_threads, defer), logits

    # -- embeddings -----------------------------------------------------------

    def embed(self, items: list[tuple[list[int], int]], embeddings_runner: bool) -> list[np.ndarray]:
        """Decode each ``(tokens, seq_id)`` as a sequence of its own in one
        batch, every token an output, and return per item a copy of its
        pooled embedding (float32[n_embd], or the n_cls_out scores under
        rank pooling), or under pooling ``none`` its token rows
        (float32[n_tokens, n_embd])."""
        batch = self.batch
        batch.clear()
        starts = [0] * len(items)
        # By ascending sequence id: a per-slot KV decodes runs of consecutive
        # ids in one pass (runner.engine.scheduler, "Batch order").
        for i in sorted(range(len(items)), key=lambda i: items[i][1]):
            tokens, seq_id = items[i]
            starts[i] = len(batch)
            batch.add_tokens(tokens, 0, seq_id, output_last=True)
        for i in range(len(batch)):
            batch.set_output(i, True)
        ctx = self.ctx
        per_token = ctx.pooling == "none"
        if not embeddings_runner:
            ctx.set_embeddings(True)
        try:
            try:
                ctx.decode(batch)
            except _llama.DeviceLostError as exc:
                raise device_lost(exc) from None
            except _llama.DecodeError as exc:  # no KV slot, aborted (closing), or failed
                raise InternalError(f"embedding decode failed: {exc}") from None
            if per_token:
                return [np.array([ctx.embeddings(start + j) for j in range(len(tokens))], dtype=np.float32)
                        for start, (tokens, _) in zip(starts, items)]
            return [np.array(ctx.embeddings_seq(seq_id), dtype=np.float32) for _, seq_id in items]
        finally:
            if not embeddings_runner:
                ctx.set_embeddings(False)


class PickResolver:
    """Finishes deferred grammar picks (_llama.Sampler.resolve) on worker
    threads, so that applying one request's grammar to the whole vocabulary
    -- about 10 ms for JSON on a 49k vocabulary, seconds for a grammar of
    deep repeats -- holds only that request, not every stream's next step.

    The engine keeps the sequence out of the steps until the token comes
    back through ``done`` (called on the worker thread).  A sampler closed
    meanwhile (the request ended) is freed when its resolve returns."""

    def __init__(self, threads: int):
        self._threads = max(1, threads)  # worker threads, started on first use
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.submitted = 0               # deferred picks handed to the workers (loop thread)

    def submit(self, sampler: "_llama.Sampler", done: Callable[[object, float], object]) -> None:
        """Resolve ``sampler``'s deferred pick, then call ``done`` with the
        token (or the exception raised) and the seconds it took."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, "runner-grammar")
        self.submitted += 1
        self._pool.submit(self._run, sampler, done)

    @staticmethod
    def _run(sampler: "_llama.Sampler", done: Callable[[object, float], object]) -> None:
        t0 = time.perf_counter()
        try:
            token = sampler.resolve()
        except Exception as exc:  # the request fails; delivered as its sampled "token"
            token = exc
        done(token, time.perf_counter() - t0)

    def close(self) -> None:
        """Wait for every resolve in progress (each holds the model)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
