"""runner.generate (the CLI's in-process ``generate``) against the engine, and
the options the CLI's ``generate`` sends."""

from __future__ import annotations

import dataclasses

import pytest

from runner.cli import _SAMPLING_FLAGS, _completion_options, build_parser
from runner.engine.core import Engine, EngineConfig
from runner.engine.requests import Chunk, CompletionOptions, CompletionRequest
from runner.generate import GenerationStats, generate

# Repeats within the penalty window: the penalties change the greedy pick only
# if the prompt's tokens reach the sampler.
PROMPT = "one two three one two three one two three one two"
N_CTX = 1024


def _engine_tokens(default_model_path: str, options: CompletionOptions) -> tuple[str, list[int]]:
    with Engine(EngineConfig(default_model_path, n_ctx=N_CTX, parallel=1, n_threads=2)) as engine:
        events = list(engine.submit(CompletionRequest(prompt=PROMPT, options=options)))
    chunks = [e for e in events if isinstance(e, Chunk)]
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.tokens]


@pytest.mark.parametrize("penalties", [
    dict(repeat_penalty=1.3),
    dict(repeat_penalty=1.0, presence_penalty=1.5, repeat_last_n=-1),
])
def test_in_process_generation_sees_the_prompt_like_the_engine(model, make_ctx, default_model_path,
                                                               penalties):
    """Greedy with penalties: the in-process path's tokens and text equal the
    engine's, which feeds the prompt's trailing tokens to the penalties."""
    options = CompletionOptions.from_dict(dict(temperature=0.0, num_predict=24, seed=1, **penalties))
    stats = GenerationStats()
    text = "".join(generate(model, make_ctx(n_ctx=N_CTX), PROMPT, options, stats))
    engine_text, engine_tokens = _engine_tokens(default_model_path, options)
    assert stats.tokens == engine_tokens
    assert text == engine_text


def test_prompt_penalties_change_the_greedy_pick(model, make_ctx):
    """The penalties see the prompt: unpenalised, the model continues the
    pattern (" three"); at 1.3 every word of the prompt is penalised and the
    first pick is another one."""
    plain = GenerationStats()
    penalised = GenerationStats()
    for stats, penalty in ((plain, 1.0), (penalised, 1.3)):
        options = CompletionOptions.from_dict(dict(temperature=0.0, num_predict=4, repeat_penalty=penalty))
        list(generate(model, make_ctx(n_ctx=N_CTX), PROMPT, options, stats))
    assert plain.tokens[0] != penalised.tokens[0]


def _cli_options(*argv: str) -> CompletionOptions:
    args = build_parser().parse_args(["generate", "-p", "hi", *argv])
    return CompletionOptions.from_dict(_completion_options(args))


def test_cli_sampling_defaults_are_the_options_defaults():
    """Without sampling flags, generate sends the options CompletionOptions
    defaults to (repeat_penalty among them), whatever those are; only
    num_predict is the CLI's own (-n)."""
    sent = _cli_options()
    defaults = {f.name: f.default for f in dataclasses.fields(CompletionOptions)
                if f.default is not dataclasses.MISSING}
    for _flag, name, _kind, _what in _SAMPLING_FLAGS:
        assert getattr(sent, name) == defaults[name], name
    assert sent == CompletionOptions(num_predict=128)


# A valid value for each sampling flag (the test checks it is not the default).
FLAG_VALUES = {"--temperature": 0.0, "--top-k": 5, "--top-p": 0.5, "--min-p": 0.05, "--typical-p": 0.7,
               "--repeat-last-n": 32, "--repeat-penalty": 1.0, "--frequency-penalty": 0.5,
               "--presence-penalty": 0.25, "--seed": 7}


def test_cli_sampling_flags_reach_their_fields():
    """Each sampling flag given on the command line sets its field, the
    other fields keep their defaults."""
    assert sorted(FLAG_VALUES) == sorted(flag for flag, *_ in _SAMPLING_FLAGS)
    for flag, name, _kind, _what in _SAMPLING_FLAGS:
        value = FLAG_VALUES[flag]
        assert value != getattr(CompletionOptions, name), flag
        sent = _cli_options(flag, str(value))
        assert sent == dataclasses.replace(CompletionOptions(num_predict=128), **{name: value}), flag
