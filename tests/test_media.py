"""Media inputs: the embedding cache, placeholders, the engine and the process.

The projectors are tiny random-weight GGUFs written by tests/mmproj.py (an
``mlp`` vision projector and an ``ultravox`` audio projector, output width 576
= the default model's n_embd); no real vision model installs from the index.
"""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest

from mmproj import png_bytes, wav_bytes, write_audio_projector, write_vision_projector
from runner.engine.media import MediaCache, MediaItem
from runner.engine.requests import BadRequest, CompletionOptions, CompletionRequest
from runner.engine.slots import SpanInput, reusable_prefix


# -- the cache alone ------------------------------------------------------------

def rows(n: int, value: float = 0.0) -> np.ndarray:
    return np.full((n, 4), value, dtype=np.float32)  # n * 16 bytes


@pytest.mark.parametrize("ops, expected_keys, evictions", [
    # (operations, keys left from least to most recently used, evictions)
    ([("put", "a", 2), ("put", "b", 2), ("put", "c", 2)], ["a", "b", "c"], 0),
    ([("put", "a", 2), ("put", "b", 2), ("put", "c", 2), ("put", "d", 2)], ["b", "c", "d"], 1),
    ([("put", "a", 2), ("put", "b", 2), ("put", "c", 2), ("get", "a"), ("put", "d", 2)],
     ["c", "a", "d"], 1),
    ([("put", "a", 2), ("put", "b", 2), ("put", "c", 4)], ["b", "c"], 1),
    ([("put", "a", 2), ("put", "big", 7)], ["a"], 0),   # larger than the bound: not kept
    ([("put", "a", 2), ("put", "a", 3), ("put", "b", 3)], ["a", "b"], 0),  # replacing frees the old
])
def test_eviction_order_under_the_byte_bound(ops, expected_keys, evictions):
    cache = MediaCache(max_bytes=6 * 16)
    for op in ops:
        if op[0] == "put":
            cache.put((op[1], 0), rows(op[2]))
        else:
            assert cache.get((op[1], 0)) is not None
    assert [k for k, _ in cache.keys()] == expected_keys
    assert cache.stats.evictions == evictions
    assert cache.bytes == sum(cache.get(k).nbytes for k in cache.keys()) <= cache.max_bytes


def test_get_or_encode_counts_hits_and_misses_and_freezes_rows():
    cache = MediaCache(max_bytes=1 << 20)
    calls = []

    def encode():
        calls.append(1)
        return rows(3, 1.5)

    first = cache.get_or_encode(("x", 0), encode)
    second = cache.get_or_encode(("x", 0), encode)
    assert len(calls) == 1 and second is first
    assert not first.flags.writeable
    info = cache.info()
    assert (info["hits"], info["misses"], info["entries"], info["bytes"]) == (1, 1, 1, 48)


def test_a_disabled_cache_encodes_every_time():
    cache = MediaCache(max_bytes=0)
    calls = []
    for _ in range(3):
        cache.get_or_encode(("x", 0), lambda: calls.append(1) or rows(1))
    assert len(calls) == 3 and len(cache) == 0


# -- the prefix rule for spans --------------------------------------------------------

IMG_A = [SpanInput(("a", 0), i) for i in range(4)]
IMG_B = [SpanInput(("b", 0), i) for i in range(4)]


@pytest.mark.parametrize("cached, prompt, expected", [
    ([1, 2] + IMG_A + [3], [1, 2] + IMG_A + [3, 4], 7),     # whole image reused
    ([1, 2] + IMG_A + [3], [1, 2] + IMG_B + [3, 4], 2),     # another image: stop before it
    ([1, 2] + IMG_A[:2], [1, 2] + IMG_A + [3], 2),          # half-decoded image: not reused
    ([1, 2] + IMG_A, [1, 2] + IMG_A, 2),                    # fully cached: last input must be
                                                            # evaluated, so the image goes again
    ([9] + IMG_A, [1] + IMG_A, 0),
])
def test_a_prefix_never_ends_inside_a_span(cached, prompt, expected):
    assert reusable_prefix(cached, prompt, len(prompt) - 1) == expected


# -- with the real extension ---------------------------------------------------------

