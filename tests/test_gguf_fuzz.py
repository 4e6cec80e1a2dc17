"""GGUF fuzz: hostile files through the reader, `inspect` (memory estimate) and a real load.

Two generators start from the tiny llama of tests/gguf_bytes.py:

* structural: overwrite counts, key/string lengths, value types, array
  lengths, tensor dimensions, ggml types, tensor offsets or UINT32 values
  (the ``Site`` list ``encode`` records), flip bytes, or cut the file short;
* semantic: set the model's hyperparameters (``llama.*``) to edge values and
  types, with tensors shaped for a possibly different model.

Invariants: the reader raises only GGUFError and allocates a bounded amount;
the memory estimate and ``inspect`` end with a result or a clean error (exit
status 1, one line); the pre-load check returns a list; and loading the file
in a worker process that runs the engine (capped with RLIMIT_AS) ends in a
loaded model or a typed refusal: the worker never dies and never hangs.

CI runs FUZZ_EXAMPLES examples per test (50); RUNNER_FUZZ_SCALE multiplies
that, as for the other fuzz suites (``RUNNER_FUZZ_SCALE=100`` for 5,000).
Examples that once broke an invariant stay as ``@example``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from gguf_bytes import (  # noqa: E402
    ARRAY, BOOL, F32, I32, KV, STRING, U32, U64, TinyShape, encode, tiny_llama_spec,
)

from runner import inspect_cmd  # noqa: E402
from runner.model.gguf import MAX_LAYERS, GGUFError, GGUFFile, parse_gguf  # noqa: E402
from runner.model.load_checks import model_problems  # noqa: E402
from runner.model.memory import LoadOptions, estimate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FUZZ_EXAMPLES = max(1, round(50 * float(os.environ.get("RUNNER_FUZZ_SCALE") or 1)))
fuzz_settings = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture,
    ],
)
READER_PEAK_BYTES = 32 << 20  # the most the reader may allocate for a ~120 KB file
WORKER_MEMORY = 4 << 30  # RLIMIT_AS of the load worker
LOAD_TIMEOUT = 120.0  # seconds one load may take in the worker before it counts as a hang

SEED_SPEC = tiny_llama_spec()
SEED, SITES = encode(SEED_SPEC)
SITE_KINDS = sorted({s.kind for s in SITES})


# ---------------------------------------------------------------------------
# bounds of inspect (no fuzzing)


def _inspect(argv):
    parser = argparse.ArgumentParser()
    inspect_cmd.add_arguments(parser)
    return inspect_cmd.run(parser.parse_args(argv))


@pytest.mark.parametrize("n_layer", [MAX_LAYERS + 1, 100_000, 2**31, 2**32 - 1])
def test_inspect_refuses_layer_counts_llama_cpp_cannot_load(tmp_path, capsys, n_layer):
    path = tmp_path / "deep.gguf"
    path.write_bytes(encode(tiny_llama_spec(hparams={"block_count": n_layer}))[0])
    assert _inspect([str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"llama-runner inspect: llama.block_count = {n_layer} is out of range: llama.cpp loads 1 to 512 layers\n"


def test_inspect_refuses_bad_arguments(tmp_path, capsys):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(SEED)
    assert _inspect([str(path), "--ctx", "-1"]) == 1
    assert "invalid load parameters: Expected `int` >= 0 - at `$.n_ctx`" in capsys.readouterr().err
    assert _inspect([str(path), "--parallel", "0"]) == 1
    assert "invalid load parameters: Expected `int` >= 1 - at `$.parallel`" in capsys.readouterr().err


def test_estimate_work_does_not_grow_with_layers(monkeypatch):
    """Per-layer values are built once per key, not once per layer (this was quadratic: 28 s at 100k layers)."""
    built = []
    original = GGUFFile._int_or_array
    monkeypatch.setattr(GGUFFile, "_int_or_array", lambda self, *a: built.append(a[0]) or original(self, *a))
    counts = {}
    for n_layer in (8, MAX_LAYERS):
        built.clear()
        spec = tiny_llama_spec(hparams={"block_count": n_layer})
        est = estimate(parse_gguf(encode(spec)[0]), LoadOptions(n_ctx=256))
        assert len(est.kv.per_layer) == n_layer
        counts[n_layer] = len(built)
    assert counts[8] == counts[MAX_LAYERS] == len(set(built))


# ---------------------------------------------------------------------------
# the load worker: one process running the engine, reused across examples

_WORKER = """
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
# reports go to the original stdout; anything else (C code included) writes to stderr
report = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
from runner.engine.core import Engine, EngineConfig
def say(**fields):
    report.write(json.dumps(fields) + "\\n")
    report.flush()
for line in sys.stdin:
    path = line.rstrip("\\n")
    try:
        engine = Engine(EngineConfig(model_path=path, n_ctx=256, n_threads=1))
    except Exception as exc:
        say(refused=type(exc).__name__, error=str(exc))
        continue
    try:
        text, final = engine.complete("the cat sat", num_predict=2, temperature=0)
        say(loaded=True, done=final.done_reason)
    except Exception as exc:
        say(loaded=True, request_error=type(exc).__name__, error=str(exc))
    finally:
        engine.close()
