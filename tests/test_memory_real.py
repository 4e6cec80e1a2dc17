"""Cross-check of the KV cache estimate against what llama.cpp allocates."""

from __future__ import annotations

import logging
import re

import pytest

from runner.model.gguf import read_gguf
from runner.model.memory import kv_cache_size

pytestmark = pytest.mark.model

LINE = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells,\s+(\d+) layers")


@pytest.mark.parametrize("n_ctx,type_k,type_v,flash", [
    (2048, "f16", "f16", "off"),
    (1000, "f16", "f16", "off"),     # padded to 1024 cells
    (4096, "q8_0", "q8_0", "on"),
    (3000, "q4_0", "q8_0", "on"),
])
def test_kv_estimate_matches_llama_cpp(llama, model, default_model_path, caplog, n_ctx, type_k, type_v, flash):
    info = read_gguf(default_model_path, max_array_size=0)
    est = kv_cache_size(info, n_ctx=n_ctx, parallel=1, type_k=type_k, type_v=type_v,
                        flash_attention=flash == "on")
    cache = est.caches[0]
    llama.set_log_level(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="runner.llama"):
            ctx = llama.Context(model, n_ctx=n_ctx, n_threads=2, flash_attn=flash, type_k=type_k, type_v=type_v)
    finally:
        llama.set_log_level(logging.WARNING)
    with ctx:
        found = [LINE.search(r.getMessage()) for r in caplog.records]
        mib, cells, layers = next(m for m in found if m).groups()
        assert int(cells) == cache.cells and int(layers) == len(cache.layers)
        assert mib == cache.log_mib
        # Exact bytes: every filled cell adds one K and one V row per layer to
        # the sequence state plus 12 bytes of cell metadata (its position, a
        # sequence count and one sequence id), so the state of 64 more cells
        # grows by exactly 64 * (bytes per cell + 12).
        per_cell = cache.total // cache.cells
        assert per_cell * cache.cells == cache.total
        with llama.Batch(128) as batch:
            batch.add_tokens(list(range(100, 110)), 0, 0)
            ctx.decode(batch)
            small = len(ctx.state_seq_get(0))
            batch.clear()
            batch.add_tokens(list(range(200, 264)), 10, 0, output_last=True)
            ctx.decode(batch)
            large = len(ctx.state_seq_get(0))
        assert large - small == 64 * (per_cell + 12)


BUFFER = re.compile(r"(model|KV|compute) buffer size =\s+([\d.]+) MiB")


@pytest.mark.parametrize("n_ctx", [2048, 8192])
def test_total_estimate_within_tolerance(llama, model, default_model_path, caplog, n_ctx):
    """Weights + KV + compute graph against the buffers llama.cpp reports.

    Stated tolerance: the compute-graph estimate within 5% of llama.cpp's
    compute buffer, the total within -5% / +20% of what llama.cpp allocates
    (it over-counts the tied output matrix, the safe direction for placement).
    """
    from runner.model.memory import LoadOptions, estimate

    info = read_gguf(default_model_path, max_array_size=0)
    est = estimate(info, LoadOptions(n_ctx=n_ctx, parallel=1, flash_attention=False))
    llama.set_log_level(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="runner.llama"):
            ctx = llama.Context(model, n_ctx=n_ctx, n_threads=2, flash_attn="off")
    finally:
        llama.set_log_level(logging.WARNING)
    ctx.close()
    sizes = {}
    for r in caplog.records:
        m = BUFFER.search(r.getMessage())
        if m:
            sizes[m.group(1)] = float(m.group(2)) * 2**20
    weights = model.size  # the model was loaded before caplog: use llama.cpp's own count
    actual = weights + sizes["KV"] + sizes["compute"]
    assert abs(est.graph.full - sizes["compute"]) <= 0.05 * sizes["compute"]
    w = est.weights
    total = sum(w.layers) + w.output + w.input + est.kv.total + est.graph.full
    assert 0.95 * actual <= total <= 1.20 * actual, (total, actual)
