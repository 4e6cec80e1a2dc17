"""Per-request sampler construction and log-probabilities."""

from __future__ import annotations

import numpy as np

from runner import _llama
from runner.engine import limits
from runner.engine.grammar import JSON_GBNF, json_schema_to_gbnf
from runner.engine.requests import (DEFAULT_SAMPLERS, BadRequest, CompletionOptions, grammar_problem,
                             logit_bias_pairs, sampler_order)


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
        grammar = json_schema_to_gbnf(options.json_schema)
    except ValueError as exc:
        raise BadRequest(f"invalid option json_schema: {exc}") from exc
    problem = grammar_problem(grammar)
    if problem:  # e.g. maxItems below minItems
        raise BadRequest(f"invalid option json_schema: the grammar made from it: {problem}")
    return grammar


def _penalties_on(o: CompletionOptions) -> bool:
    return o.repeat_last_n != 0 and (o.repeat_penalty != 1.0 or o.frequency_penalty != 0.0
                                     or o.presence_penalty != 0.0)


def _dry_on(o: CompletionOptions) -> bool:
    return o.dry_multiplier != 0.0 and o.dry_penalty_last_n != 0


def _xtc_on(o: CompletionOptions) -> bool:
    return o.xtc_probability > 0.0 and o.xtc_threshold <= 0.5


def _window(n: int, slot_ctx: int) -> int:
    """A penalty window (-1: the slot) capped at the slot: a longer one sees
    nothing more, and llama.cpp allocates (and zeroes) the whole window up
    front (2**31 tokens took 8 GiB)."""
    return slot_ctx if n == -1 else min(n, slot_ctx)


def prompt_tokens_to_accept(options: CompletionOptions, slot_ctx: int) -> int:
    """How many trailing prompt tokens the sampler must see before the first
    pick: the widest window of a stage that looks back (penalties, DRY), 0
    when none does.  (The grammar never sees the prompt.)"""
    n = 0
    if _penalties_on(options):
        n = _window(options.repeat_last_n, slot_ctx)
    if _dry_on(options) and options.mirostat == 0:
        n = max(n, _window(options.dry_penalty_last_n, slot_ctx))
    return n


def _plain(o: CompletionOptions, order: tuple[str, ...]) -> bool:
    """Whether the request needs only the stages of the keyword chain
    (logit bias, penalties, top-k, top-p, min-p, temperature, draw) in
    llama-server's default order: then the binding's native chain can serve
    it."""
    return (order == DEFAULT_SAMPLERS and o.mirostat == 0
            and not _dry_on(o) and not _xtc_on(o) and o.top_n_sigma <= 0.0
            and not 0.0 < o.typical_p < 1.0 and o.dynatemp_range == 0.0 and o.min_keep <= 1)


MAX_GRAPH_MIN_P = 0.999  # min-p from here up samples on the CPU (see in_graph)


def in_graph(o: CompletionOptions) -> bool:
    """Whether a request's chain can run inside the decode graph
    (EngineConfig.backend_sampling; _llama.Sampler.attach): only the keyword
    chain's stages, each of which llama.cpp can build into a graph; no
    grammar (it is checked on the CPU); no log-probabilities (the graph hands
    back the token, not the row); and one output per step (no speculative
    proposals to verify).  A min-p of 0.999 or more stays on the CPU too:
    the graph's min-p keeps only logits strictly above its threshold, and a
    threshold within rounding of the largest logit (min-p 1, or nearly) drops
    every token, so that the draw picks an arbitrary one (llama.cpp
    0c1e57098, llama_sampler_min_p_backend_apply)."""
    order = DEFAULT_SAMPLERS if o.samplers is None else sampler_order(o.samplers)
    return (_plain(o, order) and not o.grammar and o.json_schema is None and not o.logprobs
            and not o.top_logprobs and not o.speculative and o.min_p < MAX_GRAPH_MIN_P)


def resolve_logit_bias(model: _llama.Model, value) -> list[tuple[int, float]]:
    """(token id, bias) pairs for a request's ``logit_bias``: texts become
    every token of their tokenization (no BOS, special-token text kept as
    text), as in llama-server; an id outside the vocabulary is refused."""
    out = []
    for key, bias in logit_bias_pairs(value):
        if isinstance(key, str):
            out.extend((tok, bias) for tok in model.tokenize(key))
        elif key >= model.n_vocab:
            raise BadRequest(f"invalid option logit_bias: token id {key} is outside the "
                             f"vocabulary [0, {model.n_vocab})")
        else:
            out.append((key, bias))
    return out


