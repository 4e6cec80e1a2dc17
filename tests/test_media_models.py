"""Media for text models with special rules: M-RoPE positions (Qwen2-VL) and
non-causal image attention (Gemma 3), on tiny random-weight models.

The reference each test checks the engine against is mtmd's own helper
(``MtmdContext.eval_chunk`` wraps ``mtmd_helper_eval_chunk_single``): it
decodes a media chunk with mtmd's positions and attention switch, and says
where the text after it continues.  The engine does neither through that
helper, so agreement of the first token's log-probabilities (to 1e-3) checks
the engine's positions, batching and attention switch.  Wrong positions move
them by 1e-2 or more on these models.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from gemma3_models import write_gemma3_projector, write_gemma3_text_model
from mmproj import png_bytes
from qwen2vl_models import image_grid, write_qwen2vl_projector, write_qwen2vl_text_model
from runner.engine.media import MediaItem
from runner.engine.requests import BadRequest, CompletionOptions, CompletionRequest
from runner.engine.slots import kv_position

MARKER = "<__media__>"
TOP = 5


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2vl")
    return (str(write_qwen2vl_text_model(d / "text.gguf")),
            str(write_qwen2vl_projector(d / "proj.gguf")))


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma3")
    return (str(write_gemma3_text_model(d / "text.gguf")),
            str(write_gemma3_projector(d / "proj.gguf")))


def make_engine(paths, **kw):
    from runner.engine.core import Engine, EngineConfig

    kw.setdefault("n_ctx", 1024)
    kw.setdefault("n_threads", 2)
    return Engine(EngineConfig(paths[0], projector_path=paths[1], **kw))


def first_top(engine, prompt: str, images=(), **options) -> tuple[list[tuple[int, float]], object]:
    """The engine's first generated token: top-TOP (token, logprob), and the final."""
    options = {"num_predict": 1, "temperature": 0.0, "top_logprobs": TOP, **options}
    req = CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(options),
                            media=[MediaItem(i, data) for i, data in enumerate(images)])
    events = list(engine.submit(req))
    final = events[-1]
    assert final.error is None, final.error
    entry = next(lp for ev in events[:-1] for lp in (ev.logprobs or ()))
    return [(t["token"], t["logprob"]) for t in entry["top"]], final


def reference_top(llama, paths, prompt: str, images=(), n_batch: int = 512) -> list[tuple[int, float]]:
    """The same prompt decoded by hand: text through a plain batch, media
    through mtmd's helper, in a fresh context."""
    model = llama.Model(paths[0])
    ctx = llama.Context(model, n_ctx=1024, n_batch=n_batch, n_seq_max=1, n_threads=2)
    mt = llama.MtmdContext(model, paths[1], n_threads=1, use_gpu=False, warmup=False)
    batch = llama.Batch(n_batch)
    try:
        bitmaps = [mt.bitmap(data, str(i)) for i, data in enumerate(images)]
        n_past, last = 0, -1
        for part in mt.tokenize(prompt, bitmaps, add_special=True, parse_special=True):
            if isinstance(part, list):
                for k in range(0, len(part), n_batch):
                    batch.clear()
                    last = batch.add_tokens(part[k:k + n_batch], n_past, 0, output_last=True)
                    ctx.decode(batch)
                    n_past += len(part[k:k + n_batch])
            else:
                n_past = mt.eval_chunk(ctx, part, n_past, 0, n_batch, logits_last=False)
                last = -1
        assert last >= 0, "the reference prompts end with text"
        logits = ctx.logits(last).astype(np.float64)
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        best = np.argsort(logp)[::-1][:TOP]
        return [(int(t), float(logp[t])) for t in best]
    finally:
        mt.close()
        ctx.close()
        model.close()


def assert_same_top(got, want):
    assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in want], atol=1e-3)


# -- M-RoPE (Qwen2-VL) -------------------------------------------------------

