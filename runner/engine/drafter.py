"""A draft model: a small model with the target's vocabulary proposes the
tokens that speculative requests verify (load field ``draft_model``).

The drafter owns the draft model, its context and batch (loop thread only).
Each of its sequences mirrors the target slot of the same id: before
drafting, the draft context is brought to exactly what the target slot holds
plus the pending token (the common prefix kept, the rest removed and decoded
again), then the draft model continues greedily for the number of tokens the
scheduler gave the entry (``Scheduled.draft_limit``), one decode per token
for all drafting sequences together.  Greedy drafting makes the proposal a
function of the text so far, fixed before the target draws, so the engine's
acceptance rule stays exact (docs/design.md, "Speculative decoding").

A drafter failure never fails a request: that step verifies no proposals and
the draft sequences involved are emptied.
"""

from __future__ import annotations

import logging

from runner import _llama
from runner.engine.requests import BadRequest
from runner.engine.scheduler import Scheduled, StepPlan
from runner.engine.slots import common_prefix

log = logging.getLogger("runner.engine")


def check_vocabulary(target: _llama.Model, draft: _llama.Model, draft_path: str) -> None:
    """Refuse a draft model whose vocabulary is not the target's: the same
    size and the same text for every token id."""
    if draft.n_vocab != target.n_vocab:
        raise BadRequest(f"draft_model {draft_path}: its vocabulary has {draft.n_vocab} tokens, "
                         f"the model's {target.n_vocab}; a draft model needs the same vocabulary")
    for tok in range(target.n_vocab):
        a = target.token_to_piece(tok, special=True)
        b = draft.token_to_piece(tok, special=True)
        if a != b:
            raise BadRequest(f"draft_model {draft_path}: token {tok} is "
                             f"{a.decode('utf-8', 'replace')!r} in the model and "
                             f"{b.decode('utf-8', 'replace')!r} in the draft model; a draft model "
                             f"needs the same vocabulary")


class Drafter:
    """Greedy proposals of a draft model for a step's speculating entries."""

    def __init__(self, model: _llama.Model, ctx: _llama.Context):
        self.model = model                       # the draft model (owned)
        self.ctx = ctx                           # its context: one sequence per target slot (owned)
        self.batch = _llama.Batch(ctx.n_batch)   # rewritten for every draft decode
        self.held: dict[int, list[int]] = {}     # slot id -> tokens in the draft context's sequence

    @classmethod
    def load(cls, path: str, target: _llama.Model, *, n_ctx: int, n_batch: int, parallel: int,
             n_threads: int | None, n_gpu_layers: int, kv_unified: bool) -> "Drafter":
        """Load ``path``, check its vocabulary against ``target`` and make its
        context (as many cells and sequences as the target's)."""
        model = _llama.Model(path, n_gpu_layers=n_gpu_layers)
        ctx = None
        try:
            check_vocabulary(target, model, path)
            ctx = _llama.Context(model, n_ctx=n_ctx, n_batch=n_batch, n_seq_max=parallel,
                                 n_threads=n_threads, kv_unified=kv_unified)
            return cls(model, ctx)
        except BaseException:
            if ctx is not None:
                ctx.close()
            model.close()
            raise

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.model.close()

    def fill(self, plan: StepPlan) -> None:
        """Give every entry with a ``draft_limit`` its proposal."""
        entries = [e for e in plan.entries if e.draft_limit > 0]
        if not entries:
            return
        try:
            drafts = self._draft(entries)
        except (_llama.LlamaError, ValueError) as exc:
            log.warning("draft model failed; this step verifies no proposals: %s", exc)
            for e in entries:
                self._forget(e.seq.slot.id)
            return
        for e, draft in zip(entries, drafts):
            e.draft = draft
            e.n_inputs = 1 + len(draft)

    def _forget(self, seq_id: int) -> None:
        self.ctx.seq_rm(seq_id, 0, -1)
        self.held[seq_id] = []

    def _draft(self, entries: list[Scheduled]) -> list[list[int]]:
        ctx, batch = self.ctx, self.batch
        argmax = _llama.argmax
        drafts: list[list[int]] = [[] for _ in entries]
        # 1. Bring each draft sequence to the target slot plus the pending
        #    token; the last token's logits give the first proposal.
        pending: list[tuple[int, list[int], int]] = []  # (entry index, tokens to decode, first position)
        for i, e in enumerate(entries):
            sid = e.seq.slot.id
            history = [*e.seq.slot.inputs, e.seq.next_token]
            held = self.held.get(sid, [])
            keep = min(common_prefix(held, history), len(history) - 1)
            if keep < len(held):
                if not ctx.seq_rm(sid, keep, -1):
                    ctx.seq_rm(sid, 0, -1)
                    keep = 0
            self.held[sid] = history[:keep]
            pending.append((i, history[keep:], keep))
        while pending:
            batch.clear()
            rows: list[tuple[int, int]] = []  # (entry index, output row) of sequences finished here
            rest = []
            room = ctx.n_batch
            for i, tokens, pos in pending:
                if room <= 0:
                    rest.append((i, tokens, pos))
                    continue
                take = tokens[:room]
                sid = entries[i].seq.slot.id
                last = batch.add_tokens(take, pos, sid, output_last=len(take) == len(tokens))
                self.held[sid].extend(take)
                room -= len(take)
                if len(take) == len(tokens):
                    rows.append((i, last))
                else:
                    rest.append((i, tokens[len(take):], pos + len(take)))
            ctx.decode(batch)
            for i, row in rows:
                drafts[i].append(argmax(ctx.logits(row)))
            pending = rest
        # 2. Continue greedily, one token per drafting sequence per decode.
        going = [i for i, e in enumerate(entries) if len(drafts[i]) < e.draft_limit]
        while going:
            batch.clear()
            rows = []
            for i in going:
                sid = entries[i].seq.slot.id
                tok = drafts[i][-1]
                rows.append((i, batch.add(tok, len(self.held[sid]), sid, True)))
                self.held[sid].append(tok)
            ctx.decode(batch)
            for i, row in rows:
                drafts[i].append(argmax(ctx.logits(row)))
            going = [i for i in going if len(drafts[i]) < entries[i].draft_limit]
        return drafts
