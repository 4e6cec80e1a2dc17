"""Typed requests, results and errors shared by the engine and the process.

The engine never sees untyped data: the protocol layer validates wire
messages into these dataclasses (``CompletionOptions.validate`` raises
:class:`BadRequest`), and the engine reports back through :class:`Chunk` and
:class:`Final` events.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

# -- errors ----------------------------------------------------------------


class EngineError(Exception):
    """Base class; ``code`` is the protocol error code."""

    code = "internal"


class BadRequest(EngineError, ValueError):
    code = "bad_request"


class InputTooLong(EngineError, ValueError):
    code = "input_too_long"


class Busy(EngineError):
    code = "busy"


class NotReady(EngineError):
    code = "not_ready"


class Cancelled(EngineError):
    code = "cancelled"


class InternalError(EngineError):
    code = "internal"


class DeviceLost(InternalError):
    """A device holding part of the model was lost (an RPC server stopped):
    the engine cannot compute any more.  Its requests fail with this, and
    later ones are refused (NotReady) with the same message."""


# -- options ---------------------------------------------------------------

INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38   # floats reach llama.cpp as float32
MAX_STOP_STRINGS = 64                 # stop strings per request
MAX_STOP_CHARS = 1024                 # characters per stop string
MAX_SCHEMA_DEPTH = 64                 # nesting of a json_schema (objects and arrays)
MAX_TOP_LOGPROBS = 20                 # alternatives reported per token
MAX_GRAMMAR_NESTING = 256             # parentheses open at once in a grammar
MAX_DRAFT = 64                        # tokens proposed per step for speculative decoding
MAX_LORA_ENTRIES = 64                 # entries of one request's lora list
MAX_LORA_SCALE = 1e6                  # |scale| of an adapter: weights stay finite in float32
MAX_LOGIT_BIAS = 4096                 # entries of a logit_bias
MAX_DRY_BREAKERS = 64                 # DRY sequence breakers per request
DRY_BREAKER_BYTES = 40                # llama.cpp uses this many bytes of a breaker
DEFAULT_DRY_BREAKERS = ("\n", ":", "\"", "*")  # llama-server's dry_sequence_breakers

# The sampler stages a request may order with ``samplers`` (llama-server's
# names; common/sampling.cpp), each with its one-letter code, and the order
# they run in by default.
SAMPLER_STAGES = {"penalties": "e", "dry": "d", "top_n_sigma": "s", "top_k": "k", "typ_p": "y",
                  "top_p": "p", "min_p": "m", "xtc": "x", "temperature": "t", "infill": "i",
                  "adaptive_p": "a"}
DEFAULT_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                    "temperature")
MAX_SAMPLERS = 32                     # stages in one ``samplers`` list


def _sampler_aliases() -> dict[str, str]:
    """Every spelling llama-server takes for a stage: the name, with '-' for
    '_' (top-k), without '_' (topk), and nucleus / temp / typ."""
    names = {}
    for name in SAMPLER_STAGES:
        names[name] = name
        if "_" in name:
            names[name.replace("_", "-")] = name
            names[name.replace("_", "")] = name
    names.update(nucleus="top_p", temp="temperature", typ="typ_p")
    return names


_SAMPLER_NAMES = _sampler_aliases()
_SAMPLER_CODES = {code: name for name, code in SAMPLER_STAGES.items()}


@dataclass(frozen=True)
class _Number:
    """The type and range an integer or float option takes."""

    kind: type                       # int or float
    lo: float                        # smallest accepted value
    hi: float                        # largest accepted value
    lo_open: bool = False            # lo itself is refused
    least: float = 0.0               # a value other than lo must be at least this (temperature)

    def check(self, name: str, value: Any) -> None:
        if self.kind is int:
            if type(value) is not int:
                raise _bad(name, f"must be an integer, got {_show(value)}")
        elif type(value) is not float:
            raise _bad(name, f"must be a number, got {_show(value)}")
        elif value != value or value in (math.inf, -math.inf):
            raise _bad(name, f"must be a finite number, got {value}")
        if value < self.lo or (self.lo_open and value == self.lo) or value > self.hi:
            low = "(" if self.lo_open else "["
            raise _bad(name, f"must be within {low}{_num(self.lo)}, {_num(self.hi)}], "
                             f"got {_show(value)}")
        if self.least and self.lo < value < self.least:
            raise _bad(name, f"must be {_num(self.lo)} or at least {_num(self.least)}, "
                             f"got {_show(value)}")


# Every number option's type and range.  Counts are bounded by what llama.cpp
# takes (int32).  Floats are bounded so that the sampler's arithmetic stays
# finite: logits (tens) less penalties (at most 1e6 per occurrence, over at
# most 2**31 occurrences), divided by a repeat penalty and a temperature of at
# least 1e-6, stay far below the float32 maximum.  Past that, llama.cpp's
# softmax meets inf - inf and the request ended in an internal error.
PENALTY_MAX = 1e6
TEMPERATURE_LEAST = 1e-6
_NUMBERS: dict[str, _Number] = {
    "num_predict": _Number(int, -1, INT32_MAX),
    "temperature": _Number(float, 0.0, FLOAT32_MAX, least=TEMPERATURE_LEAST),
    "top_k": _Number(int, 0, INT32_MAX),
    "top_p": _Number(float, 0.0, 1.0),
    "min_p": _Number(float, 0.0, 1.0),
    "typical_p": _Number(float, 0.0, 1.0),
    "repeat_last_n": _Number(int, -1, INT32_MAX),
    "repeat_penalty": _Number(float, 1 / PENALTY_MAX, PENALTY_MAX),
    "presence_penalty": _Number(float, -PENALTY_MAX, PENALTY_MAX),
    "frequency_penalty": _Number(float, -PENALTY_MAX, PENALTY_MAX),
    "seed": _Number(int, -2**63, 2**64 - 1),
    "top_logprobs": _Number(int, 0, MAX_TOP_LOGPROBS),
    "num_keep": _Number(int, 0, INT32_MAX),
    "draft_max": _Number(int, 1, MAX_DRAFT),
    "min_keep": _Number(int, 0, INT32_MAX),
    "top_n_sigma": _Number(float, -PENALTY_MAX, PENALTY_MAX),
    "xtc_probability": _Number(float, 0.0, 1.0),
    "xtc_threshold": _Number(float, 0.0, 1.0),
    "dynatemp_range": _Number(float, 0.0, PENALTY_MAX),
    "dynatemp_exponent": _Number(float, 0.0, PENALTY_MAX),
    "mirostat": _Number(int, 0, 2),
    "mirostat_tau": _Number(float, 0.0, PENALTY_MAX),
    "mirostat_eta": _Number(float, 0.0, 1.0),
    "dry_multiplier": _Number(float, 0.0, PENALTY_MAX),
    "dry_base": _Number(float, 1.0, PENALTY_MAX),
    "dry_allowed_length": _Number(int, 0, INT32_MAX),
    "dry_penalty_last_n": _Number(int, -1, INT32_MAX),
    "adaptive_target": _Number(float, -PENALTY_MAX, 1.0),
    "adaptive_decay": _Number(float, 0.0, 0.99),
}
_FLAGS = ("logprobs", "truncate", "shift", "ignore_eos", "speculative")


def _bad(name: str, problem: str) -> BadRequest:
    return BadRequest(f"invalid option {name}: {problem}")


def _num(x: float) -> str:
    """A bound as people write it (2147483647, 3.4e+38, 0.0)."""
    return str(x) if isinstance(x, int) or abs(x) < 1e16 else f"{x:.2g}"


def _show(value: Any) -> str:
    """A short description of a refused value (never its whole repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"  # str() of a huge int may itself fail
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {text}"


def logit_bias_pairs(value: Any) -> list[tuple[int | str, float]]:
    """A ``logit_bias`` in the shapes llama-server takes, as (token id or
    text, bias) pairs; a bias of ``false`` bans the token (-inf).

    Shapes: ``[[token, bias], ...]`` where token is an id or a text, or
    ``{key: bias}`` where a key of decimal digits (or an integer key) is an
    id and any other key a text.  Texts are tokenized later (each of their
    tokens gets the bias).  Raises :class:`BadRequest` for anything else,
    where llama-server would skip the entry silently."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for i, pair in enumerate(value):
            if type(pair) not in (list, tuple) or len(pair) != 2:
                raise _bad("logit_bias", f"item {i} must be a [token, bias] pair, got {_show(pair)}")
            items.append((pair[0], pair[1]))
    else:
        raise _bad("logit_bias", "must be a map of tokens to biases or a list of [token, bias] "
                                 f"pairs, got {_show(value)}")
    if len(items) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(items)}")
    pairs: list[tuple[int | str, float]] = []
    for key, bias in items:
        if type(key) is str and key.isascii() and key.isdigit():
            key = int(key)
        if type(key) is int:
            if not 0 <= key <= INT32_MAX:
                raise _bad("logit_bias", f"token id {_show(key)} is not a token id")
        elif type(key) is str:
            if not key:
                raise _bad("logit_bias", "a token text must not be empty")
            if len(key) > MAX_STOP_CHARS:
                raise _bad("logit_bias", f"a token text has {len(key)} characters; "
                                         f"at most {MAX_STOP_CHARS}")
        else:
            raise _bad("logit_bias", f"a token must be an id or a text, got {_show(key)}")
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, (int, float)) and not isinstance(bias, bool):
            bias = float(bias)
            if not -PENALTY_MAX <= bias <= PENALTY_MAX:
                raise _bad("logit_bias", f"bias of {_show(key)} must be false or within "
                                         f"[-{_num(PENALTY_MAX)}, {_num(PENALTY_MAX)}], got {_show(bias)}")
        else:
            raise _bad("logit_bias", f"bias of {_show(key)} must be a number or false, got {_show(bias)}")
        pairs.append((key, bias))
    return pairs


def sampler_order(value: Any) -> tuple[str, ...]:
    """A ``samplers`` value as llama-server takes it -- a list of stage names
    (any case; ``top-k``, ``topk``, ``nucleus``, ``temp``, ``typ`` spellings
    too) or a string of one-letter codes (``"edskypmxt"``) -- as canonical
    names in order.  An unknown name or code is a :class:`BadRequest` (where
    llama-server would skip it with a warning)."""
    if type(value) is str:
        if len(value) > MAX_SAMPLERS:
            raise _bad("samplers", f"at most {MAX_SAMPLERS} stages, got {len(value)}")
        unknown = [c for c in value if c not in _SAMPLER_CODES]
        if unknown:
            raise _bad("samplers", f"unknown stage code {unknown[0]!r}; codes: "
                                   f"{''.join(SAMPLER_STAGES.values())}")
        return tuple(_SAMPLER_CODES[c] for c in value)
    if type(value) is not list:
        raise _bad("samplers", f"must be a list of stage names or a string of stage codes, "
                               f"got {_show(value)}")
    if len(value) > MAX_SAMPLERS:
        raise _bad("samplers", f"at most {MAX_SAMPLERS} stages, got {len(value)}")
    names = []
    for i, item in enumerate(value):
        name = _SAMPLER_NAMES.get(item.lower()) if type(item) is str else None
        if name is None:
            raise _bad("samplers", f"item {i}: unknown stage {_show(item)}; stages: "
                                   f"{', '.join(SAMPLER_STAGES)}")
        names.append(name)
    return tuple(names)


def _check_schema(schema: Any) -> None:
    """A json_schema is JSON data: an object at the top, string keys, finite
    numbers, at most MAX_SCHEMA_DEPTH levels (walked without recursion, so a
    deep one is refused here rather than as a RecursionError later)."""
    if type(schema) is not dict:
        raise _bad("json_schema", f"must be a JSON schema object ({{}} for any JSON object), "
                                  f"got {_show(schema)}")
    stack: list[tuple[Any, int, str]] = [(schema, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        kind = type(value)
        if kind is dict or kind is list:
            if depth > MAX_SCHEMA_DEPTH:
                raise _bad("json_schema", f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
            if kind is dict:
                for key, item in value.items():
                    if type(key) is not str:
                        raise _bad("json_schema", f"at '{where or '/'}': key {_show(key)} is not a string")
                    stack.append((item, depth + 1, f"{where}/{key[:40]}"))
            else:
                stack.extend((item, depth + 1, f"{where}/{i}") for i, item in enumerate(value))
        elif kind is float:
            if value != value or value in (math.inf, -math.inf):
                raise _bad("json_schema", f"at '{where}': {value} is not a JSON number")
        elif not (value is None or kind is str or kind is bool or kind is int):
            raise _bad("json_schema", f"at '{where}': {_show(value)} is not JSON data")


def _check_lora(value: Any) -> None:
    """The shape of a ``lora`` option, llama-server's ``[{id, scale}, ...]``
    (ids are checked against the loaded adapters by runner.engine.lora.resolve)."""
    if type(value) is not list:
        raise _bad("lora", f"must be a list of {{id, scale}} maps, got {_show(value)}")
    if len(value) > MAX_LORA_ENTRIES:
        raise _bad("lora", f"at most {MAX_LORA_ENTRIES} entries, got {len(value)}")
    for i, entry in enumerate(value):
        if type(entry) is not dict:
            raise _bad("lora", f"item {i} must be a map {{id, scale}}, got {_show(entry)}")
        unknown = sorted(str(k)[:32] for k in entry if k not in ("id", "scale"))
        if unknown:
            raise _bad("lora", f"item {i} has unknown field(s): {', '.join(unknown)}")
        if type(entry.get("id")) is not int:
            raise _bad("lora", f"item {i} needs an integer id, got {_show(entry.get('id'))}")
        scale = entry.get("scale", 0.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise _bad("lora", f"item {i}: scale must be a number, got {_show(scale)}")
        if not (math.isfinite(scale) and abs(scale) <= MAX_LORA_SCALE):
            raise _bad("lora", f"item {i}: scale must be finite and within "
                               f"[-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}], got {_show(scale)}")


# The parts of a GBNF text that can hold a parenthesis or a brace without
# being one: comments, string literals and character classes (an unterminated
# one runs to the end); then the parentheses and the {m,n} repetitions.
_GBNF_SCAN = re.compile(r'#[^\n]*|"(?:\\.|[^"\\])*"?|\[(?:\\.|[^\]\\])*\]?|[()]'
                        r'|\{\s*(\d+)\s*,\s*(\d+)\s*\}', re.S)


def grammar_problem(grammar: str) -> str | None:
    """Why llama.cpp's grammar parser must not be given ``grammar``, or None.

    * Groups nested deeper than MAX_GRAMMAR_NESTING: the parser recurses once
      per level, so a deep enough one overflows the thread's stack (20,000
      levels did on an 8 MiB stack).
    * A repetition ``{m,n}`` with n < m: the parser computes n - m unsigned
      and adds that many rules (llama-grammar.cpp, handle_repetitions), until
      the process runs out of memory.  A JSON schema whose maxItems or
      maxLength is below its minimum converts to one.
    """
    depth = deepest = 0
    for m in _GBNF_SCAN.finditer(grammar):
        token = m.group()
        if token == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif token == ")":
            depth -= 1
        elif m.group(1) is not None and int(m.group(2)) < int(m.group(1)):
            return f"repetition {token} has a maximum below its minimum"
    if deepest > MAX_GRAMMAR_NESTING:
        return f"groups nested deeper than {MAX_GRAMMAR_NESTING} levels"
    return None


@dataclass
class CompletionOptions:
    """Per-request sampling and stopping options (Ollama's option names, which
    are llama-server's where both have one; the stages only llama-server
    offers under its names).

    :meth:`validate` checks every field's type and range; the ranges are in
    ``_NUMBERS`` and documented in docs/protocol.md.
    """

    num_predict: int = -1            # tokens to generate; -1 = until the slot is full / stop
    temperature: float = 0.8         # <= 0: greedy
    top_k: int = 40                  # 0 disables
    top_p: float = 0.9               # 1.0 disables
    min_p: float = 0.0               # 0.0 disables
    typical_p: float = 1.0           # 1.0 disables
    repeat_last_n: int = 64          # penalty window; 0 disables penalties, -1 = slot size
    repeat_penalty: float = 1.1      # 1.0 disables
    presence_penalty: float = 0.0    # subtracted from the logit of every token seen in the window
    frequency_penalty: float = 0.0   # subtracted once per occurrence in the window
    seed: int = -1                   # negative: random; else taken modulo 2**32
    stop: list[str] = field(default_factory=list)  # stop strings (not returned)
    grammar: str | None = None       # GBNF grammar; None or "" = none
    json_schema: dict | None = None  # JSON schema (converted to a grammar); {} = any JSON object
    logprobs: bool = False           # return the sampled token's log-probability
    top_logprobs: int = 0            # and this many alternatives (0..20)
    num_keep: int = 4                # inputs kept at the front on truncate / shift
    truncate: bool = False           # cut a too-long prompt instead of failing
    shift: bool = True               # shift the context when generation fills the slot
    ignore_eos: bool = False         # keep generating past end-of-generation tokens (benchmarks)
    speculative: bool = False        # propose tokens by prompt lookup; the model verifies them (runner.engine.speculative)
    draft_max: int = 16              # most tokens proposed per step when speculative
    lora: list | None = None         # [{id, scale}]: adapter scales (runner.engine.lora); None: the load's
    # The other stages of llama.cpp's sampler chain, with llama-server's names and meaning
    # (docs/protocol.md, "Sampling"):
    min_keep: int = 0                # top_p, min_p, typical_p and xtc keep at least this many
    top_n_sigma: float = -1.0        # keep logits within n standard deviations of the top; <= 0: off
    xtc_probability: float = 0.0     # chance that XTC removes the top choices; 0: off
    xtc_threshold: float = 0.1       # XTC removes choices above this probability; > 0.5: off
    dynatemp_range: float = 0.0      # temperature varies by entropy within +- this; 0: off
    dynatemp_exponent: float = 1.0   # how entropy maps to the dynamic temperature
    mirostat: int = 0                # 1: Mirostat, 2: Mirostat 2.0 (replaces the stages); 0: off
    mirostat_tau: float = 5.0        # Mirostat's target surprise
    mirostat_eta: float = 0.1        # Mirostat's learning rate
    dry_multiplier: float = 0.0      # DRY repetition penalty multiplier; 0: off
    dry_base: float = 1.75           # DRY penalty base (>= 1)
    dry_allowed_length: int = 2      # repeats up to this long are not penalised by DRY
    dry_penalty_last_n: int = 64     # DRY's window; -1 = slot size, 0: off
    dry_sequence_breakers: list[str] = field(default_factory=lambda: list(DEFAULT_DRY_BREAKERS))  # end a DRY match
    adaptive_target: float = -1.0    # adaptive-p: pick tokens near this probability; < 0: off
    adaptive_decay: float = 0.9      # adaptive-p's moving-average decay
    logit_bias: dict | list | None = None  # token id or text -> bias (false: banned); see logit_bias_pairs
    samplers: list[str] | str | None = None  # stage order (names or codes); None: DEFAULT_SAMPLERS
    backend_sampling: bool | None = None  # sample inside the decode graph if the chain allows (sampling.in_graph); None: the load's

    def validate(self) -> "CompletionOptions":
        """Check every field; raises :class:`BadRequest` naming the first bad one."""
        for name, spec in _NUMBERS.items():
            spec.check(name, getattr(self, name))
        for name in _FLAGS:
            if type(getattr(self, name)) is not bool:
                raise _bad(name, f"must be a boolean, got {_show(getattr(self, name))}")
        stop = self.stop
        if type(stop) is not list:
            raise _bad("stop", f"must be a list of strings, got {_show(stop)}")
        if len(stop) > MAX_STOP_STRINGS:
            raise _bad("stop", f"at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        for i, s in enumerate(stop):
            if type(s) is not str or not s:
                raise _bad("stop", f"item {i} must be a non-empty string, got {_show(s)}")
            if len(s) > MAX_STOP_CHARS:
                raise _bad("stop", f"item {i} has {len(s)} characters; at most {MAX_STOP_CHARS}")
        breakers = self.dry_sequence_breakers
        if type(breakers) is not list or not breakers:
            raise _bad("dry_sequence_breakers", f"must be a non-empty list of strings, got {_show(breakers)}")
        if len(breakers) > MAX_DRY_BREAKERS:
            raise _bad("dry_sequence_breakers", f"at most {MAX_DRY_BREAKERS} strings, got {len(breakers)}")
        for i, s in enumerate(breakers):
            if type(s) is not str or not s or "\0" in s:
                raise _bad("dry_sequence_breakers", f"item {i} must be a non-empty string without NUL, "
                                                    f"got {_show(s)}")
            if len(s) > MAX_STOP_CHARS:
                raise _bad("dry_sequence_breakers", f"item {i} has {len(s)} characters; "
                                                    f"at most {MAX_STOP_CHARS}")
        if self.logit_bias is not None:
            logit_bias_pairs(self.logit_bias)
        if self.samplers is not None:
            sampler_order(self.samplers)
        if self.backend_sampling is not None and type(self.backend_sampling) is not bool:
            raise _bad("backend_sampling", f"must be a boolean or nil, got {_show(self.backend_sampling)}")
        if self.grammar is not None and type(self.grammar) is not str:
            raise _bad("grammar", f"must be a GBNF grammar string, got {_show(self.grammar)}")
        problem = grammar_problem(self.grammar) if self.grammar else None
        if problem:
            raise _bad("grammar", problem)
        if self.lora is not None:
            _check_lora(self.lora)
        if self.json_schema is not None:
            _check_schema(self.json_schema)
            if self.grammar:
                raise BadRequest("invalid options: give either grammar or json_schema, not both")
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "CompletionOptions":
        """Build from a plain mapping (a request's ``options``): unknown names
        are refused, integers become floats where a float is expected, a lone
        stop string becomes a list, None means the default; then validated."""
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise BadRequest(f"options must be a map of option names to values, got {_show(values)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k)[:64] for k in values if k not in known)
        if unknown:
            raise BadRequest(f"unknown option(s): {', '.join(unknown)}")
        out = cls()
        for name, value in values.items():
            if value is None:
                continue  # the default
            spec = _NUMBERS.get(name)
            if spec is not None and not isinstance(value, bool):
                if spec.kind is float and isinstance(value, numbers.Real) and not isinstance(value, float):
                    value = _to_float(name, value)
                elif spec.kind is int and isinstance(value, numbers.Integral) and type(value) is not int:
                    value = int(value)  # numpy integers
                elif spec.kind is float and type(value) is not float and isinstance(value, float):
                    value = float(value)  # numpy float64
            if name == "stop" and isinstance(value, str):
                value = [value]
            setattr(out, name, value)
        return out.validate()


def _to_float(name: str, value: numbers.Real) -> float:
    try:
        return float(value)
    except OverflowError:
        raise _bad(name, f"must be within the float32 range, got {_show(value)}") from None


@dataclass
class CompletionRequest:
    """One completion: a prompt (text or token ids) plus options."""

    prompt: str | list[int]                 # text (special tokens parsed) or token ids
    options: CompletionOptions = field(default_factory=CompletionOptions)
    add_special: bool = True                # add BOS as the model asks (text prompts)
    id: str | None = None                   # caller's id (echoed in events)
    media: list = field(default_factory=list)  # runner.engine.media.MediaItem placed by [img-N] / marker


@dataclass
class Chunk:
    """A piece of generated text (never a partial UTF-8 character)."""

    text: str                                # text to append to the output
    tokens: list[int]                        # tokens that produced it
    logprobs: list[dict] | None = None       # per token: {token, text, logprob, top: [...]}


@dataclass
class Final:
    """The last event of a completion."""

    done_reason: str                 # stop | length | cancelled | error
    prompt_eval_count: int = 0       # prompt inputs evaluated (not counting cached ones)
    prompt_eval_duration: float = 0.0  # seconds: tokenize + prompt decode
    eval_count: int = 0              # tokens generated
    eval_duration: float = 0.0       # seconds from the first generated token to the end
    cached_count: int = 0            # prompt inputs reused from the slot's KV cache
    prompt_count: int = 0            # prompt inputs in total
    slot: int = -1                   # slot (sequence id) the request ran in
    error: str | None = None         # message when done_reason == "error"
    error_code: str | None = None    # protocol code of that error
    message: Any = None              # chat requests: runner.process.chatparse.ChatMessage
    draft_proposed: int = 0          # speculative: tokens proposed and verified
    draft_accepted: int = 0          # of those, accepted (the target model sampled the same token)


@dataclass
class EmbeddingResult:
    embedding: list[float] | Any     # numpy float32 array (copied out of llama.cpp)
    prompt_eval_count: int           # tokens evaluated