def test_qwen2vl_projector_uses_mrope(llama, qwen2vl):
    model = llama.Model(qwen2vl[0])
    mt = llama.MtmdContext(model, qwen2vl[1], n_threads=1, use_gpu=False, warmup=False)
    try:
        assert mt.uses_mrope
        parts = mt.tokenize(f"a {MARKER} b", [mt.bitmap(png_bytes(100, 30), "x")])
        (chunk,) = [p for p in parts if not isinstance(p, list)]
        nx, ny = image_grid(100, 30)
        assert (chunk.n_tokens, chunk.n_pos) == (nx * ny, max(nx, ny)) == (12, 6)
        pos = chunk.mrope_positions(10)
        assert pos.shape == (4, 12)
        assert set(pos[0]) == {10}                              # one temporal position
        assert pos[1].tolist() == [10 + i // nx for i in range(12)]  # rows
        assert pos[2].tolist() == [10 + i % nx for i in range(12)]   # columns
    finally:
        mt.close()
        model.close()


@pytest.mark.parametrize("size", [(64, 64), (100, 30), (30, 100)])
def test_mrope_image_matches_mtmd(llama, qwen2vl, size):
    """Non-square images too: rows and columns swapped would differ."""
    img = png_bytes(*size, seed=5)
    prompt = f"Look at this: {MARKER} and say what it shows."
    with make_engine(qwen2vl) as engine:
        got, final = first_top(engine, prompt, [img])
        assert engine.info()["projector"]["mrope"] is True
        slot = engine.slots.slots[final.slot]
        # The KV ends where the positions say: the image took n_pos positions.
        assert engine.ctx.seq_pos_max(slot.id) == kv_position(slot.inputs, len(slot.inputs)) - 1
        assert kv_position(slot.inputs, len(slot.inputs)) < len(slot.inputs)
    assert_same_top(got, reference_top(llama, qwen2vl, prompt, [img]))


def test_mrope_image_split_across_batches(llama, qwen2vl):
    """16 image rows through n_batch 8: sections of four positions per row in
    two batches, the text after the image on another boundary."""
    img = png_bytes(64, 64, seed=6)
    prompt = f"one two {MARKER} three four five six seven eight nine ten"
    with make_engine(qwen2vl, n_batch=8) as engine:
        got, _ = first_top(engine, prompt, [img])
    assert_same_top(got, reference_top(llama, qwen2vl, prompt, [img], n_batch=8))
    assert_same_top(got, reference_top(llama, qwen2vl, prompt, [img], n_batch=512))


def test_mrope_parallel_requests_with_images(llama, qwen2vl):
    prompts = [(f"First {MARKER} then words.", [png_bytes(64, 64, seed=7)]),
               (f"{MARKER} and {MARKER} side by side.", [png_bytes(32, 32, seed=8),
                                                       png_bytes(100, 30, seed=9)]),
               (f"Just one {MARKER} here, please describe.", [png_bytes(30, 100, seed=10)])]
    with make_engine(qwen2vl, parallel=2) as engine:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: first_top(engine, *p)[0], prompts))
    for (prompt, images), top in zip(prompts, got):
        assert_same_top(top, reference_top(llama, qwen2vl, prompt, images))


def test_mrope_follow_up_turn_reuses_the_prefix(llama, qwen2vl):
    """Turn 2 extends turn 1: the cached image and the text after it keep
    their positions, and nothing is encoded again."""
    img = png_bytes(100, 30, seed=11)
    turn1 = f"User: {MARKER} what is this?\nAssistant:"
    with make_engine(qwen2vl, media_cache_bytes=0) as engine:
        req = CompletionRequest(prompt=turn1, media=[MediaItem(0, img)],
                                options=CompletionOptions.from_dict(
                                    {"num_predict": 6, "temperature": 0.0}))
        text, first = engine.submit(req).result()
        turn2 = turn1 + text + "\nUser: and the colours?\nAssistant:"
        misses = engine.media_cache.info()["misses"]
        got, final = first_top(engine, turn2, [img])
        assert engine.media_cache.info()["misses"] == misses   # no encode
        assert final.cached_count > first.prompt_count         # image and turn 1 reused
    assert_same_top(got, reference_top(llama, qwen2vl, turn2, [img]))


