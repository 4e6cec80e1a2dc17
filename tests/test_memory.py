"""Tests for runner.model.memory (KV cache, graph and projector estimates, layer planning) and runner.inspect_cmd."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from runner import inspect_cmd  # noqa: E402
from runner.model.gguf import ggml_type, read_gguf  # noqa: E402
from runner.model.memory import (  # noqa: E402
    GPU_RESERVE_FIXED,
    MLLAMA_VISION_TOKENS,
    Device,
    LoadOptions,
    MiB,
    attention_layout,
    context_shape,
    effective_kv_type,
    estimate,
    gpu_reserve,
    graph_size,
    kv_cache_size,
    kv_cache_type_problem,
    layer_weights,
    plan_layers,
    projector_size,
    supports_flash_attention,
)

VT = gguf.GGUFValueType
U32, I32, STR, BOOL, ARR = VT.UINT32, VT.INT32, VT.STRING, VT.BOOL, VT.ARRAY


@pytest.fixture(scope="module")
def default_model() -> str:
    try:
        from runner.model.models import default_model_path

        path = str(default_model_path())
    except (ImportError, OSError) as exc:  # no runner.model.models, or the model is not installed
        pytest.skip(f"default model unavailable: runner.model.models.default_model_path() raised {exc!r}")
    if not os.path.exists(path):
        pytest.skip(f"default model {path} is not downloaded")
    return path


def build(tmp_path: Path, arch: str, hparams: dict, tensors=(), name: str = "m.gguf"):
    """Write a GGUF with ``{arch}.<key>`` hyperparameters (ints -> UINT32, lists -> arrays) and read it back."""
    w = gguf.GGUFWriter(str(tmp_path / name), arch)
    for key, value in hparams.items():
        full = key if key.startswith(("general.", "tokenizer.", "clip.")) else f"{arch}.{key}"
        if isinstance(value, bool):
            w.add_key_value(full, value, BOOL)
        elif isinstance(value, int):
            w.add_key_value(full, value, U32)
        elif isinstance(value, str):
            w.add_key_value(full, value, STR)
        elif value and isinstance(value[0], bool):
            w.add_key_value(full, value, ARR, sub_type=BOOL)
        else:
            w.add_key_value(full, value, ARR, sub_type=I32)
    for tname, array in tensors:
        w.add_tensor(tname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read_gguf(tmp_path / name)


LLAMA = {
    "block_count": 4,
    "embedding_length": 64,
    "attention.head_count": 4,
    "attention.head_count_kv": 2,
    "context_length": 1024,
    "vocab_size": 128,
}


# ---------------------------------------------------------------------------
# context shape


@pytest.mark.parametrize(
    "n_ctx, parallel, unified, expected",
    [
        # n_ctx is the whole context, as the load's; expected:
        # (n_ctx total, kv_size, n_stream, n_batch, n_ubatch)
        (2048, 1, True, (2048, 2048, 1, 512, 512)),
        (1000, 1, True, (1024, 1024, 1, 512, 512)),
        (3000, 3, True, (3072, 3072, 1, 512, 512)),
        (3000, 3, False, (3072, 1024, 3, 512, 512)),
        (1000, 3, False, (1536, 512, 3, 512, 512)),  # pad(1024 // 3 = 341) = 512 cells per stream
        (600, 2, False, (1024, 512, 2, 512, 512)),
        (100, 1, True, (256, 256, 1, 100, 100)),
        (0, 1, True, (1024, 1024, 1, 512, 512)),
    ],
)
def test_context_shape(tmp_path, n_ctx, parallel, unified, expected):
    info = build(tmp_path, "llama", LLAMA)
    s = context_shape(info, n_ctx=n_ctx, parallel=parallel, unified=unified)
    assert (s.n_ctx, s.kv_size, s.n_stream, s.n_batch, s.n_ubatch) == expected
    assert s.n_seq_max == parallel


def test_context_shape_ubatch(tmp_path):
    info = build(tmp_path, "llama", LLAMA)
    assert context_shape(info, n_ctx=4096, n_batch=2048, n_ubatch=256).n_ubatch == 256
    assert context_shape(info, n_ctx=4096, n_batch=128, n_ubatch=256).n_ubatch == 128
    with pytest.raises(ValueError):
        context_shape(info, parallel=0)


# ---------------------------------------------------------------------------
# KV cache


def test_kv_plain_llama(tmp_path):
    info = build(tmp_path, "llama", LLAMA)
    kv = kv_cache_size(info, n_ctx=1000)
    # 4 layers x (K + V) x row of 2 heads x 16 dims in f16 (64 bytes) x 1024 cells
    assert kv.total == 4 * 2 * 64 * 1024 == 524_288
    assert kv.per_layer == (131_072,) * 4
    (cache,) = kv.caches
    assert (cache.name, cache.cells, cache.streams, cache.layers) == ("base", 1024, 1, (0, 1, 2, 3))
    assert cache.k_bytes == cache.v_bytes == 262_144
    assert cache.log_mib == "0.50"


def test_kv_quantized_and_streams(tmp_path):
    info = build(tmp_path, "llama", {**LLAMA, "attention.head_count_kv": 4})  # rows of 64 elements
    q8 = kv_cache_size(info, n_ctx=512, type_k="q8_0", flash_attention=True)
    assert q8.total == 4 * 2 * ggml_type("q8_0").row_size(64) * 512 == 4 * 2 * 68 * 512
    mixed = kv_cache_size(info, n_ctx=512, type_k="q8_0", type_v="q4_0", flash_attention=True)
    assert mixed.caches[0].k_bytes == 4 * 68 * 512 and mixed.caches[0].v_bytes == 4 * 36 * 512
    split = kv_cache_size(info, n_ctx=900, parallel=3, unified=False)
    assert (split.caches[0].cells, split.caches[0].streams) == (512, 3)
    assert split.total == 4 * 2 * 128 * 512 * 3


def test_kv_per_layer_heads_and_v_padding(tmp_path):
    hp = {**LLAMA, "attention.head_count_kv": [4, 2, 0, 1], "attention.value_length": 8}
    info = build(tmp_path, "llama", hp)
    lay = attention_layout(info)
    assert lay.kv_layers == (True, True, True, True)  # llama.cpp allocates (empty) tensors for 0-head layers
    assert lay.n_embd_k_gqa == (64, 32, 0, 16)
    assert lay.n_embd_v_gqa == (32, 16, 0, 8)
    fa = kv_cache_size(info, n_ctx=256, flash_attention=True)
    assert fa.per_layer == ((64 + 32) * 2 * 256, (32 + 16) * 2 * 256, 0, (16 + 8) * 2 * 256)
    # without flash attention V is stored transposed and every V row is padded to the widest (32)
    no_fa = kv_cache_size(info, n_ctx=256)
    assert no_fa.per_layer == ((64 + 32) * 2 * 256, (32 + 32) * 2 * 256, 32 * 2 * 256, (16 + 32) * 2 * 256)
    assert no_fa.caches[0].layers == (0, 1, 2, 3)


GEMMA3 = {
    "block_count": 12,
    "embedding_length": 1024,
    "attention.head_count": 4,
    "attention.head_count_kv": 2,
    "attention.key_length": 256,
    "attention.value_length": 256,
    "attention.sliding_window": 1024,
    "context_length": 32768,
}


def test_kv_sliding_window_gemma3(tmp_path):
    info = build(tmp_path, "gemma3", GEMMA3)
    lay = attention_layout(info)
    assert [il for il in range(12) if not lay.swa_layers[il]] == [5, 11]
    kv = kv_cache_size(info, n_ctx=8192)
    base, swa = kv.caches
    row = 2 * 256 * 2  # f16 row of 2 KV heads x 256
    assert (base.name, base.cells, base.layers) == ("base", 8192, (5, 11))
    assert base.total == 2 * 2 * row * 8192 == 33_554_432
    # pad(min(8192, 1024 * 1 + 512), 256) = 1536 cells
    assert (swa.name, swa.cells, len(swa.layers)) == ("swa", 1536, 10)
    assert swa.total == 10 * 2 * row * 1536 == 31_457_280
    assert kv.per_layer[0] == 2 * row * 1536 and kv.per_layer[5] == 2 * row * 8192


@pytest.mark.parametrize(
    "parallel, unified, swa_full, swa_cells",
    [
        (2, True, False, 2560),  # n_swa * 2 sequences + n_ubatch = 2560
        (2, False, False, 1536),  # per stream: n_swa + n_ubatch
        (1, True, True, 8192),
    ],
)
def test_kv_sliding_window_sizes(tmp_path, parallel, unified, swa_full, swa_cells):
    info = build(tmp_path, "gemma3", GEMMA3)
    kv = kv_cache_size(info, n_ctx=8192 * parallel, parallel=parallel, unified=unified, swa_full=swa_full)
    assert kv.caches[1].cells == swa_cells
    assert kv.caches[1].streams == (1 if unified else parallel)


def test_kv_sliding_window_rules(tmp_path):
    no_window = build(tmp_path, "gemma3", {k: v for k, v in GEMMA3.items() if k != "attention.sliding_window"})
    assert not attention_layout(no_window).has_swa
    assert len(kv_cache_size(no_window, n_ctx=4096).caches) == 1

    gemma2 = build(tmp_path, "gemma2", {k: v for k, v in GEMMA3.items() if k != "attention.sliding_window"}, name="g2")
    lay = attention_layout(gemma2)
    assert lay.n_swa == 4096 and lay.swa_layers[:4] == (True, False, True, False)

    arr = build(tmp_path, "gemma4", {**GEMMA3, "attention.sliding_window_pattern": [True, False] * 6}, name="g4")
    assert attention_layout(arr).swa_layers == (True, False) * 6

    llama4 = build(tmp_path, "llama4", {**LLAMA, "block_count": 8}, name="l4")
    lay = attention_layout(llama4)
    assert lay.n_swa == 8192 and lay.swa_layers == (True, True, True, False) * 2
    llama4_off = build(tmp_path, "llama4", {**LLAMA, "attention.sliding_window": 0}, name="l4off")
    assert not attention_layout(llama4_off).has_swa

    cohere2 = build(tmp_path, "cohere2moe", {**LLAMA, "attention.sliding_window": 512}, name="c2")
    assert attention_layout(cohere2).swa_layers == (False, True, True, True)  # dense first

    ignored = build(tmp_path, "phi3", {**LLAMA, "attention.sliding_window": 512}, name="phi3")
    assert not attention_layout(ignored).has_swa


def test_kv_mla_holds_only_k(tmp_path):
    hp = {
        **LLAMA,
        "attention.head_count": 16,
        "attention.head_count_kv": 1,
        "attention.key_length": 576,
        "attention.value_length": 512,
        "attention.key_length_mla": 192,
        "attention.value_length_mla": 128,
        "attention.kv_lora_rank": 512,
    }
    info = build(tmp_path, "deepseek2", hp)
    kv = kv_cache_size(info, n_ctx=1024)
    assert kv.caches[0].v_bytes == 0
    assert kv.total == 4 * 576 * 2 * 1024
    assert supports_flash_attention(info)


def test_kv_models_without_cache_or_with_shared_layers(tmp_path):
    bert = build(tmp_path, "bert", {**LLAMA, "context_length": 512}, name="bert")
    assert kv_cache_size(bert).total == 0 and kv_cache_size(bert).caches == ()

    nextn = build(tmp_path, "glm4moe", {**LLAMA, "nextn_predict_layers": 1}, name="nextn")
    assert attention_layout(nextn).kv_layers == (True, True, True, False)

    shared = build(tmp_path, "gemma4", {**GEMMA3, "attention.shared_kv_layers": 4}, name="shared")
    assert attention_layout(shared).kv_layers == (True,) * 8 + (False,) * 4


def test_kv_mllama_cross_attention_layers(tmp_path):
    info = build(tmp_path, "mllama", {**LLAMA, "attention.cross_attention_layers": [1, 3]})
    kv = kv_cache_size(info, n_ctx=2048, parallel=2, unified=True)
    base, cross = kv.caches
    assert base.layers == (0, 2) and base.cells == 2048
    assert (cross.name, cross.layers, cross.cells) == ("cross", (1, 3), MLLAMA_VISION_TOKENS * 2)
    assert cross.total == 2 * 2 * 64 * MLLAMA_VISION_TOKENS * 2


def test_log_mib_matches_llama_cpp_format(tmp_path):
    info = build(tmp_path, "llama", {**LLAMA, "attention.head_count_kv": 3, "embedding_length": 48})
    # 3 heads x 12 dims f16 = 72 bytes per row; 4 layers x 2 x 72 x 1280 = 737280 bytes = 0.703125 MiB
    kv = kv_cache_size(info, n_ctx=1100)
    assert kv.total == 737_280
    assert kv.caches[0].log_mib == "0.70"


# ---------------------------------------------------------------------------
# the default model (exact against llama.cpp's allocation rules)


@pytest.mark.model
def test_default_model_kv_cache(default_model):
    info = read_gguf(default_model, max_array_size=1024)
    lay = attention_layout(info)
    expected_row = 2 * info.head_count_kv * info.key_length  # f16, no SWA, no GQA variation
    kv = kv_cache_size(info, n_ctx=2048)
    assert kv.total == info.block_count * 2 * expected_row * 2048
    assert not lay.has_swa
    if info.get("general.basename") == "smollm2" and info.get("general.size_label") == "135M":
        assert kv.total == 47_185_920 and kv.caches[0].log_mib == "45.00"
        assert kv_cache_size(info, n_ctx=4096).caches[0].log_mib == "90.00"
        assert kv_cache_size(info, n_ctx=8192).total == 188_743_680
        q8 = kv_cache_size(info, n_ctx=2048, type_k="q8_0", flash_attention=True)
        assert (q8.total, q8.caches[0].log_mib) == (25_067_520, "23.91")
        assert kv_cache_size(info, n_ctx=8192, parallel=4, unified=True).caches[0].cells == 8192
        assert kv_cache_size(info, n_ctx=8192, parallel=4).caches[0].cells == 2048


# ---------------------------------------------------------------------------
# support checks


def test_flash_attention_support(tmp_path):
    assert supports_flash_attention(build(tmp_path, "llama", LLAMA, name="a"))
    assert not supports_flash_attention(build(tmp_path, "grok", LLAMA, name="b"))
    assert not supports_flash_attention(build(tmp_path, "llama", {**LLAMA, "attention.value_length": 8}, name="c"))
    assert not supports_flash_attention(build(tmp_path, "mamba", {"block_count": 2, "embedding_length": 8}, name="d"))


def test_kv_type_checks(tmp_path):
    info = build(tmp_path, "llama", {**LLAMA, "embedding_length": 128})  # 32-dim heads
    assert kv_cache_type_problem(info, "f16", False) is None
    assert kv_cache_type_problem(info, "q8_0", True) is None
    assert "needs flash attention" in kv_cache_type_problem(info, "q8_0", False)
    assert kv_cache_type_problem(info, "q5_1", True) is None  # every type a load takes
    assert "unknown KV cache type" in kv_cache_type_problem(info, "q2_k", True)
    assert effective_kv_type(info, "q4_0", True) == ("q4_0", None)
    assert effective_kv_type(info, "q4_0", False) == (
        "f16",
        "using f16 KV cache: q4_0 KV cache needs flash attention, which is off",
    )
    odd = build(tmp_path, "llama", {**LLAMA, "embedding_length": 192}, name="odd")  # 48-dim heads
    assert "divisible by 32" in kv_cache_type_problem(odd, "q8_0", True)
    grok = build(tmp_path, "grok", LLAMA, name="grok")
    assert "does not support" in kv_cache_type_problem(grok, "q8_0", True)


# ---------------------------------------------------------------------------
# graph


def _llama_with_tensors(tmp_path, arch="llama", extra=None, name="w.gguf"):
    """4 layers of one 64x64 f32 matrix (16 KiB), 64x128 f32 token_embd and output (32 KiB each)."""
    tensors = [("token_embd.weight", np.zeros((128, 64), np.float32))]
    for il in range(4):
        tensors.append((f"blk.{il}.attn_q.weight", np.zeros((64, 64), np.float32)))
    tensors.append(("output_norm.weight", np.zeros(64, np.float32)))
    tensors.append(("output.weight", np.zeros((128, 64), np.float32)))
    hp = {**LLAMA, "attention.head_count_kv": 4, "context_length": 256, "feed_forward_length": 256, **(extra or {})}
    return build(tmp_path, arch, hp, tensors, name=name)


def test_graph_size_llama(tmp_path):
    info = build(tmp_path, "llama", {**LLAMA, "feed_forward_length": 256})
    g = graph_size(info, kv_cells=1024, n_ubatch=512, flash_attention=False)
    # attention: 4*512*(2*64 + 4*16 + 2*(16+16) + 4*16) + f32 mask 4*512*1024 + scores 4*512*1024*4
    attn = 4 * 512 * 320 + 4 * 512 * 1024 + 4 * 512 * 1024 * 4
    assert attn == 11_141_120
    assert (g.full, g.cpu, g.formula) == (attn, attn, "llama")
    # no tensors: nothing to stage, only the input embeddings
    assert g.partial == 4 * 512 * 64 + attn
    fa = graph_size(info, kv_cells=1024, n_ubatch=512, flash_attention=True)
    # flash attention: f16 mask, no scores; the FFN half (4*512*(128 + 3*256)) is now the peak
    assert fa.full == 4 * 512 * (2 * 64 + 3 * 256) == 1_835_008


def test_graph_size_partial_stages_weights(tmp_path):
    info = _llama_with_tensors(tmp_path)
    g = graph_size(info, kv_cells=256, n_ubatch=256, flash_attention=False)
    assert g.partial == 4 * 256 * 64 + max(g.full + 16_384, 4 * 256 * (64 + 128) + 32_768)


def test_graph_size_families(tmp_path):
    base = graph_size(build(tmp_path, "llama", LLAMA, name="l"), kv_cells=1024, n_ubatch=512, flash_attention=False)
    g2 = graph_size(build(tmp_path, "gemma2", LLAMA, name="g"), kv_cells=1024, n_ubatch=512, flash_attention=False)
    assert g2.formula == "gemma2" and g2.full == base.full + 4 * 512 * 1024 * 4
    other = graph_size(build(tmp_path, "falcon", LLAMA, name="f"), kv_cells=1024, n_ubatch=512, flash_attention=False)
    assert other.formula == "llama" and other.full == base.full
    for arch, formula in [("qwen2", "llama"), ("gemma3", "gemma"), ("command-r", "command-r"), ("phi2", "fused-qkv"),
                          ("chatglm", "fused-qkv"), ("stablelm", "llama"), ("mllama", "mllama"),
                          ("deepseek2", "deepseek2"), ("llama4", "llama")]:
        g = graph_size(build(tmp_path, arch, LLAMA, name=arch), kv_cells=1024, n_ubatch=512, flash_attention=False)
        assert g.formula == formula and g.full >= base.full - 4 * 512 * 2 * 64, arch


# ---------------------------------------------------------------------------
# projector


def test_projector_size(tmp_path):
    hp = {
        "clip.has_vision_encoder": True,
        "clip.vision.image_size": 336,
        "clip.vision.patch_size": 14,
        "clip.vision.embedding_length": 1024,
        "clip.vision.feed_forward_length": 4096,
        "clip.vision.attention.head_count": 16,
        "clip.vision.projection_dim": 4096,
    }
    proj = build(tmp_path, "clip", hp, [("v.class_embd", np.zeros(1024, np.float32))])
    est = projector_size(proj)
    n = 577  # 24 x 24 patches + the class token
    assert est.weights == 4096
    assert est.graph == 4 * (3 * 336 * 336 + n * (3 * 1024 + 4096) + 16 * n * n + n * 4096) == 48_659_520
    assert est.total == est.weights + est.graph


# ---------------------------------------------------------------------------
# planning

ITEM = 16_384 + 65_536  # one layer: 16 KiB weights + f16 KV for 256 cells x 64 x (K + V)
OUTPUT = 32_768 + 256  # output matrix + output norm


def gpu(i: int, free: int, total: int | None = None) -> Device:
    return Device(f"CUDA{i}", f"GPU {i}", "gpu", free, total or max(free, 1))


CPU = Device("CPU", "host", "cpu", 8 << 30, 16 << 30)


def test_layer_weights(tmp_path):
    w = layer_weights(_llama_with_tensors(tmp_path))
    assert w.layers == (16_384,) * 4 and w.output == OUTPUT and w.input == 32_768
    tied = build(tmp_path, "llama", LLAMA, [("token_embd.weight", np.zeros((128, 64), np.float32))], name="tied")
    assert layer_weights(tied).output == 32_768  # llama.cpp duplicates token_embd onto the output device


def test_plan_one_gpu_everything_fits(tmp_path):
    info = _llama_with_tensors(tmp_path)
    plan = plan_layers(info, [gpu(0, 1 << 30), CPU], LoadOptions(n_ctx=256, gpu_reserve=0))
    assert (plan.n_gpu_layers, plan.tensor_split, plan.fully_offloaded, plan.fits) == (5, (5,), True, True)
    g, c = plan.usage
    assert (g.layers, g.output, g.weights, g.kv, g.graph) == ((0, 1, 2, 3), True, 4 * 16_384 + OUTPUT, 262_144,
                                                                plan.graph.full)
    assert (c.layers, c.output, c.weights, c.kv, c.graph) == ((), False, 32_768, 0, 4 * 256 * 64)
    assert plan.notes == ()


def test_plan_one_gpu_partial(tmp_path):
    info = _llama_with_tensors(tmp_path)
    partial = plan_layers(info, [CPU], LoadOptions(n_ctx=256)).graph.partial
    plan = plan_layers(info, [gpu(0, partial + ITEM + OUTPUT + 10), CPU], LoadOptions(n_ctx=256, gpu_reserve=0))
    assert (plan.n_gpu_layers, plan.tensor_split) == (2, (2,))
    g, c = plan.usage
    assert (g.layers, g.output, g.graph, g.kv) == ((3,), True, partial, 65_536)
    assert (c.layers, c.output, c.kv) == ((0, 1, 2), False, 3 * 65_536)
    assert plan.notes == ("partial offload: 2 of 5 layers fit on the GPUs",)
    assert plan.fits


def test_plan_two_unequal_gpus(tmp_path):
    info = _llama_with_tensors(tmp_path)
    full = plan_layers(info, [CPU], LoadOptions(n_ctx=256)).graph.full
    gpus = [gpu(0, full + 2 * ITEM + 5), gpu(1, full + 2 * ITEM + OUTPUT + 5)]
    plan = plan_layers(info, gpus + [CPU], LoadOptions(n_ctx=256, gpu_reserve=0))
    assert (plan.n_gpu_layers, plan.tensor_split) == (5, (2, 3))
    g0, g1, c = plan.usage
    assert (g0.layers, g0.output, g1.layers, g1.output) == ((0, 1), False, (2, 3), True)
    assert g0.used == full + 2 * ITEM and g1.used == full + 2 * ITEM + OUTPUT
    assert c.layers == () and plan.fits


def test_plan_balances_large_gpus(tmp_path):
    info = _llama_with_tensors(tmp_path)
    full = plan_layers(info, [CPU], LoadOptions(n_ctx=256)).graph.full
    # GPU 1 has twice the room of GPU 0 beyond the graph. (1, 4) fills GPU 0's room to 1/3 and
    # GPU 1's to (3 layers + output) / 6 layers = 57%; (2, 3) would fill GPU 0 to 67%.
    gpus = [gpu(0, full + 3 * ITEM), gpu(1, full + 6 * ITEM)]
    plan = plan_layers(info, gpus, LoadOptions(n_ctx=256, gpu_reserve=0))
    assert plan.tensor_split == (1, 4)
    equal = plan_layers(info, [gpu(0, full + 6 * ITEM), gpu(1, full + 6 * ITEM)], LoadOptions(n_ctx=256, gpu_reserve=0))
    assert equal.tensor_split == (2, 3)  # the output layer tips the balance toward GPU 0
    assert plan.usage[1].output


def test_plan_too_little_memory_for_any_layer(tmp_path):
    info = _llama_with_tensors(tmp_path)
    partial = plan_layers(info, [CPU], LoadOptions(n_ctx=256)).graph.partial
    plan = plan_layers(info, [gpu(0, partial + 1000), CPU], LoadOptions(n_ctx=256, gpu_reserve=0))
    assert (plan.n_gpu_layers, plan.tensor_split) == (0, (0,))
    g, c = plan.usage
    assert (g.layers, g.output, g.used) == ((), False, 0)
    assert (c.layers, c.output, c.kv) == ((0, 1, 2, 3), True, 4 * 65_536)
    assert c.weights == 32_768 + 4 * 16_384 + OUTPUT
    assert plan.notes == ("no GPU has room for a single layer; running on the CPU",)


def test_plan_default_reserve_blocks_small_gpu(tmp_path):
    info = _llama_with_tensors(tmp_path)
    plan = plan_layers(info, [gpu(0, 300 * MiB, 1 << 30), CPU], LoadOptions(n_ctx=256))
    assert plan.n_gpu_layers == 0  # 384 MiB + 3% of 1 GiB are held back
    assert gpu_reserve(gpu(0, 0, 10 << 30)) == GPU_RESERVE_FIXED + int(0.03 * (10 << 30))


def test_plan_cpu_only(tmp_path):
    info = _llama_with_tensors(tmp_path)
    plan = plan_layers(info, [CPU], LoadOptions(n_ctx=256))
    assert (plan.n_gpu_layers, plan.tensor_split, len(plan.usage)) == (0, (), 1)
    assert plan.usage[0].layers == (0, 1, 2, 3) and plan.usage[0].output
    assert plan.usage[0].weights == layer_weights(info).total
    no_devices = plan_layers(info, [], LoadOptions(n_ctx=256, n_gpu_layers=3))
    assert no_devices.usage[0].device.id == "CPU"
    assert no_devices.notes == ("n_gpu_layers = 3 requested, but there is no GPU",)


def test_plan_requested_layers(tmp_path):
    info = _llama_with_tensors(tmp_path)
    big = [gpu(0, 1 << 30), gpu(1, 1 << 30)]
    plan = plan_layers(info, big, LoadOptions(n_ctx=256, n_gpu_layers=3, gpu_reserve=0))
    assert plan.n_gpu_layers == 3 and sum(plan.tensor_split) == 3
    assert [u.layers for u in plan.usage[:2]] == [(2,), (3,)] and plan.usage[1].output
    assert plan_layers(info, big, LoadOptions(n_ctx=256, n_gpu_layers=-1, gpu_reserve=0)).n_gpu_layers == 5
    assert plan_layers(info, big, LoadOptions(n_ctx=256, n_gpu_layers=99, gpu_reserve=0)).n_gpu_layers == 5
    tiny = plan_layers(info, [gpu(0, 1000), CPU], LoadOptions(n_ctx=256, n_gpu_layers=5, gpu_reserve=0))
    assert tiny.tensor_split == (5,) and not tiny.usage[0].fits and not tiny.fits
    assert "OVER" in tiny.table()


def test_plan_projector_goes_to_first_gpu(tmp_path):
    info = _llama_with_tensors(tmp_path)
    proj_file = build(tmp_path, "clip", {"clip.has_vision_encoder": True, "clip.vision.image_size": 28,
                                         "clip.vision.patch_size": 14, "clip.vision.embedding_length": 8},
                      [("v.patch_embd.weight", np.zeros(1024, np.float32))], name="proj.gguf")
    proj = projector_size(proj_file)
    full = plan_layers(info, [CPU], LoadOptions(n_ctx=256)).graph.full
    opts = LoadOptions(n_ctx=256, gpu_reserve=0, projector=proj_file)
    gpus = [gpu(0, proj.total + full + 2 * ITEM + 5), gpu(1, full + 3 * ITEM + OUTPUT + 5)]
    plan = plan_layers(info, gpus, opts)
    assert plan.tensor_split == (2, 3)
    assert (plan.usage[0].projector, plan.usage[1].projector) == (proj.total, 0)
    assert "projector on CUDA0" in plan.notes


def test_plan_accepts_dicts_and_flash_attention_fallback(tmp_path):
    info = _llama_with_tensors(tmp_path, arch="grok", name="grok.gguf")
    devices = [{"id": "CUDA0", "type": "gpu", "free": 1 << 30, "total": 1 << 30, "library": "cuda"}]
    plan = plan_layers(info, devices, LoadOptions(n_ctx=256, kv_type="q8_0", flash_attention=True, gpu_reserve=0))
    assert plan.usage[0].device == Device("CUDA0", "CUDA0", "gpu", 1 << 30, 1 << 30)
    assert not plan.flash_attention and plan.kv.type_k == "f16"
    assert plan.notes[0] == "flash attention off: not supported for grok"
    assert plan.notes[1].startswith("using f16 KV cache: q8_0 KV cache needs flash attention")
    with pytest.raises(ValueError):
        plan_layers(info, [{"id": "X", "type": "tpu", "free": 1, "total": 1}])


def test_plan_table(tmp_path):
    info = _llama_with_tensors(tmp_path)
    table = plan_layers(info, [gpu(0, 1 << 30), CPU], LoadOptions(n_ctx=256, gpu_reserve=0)).table()
    lines = table.splitlines()
    assert lines[0].split() == ["device", "type", "layers", "weights", "kv", "cache", "graph", "outputs",
                                "projector", "host", "cache", "reserve", "total", "free"]
    assert lines[1].split()[:3] == ["CUDA0", "gpu", "0-3,output"]
    assert lines[2].split()[:3] == ["CPU", "cpu", "-"]
    assert lines[3].startswith("n_gpu_layers = 5/5, tensor_split = [5], kv f16/f16 x 256 cells x 1 stream(s)")


@pytest.mark.model
def test_default_model_plan(default_model):
    info = read_gguf(default_model, max_array_size=1024)
    plan = plan_layers(info, [gpu(0, 8 << 30), CPU], LoadOptions(n_ctx=2048))
    assert plan.n_gpu_layers == info.block_count + 1 and plan.fits
    assert plan.usage[0].kv == kv_cache_size(info, n_ctx=2048).total


# ---------------------------------------------------------------------------
# inspect


def _inspect(argv):
    parser = argparse.ArgumentParser()
    inspect_cmd.add_arguments(parser)
    return inspect_cmd.run(parser.parse_args(argv))


def test_inspect_json(tmp_path, capsys):
    _llama_with_tensors(tmp_path)
    assert _inspect([str(tmp_path / "w.gguf"), "--ctx", "200", "--parallel", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["architecture"], out["layers"], out["tensors"], out["context_length"]) == ("llama", 4, 7, 256)
    assert out["parameters"] == 128 * 64 * 2 + 4 * 64 * 64 + 64
    assert out["memory"]["kv_cache"]["n_ctx"] == 512
    assert out["memory"]["kv_cache"]["total"] == 4 * 2 * 128 * 512


def test_inspect_text_and_default(tmp_path, capsys, monkeypatch):
    _llama_with_tensors(tmp_path)
    fake = types.ModuleType("runner.model.models")
    fake.default_model_path = lambda: tmp_path / "w.gguf"
    monkeypatch.setitem(sys.modules, "runner.model.models", fake)
    assert _inspect(["default", "--type-k", "q8_0", "--type-v", "q8_0", "--flash-attn", "off"]) == 0
    out = capsys.readouterr().out
    assert "architecture    llama" in out
    assert "kv cache (base)" in out
    assert "note: using f16 KV cache: q8_0 KV cache needs flash attention, which is off" in out


def test_inspect_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all, definitely")
    assert _inspect([str(bad)]) == 1
    assert "not a GGUF file" in capsys.readouterr().err


def test_estimate_table(tmp_path):
    est = estimate(_llama_with_tensors(tmp_path), LoadOptions(n_ctx=256))
    assert est.full_offload == 4 * 16_384 + OUTPUT + est.kv.total + est.graph.full
    assert est.table().splitlines()[0].split() == ["component", "size", "detail"]
