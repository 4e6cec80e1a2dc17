"""Per-request sampler construction and log-probabilities."""

from __future__ import annotations

import numpy as np

from runner import _llama, limits
from runner.grammar import JSON_GBNF, json_schema_to_gbnf
from runner.requests import BadRequest, CompletionOptions


def grammar_for(options: CompletionOptions) -> str | None:
    """The GBNF grammar a request asks for: explicit, from a JSON schema, or none.
    An empty schema ({}) means "any JSON object", like Ollama's format: json."""
    if options.grammar:
        limits.utf8("invalid option grammar: the grammar", options.grammar, limits.MAX_GRAMMAR_BYTES)
        return options.grammar
    if options.json_schema is None:
        return None
    if not options.json_schema:
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(options.json_schema)
    except ValueError as exc:
        raise BadRequest(f"invalid option json_schema: unsupported schema: {exc}") from exc
    except RecursionError:  # a long $ref chain: the depth check in validate() cannot see it
        raise BadRequest("invalid option json_schema: references or nesting too deep") from None


def make_sampler(model: _llama.Model, options: CompletionOptions, slot_ctx: int,
                 native: bool = True) -> _llama.Sampler:
    """Build the sampler chain for one request (``native``: the binding's
    one-pass chain where the options allow it; see _llama.Sampler)."""
    # A window longer than the slot sees nothing more, and llama.cpp allocates
    # (and zeroes) the whole window up front: 2**31 tokens took 8 GiB.
    last_n = slot_ctx if options.repeat_last_n == -1 else min(options.repeat_last_n, slot_ctx)
    try:
        return _llama.Sampler(
            model, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
            min_p=options.min_p, typical_p=options.typical_p, repeat_last_n=last_n,
            repeat_penalty=options.repeat_penalty, frequency_penalty=options.frequency_penalty,
            presence_penalty=options.presence_penalty,
            seed=None if options.seed < 0 else options.seed, grammar=grammar_for(options),
            native=native)
    except _llama.GrammarError as exc:
        raise BadRequest(f"invalid option grammar: {exc}") from exc


def logprob_entry(model: _llama.Model, logits: np.ndarray, token: int, top_n: int) -> dict:
    """Log-probability of ``token`` under the raw logits, plus the ``top_n`` best.

    Computed from the model's distribution before sampler transformations
    (temperature, penalties), as OpenAI-style APIs report it.
    """
    peak = float(logits.max())
    log_z = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    entry = {"token": int(token), "logprob": float(logits[token]) - log_z}
    if top_n > 0:
        best = np.argpartition(logits, -top_n)[-top_n:]
        best = best[np.argsort(logits[best])[::-1]]
        entry["top"] = [{"token": int(t), "logprob": float(logits[t]) - log_z,
                         "text": model.token_to_piece(int(t)).decode("utf-8", "replace")}
                        for t in best]
    return entry