@pytest.fixture(scope="module")
def projectors(tmp_path_factory):
    d = tmp_path_factory.mktemp("mmproj")
    return {
        "vision": str(write_vision_projector(d / "vision.gguf")),
        "audio": str(write_audio_projector(d / "audio.gguf")),
        "narrow": str(write_vision_projector(d / "narrow.gguf", n_embd_out=512)),
    }


def make_engine(model_path: str, projector: str, **kw):
    from runner.engine.core import Engine, EngineConfig

    kw.setdefault("n_ctx", 2048)
    kw.setdefault("n_threads", 2)
    return Engine(EngineConfig(model_path, projector_path=projector, **kw))


@pytest.fixture(scope="module")
def engine(default_model_path, projectors):
    e = make_engine(default_model_path, projectors["vision"], parallel=4)
    yield e
    e.close()


def run(engine, prompt, media=(), **options):
    options.setdefault("num_predict", 4)
    options.setdefault("temperature", 0.0)
    req = CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(options),
                            media=[MediaItem(i, data) for i, data in enumerate(media)])
    return engine.submit(req).result()


def misses(engine) -> int:
    return engine.media_cache.info()["misses"]


def test_projector_encodes_the_same_image_to_the_same_rows(engine):
    img = png_bytes(32, 32, seed=11)
    from runner.engine.media import build_prompt

    mp1 = build_prompt(engine.mtmd, "look: [img-0]", [MediaItem(0, img)], True)
    mp2 = build_prompt(engine.mtmd, "look: [img-0]", [MediaItem(0, img)], True)
    assert [sp.key for sp in mp1.spans] == [sp.key for sp in mp2.spans]
    a = engine.mtmd.encode(mp1.spans[0].chunk)
    b = engine.mtmd.encode(mp2.spans[0].chunk)
    assert a.shape == (16, 576) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.isfinite(a).all()
    other = build_prompt(engine.mtmd, "look: [img-0]", [MediaItem(0, png_bytes(32, 32, seed=12))], True)
    assert other.spans[0].key != mp1.spans[0].key
    assert not np.array_equal(engine.mtmd.encode(other.spans[0].chunk), a)


def test_same_image_twice_is_encoded_once(engine):
    img = png_bytes(32, 32, seed=21)
    before, hits = misses(engine), engine.media_cache.info()["hits"]
    t1, f1 = run(engine, "First question about [img-0]?", [img])
    # Different text before the image: the KV prefix cannot cover it, the cache can.
    t2, f2 = run(engine, "A second, longer question about [img-0]?", [img])
    assert misses(engine) == before + 1
    assert engine.media_cache.info()["hits"] == hits + 1
    assert f1.done_reason == f2.done_reason == "length"
    assert f1.prompt_count == len(engine.tokenize("First question about ", add_special=True)) + 16 + \
        len(engine.tokenize("?"))


def test_different_images_do_not_match_in_the_prefix_cache(default_model_path, projectors):
    # The slot cache alone (no host-memory tier, which would restore the
    # first image's state for the third request: see the next test).
    with make_engine(default_model_path, projectors["vision"], parallel=1, cache_ram_mb=0) as e:
        prefix = "Compare this picture: "
        n_text = len(e.tokenize(prefix, add_special=True))
        _, f1 = run(e, prefix + "[img-0] now.", [png_bytes(32, 32, seed=1)])
        _, f2 = run(e, prefix + "[img-0] now.", [png_bytes(32, 32, seed=2)])
        assert f1.cached_count == 0
        assert f2.cached_count == n_text          # stops right before the other image
        assert e.media_cache.info()["misses"] == 2
        # The first image again: its rows come from the cache, not the encoder.
        _, f3 = run(e, prefix + "[img-0] now.", [png_bytes(32, 32, seed=1)])
        assert f3.cached_count == n_text and e.media_cache.info()["misses"] == 2


def test_host_tier_restores_a_prompt_with_an_image(default_model_path, projectors):
    with make_engine(default_model_path, projectors["vision"], parallel=1) as e:
        prompt = "Compare this picture: [img-0] now."
        one, two = png_bytes(32, 32, seed=1), png_bytes(32, 32, seed=2)
        _, f1 = run(e, prompt, [one])
        _, f2 = run(e, prompt, [two])
        _, f3 = run(e, prompt, [one])     # the first image's state comes back from host memory
        assert f2.cached_count < f1.prompt_count - 1
        assert f3.cached_count == f3.prompt_count - 1  # all but the last input, as for any full hit
        assert e.info()["host_cache"]["hits"] >= 1


