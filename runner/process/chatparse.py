"""A chat answer's text split into content, reasoning and tool calls.

The syntaxes are the ones llama.cpp's ``common/chat*`` recognises for these
families (the facts come from there; the parser is our own):

* reasoning between ``<think>`` and ``</think>`` at the start of the answer
  (Qwen3, DeepSeek R1, SmolLM3...); when the rendered prompt already ends
  with ``<think>``, the answer starts inside the reasoning;
* ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks, any number (Hermes 2/3, Qwen 2.5 / 3);
* ``llama3``: the whole answer is one JSON object ``{"name": ...,
  "parameters": {...}}``, optionally after ``<|python_tag|>`` (Llama 3.1-3.3);
* ``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments",
  "id"}`` (Mistral Nemo, Small).

Which apply is read from the template's source (:func:`detect`); tool calls
are looked for only when the request had tools.  Text that does not parse
(a call cut short by ``num_predict``, malformed JSON) stays in ``content``:
parsing never fails a request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

ToolSyntax = Literal["hermes", "llama3", "mistral"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_CALLS = "[TOOL_CALLS]"


class ToolCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One function call the model asked for."""

    name: str                            # the function's name
    arguments: str                       # its arguments, as JSON text
    id: str = ""                         # the call's id where the model's syntax carries one


class ChatMessage(msgspec.Struct, kw_only=True):
    """The assistant's answer, parsed."""

    content: str                         # the answer's text, less reasoning and tool calls
    reasoning_content: str = ""          # the text between <think> and </think>
    tool_calls: list[ToolCall] = []      # calls in the order the model wrote them


@dataclass(frozen=True)
class ChatFormat:
    """What to look for in an answer."""

    tools: ToolSyntax | None = None      # tool-call syntax; None: tool calls are not parsed
    reasoning: bool = False              # split off <think>...</think>
    in_reasoning: bool = False           # the prompt opened the reasoning: the answer starts in it


def detect(source: str, prompt: str, has_tools: bool, reasoning: bool = True) -> ChatFormat:
    """The format of answers to ``prompt``, rendered by the template ``source``."""
    tools: ToolSyntax | None = None
    if has_tools:
        if "<tool_call>" in source:
            tools = "hermes"
        elif _MISTRAL_CALLS in source:
            tools = "mistral"
        elif "<|start_header_id|>" in source:
            tools = "llama3"
    think = reasoning and (THINK_OPEN in source or THINK_CLOSE in source)
    opened = think and prompt.rstrip().endswith(THINK_OPEN)
    return ChatFormat(tools=tools, reasoning=think, in_reasoning=opened)


def _arguments(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return None


def _call(obj: Any, args_key: str = "arguments") -> ToolCall | None:
    """A ToolCall from a decoded JSON object, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    text = _arguments(args)
    if text is None:
        return None
    call_id = obj.get("id")
    return ToolCall(name=obj["name"], arguments=text, id=call_id if isinstance(call_id, str) else "")


def _whole_json(text: str) -> Any:
    """``text`` decoded as one JSON value (surrounding whitespace allowed), or None."""
    text = text.strip()
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return value if end == len(text) else None


def _split_reasoning(text: str, fmt: ChatFormat) -> tuple[str, str]:
    """(reasoning, rest)."""
    if not fmt.reasoning:
        return "", text
    if fmt.in_reasoning:
        body = text
    else:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return "", text
        body = stripped[len(THINK_OPEN):]
    end = body.find(THINK_CLOSE)
    if end < 0:  # still thinking when generation stopped
        return body.strip(), ""
    return body[:end].strip(), body[end + len(THINK_CLOSE):].lstrip()


def _hermes(text: str) -> tuple[str, list[ToolCall]]:
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _HERMES_CALL.finditer(text):
        call = _call(_whole_json(m.group(1)))
        if call is None:
            continue  # not a call: left in the content
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    return "".join(kept).strip() if calls else text, calls


def _llama3(text: str) -> tuple[str, list[ToolCall]]:
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG):]
    call = _call(_whole_json(body), "parameters")
    return ("", [call]) if call is not None else (text, [])


def _mistral(text: str) -> tuple[str, list[ToolCall]]:
    at = text.find(_MISTRAL_CALLS)
    if at < 0:
        return text, []
    value = _whole_json(text[at + len(_MISTRAL_CALLS):])
    if not isinstance(value, list):
        return text, []
    calls = [_call(obj) for obj in value]
    if not calls or any(c is None for c in calls):
        return text, []
    return text[:at].strip(), calls  # type: ignore[return-value]


_TOOL_PARSERS = {"hermes": _hermes, "llama3": _llama3, "mistral": _mistral}


def parse(text: str, fmt: ChatFormat) -> ChatMessage:
    """Split an answer; never raises."""
    reasoning, rest = _split_reasoning(text, fmt)
    calls: list[ToolCall] = []
    if fmt.tools is not None:
        rest, calls = _TOOL_PARSERS[fmt.tools](rest)
    return ChatMessage(content=rest, reasoning_content=reasoning, tool_calls=calls)
