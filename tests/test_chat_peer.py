"""Chat requests beside llama-server (``--jinja``) on the same model and messages:
the rendered prompt (its ``/apply-template``) and the greedy answer (its
``/v1/chat/completions``) must be identical.

llama-server is the peer binary scripts/build_peers.sh builds into
build/peers/bin; CI does not build it, so these tests skip without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from llama_server import SERVER, LlamaServer  # noqa: E402

from chat_models import FAMILIES, write_chat_model  # noqa: E402
from test_chat import ODD, WEATHER_TOOL, chat  # noqa: E402

pytestmark = pytest.mark.skipif(not SERVER.exists(), reason=f"{SERVER} not built "
                                                              "(scripts/build_peers.sh)")

TEXT = ODD.replace("\x00", "")  # llama-server reads JSON text as C strings
CONVERSATIONS = {
    "user": chat("user", "Hi"),
    "system": chat("system", "Be brief.", "user", "Hi"),
    "multi-turn": chat("system", "Be brief.", "user", "Hi", "assistant", "Hello!", "user", TEXT),
    "system only": chat("system", "Only system."),
    "empty content": chat("user", ""),
    "no messages": [],
    "text parts": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                {"type": "text", "text": "b"}]}],
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "abcDEF123", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "22 C"},
]


def _peer(path: str) -> LlamaServer:
    return LlamaServer(["-m", path, "--jinja", "-c", "2048", "-np", "1", "-t", "2"])


def _their_prompt(server: LlamaServer, body: dict) -> str | None:
    """/apply-template's prompt, or None when llama-server refuses the messages."""
    try:
        with server.post("/apply-template", body) as reply:
            return json.loads(reply.read())["prompt"]
    except OSError:  # urllib's HTTPError: a 4xx/5xx answer
        return None


@pytest.mark.parametrize("family", ["default", *FAMILIES])
def test_rendered_prompts_match_llama_server(family, llama, default_model_path, tmp_path_factory):
    from runner.engine.requests import BadRequest
    from runner.process.chat import ChatRequest, ChatTemplates

    if family == "default":
        path = default_model_path
    else:
        path = str(write_chat_model(tmp_path_factory.getbasetemp() / "chat-peer", family))
    model = llama.Model(path)
    server = _peer(path)
    try:
        templates = ChatTemplates(model)
        cases = [(name, messages, None) for name, messages in CONVERSATIONS.items()]
        cases.append(("tools", TOOL_CONVERSATION, [WEATHER_TOOL]))
        compared = 0
        for name, messages, tools in cases:
            body = {"messages": messages, **({"tools": tools} if tools else {})}
            theirs = _their_prompt(server, body)
            try:
                ours = templates.render(ChatRequest(messages=messages, tools=tools)).prompt
            except BadRequest:
                ours = None
            assert ours == theirs, f"{family}: {name}"
            compared += ours is not None
        assert compared >= len(cases) - 1  # at most one refusal (Gemma 2: tool roles)
    finally:
        server.close()
        model.close()


def test_greedy_answers_match_llama_server(default_model_path):
    """The default model answers the same, token for token (greedy; llama-server's
    default penalties are off, so ours are switched off too)."""
    from runner.process.client import Runner

    conversations = [
        chat("user", "What is the capital of France?"),
        chat("system", "You answer in one word.", "user", "Capital of Japan?"),
        chat("user", "Write a haiku about the sea.", "assistant", "Waves fold into foam",
             "user", "Another one, about snow " + TEXT),
    ]
    server = _peer(default_model_path)
    try:
        with Runner.spawn(default_model_path, n_ctx=2048, n_threads=2) as runner:
            for messages in conversations:
                with server.post("/v1/chat/completions", {"messages": messages, "temperature": 0,
                                                          "max_tokens": 48}) as reply:
                    theirs = json.loads(reply.read())
                text, final = runner.chat(messages, temperature=0.0, repeat_penalty=1.0,
                                          num_predict=48).text()
                assert text and text == theirs["choices"][0]["message"]["content"]
                assert final.message.content == text
                assert final.prompt_count == theirs["usage"]["prompt_tokens"]
                assert final.done_reason == theirs["choices"][0]["finish_reason"]
    finally:
        server.close()