"""

# what a refused load may raise: the pre-load check, llama.cpp's refusal, a refused context
CLEAN_REFUSALS = {"ModelFileError", "ModelLoadError", "ContextError", "BadRequest", "LlamaError"}


class LoadWorker:
    """A subprocess that loads each file it is given with the engine and says how it went."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None  # the worker, started on first use and after a death
        self.stderr = tempfile.TemporaryFile("w+")  # the worker's log (a pipe nobody drains would fill up)

    def _start(self) -> subprocess.Popen:
        code = _WORKER.format(memory=WORKER_MEMORY)
        return self._popen([sys.executable, "-c", code])

    def _popen(self, argv: list[str]) -> subprocess.Popen:
        self.stderr.seek(0)
        self.stderr.truncate()
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                text=True, cwd=ROOT)

    def load(self, path: Path) -> dict:
        """The worker's report on ``path``, or {"died": status, "stderr": tail} / {"hung": True}."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        proc.stdin.write(f"{path}\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], LOAD_TIMEOUT)
        line = proc.stdout.readline() if ready else None
        if line:
            return json.loads(line)
        hung = line is None
        proc.kill()
        proc.wait()
        self.proc = None
        self.stderr.seek(0)
        tail = self.stderr.read()[-3000:]
        return {"hung": True, "stderr": tail} if hung else {"died": proc.returncode, "stderr": tail}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.stderr.close()


@pytest.fixture(scope="module")
def worker():
    w = LoadWorker()
    yield w
    w.close()


def _assert_clean_load(worker: LoadWorker, data: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(data)
    report = worker.load(path)
    assert "died" not in report and "hung" not in report, report
    if "refused" in report:
        assert report["refused"] in CLEAN_REFUSALS, report
        assert report["error"], report
    else:
        assert "request_error" not in report or report["request_error"] in CLEAN_REFUSALS, report
    return report


# ---------------------------------------------------------------------------
# header-only invariants shared by both generators


def _check_header(data: bytes) -> GGUFFile | None:
    """Reader, pre-load check, estimate and inspect on ``data``; returns the header if it parses."""
    tracemalloc.start()
    try:
        try:
            info = parse_gguf(data)
        except GGUFError:
            info = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < READER_PEAK_BYTES, f"the reader allocated {peak} bytes for a {len(data)}-byte file"
    if info is None:
        return None
    assert isinstance(model_problems(info), list)
    try:
        estimate(info, LoadOptions(n_ctx=256))
    except (GGUFError, ValueError):
        pass
    return info


def _check_inspect(data: bytes, tmp_path: Path, capsys) -> None:
    path = tmp_path / "inspect.gguf"
    path.write_bytes(data)
    status = _inspect([str(path), "--json"])
    out, err = capsys.readouterr()
    if status == 0:
        json.loads(out)
    else:
        assert status == 1 and err.startswith("llama-runner inspect: ") and err.count("\n") == 1, err


# ---------------------------------------------------------------------------
# structural mutations

_U32_EDGES = [0, 1, 2, 3, 5, 8, 9, 12, 13, 31, 32, 63, 64, 255, 256, 513, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
_U64_EDGES = _U32_EDGES + [2**32, 2**48, 2**63 - 1, 2**63, 2**64 - 1, len(SEED), len(SEED) - 1, len(SEED) + 1]


def _site_value(width: int):
    edges, top = (_U32_EDGES, 2**32 - 1) if width == 4 else (_U64_EDGES, 2**64 - 1)
    return st.one_of(st.sampled_from(edges), st.integers(0, top))


_site = st.sampled_from(SITE_KINDS).flatmap(lambda k: st.sampled_from([s for s in SITES if s.kind == k]))
_set = _site.flatmap(lambda s: st.tuples(st.just("set"), st.just(s.offset), st.just(s.width), _site_value(s.width)))
_byte = st.tuples(st.just("byte"), st.integers(0, len(SEED) - 1), st.just(1), st.integers(0, 255))
_cut = st.tuples(st.just("cut"), st.integers(0, len(SEED) - 1), st.just(0), st.just(0))
mutations = st.lists(st.one_of(_set, _set, _byte, _cut), min_size=1, max_size=4)


def _mutate(edits) -> bytes:
    data = bytearray(SEED)
    for op, pos, width, value in edits:
        if pos >= len(data):
            continue
        if op == "cut":
            del data[pos:]
        elif op == "byte":
            data[pos] = value
        elif pos + width <= len(data):
            struct.pack_into("<I" if width == 4 else "<Q", data, pos, value)
    return bytes(data)


def _site_at(kind: str, label: str = "") -> int:
    return next(s.offset for s in SITES if s.kind == kind and (not label or s.label == label))


@fuzz_settings
@given(edits=mutations)
def test_mutated_files_reader_inspect(edits, tmp_path_factory, capsys):
    data = _mutate(edits)
    _check_header(data)
    _check_inspect(data, tmp_path_factory.mktemp("inspect"), capsys)


@pytest.mark.model
@fuzz_settings
@given(edits=mutations)
@example(edits=[("set", _site_at("u32", "llama.block_count"), 4, 0)])
@example(edits=[("set", _site_at("u32", "llama.attention.head_count_kv"), 4, 3)])
@example(edits=[("set", _site_at("ggml_type", "token_embd.weight"), 4, 1)])
@example(edits=[("set", _site_at("offset", "output_norm.weight"), 8, 64)])
@example(edits=[("byte", 417, 1, 128)])  # found: a negative RMS-norm epsilon aborted the first decode
def test_mutated_files_load_cleanly(edits, worker, tmp_path_factory):
    report = _assert_clean_load(worker, _mutate(edits), tmp_path_factory.mktemp("load"))
    event(f"load: {report.get('refused', 'loaded')}")  # shown by --hypothesis-show-statistics


# ---------------------------------------------------------------------------
# hyperparameter mutations

_HPARAM_KEYS = [
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
    "expert_count", "expert_used_count", "expert_group_count", "expert_group_used_count",
    "nextn_predict_layers", "rope.scaling.type", "rope.freq_base", "attention.layer_norm_rms_epsilon",
    "attention.sliding_window", "vocab_size", "pooling_type", "attention.causal",
]


def _hparam_value():
    u32 = st.one_of(st.integers(0, 16), st.sampled_from(_U32_EDGES), st.integers(0, 2**32 - 1))
    return st.one_of(
        u32,
        u32,
        u32,
        st.builds(lambda v: KV("", I32, v), st.integers(-(2**31), 2**31 - 1)),
        st.builds(lambda v: KV("", U64, v), st.sampled_from(_U64_EDGES)),
        st.builds(lambda v: KV("", F32, v), st.floats(width=32, allow_nan=True, allow_infinity=True)),
        st.builds(lambda v: KV("", STRING, v), st.sampled_from(["", "none", "linear", "yarn", "bogus", "\x00"])),
        st.builds(lambda v: KV("", BOOL, v), st.booleans()),
        st.builds(lambda v: KV("", ARRAY, v, U32), st.lists(st.sampled_from(_U32_EDGES), max_size=3)),
        st.none(),  # leave the key out
    )


hparams = st.dictionaries(st.sampled_from(_HPARAM_KEYS), _hparam_value(), max_size=4)
# tensors are shaped for these (the keys follow unless hparams overrides them)
shapes = st.builds(
    TinyShape,
    n_embd=st.sampled_from([8, 16, 32, 36]),
    n_layer=st.integers(1, 3),
    n_head=st.sampled_from([1, 2, 4]),
    n_head_kv=st.sampled_from([1, 2, 3, 4]),
    n_ff=st.sampled_from([8, 64]),
    head_dim_k=st.sampled_from([None, 4, 6, 8, 9]),
    head_dim_v=st.sampled_from([None, 4, 8]),
)


def _hparam_file(shape: TinyShape, params: dict) -> bytes:
    return encode(tiny_llama_spec(shape, hparams=params))[0]


@fuzz_settings
@given(shape=shapes, params=hparams)
def test_hyperparameters_reader_inspect(shape, params, tmp_path_factory, capsys):
    data = _hparam_file(shape, params)
    assert _check_header(data) is not None
    _check_inspect(data, tmp_path_factory.mktemp("inspect"), capsys)


@pytest.mark.model
@fuzz_settings
@given(shape=shapes, params=hparams)
@example(shape=TinyShape(), params={"block_count": 0})
@example(shape=TinyShape(), params={"expert_used_count": 1})
@example(shape=TinyShape(n_head=4, n_head_kv=3), params={"context_length": 256})
@example(shape=TinyShape(n_embd=36), params={"context_length": 256})
def test_hyperparameters_load_cleanly(shape, params, worker, tmp_path_factory):
    report = _assert_clean_load(worker, _hparam_file(shape, params), tmp_path_factory.mktemp("load"))
    event(f"load: {report.get('refused', 'loaded')}")


@pytest.mark.model
def test_worker_loads_the_seed_and_restarts(worker, tmp_path):
    """The valid seed loads and generates; a worker that is gone is replaced for the next file."""
    assert _assert_clean_load(worker, SEED, tmp_path) == {"loaded": True, "done": "length"}
    worker.proc.kill()
    worker.proc.wait()
    assert worker.load(tmp_path / "fuzz.gguf") == {"loaded": True, "done": "length"}


class _AbortingWorker(LoadWorker):
    def _start(self) -> subprocess.Popen:
        code = "import os, sys; sys.stdin.readline(); sys.stderr.write('GGML_ASSERT(x) failed\\n'); os.abort()"
        return self._popen([sys.executable, "-c", code])


def test_worker_reports_a_death(tmp_path):
    w = _AbortingWorker()
    report = w.load(tmp_path / "any.gguf")
    assert report == {"died": -6, "stderr": "GGML_ASSERT(x) failed\n"}
    assert w.proc is None
    w.close()
