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


@dataclass
class SamplingOptions:
    temperature: float = 0.8      # <= 0 means greedy
    top_k: int = 40               # 0 disables
    top_p: float = 0.9            # 1.0 disables
    min_p: float = 0.0            # 0.0 disables
    typical_p: float = 1.0        # 1.0 disables
    repeat_last_n: int = 64       # tokens the penalties look back over
    repeat_penalty: float = 1.0   # 1.0 disables
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None       # None picks a random seed
    grammar: str | None = None    # GBNF text constraining the output

    def make_sampler(self, model: _llama.Model) -> _llama.Sampler:
        return _llama.Sampler(
            model, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            min_p=self.min_p, typical_p=self.typical_p, repeat_last_n=self.repeat_last_n,
            repeat_penalty=self.repeat_penalty, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, seed=self.seed, grammar=self.grammar)


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


def generate(model: _llama.Model, ctx: _llama.Context, prompt: str, n_predict: int,
             options: SamplingOptions, stats: GenerationStats | None = None,
             add_special: bool = True) -> Iterator[str]:
    """Yield text pieces (never a partial UTF-8 character) for ``prompt``."""
    stats = stats if stats is not None else GenerationStats()
    t0 = time.perf_counter()
    tokens = model.tokenize(prompt, add_special=add_special, parse_special=True)
    if not tokens:
        raise ValueError("the prompt is empty")
    n_ctx = ctx.n_ctx_seq
    if len(tokens) >= n_ctx:
        raise ValueError(f"prompt of {len(tokens)} tokens does not fit the context of {n_ctx}")
    ctx.seq_rm(0, -1, -1)
    with _llama.Batch(ctx.n_batch) as batch, options.make_sampler(model) as sampler:
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
