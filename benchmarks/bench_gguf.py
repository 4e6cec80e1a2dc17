"""Header-reading speed: runner.model.gguf against gguf-py's GGUFReader.

Run with ``python -m pytest benchmarks/bench_gguf.py``; add ``-s`` to see the
speed-up lines, which also land in ``--benchmark-json`` as extra_info.
runner.model.gguf reads with max_array_size=1024 (vocabularies skipped), the way
``inspect`` and the memory planner use it; GGUFReader always maps and indexes
every array.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from runner.model.gguf import read_gguf  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB = REPO / "vendor" / "llama.cpp" / "models" / "ggml-vocab-qwen2.gguf"  # 151,936 tokens + 151,387 merges


def _default_model() -> str:
    try:
        from runner.model.models import default_model_path

        return str(default_model_path())
    except (ImportError, OSError) as exc:
        pytest.skip(f"default model unavailable: {exc!r}")


def _vocab() -> str:
    if not VOCAB.exists():
        pytest.skip(f"{VOCAB} is missing (run the vendor sync step)")
    return str(VOCAB)


@pytest.fixture(params=["default-model", "qwen2-vocab"])
def gguf_path(request) -> str:
    return _default_model() if request.param == "default-model" else _vocab()


def _best_of(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_runner_gguf(benchmark, gguf_path):
    info = benchmark(read_gguf, gguf_path, max_array_size=1024)
    assert info.tensors or info.vocab_size


def test_gguf_py_reader(benchmark, gguf_path):
    reader = benchmark.pedantic(gguf.GGUFReader, args=(gguf_path,), rounds=3, iterations=1)
    assert reader.fields


def test_speedup(benchmark, gguf_path, capsys):
    ours = _best_of(lambda: read_gguf(gguf_path, max_array_size=1024), 5)
    theirs = _best_of(lambda: gguf.GGUFReader(gguf_path), 2)
    benchmark.extra_info.update(runner_s=ours, gguf_py_s=theirs, speedup=theirs / ours)
    benchmark.pedantic(read_gguf, args=(gguf_path,), kwargs={"max_array_size": 1024}, rounds=1, iterations=1)
    with capsys.disabled():
        print(
            f"\n{Path(gguf_path).name}: runner.model.gguf {ours * 1e3:.1f} ms, "
            f"gguf.GGUFReader {theirs * 1e3:.1f} ms, {theirs / ours:.0f}x faster"
        )
