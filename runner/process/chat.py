"""Chat requests: messages rendered into a prompt with the model's own template.

A model ships its chat template as Jinja source in the GGUF key
``tokenizer.chat_template`` (a second one, ``tokenizer.chat_template.tool_use``,
is used when a request has tools).  :class:`ChatTemplate` renders it with
jinja2's immutable sandbox configured the way Hugging Face's transformers and
llama.cpp render these templates: ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, a ``tojson`` filter that does not HTML-escape and
takes ``indent`` / ``separators`` / ``sort_keys`` / ``ensure_ascii``, and the
globals ``raise_exception`` and ``strftime_now``.  The variables are the ones
llama-server passes: ``messages``, ``bos_token``, ``eos_token``,
``add_generation_prompt``, ``tools`` (only when there are some),
``enable_thinking``, ``date_string`` and ``datetime``, then the request's own
``template_kwargs``.

Messages are first brought to the shape llama.cpp gives templates
(:func:`normalize_messages`), then adjusted for what the template can take,
found by rendering two probe conversations once per template (as llama.cpp's
capability check does): a template that ignores or refuses a system message
gets it merged into the first user message; one that reads tool-call
arguments as an object gets them parsed from JSON text.

The rendered prompt loses a leading BOS text when the model adds BOS itself
(the tokenizer puts it back), so the prompt is tokenized with ``add_special``
and special tokens parsed, exactly as llama-server does.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runner.engine.requests import BadRequest

# llama.cpp's fallback when a model has no template (common/chat.cpp), ChatML.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}")

MAX_MESSAGES = 100_000            # messages in one chat request
_ROLE_MAX = 256                   # characters of a role name

# What the probe conversations carry; found in the output when the template used it.
_PROBE_SYSTEM = "System message"
_PROBE_USER = "User message"


class TemplateRaised(jinja2.TemplateError):
    """A template called ``raise_exception(message)``."""


def _raise_exception(message: Any = "") -> None:
    raise TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return time.strftime(fmt)  # local time, as llama.cpp's std::localtime


class _ReadTracker:
    """Records whether a template looked into the probe's tool-call arguments."""

    def __init__(self) -> None:
        self.read = False  # set by _TrackedArgs when any of its keys or items was read


class _TrackedArgs(dict):
    """A dict that tells its :class:`_ReadTracker` when its content is read."""

    def __init__(self, tracker: _ReadTracker, *args: Any) -> None:
        super().__init__(*args)
        self.tracker = tracker  # where reads are recorded

    def _mark(self) -> None:
        self.tracker.read = True

    def __getitem__(self, key):
        self._mark()
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._mark()
        return super().get(key, default)

    def items(self):
        self._mark()
        return super().items()

    def keys(self):
        self._mark()
        return super().keys()

    def values(self):
        self._mark()
        return super().values()

    def __iter__(self):
        self._mark()
        return super().__iter__()


