"""Typed requests, results and errors shared by the engine and the process.

The engine never sees untyped data: the protocol layer validates wire
messages into these dataclasses (``CompletionOptions.validate`` raises
:class:`BadRequest`), and the engine reports back through :class:`Chunk` and
:class:`Final` events.
"""

from __future__ import annotations

import dataclasses
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


# -- options ---------------------------------------------------------------


@dataclass
class CompletionOptions:
    """Per-request sampling and stopping options (Ollama's option names)."""

    num_predict: int = -1            # tokens to generate; -1 = until the slot is full / stop
    temperature: float = 0.8         # <= 0: greedy
    top_k: int = 40                  # 0 disables
    top_p: float = 0.9               # 1.0 disables
    min_p: float = 0.0               # 0.0 disables
    typical_p: float = 1.0           # 1.0 disables
    repeat_last_n: int = 64          # penalty window; 0 disables penalties, -1 = slot size
    repeat_penalty: float = 1.1      # 1.0 disables
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1                   # -1: random
    stop: list[str] = field(default_factory=list)  # stop strings (not returned)
    grammar: str | None = None       # GBNF grammar
    json_schema: dict | None = None  # JSON schema (converted to a grammar); {} = any JSON object
    logprobs: bool = False           # return the sampled token's log-probability
    top_logprobs: int = 0            # and this many alternatives (0..20)
    num_keep: int = 4                # inputs kept at the front on truncate / shift
    truncate: bool = False           # cut a too-long prompt instead of failing
    shift: bool = True               # shift the context when generation fills the slot
    ignore_eos: bool = False         # keep generating past end-of-generation tokens (benchmarks)

    def validate(self) -> "CompletionOptions":
        def bad(msg: str) -> BadRequest:
            return BadRequest(f"invalid option: {msg}")

        if not isinstance(self.num_predict, int) or self.num_predict < -1:
            raise bad("num_predict must be an integer >= -1")
        if self.temperature < 0 or self.temperature != self.temperature:
            raise bad("temperature must be >= 0")
        if self.top_k < 0:
            raise bad("top_k must be >= 0")
        for name in ("top_p", "min_p", "typical_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise bad(f"{name} must be within [0, 1]")
        if self.repeat_last_n < -1:
            raise bad("repeat_last_n must be >= -1")
        if self.repeat_penalty <= 0:
            raise bad("repeat_penalty must be > 0")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop must be a list of non-empty strings")
        if not 0 <= self.top_logprobs <= 20:
            raise bad("top_logprobs must be within [0, 20]")
        if self.num_keep < 0:
            raise bad("num_keep must be >= 0")
        if self.grammar is not None and self.json_schema is not None:
            raise bad("give either grammar or json_schema, not both")
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "CompletionOptions":
        """Build from a plain mapping, rejecting unknown names and wrong types."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise BadRequest(f"unknown option(s): {', '.join(unknown)}")
        out = cls()
        for name, value in values.items():
            default = getattr(out, name)
            if value is None and default is None:
                continue
            if isinstance(default, bool) and not isinstance(value, bool):
                raise BadRequest(f"option {name} must be a boolean")
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            expected = type(default) if default is not None else None
            if expected in (int, float) and (not isinstance(value, expected) or isinstance(value, bool)):
                raise BadRequest(f"option {name} must be a number ({expected.__name__})")
            if name == "stop" and isinstance(value, str):
                value = [value]
            setattr(out, name, value)
        return out.validate()


@dataclass
class CompletionRequest:
    """One completion: a prompt (text or token ids) plus options."""

    prompt: str | list[int]                 # text (special tokens parsed) or token ids
    options: CompletionOptions = field(default_factory=CompletionOptions)
    add_special: bool = True                # add BOS as the model asks (text prompts)
    id: str | None = None                   # caller's id (echoed in events)
    media: list = field(default_factory=list)  # runner.media.MediaItem placed by [img-N] / marker


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


@dataclass
class EmbeddingResult:
    embedding: list[float] | Any     # numpy float32 array (copied out of llama.cpp)
    prompt_eval_count: int           # tokens evaluated
