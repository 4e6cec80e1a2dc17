"""LoRA on the real extension: the benchmarks' tiny llama with two tiny random
adapters written by tests/lora_models.py.  Greedy text is the observable:
an adapter at scale 1 changes it, scale 0 gives the base model's, and
requests of different adapter sets in flight at once each get what they get
alone (the scheduler never mixes sets in one decode, runner.engine.scheduler)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from runner.engine.core import Engine, EngineConfig
from runner.engine.requests import BadRequest, CompletionOptions, CompletionRequest

from lora_models import write_lora

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from tiny_model import write_tiny_llama  # noqa: E402

pytestmark = pytest.mark.model

N = 24  # tokens per completion
PROMPTS = ["The capital of France is", "Once upon a time, 🐉 und Drachen", "def f(x):\n    return"]


def greedy(lora=None, **kw):
    opts = dict(temperature=0.0, repeat_penalty=1.0, num_predict=N, ignore_eos=True, **kw)
    if lora is not None:
        opts["lora"] = lora
    return opts


A = [{"id": 0, "scale": 1.0}]          # adapter 0 alone
B = [{"id": 1, "scale": 1.0}]          # adapter 1 alone
A_HALF = [{"id": 0, "scale": 0.5}]
BASE = [{"id": 0, "scale": 0.0}]       # every adapter at 0: the base model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    model = write_tiny_llama(d / "tiny.gguf")
    return model, write_lora(model, d / "a.gguf", seed=1), write_lora(model, d / "b.gguf", seed=2)


@pytest.fixture(scope="module")
def base_engine(files):
    e = Engine(EngineConfig(str(files[0]), n_ctx=1024, parallel=2, n_threads=2))
    yield e
    e.close()


@pytest.fixture(scope="module")
def engine(files):
    e = Engine(EngineConfig(str(files[0]), n_ctx=2048, parallel=4, n_threads=2,
                            lora_paths=(str(files[1]), str(files[2]))))
    yield e
    e.close()


def text(engine, prompt, **options):
    out, final = engine.complete(prompt, **options)
    assert final.done_reason == "length", final
    return out


def test_scale_zero_is_the_base_model_and_a_scale_changes_it(engine, base_engine):
    for prompt in PROMPTS:
        base = text(base_engine, prompt, **greedy())
        assert text(engine, prompt, **greedy(BASE)) == base
        assert text(engine, prompt, **greedy([{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}])) == base
        with_a = text(engine, prompt, **greedy(A))
        with_b = text(engine, prompt, **greedy(B))
        assert with_a != base and with_b != base and with_a != with_b
        assert text(engine, prompt, **greedy(A_HALF)) not in (base, with_a)


def test_no_option_runs_every_adapter_at_scale_one(engine):
    both = [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 1.0}]
    for prompt in PROMPTS:
        assert text(engine, prompt, **greedy()) == text(engine, prompt, **greedy(both))
        assert text(engine, prompt, **greedy([])) == text(engine, prompt, **greedy(both))


def test_sets_in_flight_at_once_each_equal_their_solo_runs(engine):
    sets = [A, B, BASE, A_HALF, None]
    solo = {(p, i): text(engine, p, **greedy(s)) for p in PROMPTS[:2] for i, s in enumerate(sets)}
    switches = engine.info()["lora"]["switches"]
    handles = {(p, i): engine.submit(CompletionRequest(p, CompletionOptions.from_dict(greedy(s))))
               for p in PROMPTS[:2] for i, s in enumerate(sets)}  # 10 requests, 4 slots
    for key, h in handles.items():
        out, final = h.result()
        assert final.done_reason == "length"
        assert out == solo[key], key
    assert engine.info()["lora"]["switches"] > switches  # the sets did take turns


def test_a_cached_prefix_serves_only_its_own_set(files):
    """One slot, adapter 0 loaded (default set: scale 1).  A prefix computed
    under one set is never reused under another; the host tier keeps (and
    restores) only the default set's prefixes."""
    e = Engine(EngineConfig(str(files[0]), n_ctx=512, parallel=1, n_threads=2,
                            lora_paths=(str(files[1]),)))
    try:
        prompt = PROMPTS[0] * 4

        def run(lora):
            out, final = e.complete(prompt, **greedy(lora))
            return out, final.cached_count

        half, cached = run(A_HALF)
        assert cached == 0
        base, cached = run(BASE)
        assert cached == 0
        assert run(BASE) == (base, len(e.tokenize(prompt, add_special=True)) - 1)  # the slot serves it
        assert run(A_HALF) == (half, 0)        # BASE's slot does not; nothing kept for A_HALF
        default, cached = run(None)
        assert cached == 0 and default not in (base, half)
        assert run(BASE) == (base, 0)
        assert run(None) == (default, len(e.tokenize(prompt, add_special=True)) - 1)  # from the host tier
    finally:
        e.close()


