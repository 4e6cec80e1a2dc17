"""Chat templates (runner/process/chat.py), answer parsing (runner/process/chatparse.py) and the
``chat`` op.

The rendering tests load tiny models that carry each family's real template
(tests/chat_models.py) and compare with prompts written out by hand from the
family's documented format.  Dates are pinned with ``template_kwargs`` where a
template prints one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from runner.engine.requests import BadRequest
from runner.process import chatparse
from runner.process.chat import ChatRequest, ChatTemplate, ChatTemplates, normalize_messages
from runner.process.chatparse import ChatFormat, ChatMessage, ToolCall

from chat_models import write_chat_model

PINNED = {"date_string": "26 Jul 2024"}
ODD = "naïve 🦙 ‮rtl‬ 日本語\u200b e\u0301 \x00nul \"q\" 'a' <b>&amp;"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> in a city, é",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
WEATHER_TOOL_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": '
                     '"Weather <now> in a city, é", "parameters": {"type": "object", "properties": '
                     '{"city": {"type": "string"}}, "required": ["city"]}}}')


def chat(*pairs: str) -> list[dict]:
    """Messages from (role, content) pairs given flat: chat("user", "Hi", ...)."""
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2])]


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("chat-models")


@pytest.fixture(scope="module")
def templates(llama, family_dir):
    """family name -> ChatTemplates of its tiny model (models closed at the end)."""
    models, out = [], {}

    def get(name: str) -> ChatTemplates:
        if name not in out:
            m = llama.Model(str(write_chat_model(family_dir, name)))
            models.append(m)
            out[name] = ChatTemplates(m)
        return out[name]

    yield get
    for m in models:
        m.close()


@pytest.fixture(scope="module")
def smol(model):
    return ChatTemplates(model)


def render(t: ChatTemplates, messages, **kw) -> str:
    return t.render(ChatRequest(messages=messages, **kw)).prompt


# -- the default model (SmolLM2: ChatML with a default system message) -----------


@pytest.mark.parametrize("messages, expected", [
    (chat("user", "Hi"),
     f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
     "<|im_start|>assistant\n"),
    (chat("system", "Be brief.", "user", "Hi", "assistant", "Hello!", "user", "How are you?"),
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
     "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n"
     "<|im_start|>assistant\n"),
    (chat("system", "Only a system message."),
     "<|im_start|>system\nOnly a system message.<|im_end|>\n<|im_start|>assistant\n"),
    ([], "<|im_start|>assistant\n"),
    (chat("user", ""),
     f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
     "<|im_start|>assistant\n"),
    (chat("user", ODD),
     f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n{ODD}<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ([{"role": "user", "content": None}],
     f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ([{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}],
     f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\none\ntwo<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ([{"role": "developer", "content": "Dev rules."}, {"role": "user", "content": "Hi"}],
     "<|im_start|>system\nDev rules.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
     "<|im_start|>assistant\n"),
])
def test_default_model_template(smol, messages, expected):
    assert render(smol, messages) == expected


def test_default_model_without_generation_prompt(smol):
    assert render(smol, chat("user", "Hi", "assistant", "Yo"), add_generation_prompt=False) == (
        f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n")


def test_vocabulary_facts_of_the_default_model(smol):
    assert (smol.bos_token, smol.eos_token, smol.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert "SmolLM" in smol.sources["default"] and smol.sources["tool_use"] is None


# -- Llama 3.1 / 3.2 ----------------------------------------------------------------

LLAMA_SYS = ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
             "Today Date: 26 Jul 2024\n\n")


def test_llama3_bos_dropped_and_turns(templates):
    t = templates("llama3")
    assert (t.bos_token, t.eos_token, t.add_bos) == ("<|begin_of_text|>", "<|eot_id|>", True)
    out = render(t, chat("system", "  Be brief.  ", "user", " Hi ", "assistant", "Hello!",
                         "user", "How are you?"), template_kwargs=PINNED)
    assert out == (LLAMA_SYS + "Be brief.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama3_date_is_today_by_default(templates):
    # llama-server passes date_string (today, "%d %b %Y") to every template.
    before = time.strftime("%d %b %Y")
    out = render(templates("llama3"), chat("user", "Hi"))
    after = time.strftime("%d %b %Y")
    assert f"Today Date: {before}\n" in out or f"Today Date: {after}\n" in out


def test_llama3_tools_and_tool_messages(templates):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "22 C"},
    ]
    out = render(templates("llama3"), messages, tools=[WEATHER_TOOL], template_kwargs=PINNED)
    tool_json = (
        '{\n    "type": "function",\n    "function": {\n        "name": "get_weather",\n'
        '        "description": "Weather <now> in a city, é",\n        "parameters": {\n'
        '            "type": "object",\n            "properties": {\n                "city": {\n'
        '                    "type": "string"\n                }\n            },\n'
        '            "required": [\n                "city"\n            ]\n        }\n    }\n}')
    assert out == (
        "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its "
        "proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name '
        'and its value}.Do not use variables.\n\n' + tool_json + "\n\n"
        "Weather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n"22 C"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama32_date_string(templates):
    out = render(templates("llama32"), chat("user", "Hi"), template_kwargs={"date_string": "1 Jan 2000"})
    assert out == ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                   "December 2023\nToday Date: 1 Jan 2000\n\n<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


# -- Qwen 2.5 ------------------------------------------------------------------------

QWEN_SYS = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def test_qwen25_turns(templates):
    t = templates("qwen25")
    assert render(t, chat("user", ODD)) == (
        f"<|im_start|>system\n{QWEN_SYS}<|im_end|>\n<|im_start|>user\n{ODD}<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render(t, chat("system", "S", "user", "a", "assistant", "b", "user", "c")) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
        "<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")
    assert render(t, chat("system", "S")) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\n"


def test_qwen25_tools_tool_calls_and_responses(templates):
    t = templates("qwen25")
    assert t.get(True).object_arguments  # it writes `arguments | tojson`
    messages = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "22 C"},
        {"role": "tool", "content": "-3 C"},
    ]
    assert render(t, messages, tools=[WEATHER_TOOL]) == (
        f"<|im_start|>system\n{QWEN_SYS}\n\n# Tools\n\nYou may call one or more functions to assist "
        "with the user query.\n\nYou are provided with function signatures within <tools></tools> "
        f"XML tags:\n<tools>\n{WEATHER_TOOL_JSON}\n</tools>\n\nFor each function call, return a json "
        "object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n22 C\n</tool_response>\n<tool_response>\n-3 C\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_qwen25_no_messages(templates):
    # messages[0] of no messages is undefined, not an error (llama-server agrees).
    assert render(templates("qwen25"), []) == (
        f"<|im_start|>system\n{QWEN_SYS}<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_enable_thinking(templates):
    t = templates("qwen3")
    on = render(t, chat("user", "Hi"))
    off = render(t, chat("user", "Hi"), template_kwargs={"enable_thinking": False})
    assert on == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"


# -- Gemma 2 (no system role) --------------------------------------------------------


def test_gemma2_system_merged_and_turns(templates):
    t = templates("gemma2")
    assert (t.bos_token, t.add_bos) == ("<bos>", True)
    assert not t.get(False).supports_system_role
    assert render(t, chat("system", "Be brief.", "user", "Hi")) == (
        "<start_of_turn>user\nBe brief.\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert render(t, chat("user", "  Hi  ", "assistant", "Hello!", "user", ODD)) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        f"<start_of_turn>user\n{ODD.strip()}<end_of_turn>\n<start_of_turn>model\n")


def test_gemma2_refusals_are_bad_requests(templates):
    t = templates("gemma2")
    with pytest.raises(BadRequest, match="roles must alternate"):
        render(t, chat("user", "a", "user", "b"))
    # A lone system message is dropped (nothing to merge it into).
    assert render(t, chat("system", "alone")) == "<start_of_turn>model\n"
    with pytest.raises(BadRequest, match="Cannot put tools in the first user message"):
        render(templates("llama3"), [], tools=[WEATHER_TOOL])


# -- Mistral Nemo ----------------------------------------------------------------------


def test_mistral_turns(templates):
    t = templates("mistral")
    assert render(t, chat("user", "Hi")) == "[INST]Hi[/INST]"
    assert render(t, chat("system", "Be brief.", "user", "Hi", "assistant", "Hello!",
                          "user", "How are you?")) == (
        "[INST]Hi[/INST]Hello!</s>[INST]Be brief.\n\nHow are you?[/INST]")


def test_mistral_tools(templates):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "abcDEF123", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "22 C"},
    ]
    assert render(templates("mistral"), messages, tools=[WEATHER_TOOL]) == (
        '[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "get_weather", '
        '"description": "Weather <now> in a city, é", "parameters": {"type": "object", '
        '"properties": {"city": {"type": "string"}}, "required": ["city"]}}}][/AVAILABLE_TOOLS]'
        "[INST]Weather in Paris?[/INST]"
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]</s>'
        '[TOOL_RESULTS]{"content": 22 C, "call_id": "abcDEF123"}[/TOOL_RESULTS]')
    bad_id = [dict(messages[0]), {"role": "assistant", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    with pytest.raises(BadRequest, match="Tool call IDs"):
        render(templates("mistral"), bad_id, tools=[WEATHER_TOOL])


# -- the sandbox and its helpers (no model) -------------------------------------------


def test_tojson_filters_and_globals():
    t = ChatTemplate("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(sort_keys=true) }}"
                     "|{{ raise_exception is defined }}")
    out = t.render([], template_kwargs={"x": {"b": "<é>", "a": [1, 2.5, None, True]}})
    assert out == ('{"b": "<é>", "a": [1, 2.5, null, true]}|{\n  "b": "<é>",\n  "a": [\n    1,\n'
                   '    2.5,\n    null,\n    true\n  ]\n}|{"a": [1, 2.5, null, true], "b": "<é>"}|True')
    assert ChatTemplate("{{ strftime_now('%Y') }}").render([]) in {
        time.strftime("%Y"), str(int(time.strftime("%Y")) + 1)}
    with pytest.raises(BadRequest, match="refused the messages: nope"):
        ChatTemplate("{{ raise_exception('nope') }}").render([])


def test_trim_and_lstrip_blocks_and_loop_controls():
    src = "{% for m in messages %}\n  {% if m.role == 'skip' %}{% continue %}{% endif %}\n" \
          "[{{ m.content }}]\n{% endfor %}{% generation %}G{% endgeneration %}"
    assert ChatTemplate(src).render(chat("user", "a", "skip", "b", "user", "c")) == "[a]\n[c]\nG"


def test_the_sandbox_holds():
    with pytest.raises(BadRequest, match="SecurityError"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(BadRequest, match="SecurityError"):
        ChatTemplate("{% set x = messages.append(1) %}").render([])
    with pytest.raises(BadRequest, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(BadRequest, match="chat template failed: TypeError"):
        ChatTemplate("{{ 1 + 'a' }}").render([])
    with pytest.raises(BadRequest, match="chat template failed: UndefinedError"):
        ChatTemplate("{{ nothing + 'a' }}").render([])
    assert ChatTemplate("{{ nothing.at[0].all }}|{{ messages[3].role == 'x' }}").render([]) == "|False"


def test_chatml_fallback():
    from runner.process.chat import CHATML_TEMPLATE

    assert ChatTemplate(CHATML_TEMPLATE).render(chat("system", "S", "user", "Hi")) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_bos_and_eos_dropped_only_when_the_tokenizer_adds_them():
    src = "{{ bos_token }}x{{ eos_token }}"
    assert ChatTemplate(src, "<s>", "</s>", add_bos=True).render([]) == "x</s>"
    assert ChatTemplate(src, "<s>", "</s>", add_bos=False).render([]) == "<s>x</s>"
    assert ChatTemplate(src, "<s>", "</s>", add_bos=True, add_eos=True).render([]) == "x"


@pytest.mark.parametrize("messages, problem", [
    ("hi", "messages must be a list"),
    ([3], r"messages\[0\] must be a map"),
    ([{"content": "x"}], r"messages\[0\].role"),
    ([{"role": ""}], r"messages\[0\].role"),
    ([{"role": "user"}], "needs content or tool_calls"),
    ([{"role": "user", "content": 7}], "content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "only 'text' parts"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"content\[0\].text"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], "string name"),
    ([{"role": "assistant", "tool_calls": "x"}], "tool_calls must be a list"),
    ([{"role": "tool", "content": "x", "tool_call_id": 5}], "tool_call_id must be a string"),
])
def test_bad_messages(messages, problem):
    with pytest.raises(BadRequest, match=problem):
        normalize_messages(messages)


def test_messages_keep_only_what_llama_cpp_passes():
    out = normalize_messages([{"role": "assistant", "content": None, "extra": 1, "name": "",
                               "tool_calls": [{"function": {"name": "f", "arguments": {"a": [1, "é"]}},
                                               "id": "c1"}]}])
    assert out == [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"a":[1,"é"]}'}, "id": "c1"}]}]


# -- parsing answers (no model) ----------------------------------------------------------

HERMES = ChatFormat(tools="hermes", reasoning=True)


@pytest.mark.parametrize("text, fmt, expected", [
    ("Plain answer.", ChatFormat(), ChatMessage(content="Plain answer.")),
    ("<think>\nhmm </think>\n\nIt is 4.", ChatFormat(reasoning=True),
     ChatMessage(content="It is 4.", reasoning_content="hmm")),
    ("still thinking", ChatFormat(reasoning=True, in_reasoning=True),
     ChatMessage(content="", reasoning_content="still thinking")),
    ("a</think>b", ChatFormat(reasoning=True, in_reasoning=True),
     ChatMessage(content="b", reasoning_content="a")),
    ("<think>x</think>y", ChatFormat(), ChatMessage(content="<think>x</think>y")),
    ('<think>plan</think>Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call>\n<tool_call>{"name": "now", "arguments": {}}</tool_call>', HERMES,
     ChatMessage(content="Sure.", reasoning_content="plan", tool_calls=[
         ToolCall(name="get_weather", arguments='{"city": "Paris"}'),
         ToolCall(name="now", arguments="{}")])),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}', HERMES,
     ChatMessage(content='<tool_call>\n{"name": "f", "arguments": {"a": 1}')),
    ("<tool_call>not json</tool_call>", HERMES, ChatMessage(content="<tool_call>not json</tool_call>")),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', ChatFormat(tools="llama3"),
     ChatMessage(content="", tool_calls=[ToolCall(name="get_weather", arguments='{"city": "Oslo"}')])),
    ('<|python_tag|>{"name": "f", "parameters": {}}', ChatFormat(tools="llama3"),
     ChatMessage(content="", tool_calls=[ToolCall(name="f", arguments="{}")])),
    ('The JSON is {"name": "f"}', ChatFormat(tools="llama3"),
     ChatMessage(content='The JSON is {"name": "f"}')),
    ('[TOOL_CALLS][{"name": "f", "arguments": {"x": "日本"}, "id": "abcDEF123"}]',
     ChatFormat(tools="mistral"),
     ChatMessage(content="", tool_calls=[ToolCall(name="f", arguments='{"x": "日本"}', id="abcDEF123")])),
    ('[TOOL_CALLS][{"name": "f", "argu', ChatFormat(tools="mistral"),
     ChatMessage(content='[TOOL_CALLS][{"name": "f", "argu')),
    ("", HERMES, ChatMessage(content="")),
])
def test_parse(text, fmt, expected):
    assert chatparse.parse(text, fmt) == expected


def test_detect():
    assert chatparse.detect("<tool_call> <think>", "p", has_tools=True) == HERMES
    assert chatparse.detect("<tool_call>", "p", has_tools=False) == ChatFormat()
    assert chatparse.detect("[TOOL_CALLS]", "p", True).tools == "mistral"
    assert chatparse.detect("<|start_header_id|>", "p", True).tools == "llama3"
    assert chatparse.detect("</think>", "x<think>\n", False) == ChatFormat(reasoning=True, in_reasoning=True)
    assert chatparse.detect("</think>", "x<think>\n", False, reasoning=False) == ChatFormat()


# -- through a runner ----------------------------------------------------------------------

GREEDY = {"temperature": 0.0, "num_predict": 24}


def test_chat_is_a_completion_of_the_rendered_prompt(spawn):
    r = spawn(parallel=3)
    messages = chat("system", "Answer briefly.", "user", "What is 2 + 2? " + ODD)
    text, final = r.chat(messages, **GREEDY).text()
    prompt = ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2? "
              f"{ODD}<|im_end|>\n<|im_start|>assistant\n")
    # The reference on a runner of its own: here the prompt would come from
    # the prefix cache but its last token, and a last token decoded alone
    # rounds differently from one decoded with the prompt (greedy text
    # parted after ~10 tokens on an AMD EPYC).
    ref_text, ref_final = spawn(parallel=3).complete(prompt, **GREEDY).text()
    assert text == ref_text and text
    assert final.prompt_count == ref_final.prompt_count == len(r.tokenize(prompt, parse_special=True))
    assert final.message == ChatMessage(content=text) and ref_final.message is None
    # Three at once, each as alone.
    conversations = [chat("user", "Name a colour."), chat("user", "Name a fruit."),
                     chat("user", "Count to three.", "assistant", "1 2 3", "user", "Again")]
    alone = [r.chat(c, **GREEDY).text()[0] for c in conversations]
    streams = [r.chat(c, **GREEDY) for c in conversations]
    assert [s.text()[0] for s in streams] == alone


def test_chat_errors_fail_only_their_request(spawn):
    from runner.engine.requests import BadRequest as ClientBadRequest

    r = spawn()
    with pytest.raises(ClientBadRequest, match="needs content or tool_calls"):
        r.chat([{"role": "user"}]).text()
    with pytest.raises(ClientBadRequest, match="invalid option top_k"):
        r.chat(chat("user", "x"), top_k=-1).text()
    with pytest.raises(ClientBadRequest, match="tools"):
        r.chat(chat("user", "x"), tools=[{"type": "retrieval"}]).text()
    from runner.engine.requests import InputTooLong

    with pytest.raises(InputTooLong, match="does not fit"):
        r.chat(chat("user", "word " * 200_000)).text()  # 1 MB, rendered on the heavy pool
    with pytest.raises(InputTooLong, match="does not fit"):
        r.chat(chat(*["user", "a", "assistant", "b"] * 5_000)).text()  # 20,000 messages
    # Default sampling, unseeded: the model may also end its answer at once
    # (seen in CI: an end token first after the truncated prompt).
    _, final = r.chat(chat("user", "word " * 2_000), truncate=True, num_predict=2).text()
    assert final.prompt_count < 512 and final.done_reason in ("length", "stop")
    assert final.eval_count == 2 or final.done_reason == "stop"
    text, final = r.chat(chat("user", "Hi"), num_predict=4).text()
    assert final.done_reason in ("length", "stop") and final.message.content == text


def test_async_chat_and_cancel(spawn):
    import asyncio

    r = spawn(parallel=2)
    messages = chat("user", "Count from one to fifty in words.")
    expected, _ = r.chat(messages, **GREEDY).text()

    async def run():
        text, final = await r.achat(messages, **GREEDY).text()
        long = r.achat(messages, temperature=0.0, num_predict=400, ignore_eos=True)
        async for event in long:
            if getattr(event, "text", ""):
                break
        long.cancel()
        async for event in long:
            last = event
        return text, final, last

    text, final, last = asyncio.run(run())
    assert text == expected and final.message.content == text
    assert last.done_reason == "cancelled" and last.message is not None


def test_template_errors_and_tool_calls_through_a_runner(family_dir):
    """A tiny Qwen 2.5 runner: arguments its template cannot take are that
    request's bad_request; a tool call (forced by a grammar) comes back
    parsed in the final."""
    from runner.engine.requests import BadRequest as ClientBadRequest
    from runner.process.client import Runner

    path = write_chat_model(family_dir, "qwen25")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    grammar = "root ::= " + json.dumps(call)
    with Runner.spawn(str(path), n_ctx=1024, n_threads=2) as r:
        bad = [{"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]
        with pytest.raises(ClientBadRequest, match=r"arguments is not JSON"):
            r.chat(bad, tools=[WEATHER_TOOL]).text()
        text, final = r.chat(chat("user", "Weather in Paris?"), tools=[WEATHER_TOOL],
                             grammar=grammar, num_predict=200).text()
        assert text == call
        assert final.message == ChatMessage(content="", tool_calls=[
            ToolCall(name="get_weather", arguments='{"city": "Paris"}')])
        # Without tools the same text is content.
        text, final = r.chat(chat("user", "Weather?"), grammar=grammar, num_predict=200).text()
        assert final.message == ChatMessage(content=call)


def test_reasoning_through_a_runner(family_dir):
    from runner.process.client import Runner

    path = write_chat_model(family_dir, "qwen3")
    answer = "<think>\nLet me add.\n</think>\n\n4"
    grammar = "root ::= " + json.dumps(answer)
    with Runner.spawn(str(path), n_ctx=1024, n_threads=2) as r:
        _, final = r.chat(chat("user", "2+2?"), grammar=grammar, num_predict=100).text()
        assert final.message == ChatMessage(content="4", reasoning_content="Let me add.")
        _, final = r.chat(chat("user", "2+2?"), grammar=grammar, num_predict=100,
                          reasoning_format="none").text()
        assert final.message == ChatMessage(content=answer)


# -- the command line ------------------------------------------------------------------------


def test_generate_chat_in_process_and_through_a_runner(spawn, default_model_path):
    args = [sys.executable, "-m", "runner.cli", "generate", "--model", default_model_path,
            "--chat", "--system", "You answer in one word.", "--prompt", "Capital of Japan?",
            "--temperature", "0", "-n", "12", "--threads", "2", "--ctx", "512", "-q"]
    local = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    r = spawn()
    remote = subprocess.run(args + ["--endpoint", r.endpoint], capture_output=True, text=True,
                            timeout=300)
    assert remote.returncode == 0, remote.stderr
    expected, _ = r.chat(chat("system", "You answer in one word.", "user", "Capital of Japan?"),
                         temperature=0.0, num_predict=12).text()
    assert local.stdout == remote.stdout == expected + "\n"
    assert "Tokyo" in expected
    refused = subprocess.run(args[:6] + ["--system", "x", "--prompt", "y"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "--system needs --chat" in refused.stderr