def test_follow_up_turn_reuses_the_kv_prefix_without_encoding(default_model_path, projectors):
    # No media cache at all: only the KV prefix can spare the encoder.
    with make_engine(default_model_path, projectors["vision"], parallel=1, media_cache_bytes=0) as e:
        img = png_bytes(32, 32, seed=5)
        turn1 = "<|im_start|>user\nWhat is in [img-0]?<|im_end|>\n<|im_start|>assistant\n"
        answer, f1 = run(e, turn1, [img], num_predict=6)
        assert e.media_cache.info()["misses"] == 1
        turn2 = turn1 + answer + "<|im_end|>\n<|im_start|>user\nAnd the colours?<|im_end|>\n"
        _, f2 = run(e, turn2, [img])
        assert e.media_cache.info()["misses"] == 1     # not encoded again
        assert f2.cached_count >= f1.prompt_count
        assert f2.prompt_eval_count == f2.prompt_count - f2.cached_count


def test_four_parallel_requests_with_images(engine):
    images = [png_bytes(24 + 8 * i, 32, seed=100 + i) for i in range(4)]
    start = threading.Barrier(4)

    def one(i):
        start.wait()
        return run(engine, f"Picture {i}: [img-0]. Another: [img-1]. Say something.",
                   [images[i], images[(i + 1) % 4]], num_predict=6)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    for text, final in results:
        assert final.done_reason == "length" and final.eval_count == 6 and final.error is None
    # Each image is encoded at most once; the second use of each is a hit or a
    # concurrent first use (both in flight before either was cached).
    assert engine.media_cache.info()["entries"] >= 4


def test_an_image_on_an_n_batch_boundary(default_model_path, projectors):
    """Text before the image fills the first batch exactly, then straddles it:
    both give the output of an engine whose batch holds the whole prompt."""
    img = png_bytes(32, 32, seed=7)
    outputs = {}
    for n_batch in (512, 32):
        with make_engine(default_model_path, projectors["vision"], parallel=1, n_batch=n_batch) as e:
            n_special = len(e.tokenize(" the", add_special=True)) - 1  # BOS, if the model adds one
            for at in (32, 28):
                # The image starts at 32 (on the boundary) or at 28 (rows
                # 28..43 cross it).
                text = " the" * (at - n_special)
                assert len(e.tokenize(text, add_special=True)) == at
                out, final = run(e, text + "[img-0] and then", [img], num_predict=6)
                assert final.prompt_count == at + 16 + len(e.tokenize(" and then"))
                outputs[n_batch, at] = out
    assert outputs[32, 32] == outputs[512, 32]
    assert outputs[32, 28] == outputs[512, 28]


def test_media_at_the_end_of_the_prompt_gives_the_first_token(engine):
    out, final = run(engine, "Describe: [img-0]", [png_bytes(16, 16, seed=3)])
    assert final.eval_count == 4 and final.done_reason == "length"


def test_the_default_marker_takes_items_in_order(engine):
    a, b = png_bytes(32, 32, seed=31), png_bytes(32, 32, seed=32)
    from runner.engine.media import build_prompt

    marker = engine.mtmd.marker
    by_marker = build_prompt(engine.mtmd, f"x {marker} y {marker}", [MediaItem(0, a), MediaItem(1, b)], True)
    by_id = build_prompt(engine.mtmd, "x [img-0] y [img-1]", [MediaItem(0, a), MediaItem(1, b)], True)
    assert by_marker.inputs == by_id.inputs
    swapped = build_prompt(engine.mtmd, "x [img-1] y [img-0]", [MediaItem(0, a), MediaItem(1, b)], True)
    assert [s.key for s in swapped.spans] == [s.key for s in reversed(by_id.spans)]