def test_bad_lora_options_fail_the_request_only(engine, base_engine):
    with pytest.raises(BadRequest, match=r"invalid option lora: no adapter with id 2 is loaded \(loaded: ids 0..1\)"):
        engine.complete("x", **greedy([{"id": 2, "scale": 1.0}]))
    with pytest.raises(BadRequest, match=r"no adapter with id 0 is loaded \(loaded: none\)"):
        base_engine.complete("x", **greedy(A))
    with pytest.raises(BadRequest, match="invalid option lora: must be a list"):
        engine.complete("x", **greedy({"id": 0}))
    assert text(engine, "x", **greedy(A))  # the engine goes on


def test_info_lists_the_adapters(engine, files):
    info = engine.info()["lora"]
    assert 8 <= info["turn_steps"] <= 64  # set from the switches measured so far
    assert info["adapters"] == [{"id": 0, "path": str(files[1]), "scale": 1.0},
                                {"id": 1, "path": str(files[2]), "scale": 1.0}]


def test_generate_command_loads_adapters_and_takes_scales(engine, files):
    """``llama-runner generate --lora FILE --lora-scale ID=SCALE`` prints what
    the engine gives the same request."""
    import subprocess

    prompt = PROMPTS[0]

    def generate(*extra):
        out = subprocess.run([sys.executable, "-m", "runner.cli", "generate", "--model", str(files[0]),
                              "--prompt", prompt, "-n", str(N), "--temperature", "0", "--repeat-penalty", "1",
                              "--quiet", "--lora", str(files[1]), "--lora", str(files[2]),
                              *extra], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.rstrip("\n")

    def expected(lora=None):
        opts = dict(temperature=0.0, repeat_penalty=1.0, num_predict=N)
        return engine.complete(prompt, **opts, **({"lora": lora} if lora else {}))[0]

    assert generate("--lora-scale", "0=0.5") == expected(A_HALF)
    assert generate() == expected()
    assert expected(A_HALF) != expected()
    bad = subprocess.run([sys.executable, "-m", "runner.cli", "generate", "--model", str(files[0]),
                          "--prompt", prompt, "--lora", str(files[1]), "--lora-scale", "half"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "ID=SCALE" in bad.stderr


def _bad_adapters(files, d: Path) -> dict[str, tuple[Path, str]]:
    """Adapter paths llama.cpp could not use, each with the reason expected
    (a regex) after the path."""
    import gguf

    (d / "dir.gguf").mkdir(exist_ok=True)
    (d / "text.gguf").write_text("not a GGUF file, only some text\n" * 4)
    cut = d / "cut.gguf"
    data = Path(files[1]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    other = d / "qwen2.gguf"  # an adapter's header, for another architecture
    w = gguf.GGUFWriter(str(other), "qwen2")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 4.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 8), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {
        "missing": (d / "missing.gguf", None),
        "directory": (d / "dir.gguf", "is a directory, not a GGUF file"),
        "text": (d / "text.gguf", r"is not a usable GGUF file: not a GGUF file \(magic b'not '\)"),
        "truncated": (cut, r"is not a usable GGUF file: tensor data needs \d+ bytes, file has \d+ \(truncated\?\)"),
        "a model": (Path(files[0]), r"is not a LoRA adapter \((general.type is 'model'|it has no general.type), not 'adapter'\)"),
        "other architecture": (other, "is for architecture 'qwen2'; the model's is 'llama'"),
    }


def _expected(path: Path, reason: str | None) -> str:
    import re

    if reason is None:
        return f"LoRA adapter not found: {re.escape(str(path))}$"
    return f"LoRA adapter {re.escape(str(path))} {reason}$"


@pytest.mark.parametrize("case", ["missing", "directory", "text", "truncated", "a model", "other architecture"])
def test_an_unusable_adapter_file_is_a_bad_request_naming_it(files, tmp_path, case):
    """The engine refuses the load before loading the model, with the file
    and its problem, not llama.cpp's "failed to load lora adapter"."""
    path, reason = _bad_adapters(files, tmp_path)[case]
    with pytest.raises(BadRequest, match=_expected(path, reason)) as info:
        Engine(EngineConfig(str(files[0]), n_ctx=256, n_threads=2, lora_paths=(str(files[1]), str(path))))
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("case", ["missing", "text"])
def test_a_runner_refuses_an_unusable_adapter_as_a_bad_request(files, tmp_path, case):
    """Through a spawned runner: code bad_request, the message is the
    reason alone (no unrelated llama.cpp log line)."""
    from runner.process.client import Runner

    path, reason = _bad_adapters(files, tmp_path)[case]
    with pytest.raises(BadRequest, match="load failed: " + _expected(path, reason)) as info:
        Runner.spawn(str(files[0]), n_ctx=256, n_threads=2, lora_paths=[str(path)])
    assert info.value.code == "bad_request"