def _tojson(value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    """``tojson`` as transformers defines it: plain JSON, no HTML escaping."""
    if isinstance(value, _TrackedArgs):
        value._mark()
    if separators is not None:
        separators = tuple(separators)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks the
    assistant's tokens with it; for rendering it is its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _environment() -> ImmutableSandboxedEnvironment:
    # ChainableUndefined: an item or attribute of something undefined is
    # undefined too, not an error, as in llama.cpp's engine (Gemma 2's
    # `messages[0]['role']` on no messages renders, in llama-server too).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        undefined=jinja2.ChainableUndefined,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _bad(problem: str) -> BadRequest:
    return BadRequest(f"invalid chat request: {problem}")


def _text_parts(i: int, parts: list) -> str:
    """A content given as parts: the text parts joined by newlines (llama.cpp's rule)."""
    text = ""
    for j, part in enumerate(parts):
        if type(part) is not dict:
            raise _bad(f"messages[{i}].content[{j}] must be a map, got {type(part).__name__}")
        kind = part.get("type")
        if kind != "text":
            raise _bad(f"messages[{i}].content[{j}] has type {str(kind)[:40]!r}; only 'text' "
                       f"parts are taken (media go in the request's media)")
        piece = part.get("text")
        if type(piece) is not str:
            raise _bad(f"messages[{i}].content[{j}].text must be a string")
        text = text + "\n" + piece if text else piece
    return text


def _tool_call(i: int, j: int, call: Any) -> dict:
    where = f"messages[{i}].tool_calls[{j}]"
    if type(call) is not dict:
        raise _bad(f"{where} must be a map")
    if call.get("type", "function") != "function":
        raise _bad(f"{where}.type must be 'function'")
    fn = call.get("function")
    if type(fn) is not dict or type(fn.get("name")) is not str:
        raise _bad(f"{where}.function must be a map with a string name")
    args = fn.get("arguments", {})
    if type(args) is not str:
        try:
            args = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise _bad(f"{where}.function.arguments is not JSON data: {exc}") from None
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if call.get("id") is not None:
        if type(call["id"]) is not str:
            raise _bad(f"{where}.id must be a string")
        out["id"] = call["id"]
    return out


def normalize_messages(messages: Any) -> list[dict]:
    """Messages as llama.cpp hands them to templates: ``role`` and a string
    ``content`` ("" when null or absent), plus ``reasoning_content``,
    ``name``, ``tool_call_id`` and ``tool_calls`` where given (with
    ``arguments`` as JSON text); other keys are dropped.  Raises BadRequest."""
    if type(messages) is not list:
        raise _bad("messages must be a list of maps")
    if len(messages) > MAX_MESSAGES:
        raise _bad(f"{len(messages)} messages, over the limit of {MAX_MESSAGES}")
    out = []
    for i, msg in enumerate(messages):
        if type(msg) is not dict:
            raise _bad(f"messages[{i}] must be a map, got {type(msg).__name__}")
        role = msg.get("role")
        if type(role) is not str or not role or len(role) > _ROLE_MAX:
            raise _bad(f"messages[{i}].role must be a non-empty string")
        if "content" not in msg and "tool_calls" not in msg:
            raise _bad(f"messages[{i}] needs content or tool_calls")
        content = msg.get("content")
        if content is None:
            content = ""
        elif type(content) is list:
            content = _text_parts(i, content)
        elif type(content) is not str:
            raise _bad(f"messages[{i}].content must be a string, a list of text parts or null")
        norm: dict[str, Any] = {"role": role, "content": content}
        for key in ("reasoning_content", "name", "tool_call_id"):
            value = msg.get(key)
            if value is None or value == "":
                continue
            if type(value) is not str:
                raise _bad(f"messages[{i}].{key} must be a string")
            norm[key] = value
        calls = msg.get("tool_calls")
        if calls:
            if type(calls) is not list:
                raise _bad(f"messages[{i}].tool_calls must be a list")
            norm["tool_calls"] = [_tool_call(i, j, c) for j, c in enumerate(calls)]
        out.append(norm)
    return out


def normalize_tools(tools: Any) -> list[dict] | None:
    """Function tools in OpenAI's shape, as llama.cpp passes them on:
    ``{type, function: {name, description, parameters}}``; None when empty."""
    if tools is None:
        return None
    if type(tools) is not list:
        raise _bad("tools must be a list of maps")
    out = []
    for i, tool in enumerate(tools):
        if type(tool) is not dict or tool.get("type") != "function":
            raise _bad(f"tools[{i}] must be a map with type 'function'")
        fn = tool.get("function")
        if type(fn) is not dict or type(fn.get("name")) is not str:
            raise _bad(f"tools[{i}].function must be a map with a string name")
        description = fn.get("description", "")
        if type(description) is not str:
            raise _bad(f"tools[{i}].function.description must be a string")
        params = fn.get("parameters", {})
        if params is None:
            params = {}
        if type(params) is not dict:
            raise _bad(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function",
                    "function": {"name": fn["name"], "description": description,
                                 "parameters": params}})
    return out or None


@dataclass
class ChatRequest:
    """A chat, before rendering."""

    messages: list[dict]                  # OpenAI-style messages (role, content, tool_calls...)
    tools: list[dict] | None = None       # OpenAI-style function tools; None or []: none
    add_generation_prompt: bool = True    # end with the assistant's turn opening
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # extra template variables


@dataclass
class Rendered:
    """A rendered chat: the prompt and what the output parser needs to know."""

    prompt: str                           # text to tokenize with add_special and special tokens
    source: str                           # the template that rendered it
    has_tools: bool                       # the request had tools (tool calls are parsed)


