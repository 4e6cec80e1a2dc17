"""Model files that would abort llama.cpp are refused before it sees them (runner.model.load_checks).

Each case in CASES is the tiny llama of tests/gguf_bytes.py with one
hyperparameter out of range. ``test_unchecked_cases_abort_llama_cpp`` (slow)
shows that the vendored llama.cpp really aborts on every one of them, so each
check guards a real crash; the other tests show that the runner refuses them
with the reason and goes on living: in-process, in a subprocess running the
engine (no SIGABRT), and in a real runner process (state ``error``).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gguf_bytes import (  # noqa: E402
    I32, KV, STRING, TINY, U32, GGUFSpec, TinyShape, encode, tiny_llama_spec, tiny_vocab, write_tiny_llama,
)

from handserve import deferred_runner  # noqa: E402
from runner.model import load_checks  # noqa: E402
from runner.model.gguf import MAX_LAYERS, parse_gguf  # noqa: E402
from runner.model.load_checks import ModelFileError, check_model_file, model_problems  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "vendor" / "llama.cpp"

_MOE = {"expert_count": 4, "expert_used_count": 2}
# (case id, tiny_llama_spec arguments, what the refusal says)
CASES = [
    ("no_layers", {"hparams": {"block_count": 0}}, "block_count = 0 is out of range"),
    ("too_many_layers", {"hparams": {"block_count": 513}}, "block_count = 513 is out of range"),
    ("layers_u32_max", {"hparams": {"block_count": 2**32 - 1}}, "block_count = 4294967295 is out of range"),
    ("nextn_over_layers", {"hparams": {"nextn_predict_layers": 3}}, "nextn_predict_layers = 3 is more than"),
    ("too_many_experts", {"hparams": {"expert_count": 1025, "expert_used_count": 2}}, "limit of 1024"),
    ("used_without_experts", {"hparams": {"expert_used_count": 2}}, "expert_used_count = 2 is more than expert_count 0"),
    ("experts_none_used", {"hparams": {"expert_count": 4}}, "expert_used_count is 0"),
    ("used_over_experts", {"hparams": {"expert_count": 4, "expert_used_count": 5}}, "expert_used_count = 5"),
    ("per_layer_used_over", {"hparams": {"expert_count": 4, "expert_used_count": [2, 6]}}, "expert_used_count = 6"),
    ("groups_not_fewer", {"hparams": {**_MOE, "expert_group_count": 4}}, "must be less than expert_count 4"),
    (
        "groups_not_dividing",
        {"hparams": {"expert_count": 6, "expert_used_count": 2, "expert_group_count": 4, "expert_group_used_count": 1}},
        "not a multiple",
    ),
    ("group_used_zero", {"hparams": {"expert_count": 8, "expert_used_count": 2, "expert_group_count": 4}},
     "expert_group_used_count = 0 must be 1 to 3"),
    ("groups_without_experts", {"hparams": {"expert_group_count": 2}}, "but the model has no experts"),
    ("rope_scaling_unknown", {"hparams": {"rope.scaling.type": "bogus"}}, "rope.scaling.type = 'bogus'"),
    ("kv_heads_not_dividing", {"shape": TinyShape(n_head=4, n_head_kv=3)}, "3 KV heads do not divide 4"),
    ("k_and_v_heads_differ", {"shape": TinyShape(head_dim_k=8, head_dim_v=16)}, "file has 8, 16 and 8"),
    ("odd_rope_dims", {"shape": TinyShape(n_embd=36, n_head=4, n_head_kv=2)}, "rope dimension count 9 is odd"),
    ("duplicate_token", {"tokens": tiny_vocab()[:-1] + ["\u2581the"]}, "token 269 '\u2581the' repeats token 259"),
    ("bos_missing", {"tokens": []}, "add_bos_token is true but the 0-token vocabulary has no BOS token"),
    ("negative_rms_eps", {"hparams": {"attention.layer_norm_rms_epsilon": -1e-5}}, "must be >= 0"),
    ("nan_rms_eps", {"hparams": {"attention.layer_norm_rms_epsilon": float("nan")}}, "= nan must be >= 0"),
]
# Refused by the checks, but llama.cpp refuses them cleanly too (a thrown error, not an abort).
CLEAN_CASES = [
    ("rope_dims_differ", {"hparams": {"rope.dimension_count": 4}}, "file has 8, 8 and 4"),
    ("heads_wrong_type", {"hparams": {"attention.head_count": KV("", I32, 4)}}, "is INT32; llama.cpp reads it as UINT32"),
    ("per_layer_wrong_length", {"hparams": {"attention.head_count_kv": [2, 2, 2]}}, "has 3 entries for 2 layers"),
]
ALL_CASES = CASES + CLEAN_CASES


def _spec(kw):
    kw = dict(kw)
    return tiny_llama_spec(kw.pop("shape", TINY), **kw)


def _write_cases(tmp_path, cases):
    paths = {}
    for name, kw, _ in cases:
        paths[name] = tmp_path / f"{name}.gguf"
        paths[name].write_bytes(encode(_spec(kw))[0])
    return paths


# ---------------------------------------------------------------------------
# the checks on headers (no llama.cpp)


@pytest.mark.parametrize("name,kw,reason", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_problem_is_named(name, kw, reason):
    problems = model_problems(parse_gguf(encode(_spec(kw))[0]))
    assert len(problems) == 1 and reason in problems[0], problems


def test_valid_files_pass(tmp_path):
    assert model_problems(parse_gguf(encode(tiny_llama_spec())[0])) == []
    moe = {"expert_count": 8, "expert_used_count": 2, "expert_group_count": 4, "expert_group_used_count": 2}
    assert model_problems(parse_gguf(encode(tiny_llama_spec(hparams=moe))[0])) == []
    assert model_problems(parse_gguf(encode(tiny_llama_spec(hparams={"block_count": MAX_LAYERS}))[0])) == []
    # a per-layer KV head array with a layer without attention (0 KV heads)
    assert model_problems(parse_gguf(encode(tiny_llama_spec(hparams={"attention.head_count_kv": [2, 0]}))[0])) == []
    # hunyuan_vl turns a single expert into "no experts" before llama.cpp checks them
    spec = tiny_llama_spec(hparams={"expert_count": 1})
    assert model_problems(parse_gguf(encode(spec)[0]))
    renamed = [KV("general.architecture", STRING, "hunyuan_vl")]
    renamed += [KV(k.key.replace("llama.", "hunyuan_vl."), k.type, k.value, k.element_type) for k in spec.kvs[1:]]
    assert model_problems(parse_gguf(encode(GGUFSpec(tuple(renamed), spec.tensors))[0])) == []


def test_mistyped_architecture_is_a_problem():
    spec = tiny_llama_spec()
    kvs = (KV("general.architecture", U32, 5),) + spec.kvs[1:]
    problems = model_problems(parse_gguf(encode(GGUFSpec(kvs, spec.tensors))[0]))
    assert problems == ["general.architecture: expected a string, file has UINT32"]


def test_all_problems_are_listed_and_the_file_named(tmp_path):
    path = tmp_path / "bad.gguf"
    write_tiny_llama(path, hparams={"rope.scaling.type": "bogus", "expert_group_count": 2},
                     tokens=tiny_vocab() + ["<s>"])
    with pytest.raises(ModelFileError) as info:
        check_model_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "rope.scaling.type" in message and "expert_group_count" in message and "repeats token 1" in message


def test_unreadable_files_are_left_to_llama_cpp(tmp_path):
    assert check_model_file(tmp_path / "missing.gguf") is None
    assert check_model_file(tmp_path) is None
    (tmp_path / "short.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelFileError, match="too short"):
        check_model_file(tmp_path / "short.gguf")


def test_default_model_passes(default_model_path):
    info = check_model_file(default_model_path)
    assert info is not None and info.architecture == "llama"


# ---------------------------------------------------------------------------
# the limits and the architecture list follow the vendored llama.cpp

needs_vendor = pytest.mark.skipif(not (VENDOR / "src").is_dir(), reason="vendor/llama.cpp is not synced")


@needs_vendor
def test_limits_match_vendored_sources():
    hparams_h = (VENDOR / "src" / "llama-hparams.h").read_text()
    assert re.search(rf"#define LLAMA_MAX_LAYERS\s+{MAX_LAYERS}\b", hparams_h)
    assert re.search(rf"#define LLAMA_MAX_EXPERTS\s+{load_checks.MAX_EXPERTS}\b", hparams_h)
    model_cpp = (VENDOR / "src" / "llama-model.cpp").read_text()
    table = model_cpp.split("LLAMA_ROPE_SCALING_TYPES = {", 1)[1].split("};", 1)[0]
    assert tuple(re.findall(r'"(\w+)"', table)) == load_checks.ROPE_SCALING_TYPES


@needs_vendor
def test_same_head_and_rope_list_matches_vendored_graphs():
    arch_names = set(re.findall(r'\{ LLM_ARCH_\w+,\s+"([^"]+)"', (VENDOR / "src" / "llama-arch.cpp").read_text()))
    asserting = set()
    for path in (VENDOR / "src" / "models").glob("*.cpp"):
        text = path.read_text()
        if "GGML_ASSERT(n_embd_head == n_rot)" in text and "GGML_ASSERT(n_embd_head == hparams.n_embd_head_k())" in text:
            asserting.add(path.stem)
    # every listed architecture's graph asserts both, and no such architecture is missing
    assert load_checks.SAME_HEAD_AND_ROPE == asserting & arch_names


# ---------------------------------------------------------------------------
# loading: the engine in a subprocess, the unchecked binding, a runner process

_ENGINE_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from runner.engine.core import Engine, EngineConfig
for path in sys.argv[1:]:
    try:
        engine = Engine(EngineConfig(model_path=path, n_ctx=256, n_threads=1))
    except Exception as exc:
        print(json.dumps({"path": path, "type": type(exc).__name__, "error": str(exc)}), flush=True)
        continue
    text, final = engine.complete("the cat sat", num_predict=2, temperature=0)
    engine.close()
    print(json.dumps({"path": path, "type": None, "error": None, "done": final.done_reason}), flush=True)
"""