def sampler_stages(options: CompletionOptions, slot_ctx: int,
                   biases: list[tuple[int, float]]) -> list[tuple]:
    """The explicit chain (see _llama.Sampler's ``stages``) that llama-server
    builds for these options (common/sampling.cpp): logit bias; then either
    temperature and Mirostat, or the stages of ``samplers`` in its order
    followed by the draw (adaptive-p when listed, greedy at temperature <=
    0).  A stage whose options turn it off is left out, as the native chain
    and the keyword chain leave it out."""
    o = options
    stages: list[tuple] = [("logit_bias", biases)] if biases else []
    if o.mirostat:
        stages.append(("temp", o.temperature, 0.0, 1.0))
        if o.mirostat == 1:
            stages.append(("mirostat", o.mirostat_tau, o.mirostat_eta, 100))
        else:
            stages.append(("mirostat_v2", o.mirostat_tau, o.mirostat_eta))
        return stages
    order = DEFAULT_SAMPLERS if o.samplers is None else sampler_order(o.samplers)
    adaptive = False
    for name in order:
        if name == "penalties" and _penalties_on(o):
            stages.append(("penalties", _window(o.repeat_last_n, slot_ctx), o.repeat_penalty,
                           o.frequency_penalty, o.presence_penalty))
        elif name == "dry" and _dry_on(o):
            stages.append(("dry", o.dry_multiplier, o.dry_base, o.dry_allowed_length,
                           _window(o.dry_penalty_last_n, slot_ctx), o.dry_sequence_breakers))
        elif name == "top_n_sigma" and o.top_n_sigma > 0.0:
            stages.append(("top_n_sigma", o.top_n_sigma))
        elif name == "top_k" and o.top_k > 0:
            stages.append(("top_k", o.top_k))
        elif name == "typ_p" and 0.0 < o.typical_p < 1.0:
            stages.append(("typical", o.typical_p, o.min_keep))
        elif name == "top_p" and 0.0 < o.top_p < 1.0:
            stages.append(("top_p", o.top_p, o.min_keep))
        elif name == "min_p" and o.min_p > 0.0:
            stages.append(("min_p", o.min_p, o.min_keep))
        elif name == "xtc" and _xtc_on(o):
            stages.append(("xtc", o.xtc_probability, o.xtc_threshold, o.min_keep))
        elif name == "temperature":
            stages.append(("temp", o.temperature, o.dynatemp_range, o.dynatemp_exponent))
        elif name == "infill":
            stages.append(("infill",))
        elif name == "adaptive_p":
            adaptive = True
    if adaptive:
        stages.append(("adaptive_p", o.adaptive_target, o.adaptive_decay))
    elif o.temperature <= 0.0 and o.dynatemp_range == 0.0 and "temperature" in order:
        stages.append(("greedy",))  # the temperature stage left one token
    else:
        stages.append(("dist",))
    return stages


def make_sampler(model: _llama.Model, options: CompletionOptions, slot_ctx: int,
                 native: bool = True) -> _llama.Sampler:
    """Build the sampler chain for one request (``native``: the binding's
    one-pass chain where the options allow it; see _llama.Sampler)."""
    order = DEFAULT_SAMPLERS if options.samplers is None else sampler_order(options.samplers)
    grammar = grammar_for(options)
    sampler = _sampler(model, options, order, slot_ctx, native, grammar)
    if grammar:
        cost = sampler.grammar_check_seconds(limits.MAX_GRAMMAR_CHECK_S)
        if cost > limits.MAX_GRAMMAR_CHECK_S:
            sampler.close()
            raise BadRequest(
                f"invalid option {_grammar_field(options)}: checking the vocabulary against its "
                f"grammar would take about {cost:.1f} s for each token the model's first choice "
                f"breaks (limit {limits.MAX_GRAMMAR_CHECK_S:g} s), and the request would wait that "
                f"long for each; many optional or repeated items in a row cost the most")
    return sampler


def _grammar_field(options: CompletionOptions) -> str:
    """The option a request's grammar came from, for its errors."""
    return "grammar" if options.grammar else "json_schema"


def _sampler(model: _llama.Model, options: CompletionOptions, order: list[str], slot_ctx: int,
             native: bool, grammar: str | None) -> _llama.Sampler:
    """The sampler for ``options`` with ``grammar`` (GBNF or None): the
    keyword chain (native where ``native`` and the stages allow) when the
    options need only its stages in the default order, else the explicit
    stage list; llama.cpp's refusals become BadRequest naming the option."""
    seed = None if options.seed < 0 else options.seed
    biases = resolve_logit_bias(model, options.logit_bias) if options.logit_bias is not None else []
    try:
        if _plain(options, order):
            summed: dict[int, float] = {}  # a token named twice (as an id and in a text) gets both
            for tok, bias in biases:
                summed[tok] = summed.get(tok, 0.0) + bias
            return _llama.Sampler(
                model, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                min_p=options.min_p, typical_p=options.typical_p,
                repeat_last_n=_window(options.repeat_last_n, slot_ctx),
                repeat_penalty=options.repeat_penalty, frequency_penalty=options.frequency_penalty,
                presence_penalty=options.presence_penalty, seed=seed, grammar=grammar, native=native,
                logit_bias=summed or None)
        stages = sampler_stages(options, slot_ctx, biases)
        return _llama.Sampler(model, seed=seed, grammar=grammar, stages=stages)
    except _llama.GrammarError as exc:  # llama.cpp's parser refused it (a converted schema too)
        raise BadRequest(f"invalid option {_grammar_field(options)}: {exc}") from exc
    except _llama.SamplerError as exc:  # the DRY stage's search of the vocabulary threw
        raise BadRequest(f"invalid option dry_sequence_breakers: {exc}") from exc


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