class ChatTemplate:
    """One compiled template with the model's BOS / EOS text.

    Thread-safe: rendering builds no shared state (jinja2 templates render
    concurrently).  The probes run once, in the constructor.
    """

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "",
                 add_bos: bool = False, add_eos: bool = False) -> None:
        self.source = source              # the Jinja source
        self.bos_token = bos_token        # text of the model's BOS token ("" if none)
        self.eos_token = eos_token        # text of the model's EOS token ("" if none)
        self.add_bos = add_bos            # the tokenizer adds BOS: a rendered leading one is dropped
        self.add_eos = add_eos            # the tokenizer adds EOS: a rendered trailing one is dropped
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise BadRequest(f"the model's chat template does not compile: {exc}") from None
        self.supports_system_role = self._probe_system()  # renders a system message's content
        self.object_arguments = self._probe_object_arguments()  # reads arguments as a map

    # -- probes (llama.cpp's jinja/caps.cpp asks the same questions) ----------

    def _try(self, **variables: Any) -> str | None:
        try:
            return self._template.render(bos_token="", eos_token="", add_generation_prompt=True,
                                         **variables)
        except Exception:  # a probe the template refuses answers "no"
            return None

    def _probe_system(self) -> bool:
        out = self._try(messages=[{"role": "system", "content": _PROBE_SYSTEM},
                                  {"role": "user", "content": _PROBE_USER}])
        return out is not None and _PROBE_SYSTEM in out

    def _probe_object_arguments(self) -> bool:
        tracker = _ReadTracker()
        args = _TrackedArgs(tracker, {"arg": "value"})
        self._try(messages=[
            {"role": "user", "content": _PROBE_USER},
            {"role": "assistant", "content": "",
             "tool_calls": [{"id": "call00001", "type": "function",
                             "function": {"name": "tool1", "arguments": args}}]},
            {"role": "tool", "content": "Tool response", "tool_call_id": "call00001",
             "name": "tool1"},
            {"role": "assistant", "content": "The tool response was 'tool response'"},
            {"role": "user", "content": _PROBE_USER}],
            tools=[{"type": "function", "function": {
                "name": "tool1", "description": "Tool 1",
                "parameters": {"type": "object", "properties": {"arg": {"type": "string"}},
                               "required": ["arg"]}}}])
        return tracker.read

    # -- rendering --------------------------------------------------------------

    def adapt(self, messages: list[dict]) -> list[dict]:
        """Normalized messages adjusted for this template, as llama.cpp does."""
        messages = [dict(m) for m in messages]
        if "<|channel|>" not in self.source:  # every template but gpt-oss's
            for m in messages:
                if m["role"] == "developer":
                    m["role"] = "system"
        if not self.supports_system_role and messages and messages[0]["role"] == "system":
            first = messages.pop(0)
            if messages:
                messages[0]["content"] = first["content"] + "\n" + messages[0]["content"]
        if self.object_arguments:
            for i, m in enumerate(messages):
                for j, call in enumerate(m.get("tool_calls", ())):
                    text = call["function"]["arguments"]
                    try:
                        parsed = json.loads(text)
                    except ValueError as exc:
                        raise _bad(f"messages[{i}].tool_calls[{j}].function.arguments is not "
                                   f"JSON: {exc}") from None
                    m["tool_calls"][j] = {**call, "function": {**call["function"],
                                                               "arguments": parsed}}
        return messages

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True,
               template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt for normalized ``messages``; BadRequest when the template fails."""
        variables: dict[str, Any] = {
            "messages": self.adapt(messages), "bos_token": self.bos_token,
            "eos_token": self.eos_token, "enable_thinking": True,
            "datetime": time.strftime("%b %d %Y"), "date_string": time.strftime("%d %b %Y")}
        if tools:
            variables["tools"] = tools
        variables.update(template_kwargs or {})
        if add_generation_prompt:
            variables["add_generation_prompt"] = True
        try:
            text = self._template.render(**variables)
        except TemplateRaised as exc:
            raise BadRequest(f"the chat template refused the messages: {exc}") from None
        except RecursionError:
            raise BadRequest("the chat template recursed too deeply") from None
        except Exception as exc:
            raise BadRequest(f"the chat template failed: {type(exc).__name__}: {exc}") from None
        if self.add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        if self.add_eos and self.eos_token and text.endswith(self.eos_token):
            text = text[:-len(self.eos_token)]
        return text


def _token_text(model, token: int) -> str:
    """A special token's text, as llama.cpp's common_token_to_piece(special=true)."""
    if token < 0:
        return ""
    return model.token_to_piece(token, special=True).decode("utf-8", "replace")


class ChatTemplates:
    """A model's templates (default and tool-use), compiled on first use.

    Built from the model's metadata; ``get`` is thread-safe (a lock guards
    the first compilation of each).  A template that does not compile fails
    the requests that need it, never the runner.
    """

    def __init__(self, model) -> None:
        default = model.chat_template()
        tool_use = model.chat_template("tool_use")
        if not default or default == "chatml":
            default = tool_use or CHATML_TEMPLATE
        self.sources = {"default": default, "tool_use": tool_use}  # variant -> Jinja source (or None)
        self.bos_token = _token_text(model, model.bos)  # BOS text, "" when the vocab has none
        self.eos_token = _token_text(model, model.eos)  # EOS text, "" when the vocab has none
        self.add_bos = model.add_bos      # the tokenizer adds BOS itself
        self.add_eos = model.add_eos      # the tokenizer adds EOS itself
        self._compiled: dict[str, ChatTemplate | BadRequest] = {}  # variant -> template or its error
        self._lock = threading.Lock()     # guards _compiled

    def get(self, has_tools: bool) -> ChatTemplate:
        variant = "tool_use" if has_tools and self.sources["tool_use"] else "default"
        with self._lock:
            found = self._compiled.get(variant)
            if found is None:
                try:
                    found = ChatTemplate(self.sources[variant], self.bos_token, self.eos_token,
                                         self.add_bos, self.add_eos)
                except BadRequest as exc:
                    found = exc
                self._compiled[variant] = found
        if isinstance(found, BadRequest):
            raise BadRequest(str(found))
        return found

    def render(self, request: ChatRequest) -> Rendered:
        """Validate and render a chat request (BadRequest on any problem)."""
        if type(request.template_kwargs) is not dict:
            raise _bad("template_kwargs must be a map")
        messages = normalize_messages(request.messages)
        tools = normalize_tools(request.tools)
        template = self.get(tools is not None)
        prompt = template.render(messages, tools, request.add_generation_prompt,
                                 request.template_kwargs)
        return Rendered(prompt=prompt, source=template.source, has_tools=tools is not None)