@pytest.mark.parametrize("kv_unified", [False, True])
def test_mrope_prefix_forked_into_another_slot(llama, qwen2vl, kv_unified):
    """'multi' policy: a prompt sharing an image prefix with another slot gets
    that prefix copied (positions [0, kv_position(n)), not [0, n))."""
    img = png_bytes(100, 30, seed=13)
    head = f"System: be brief.\nUser: {MARKER} what is it?"
    with make_engine(qwen2vl, parallel=2, cache_policy="multi", kv_unified=kv_unified) as engine:
        first_top(engine, head + " Answer in French.", [img])
        misses = engine.media_cache.info()["misses"]
        follow = head + " Answer in German, please."
        got, final = first_top(engine, follow, [img])
        assert final.slot == 1 and final.cached_count > 12  # the image came from slot 0
        assert engine.media_cache.info()["misses"] == misses
        slot = engine.slots.slots[1]
        assert engine.ctx.seq_pos_max(1) == kv_position(slot.inputs, len(slot.inputs)) - 1
    assert_same_top(got, reference_top(llama, qwen2vl, follow, [img]))


def test_mrope_context_full_ends_with_length(qwen2vl):
    """An M-RoPE sequence cannot be shifted: at the slot's end it stops."""
    with make_engine(qwen2vl, n_ctx=64) as engine:
        req = CompletionRequest(prompt=f"{MARKER} go", media=[MediaItem(0, png_bytes(64, 64))],
                                options=CompletionOptions.from_dict(
                                    {"num_predict": 1000, "temperature": 0.0, "ignore_eos": True}))
        _, final = engine.submit(req).result()
        assert final.done_reason == "length" and final.error is None
        assert final.eval_count < 1000  # llama.cpp rounds n_ctx up to 256
        # the slot is full; the last token sampled is returned, never decoded
        assert final.prompt_count + final.eval_count == engine.slot_ctx + 1


# -- non-causal image attention (Gemma 3) ------------------------------------

def test_non_causal_image_matches_mtmd(llama, gemma3):
    img = png_bytes(64, 64, seed=12)
    prompt = f"Here: {MARKER} tell me about it."
    with make_engine(gemma3) as engine:
        got, _ = first_top(engine, prompt, [img])
        assert engine.mtmd.non_causal(engine.mtmd.tokenize(prompt, [engine.mtmd.bitmap(img, "i")])[1])
    assert_same_top(got, reference_top(llama, gemma3, prompt, [img]))


def test_non_causal_image_needs_it_whole_in_one_batch(gemma3):
    with make_engine(gemma3, n_batch=8) as engine:
        req = CompletionRequest(prompt=f"{MARKER}", media=[MediaItem(0, png_bytes())],
                                options=CompletionOptions.from_dict({"num_predict": 1}))
        with pytest.raises(BadRequest, match="n_batch >= 16"):
            engine.submit(req)
        _, final = engine.submit(CompletionRequest(
            prompt="text still works", options=CompletionOptions.from_dict({"num_predict": 2}))).result()
        assert final.error is None


def test_sliding_window_prefix_is_not_reused_without_its_window(tmp_path):
    """With an 8-token window, the SWA cache (256 cells at n_batch 64) drops
    old positions as a long sequence grows; a slot cut back to an early
    prefix then lacks the window before the cut.  The engine evaluates the
    prompt again rather than continue from that KV (llama.cpp would accept
    it silently and compute with the window missing)."""
    path = str(write_gemma3_text_model(tmp_path / "swa.gguf", sliding_window=8))
    from runner.engine.core import Engine, EngineConfig

    config = EngineConfig(path, n_ctx=512, n_batch=64, n_threads=2)
    with Engine(config) as engine:
        base = engine.tokenize("one two three four five six seven eight nine ten " * 4)
        long_tail = engine.tokenize(" and a long first ending that goes on" * 45)
        assert len(base) < 100 and len(base) + len(long_tail) > 300
        engine.complete(base + long_tail, num_predict=1)
        assert engine.ctx.seq_pos_min(0) > len(base)  # the window before the cut is gone
        follow = engine.detokenize(base) + " but another ending"
        got, final = first_top(engine, follow)
        assert final.cached_count == 0
    with Engine(config) as cold:
        want, _ = first_top(cold, follow)
    assert_same_top(got, want)
