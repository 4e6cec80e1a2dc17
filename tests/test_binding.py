"""The Cython binding against the real default model."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"


# -- tokenizer ---------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "东京は日本の首都です。北京是中国的首都。",
    "emoji: 👍🏽 🇫🇷 👨‍👩‍👧‍👦",
    "combining: e\u0301 a\u0308 n\u0303 \u1e9b\u0323",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
])
def test_tokenize_round_trip(model, text):
    tokens = model.tokenize(text)
    assert tokens and all(0 <= t < model.n_vocab for t in tokens)
    assert model.detokenize(tokens) == text
    joined = b"".join(model.token_to_piece(t) for t in tokens)
    assert joined.decode("utf-8") == text


def test_tokenize_empty(model):
    assert model.tokenize("") == []
    assert model.tokenize(b"") == []
    assert model.detokenize([]) == ""


def test_bos_added_exactly_when_asked(model):
    plain = model.tokenize(PROMPT)
    special = model.tokenize(PROMPT, add_special=True)
    if model.add_bos:
        assert special == [model.bos] + plain
    else:
        assert special == plain
    assert model.tokenize(PROMPT, add_special=False) == plain


def test_special_tokens_parsed_only_when_asked(model):
    text = "<|im_start|>user"
    parsed = model.tokenize(text, parse_special=True)
    literal = model.tokenize(text, parse_special=False)
    assert len(parsed) < len(literal)
    assert model.is_control(parsed[0])
    assert model.token_to_piece(parsed[0]) == b""
    assert model.token_to_piece(parsed[0], special=True) == b"<|im_start|>"


def test_long_text_tokenizes_with_gil_released(model):
    text = "lorem ipsum dolor sit amet " * 2000
    tokens = model.tokenize(text)
    assert model.detokenize(tokens) == text


def test_model_properties(model):
    assert model.n_embd == 576
    assert model.n_vocab == 49152
    assert model.n_layer == 30
    assert model.n_ctx_train >= 2048
    assert model.n_params > 100_000_000
    assert model.size > 50_000_000
    assert "Q4_1" in model.ftype_name
    meta = model.metadata()
    assert meta["general.architecture"] == "llama"
    assert model.meta("general.architecture") == "llama"
    assert model.meta("no.such.key") is None
    assert "im_start" in (model.chat_template() or "")
    assert model.is_eog(model.eos)


# -- decoding ----------------------------------------------------------------

def greedy(llama, model, ctx, prompt_tokens, n, chunk):
    """Evaluate the prompt in chunks of ``chunk`` tokens, then 32 greedy steps."""
    from runner.generate import decode_prompt

    ctx.clear()
    with llama.Batch(512) as batch, llama.Sampler(model, temperature=0) as sampler:
        idx = decode_prompt(ctx, batch, prompt_tokens, chunk=chunk)
        out = []
        pos = len(prompt_tokens)
        for _ in range(n):
            tok = sampler.sample(ctx, idx)
            out.append(tok)
            batch.clear()
            idx = batch.add(tok, pos, 0, True)
            ctx.decode(batch)
            pos += 1
        return out


def test_greedy_is_deterministic_and_chunking_invariant(llama, model, make_ctx):
    ctx = make_ctx()
    prompt = model.tokenize("Once upon a time, in a small village by the sea, there lived", add_special=True)
    first = greedy(llama, model, ctx, prompt, 32, 512)
    assert len(first) == 32
    assert greedy(llama, model, ctx, prompt, 32, 512) == first
    for chunk in (1, 7):
        assert greedy(llama, model, ctx, prompt, 32, chunk) == first, f"chunk={chunk}"


def test_greedy_sample_is_the_first_largest_logit(llama, model, make_ctx):
    from runner.generate import decode_prompt

    ctx = make_ctx()
    prompt = model.tokenize("Water boils at", add_special=True)
    with llama.Batch(512) as batch, llama.Sampler(model, temperature=0) as sampler:
        idx = decode_prompt(ctx, batch, prompt, chunk=512)
        pos = len(prompt)
        for _ in range(8):
            tok = sampler.sample(ctx, idx)
            assert tok == int(np.argmax(ctx.logits(idx)))
            batch.clear()
            idx = batch.add(tok, pos, 0, True)
            ctx.decode(batch)
            pos += 1


def reference_argmax(x):
    """First index of the largest non-NaN value; 0 when x[0] is NaN."""
    if np.isnan(x[0]):
        return 0
    return int(np.nanargmax(x))


@pytest.mark.parametrize("n", [1, 2, 15, 255, 256, 257, 511, 4096, 49152, 49153])
def test_argmax_matches_numpy_on_every_layout(llama, n):
    rng = np.random.default_rng(n)
    for trial in range(40):
        x = rng.standard_normal(n).astype(np.float32)
        where = rng.integers(0, n, size=3)
        if trial % 4 == 1:
            x[where] = x.max() + 1  # ties: the first one wins
        elif trial % 4 == 2:
            x[where] = np.nan
        elif trial % 4 == 3:
            x[:] = np.float32(-np.inf)
            x[where[0]] = 0.0
        assert llama.argmax(x) == reference_argmax(x), (n, trial)


def test_argmax_edge_values(llama):
    assert llama.argmax(np.array([np.nan, 5, 7], np.float32)) == 0
    assert llama.argmax(np.array([3, np.nan, 7, 7], np.float32)) == 2
    assert llama.argmax(np.full(300, -np.inf, np.float32)) == 0
    big = np.zeros(1000, np.float32)
    big[256:272] = np.nan  # a block whose first lanes are NaN keeps its maximum
    big[300] = 9
    assert llama.argmax(big) == 300
    big[999] = np.inf  # the tail after the last whole block
    assert llama.argmax(big) == 999
    with pytest.raises(ValueError):
        llama.argmax(np.zeros(0, np.float32))


def test_two_sequences_in_one_batch_match_alone(llama, model, make_ctx):
    # Logits of the same tokens computed inside a larger batch differ only by
    # float rounding of a differently shaped matmul: atol 2e-2 on logits of
    # magnitude ~10-30 (CPU, f16 KV).
    ctx = make_ctx(n_seq_max=2, n_ctx=1024)
    a = model.tokenize("The sun rises in the east and", add_special=True)
    b = model.tokenize("Water boils at a temperature of", add_special=True)
    with llama.Batch(512, n_seq_max=2) as batch:
        alone = []
        for toks in (a, b):
            ctx.clear()
            batch.clear()
            i = batch.add_tokens(toks, 0, 0, output_last=True)
            ctx.decode(batch)
            alone.append(np.array(ctx.logits(i)))
        ctx.clear()
        batch.clear()
        ia = batch.add_tokens(a, 0, 0, output_last=True)
        ib = batch.add_tokens(b, 0, 1, output_last=True)
        ctx.decode(batch)
        np.testing.assert_allclose(ctx.logits(ia), alone[0], atol=2e-2, rtol=0)
        np.testing.assert_allclose(ctx.logits(ib), alone[1], atol=2e-2, rtol=0)
        assert int(np.argmax(ctx.logits(ia))) == int(np.argmax(alone[0]))
        assert int(np.argmax(ctx.logits(ib))) == int(np.argmax(alone[1]))


def test_seq_cp_and_seq_rm(llama, model, make_ctx):
    ctx = make_ctx(n_seq_max=2, kv_unified=True)
    prefix = model.tokenize("A list of fruits: apple, banana,", add_special=True)
    cont = model.tokenize(" cherry, grape")
    other = model.tokenize(" tomato, potato")
    n = len(prefix)
    with llama.Batch(512, n_seq_max=2) as batch:
        batch.add_tokens(prefix, 0, 0)
        ctx.decode(batch)
        ctx.seq_cp(0, 1, 0, n)
        assert ctx.seq_pos_max(1) == n - 1
        batch.clear()
        i0 = batch.add_tokens(cont, n, 0, output_last=True)
        i1 = batch.add_tokens(cont, n, 1, output_last=True)
        ctx.decode(batch)
        l0, l1 = np.array(ctx.logits(i0)), np.array(ctx.logits(i1))
        np.testing.assert_allclose(l0, l1, atol=2e-2, rtol=0)

        # Replace the continuation of sequence 0, then restore it.
        assert ctx.seq_rm(0, n, -1)
        assert ctx.seq_pos_max(0) == n - 1
        batch.clear()
        batch.add_tokens(other, n, 0, output_last=True)
        ctx.decode(batch)
        assert ctx.seq_rm(0, n, -1)
        batch.clear()
        i0 = batch.add_tokens(cont, n, 0, output_last=True)
        ctx.decode(batch)
        np.testing.assert_allclose(ctx.logits(i0), l0, atol=2e-2, rtol=0)


def test_logits_are_zero_copy_views(llama, model, make_ctx):
    ctx = make_ctx()
    with llama.Batch(8) as batch:
        i = batch.add(model.tokenize("Hi")[0], 0, 0, True)
        ctx.decode(batch)
        view = ctx.logits(i)
        assert view.dtype == np.float32 and view.shape == (model.n_vocab,)
        assert not view.flags.writeable and not view.flags.owndata
        assert np.shares_memory(view, ctx.logits(i))


def test_state_seq_round_trip(llama, model, make_ctx):
    ctx = make_ctx(n_seq_max=2)
    toks = model.tokenize("Saving and restoring state works", add_special=True)
    with llama.Batch(64) as batch:
        batch.add_tokens(toks, 0, 0, output_last=True)
        ctx.decode(batch)
        blob = ctx.state_seq_get(0)
        assert isinstance(blob, bytes) and len(blob) > 0
        ctx.clear()
        assert ctx.seq_pos_max(0) == -1
        ctx.state_seq_set(blob, 1)
        assert ctx.seq_pos_max(1) == len(toks) - 1


def test_state_seq_into_a_caller_buffer(llama, model, make_ctx):
    ctx = make_ctx(n_seq_max=2)
    toks = model.tokenize("Copied straight into a buffer", add_special=True)
    with llama.Batch(64) as batch:
        batch.add_tokens(toks, 0, 1, output_last=True)
        ctx.decode(batch)
    blob = ctx.state_seq_get(1)
    assert ctx.state_seq_size(1) == len(blob)
    out = np.full(len(blob) + 7, 0xAB, dtype=np.uint8)
    assert ctx.state_seq_get_into(1, out) == len(blob)
    assert out[:len(blob)].tobytes() == blob and (out[len(blob):] == 0xAB).all()
    ba = bytearray(len(blob))
    assert ctx.state_seq_get_into(1, ba) == len(blob) and bytes(ba) == blob
    with pytest.raises(ValueError, match=f"the state is {len(blob)} bytes, the buffer {len(blob) - 1}"):
        ctx.state_seq_get_into(1, np.zeros(len(blob) - 1, dtype=np.uint8))
    with pytest.raises((ValueError, BufferError, TypeError)):
        ctx.state_seq_get_into(1, blob)            # read-only
    with pytest.raises(TypeError):
        ctx.state_seq_get_into(1, None)
    ctx.clear()
    ctx.state_seq_set(out[:len(blob)], 0)           # what it wrote restores
    assert ctx.seq_pos_max(0) == len(toks) - 1


def test_embeddings_context(llama, model, make_ctx):
    ctx = make_ctx(embeddings=True, pooling="mean")
    toks = model.tokenize("embed me", add_special=True)
    with llama.Batch(64) as batch:
        batch.add_tokens(toks, 0, 0, output_last=True)
        ctx.decode(batch)
        emb = ctx.embeddings_seq(0)
        assert emb.shape == (576,) and np.isfinite(emb).all() and np.abs(emb).sum() > 0


def test_sampler_variants(llama, model, make_ctx):
    ctx = make_ctx()
    toks = model.tokenize(PROMPT, add_special=True)
    with llama.Batch(64) as batch:
        i = batch.add_tokens(toks, 0, 0, output_last=True)
        ctx.decode(batch)
        seeded = [llama.Sampler(model, temperature=1.0, top_k=0, top_p=1.0, seed=7).sample(ctx, i)
                  for _ in range(3)]
        assert len(set(seeded)) == 1
        s = llama.Sampler(model, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.95,
                          repeat_last_n=64, repeat_penalty=1.1, frequency_penalty=0.1,
                          presence_penalty=0.1, seed=1)
        for t in toks:
            s.accept(t)
        assert 0 <= s.sample(ctx, i) < model.n_vocab
        g = llama.Sampler(model, temperature=0, grammar='root ::= "yes" | "no"')
        tok = g.sample(ctx, i)
        assert model.token_to_piece(tok) in (b"yes", b"no", b"y", b"n", b"ye")


def test_lora_missing_file(llama, model):
    with pytest.raises(FileNotFoundError):
        llama.LoraAdapter(model, "/nonexistent/adapter.gguf")


# -- errors, never crashes -----------------------------------------------------

def test_missing_model_file(llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        llama.Model(tmp_path / "missing.gguf")


def test_truncated_gguf(llama, default_model_path, tmp_path):
    bad = tmp_path / "truncated.gguf"
    with open(default_model_path, "rb") as f:
        bad.write_bytes(f.read(1_000_000))
    with pytest.raises(llama.ModelLoadError):
        llama.Model(bad)


def test_not_a_gguf(llama, tmp_path):
    bad = tmp_path / "text.gguf"
    bad.write_text("this is not a model\n" * 100)
    with pytest.raises(llama.ModelLoadError):
        llama.Model(bad)


def test_progress_callback_can_abort(llama, default_model_path):
    seen = []

    def progress(p):
        seen.append(p)
        return False

    with pytest.raises(llama.ModelLoadError, match="aborted"):
        llama.Model(default_model_path, progress=progress)
    assert seen


def test_progress_callback_exception(llama, default_model_path):
    def progress(p):
        raise KeyError("boom")

    with pytest.raises(llama.ModelLoadError) as info:
        llama.Model(default_model_path, progress=progress)
    assert isinstance(info.value.__cause__, KeyError)


def test_bad_context_params(llama, model):
    with pytest.raises(ValueError, match="n_ctx"):
        llama.Context(model, n_ctx=0)
    with pytest.raises(ValueError):
        llama.Context(model, n_ctx=512, type_k="q3_z")
    with pytest.raises(ValueError):
        llama.Context(model, n_ctx=512, flash_attn="maybe")


def test_out_of_range_tokens(llama, model, make_ctx):
    ctx = make_ctx()
    with llama.Batch(8) as batch:
        batch.add(model.n_vocab, 0, 0, True)
        with pytest.raises(ValueError, match="out of range"):
            ctx.decode(batch)
        batch.clear()
        batch.add(-1, 0, 0, True)
        with pytest.raises(ValueError, match="out of range"):
            ctx.decode(batch)
    with pytest.raises(ValueError):
        model.detokenize([model.n_vocab + 5])
    with pytest.raises(ValueError):
        model.token_to_piece(-3)
    # The context still works after the rejected batches.
    with llama.Batch(8) as batch:
        batch.add(model.tokenize("ok")[0], 0, 0, True)
        ctx.decode(batch)


def test_batch_larger_than_n_batch(llama, model, make_ctx):
    ctx = make_ctx(n_batch=16)
    with llama.Batch(64) as batch:
        batch.add_tokens(list(range(100, 140)), 0, 0, output_last=True)
        with pytest.raises(ValueError, match="exceeds n_batch"):
            ctx.decode(batch)
    with llama.Batch(4) as small:
        with pytest.raises(IndexError, match="do not fit"):
            small.add_tokens([1, 2, 3, 4, 5], 0, 0)


def test_bad_sequence_id(llama, model, make_ctx):
    ctx = make_ctx(n_seq_max=2)
    with llama.Batch(8) as batch:
        batch.add(100, 0, 5, True)
        with pytest.raises(ValueError, match="sequence id"):
            ctx.decode(batch)
    with pytest.raises(ValueError):
        ctx.seq_rm(9)


def test_empty_batch(llama, make_ctx):
    ctx = make_ctx()
    with llama.Batch(8) as batch:
        with pytest.raises(ValueError, match="empty"):
            ctx.decode(batch)


def test_use_after_close(llama, default_model_path):
    model = llama.Model(default_model_path)
    ctx = llama.Context(model, n_ctx=256, n_threads=2)
    batch = llama.Batch(8)
    sampler = llama.Sampler(model, temperature=0)
    with pytest.raises(llama.LlamaError, match="open context"):
        model.close()
    ctx.close()
    ctx.close()  # idempotent
    batch.close()
    sampler.close()
    model.close()
    model.close()
    with pytest.raises(llama.ClosedError):
        model.tokenize("x")
    with pytest.raises(llama.ClosedError):
        _ = model.n_embd
    with pytest.raises(llama.ClosedError):
        ctx.decode(llama.Batch(1))
    with pytest.raises(llama.ClosedError):
        ctx.seq_rm(0)
    with pytest.raises(llama.ClosedError):
        batch.add(1, 0, 0)
    with pytest.raises(llama.ClosedError):
        sampler.reset()
    with pytest.raises(llama.ClosedError):
        llama.Context(model, n_ctx=256)


def test_malformed_grammar(llama, model):
    with pytest.raises(llama.GrammarError):
        llama.Sampler(model, temperature=0, grammar="root ::= (unclosed")
    with pytest.raises(llama.GrammarError):
        llama.Sampler(model, temperature=0, grammar="root ::= undefined-rule")


def test_embedding_batch_width(llama, make_ctx):
    ctx = make_ctx()
    with llama.Batch(4, embd=100) as batch:
        batch.add_embedding(np.zeros(100, dtype=np.float32), 0, 0, True)
        with pytest.raises(ValueError, match="n_embd"):
            ctx.decode(batch)
    with llama.Batch(4, embd=576) as batch:
        with pytest.raises(ValueError):
            batch.add_embedding(np.zeros(10), 0, 0)
        with pytest.raises(TypeError):
            batch.add(1, 0, 0)


def test_mrope_batch_keeps_sections_in_place(llama):
    """Four positions per row, section-major for the current n_tokens: rows
    appended, or a batch cut short, move the sections with them."""
    with llama.Batch(8, embd=4, n_pos=4) as batch:
        a = np.array([[10, 10, 10], [20, 21, 22], [30, 31, 32], [0, 0, 0]])
        b = np.array([[40, 40], [50, 51], [60, 61], [1, 1]])
        assert batch.add_embeddings(np.zeros((3, 4)), 0, 0, positions=a) == 2
        assert batch.add_embeddings(np.ones((2, 4)), 0, 0, output_last=True, positions=b) == 4
        assert batch.positions().tolist() == np.hstack([a, b]).tolist()
        batch.truncate(4)
        assert batch.positions().tolist() == np.hstack([a, b])[:, :4].tolist()
        with pytest.raises(ValueError, match="shape"):
            batch.add_embeddings(np.zeros((2, 4)), 0, 0, positions=a)
        with pytest.raises(ValueError, match="4 positions"):
            batch.add_embeddings(np.zeros((1, 4)), 0, 0)
        with pytest.raises(TypeError):
            batch.add_embedding(np.zeros(4), 0, 0)
    with llama.Batch(4, embd=4) as plain:
        plain.add_embeddings(np.zeros((2, 4)), 7, 0)
        assert plain.positions().tolist() == [[7, 8]]
        with pytest.raises(ValueError, match="one position"):
            plain.add_embeddings(np.zeros((1, 4)), 0, 0, positions=a[:1, :1])
    with pytest.raises(ValueError):
        llama.Batch(4, n_pos=4)  # token batches have one position per token


# -- devices, build, logging ---------------------------------------------------

def test_devices_and_build_info(llama):
    devs = llama.devices()
    assert any(d["type"] == "cpu" for d in devs)
    for d in devs:
        assert d["total"] >= d["free"] >= 0
    info = llama.build_info()
    assert info["backends"] and any(b["name"] == "CPU" for b in info["backends"])
    assert info["ggml_commit"]


def test_log_lines_reach_python_logging(llama, default_model_path, caplog, tmp_path):
    import logging

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with caplog.at_level(logging.WARNING, logger="runner.llama"):
        with pytest.raises(llama.ModelLoadError) as info:
            llama.Model(bad)
    assert any(r.name == "runner.llama" for r in caplog.records)
    assert llama.last_error_line()
    assert llama.last_error_line() in str(info.value)


@pytest.mark.skipif(not hasattr(os, "eventfd"), reason="counts through an eventfd")
def test_decode_rings_a_doorbell_once_per_decode(llama, model, make_ctx):
    from runner.engine.handoff import Doorbell

    ctx = make_ctx()
    bell = Doorbell()
    try:
        token = model.tokenize("Hi", add_special=True)[0]
        with llama.Batch(8) as batch:
            for pos, fd in enumerate((bell.fd, -1, bell.fd)):  # -1: no doorbell, nothing written
                batch.clear()
                batch.add(token, pos, 0, True)
                ctx.decode(batch, fd)
        assert os.eventfd_read(bell.fd) == 2
        seen = []
        waiter = threading.Thread(target=lambda: (bell.wait(), seen.append(True)))
        waiter.start()
        bell.ring()
        waiter.join(10)
        assert seen == [True]
    finally:
        bell.close()
