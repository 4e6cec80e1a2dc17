"""Single-sequence generation straight on the binding.

This is the smallest complete use of the binding: load, tokenize, decode the
prompt in chunks of n_batch, then sample one token at a time.  The CLI's
``generate`` uses it; the engine (continuous batching, prefix cache) is the
path for concurrent requests.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator

from runner import _llama
from runner.engine.requests import CompletionOptions
from runner.engine.sampling import make_sampler, prompt_tokens_to_accept


@dataclass
class GenerationStats:
    prompt_tokens: int = 0        # tokens evaluated for the prompt
    prompt_seconds: float = 0.0   # tokenize + prompt decode time
    generated_tokens: int = 0     # tokens sampled
    generate_seconds: float = 0.0 # time from the first sampled token to the end
    done_reason: str = ""         # "stop" (end-of-generation token) or "length"
    tokens: list[int] = field(default_factory=list)  # generated token ids


def decode_prompt(ctx: _llama.Context, batch: _llama.Batch, tokens: list[int],
                  seq_id: int = 0, pos0: int = 0, chunk: int | None = None) -> int:
    """Evaluate ``tokens`` in chunks; the last token's logits are requested.
    Returns the batch index of the last token (for sampling)."""
    if not tokens:
        raise ValueError("empty prompt")
    step = min(chunk or ctx.n_batch, ctx.n_batch, batch.capacity)
    last = -1
    for start in range(0, len(tokens), step):
        part = tokens[start:start + step]
        batch.clear()
        last = batch.add_tokens(part, pos0 + start, seq_id, output_last=start + step >= len(tokens))
        ctx.decode(batch)
    return last


def generate(model: _llama.Model, ctx: _llama.Context, prompt: str,
             options: CompletionOptions, stats: GenerationStats | None = None,
             add_special: bool = True) -> Iterator[str]:
    """Yield text pieces (never a partial UTF-8 character) for ``prompt``;
    ``options.num_predict`` tokens at most (-1: until the context is full)."""
    stats = stats if stats is not None else GenerationStats()
    t0 = time.perf_counter()
    tokens = model.tokenize(prompt, add_special=add_special, parse_special=True)
    if not tokens:
        raise ValueError("the prompt is empty")
    n_ctx = ctx.n_ctx_seq
    if len(tokens) >= n_ctx:
        raise ValueError(f"prompt of {len(tokens)} tokens does not fit the context of {n_ctx}")
    ctx.seq_rm(0, -1, -1)
    n_predict = options.num_predict if options.num_predict >= 0 else n_ctx
    with _llama.Batch(ctx.n_batch) as batch, make_sampler(model, options, n_ctx) as sampler:
        # The penalties and DRY look back over the prompt too, as in the
        # engine (Engine._started); the grammar never sees it.
        n_seen = prompt_tokens_to_accept(options, n_ctx)
        for token in tokens[-n_seen:] if n_seen else ():
            sampler.accept(token)
        idx = decode_prompt(ctx, batch, tokens)
        stats.prompt_tokens = len(tokens)
        stats.prompt_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pos = len(tokens)
        stats.done_reason = "length"
        while stats.generated_tokens < n_predict:
            token = sampler.sample(ctx, idx)
            if model.is_eog(token):
                stats.done_reason = "stop"
                break
            stats.generated_tokens += 1
            stats.tokens.append(token)
            text = decoder.decode(model.token_to_piece(token))
            if text:
                yield text
            if stats.generated_tokens >= n_predict or pos + 1 >= n_ctx:
                break
            batch.clear()
            idx = batch.add(token, pos, 0, True)
            ctx.decode(batch)
            pos += 1
        tail = decoder.decode(b"", final=True)
        if tail and tail != "\ufffd":
            yield tail
        stats.generate_seconds = time.perf_counter() - t1