@pytest.mark.parametrize("prompt, media, message", [
    ("see [img-0]", [b""], "empty"),
    ("see [img-0]", [png_bytes(32, 32, seed=1)[:40]], "cannot decode"),
    ("see [img-0]", [b"this is not an image at all, just text" * 4], "cannot decode"),
    ("see [img-3]", [png_bytes(32, 32)], "names no media item"),
    ("see nothing", [png_bytes(32, 32)], "not referenced"),
    ("see [img-0] and <__media__> <__media__>", [png_bytes(32, 32)], "more <__media__> markers"),
    ("see [img-0]", [wav_bytes(0.5)], "no audio encoder"),
])
def test_bad_media_fail_the_request_not_the_engine(engine, prompt, media, message):
    with pytest.raises(BadRequest, match=message):
        run(engine, prompt, media)
    out, final = run(engine, "Still alive? [img-0]", [png_bytes(32, 32, seed=9)])
    assert final.done_reason == "length"


def test_media_without_a_projector_is_a_clear_error(default_model_path):
    from runner.engine.core import Engine, EngineConfig

    with Engine(EngineConfig(default_model_path, n_ctx=512, n_threads=2)) as e:
        with pytest.raises(BadRequest, match="no multimodal projector"):
            run(e, "see [img-0]", [png_bytes(32, 32)])
        # Without media, placeholder text is just text.
        _, final = run(e, "see [img-0]")
        assert final.done_reason == "length"


def test_a_projector_of_the_wrong_width_fails_at_load(default_model_path, projectors):
    with pytest.raises(BadRequest, match=f"projector {projectors['narrow']} cannot be used with "
                                         "this model: .*mismatch between text model"):
        make_engine(default_model_path, projectors["narrow"])


@pytest.mark.parametrize("kind", ["missing", "directory", "not a projector"])
def test_a_projector_path_that_is_no_projector_fails_the_load_as_a_bad_request(
        default_model_path, tmp_path, kind):
    path = tmp_path / "mmproj.gguf"
    if kind == "directory":
        path.mkdir()
    elif kind == "not a projector":
        path = default_model_path  # a GGUF, but a language model
    with pytest.raises(BadRequest, match=f"projector.* {path}"):
        make_engine(default_model_path, str(path), n_ctx=256, n_threads=2)


def test_audio_through_an_audio_projector(default_model_path, projectors):
    with make_engine(default_model_path, projectors["audio"], parallel=1) as e:
        assert e.info()["projector"]["audio"] and not e.info()["projector"]["vision"]
        out, final = run(e, "Transcribe: [img-0] Text:", [wav_bytes(1.0, seed=1)])
        assert final.done_reason == "length"
        assert final.prompt_count > 75
        with pytest.raises(BadRequest, match="no vision encoder"):
            run(e, "see [img-0]", [png_bytes(32, 32)])


def test_media_through_the_runner_process(default_model_path, projectors):
    from runner.process.client import Runner

    img = png_bytes(32, 32, seed=41)
    with Runner.spawn(default_model_path, n_ctx=1024, parallel=2, n_threads=2,
                      projector_path=projectors["vision"]) as r:
        chunks = list(r.complete("What is [img-0]?", media=[img], num_predict=4, temperature=0))
        final = chunks[-1]
        assert final.done_reason == "length" and final.prompt_count > 16
        list(r.complete("Again, what is [img-0]?", media={0: img}, num_predict=2))
        cache = r.info().engine["media_cache"]
        assert (cache["misses"], cache["hits"], cache["entries"]) == (1, 1, 1)
        with pytest.raises(Exception, match="cannot decode"):
            list(r.complete("bad [img-0]", media=[b"garbage bytes"], num_predict=2))
        assert list(r.complete("fine", num_predict=2))[-1].done_reason == "length"
        # A cancelled media completion ends with its final, like any completion.
        stream = r.complete("Describe [img-0] at length.", media=[img], num_predict=2000,
                            ignore_eos=True)
        assert type(next(stream)).__name__ == "Chunk"
        stream.cancel()
        assert list(stream)[-1].done_reason == "cancelled"


def test_generate_command_with_an_image(default_model_path, projectors, tmp_path):
    import subprocess
    import sys

    img = tmp_path / "picture.png"
    img.write_bytes(png_bytes(32, 32, seed=3))
    cmd = [sys.executable, "-m", "runner.cli", "generate", "--model", default_model_path,
           "--mmproj", projectors["vision"], "--image", str(img), "-p", "What is this?",
           "-n", "4", "--temperature", "0", "--threads", "2", "-v", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "generation: 4 tokens" in done.stderr
    bad = subprocess.run(cmd[:9] + [projectors["vision"]] + cmd[10:], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "cannot decode the media" in bad.stderr