# What Engine does minus the check: load, create a context, run one prompt.
_UNCHECKED_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from runner import _llama
_llama.backend_init()
model = _llama.Model(sys.argv[1])
ctx = _llama.Context(model, n_ctx=256, n_batch=64, n_threads=1)
tokens = model.tokenize("the cat sat", add_special=True)
batch = _llama.Batch(64)
batch.add_tokens(tokens, 0, 0, output_last=True)
ctx.decode(batch)
"""


def _run(code, *args, timeout=120):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.model
def test_engine_refuses_each_case_and_lives(tmp_path):
    paths = _write_cases(tmp_path, ALL_CASES)
    good = write_tiny_llama(tmp_path / "good.gguf")
    proc = _run(_ENGINE_CHILD, *paths.values(), good, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {Path(r["path"]).stem: r for r in map(json.loads, proc.stdout.splitlines())}
    for name, _, reason in ALL_CASES:
        assert results[name]["type"] == "ModelFileError", results[name]
        assert reason in results[name]["error"], results[name]
    assert results["good"]["type"] is None and results["good"]["done"] == "length"


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("name,kw,reason", CASES, ids=[c[0] for c in CASES])
def test_unchecked_cases_abort_llama_cpp(tmp_path, name, kw, reason):
    """Without the check the vendored llama.cpp aborts on the case: the check guards a real crash.

    When an upgrade of llama.cpp makes one of these fail cleanly instead, its
    check may go (and this case moves to CLEAN_CASES).
    """
    path = _write_cases(tmp_path, [(name, kw, reason)])[name]
    proc = _run(_UNCHECKED_CHILD, path)
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stderr[-2000:])


@pytest.mark.model
def test_runner_process_reports_the_reason(tmp_path):
    from runner.engine.requests import EngineError
    from runner.process.client import Runner, RunnerGone

    paths = _write_cases(tmp_path, [c for c in CASES if c[0] in ("too_many_layers", "duplicate_token")])
    reasons = dict((c[0], c[2]) for c in CASES)
    for name, path in paths.items():
        with pytest.raises(EngineError) as info:
            Runner.spawn(str(path), n_ctx=256, n_threads=1, load_timeout=60)
        # state "error", not a dead runner (that would raise RunnerGone)
        assert not isinstance(info.value, RunnerGone), info.value
        assert "load failed" in str(info.value) and reasons[name] in str(info.value)
    with Runner.spawn(str(write_tiny_llama(tmp_path / "good.gguf")), n_ctx=256, n_threads=1) as runner:
        assert runner.health().state == "ready"


@pytest.mark.model
def test_llama_cpp_refusal_says_why(tmp_path):
    path = write_tiny_llama(tmp_path / "three_layers.gguf", hparams={"block_count": 3})  # tensors for 2
    assert check_model_file(path) is not None  # nothing the checks know: llama.cpp refuses it
    proc = _run(_ENGINE_CHILD, path)
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["type"] == "ModelLoadError"
    assert "blk.2.attn_norm.weight" in result["error"], result["error"]


@pytest.mark.model
def test_load_error_carries_llama_cpp_lines_only_when_llama_cpp_failed(tmp_path):
    """One runner process, two loads: llama.cpp refuses the file (its reason
    is in the error), then the engine refuses the parameters before touching
    the file, and that error carries no llama.cpp line (the stale one is
    unrelated)."""
    from runner.engine.requests import BadRequest, EngineError
    from runner.process.client import Runner

    path = write_tiny_llama(tmp_path / "three_layers.gguf", hparams={"block_count": 3})  # tensors for 2
    with deferred_runner(str(path)) as (proc, endpoint):
        with Runner.connect(endpoint) as r:
            r.load(n_ctx=256, n_threads=1)
            with pytest.raises(EngineError) as failed:
                r.wait_ready(load_timeout=60)
            assert "blk.2.attn_norm.weight" in str(failed.value), failed.value
            r.load(n_ctx=2, parallel=4, n_threads=1)
            with pytest.raises(BadRequest) as refused:
                r.wait_ready(load_timeout=60)
            message = str(refused.value)
            assert "too small for parallel 4" in message, message
            assert "llama.cpp" not in message and "blk.2" not in message, message
            r.shutdown()
        assert proc.wait(60) == 0


def test_vocabulary_without_byte_tokens_fails_the_request_not_the_process(tmp_path):
    """llama.cpp's tokenizer throws std::out_of_range for a SentencePiece
    vocabulary with no <0xNN> tokens; ext/guard.cpp turns it into an error."""
    from runner.engine.core import Engine, EngineConfig
    from runner.engine.requests import EngineError

    path = write_tiny_llama(tmp_path / "no_bytes.gguf", tokens=["<unk>", "<s>", "</s>", "a"])
    with Engine(EngineConfig(str(path), n_ctx=64, n_threads=1)) as engine:
        with pytest.raises(EngineError) as info:
            engine.complete("the cat sat", num_predict=2)
        assert "tokeniz" in str(info.value) and info.value.code == "internal"
        # Token-id prompts need no tokenizer: the engine still serves them.
        text, final = engine.complete([1, 3], num_predict=2, temperature=0.0)
        assert final.done_reason in ("stop", "length")
