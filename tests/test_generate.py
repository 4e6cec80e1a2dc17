"""runner.generate (the CLI's in-process ``generate``) against the engine."""

from __future__ import annotations

import pytest

from runner.engine import Engine, EngineConfig
from runner.generate import GenerationStats, generate
from runner.requests import Chunk, CompletionOptions, CompletionRequest

pytestmark = pytest.mark.model

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
