"""The host-memory tier in the engine: more conversations than slots.

Each test runs conversations through one slot, so every return finds its
slot taken by another conversation, and compares the greedy tokens after a
restore with those of the same request on an engine that never evicted it
(more slots).
"""

from __future__ import annotations

import numpy as np
import pytest
from gemma3_models import write_gemma3_text_model
from mmproj import _matrix, _normal, _ones, _zeros, copy_tokenizer, finish_gguf

from runner.engine.core import Engine, EngineConfig
from runner.engine.requests import Chunk, CompletionOptions, CompletionRequest

pytestmark = pytest.mark.model

# Greedy, with the other options at their defaults (penalties included).
GREEDY = dict(temperature=0.0, num_predict=12)


def run(engine, prompt, **options):
    events = list(engine.submit(CompletionRequest(
        prompt=prompt, options=CompletionOptions.from_dict({**GREEDY, **options}))))
    return [t for e in events if isinstance(e, Chunk) for t in e.tokens], events[-1]


TOPICS = ["Apples", "Bridges", "Comets", "Deserts"]  # distinct first tokens: no shared prefix


def conversations(engine, n=3):
    return [engine.tokenize(f"{t}. " + f"We talk about {t.lower()}, at length. " * 25,
                            add_special=True) for t in TOPICS[:n]]


def returning_turns(path, parallel, cache_ram_mb=256):
    """Three first turns, then two returns of conversation 0 (each finding
    the slot taken): one following its reply, one replacing the reply.
    Returns [(prompt, tokens, final, inputs the slot held)] of the two, and
    the tier's counters."""
    with Engine(EngineConfig(path, n_ctx=1024 * parallel, parallel=parallel, n_threads=2,
                             cache_ram_mb=cache_ram_mb)) as e:
        firsts = conversations(e)
        replies = [run(e, p)[0] for p in firsts]
        # the slot held the first prompt and the reply but its last token
        # (returned, never decoded); then the first prompt and more
        held = (len(firsts[0]) + len(replies[0]) - 1, len(firsts[0]))
        out = []
        for follow, n in zip((firsts[0] + replies[0] + e.tokenize(" Tell me more."),
                              firsts[0] + e.tokenize(" Say it differently.")), held):
            out.append((follow, *run(e, follow), n))
            run(e, firsts[1])  # the slot is taken again (restoring conversation 1)
        return out, e.info()["host_cache"]


def test_returning_conversation_is_restored_and_generates_the_same_tokens(default_model_path):
    """A restore gives back the state bytes the slot had: the tokens are
    those of an engine that never evicted the conversation.  (Against a cold
    evaluation of the whole prompt they may differ after a few tokens, with
    or without the tier: llama.cpp's CPU kernels round a 201-token batch and
    a 7-token batch differently from one of 208; measured here, the first 5
    greedy tokens agreed.)"""
    (more, edit), info = returning_turns(default_model_path, parallel=1)
    follow, tokens, final, held = more
    assert final.error is None and final.slot == 0
    # everything the slot held for conversation 0 came back from host memory
    assert final.cached_count == held
    assert final.prompt_eval_count == len(follow) - held
    # the second return shares the first prompt only: restored and cut back
    assert edit[2].cached_count == edit[3]
    assert info["hits"] == 4 and info["restore_seconds"] > 0 and info["save_seconds"] > 0
    assert 0 < info["bytes"] <= info["max_bytes"] == 256 << 20

    (kept_more, kept_edit), kept_info = returning_turns(default_model_path, parallel=3)
    assert kept_info["hits"] == 0
    assert kept_more[2].cached_count == final.cached_count and kept_more[1] == tokens
    assert kept_edit[2].cached_count == edit[2].cached_count and kept_edit[1] == edit[1]


def test_tier_respects_its_byte_bound(default_model_path):
    # one conversation's state is ~4.6 MB (200 tokens of 23 KB): 6 MiB keep one at a time
    with Engine(EngineConfig(default_model_path, n_ctx=1024, parallel=1, n_threads=2,
                             cache_ram_mb=6)) as e:
        firsts = conversations(e, 4)
        for p in firsts:
            run(e, p, num_predict=2)
        info = e.info()["host_cache"]
        assert 4 << 20 < info["bytes"] <= 6 << 20
        assert info["entries"] == 1 and info["saves"] == 3 and info["evictions"] == 2
        _, final = run(e, firsts[2] + e.tokenize(" Again."))  # the one kept: restored
        assert final.cached_count == len(firsts[2])
        _, final = run(e, firsts[0] + e.tokenize(" Again."))  # evicted: evaluated again
        assert final.cached_count == 0 and e.info()["host_cache"]["hits"] == 1


def test_sliding_window_state_is_restored_only_where_its_window_is_whole(tmp_path):
    """With an 8-token window llama.cpp saves only the last window of the
    SWA layers: a returning conversation that extends the saved inputs is
    restored; a prompt sharing only an early part of them is not (the
    window before that cut is not in the state), and is evaluated again."""
    path = str(write_gemma3_text_model(tmp_path / "swa.gguf", sliding_window=8))
    config = dict(n_ctx=512, n_batch=64, n_threads=2)
    with Engine(EngineConfig(path, parallel=1, **config)) as e:
        a = e.tokenize("one two three four five six seven eight nine ten " * 6)
        b = e.tokenize("a completely different conversation about other things " * 5)
        reply_a, _ = run(e, a)
        run(e, b)                                     # slot reused: conversation a saved
        follow = a + reply_a + e.tokenize(" and then")
        tokens, final = run(e, follow)
        assert final.cached_count == len(a) + len(reply_a) - 1  # the last reply token was never decoded
        info = e.info()["host_cache"]
        assert info["hits"] == 1
        run(e, b)                                     # a's longer state saved again
        _, early = run(e, a[:20] + e.tokenize(" elsewhere"))
        assert early.cached_count == 0
        assert e.info()["host_cache"]["hits"] == 1
    with Engine(EngineConfig(path, parallel=2, **config)) as kept:
        reply, _ = run(kept, a)
        run(kept, b)
        want, kept_final = run(kept, follow)
        assert reply == reply_a and kept_final.cached_count == final.cached_count
    assert tokens == want


def test_full_size_sliding_window_cache_keeps_early_prefixes_reusable(tmp_path):
    """``swa_full``: the SWA layers keep every position, so a slot cut back
    to an early prefix still holds the window before the cut and is reused
    (without it the same prompt is evaluated again: tests/test_media_models.py)."""
    path = str(write_gemma3_text_model(tmp_path / "swa.gguf", sliding_window=8))
    config = dict(n_ctx=512, n_batch=64, n_threads=2, swa_full=True, cache_ram_mb=0)
    with Engine(EngineConfig(path, **config)) as e:
        base = e.tokenize("one two three four five six seven eight nine ten " * 4)
        run(e, base + e.tokenize(" and a long first ending that goes on" * 45), num_predict=1)
        assert e.ctx.seq_pos_min(0) == 0  # nothing dropped
        follow = base + e.tokenize(" but another ending")
        tokens, final = run(e, follow)
        assert final.cached_count == len(base)
    with Engine(EngineConfig(path, **config)) as kept:
        run(kept, base, num_predict=1)
        want, kept_final = run(kept, follow)
        assert kept_final.cached_count == len(base)
    assert tokens == want


def write_mamba(path, seed: int = 0, *, n_embd: int = 32, n_layer: int = 2, d_state: int = 8,
                d_conv: int = 4, dt_rank: int = 4):
    """A tiny random-weight Mamba (recurrent) model: the keys and tensors
    vendor/llama.cpp/src/models/mamba.cpp reads (d_inner = 2 * n_embd, the
    only expansion it supports; the LM head tied to token_embd; A negative,
    as converters write -exp(A_log)), with the default model's tokenizer."""
    import gguf

    rng = np.random.default_rng(seed)
    arch, d_inner = "mamba", 2 * n_embd
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.name", "llama-runner test mamba")
    for key, value in (("context_length", 4096), ("embedding_length", n_embd),
                       ("block_count", n_layer), ("feed_forward_length", 0),
                       ("attention.head_count", 0), ("ssm.conv_kernel", d_conv),
                       ("ssm.inner_size", d_inner), ("ssm.state_size", d_state),
                       ("ssm.time_step_rank", dt_rank)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    n_vocab = copy_tokenizer(w)
    # numpy shapes are ggml's ne reversed
    w.add_tensor("token_embd.weight", _matrix(rng, n_vocab, n_embd))
    w.add_tensor("output_norm.weight", _ones(n_embd))
    for il in range(n_layer):
        b = f"blk.{il}"
        w.add_tensor(f"{b}.attn_norm.weight", _ones(n_embd))
        w.add_tensor(f"{b}.ssm_in.weight", _matrix(rng, 2 * d_inner, n_embd))
        w.add_tensor(f"{b}.ssm_conv1d.weight", _normal(rng, d_inner, d_conv))
        w.add_tensor(f"{b}.ssm_conv1d.bias", _zeros(d_inner))
        w.add_tensor(f"{b}.ssm_x.weight", _matrix(rng, dt_rank + 2 * d_state, d_inner))
        w.add_tensor(f"{b}.ssm_dt.weight", _matrix(rng, d_inner, dt_rank))
        w.add_tensor(f"{b}.ssm_dt.bias", _zeros(d_inner))
        w.add_tensor(f"{b}.ssm_a", -rng.uniform(0.5, 1.5, (d_inner, d_state)).astype(np.float32))
        w.add_tensor(f"{b}.ssm_d", _ones(d_inner))
        w.add_tensor(f"{b}.ssm_out.weight", _matrix(rng, n_embd, d_inner))
    finish_gguf(w)
    return path


def test_recurrent_state_is_restored_only_for_prompts_extending_it(tmp_path):
    """A recurrent state cannot be cut back: the returning conversation that
    extends everything the slot held is restored (and generates what an
    engine that kept it generates); an edit inside it is evaluated again."""
    path = str(write_mamba(tmp_path / "mamba.gguf"))
    config = dict(n_ctx=1024, n_threads=2)

    def session(parallel):
        with Engine(EngineConfig(path, parallel=parallel, **config)) as e:
            assert e.model.is_recurrent
            a = e.tokenize("one two three four five six seven eight nine ten " * 4)
            b = e.tokenize("completely different words about the sea " * 4)
            reply, _ = run(e, a, num_predict=6)
            run(e, b, num_predict=6)
            follow = a + reply + e.tokenize(" and more")
            tokens, final = run(e, follow, num_predict=6)
            run(e, b, num_predict=6)
            _, edit = run(e, a[:10] + e.tokenize(" elsewhere"), num_predict=6)
            return len(a) + len(reply) - 1, tokens, final, edit, e.info()["host_cache"]

    held, tokens, final, edit, info = session(1)
    assert final.cached_count == held and edit.cached_count == 0
    # b's second turn repeats b, shorter than b's saved state (b and its reply): not served
    assert info["hits"] == 1 and info["restore_failures"] == 0
    _, kept_tokens, kept_final, _, kept_info = session(2)
    assert kept_info["hits"] == 0 and kept_final.cached_count == held
    assert tokens == kept_tokens


def write_lfm2(path, seed: int = 0, *, n_embd: int = 32, n_head: int = 4, n_head_kv: int = 2,
               n_ff: int = 64, l_cache: int = 3, kinds: str = "ca"):
    """A tiny random-weight LFM2 (hybrid: short-convolution layers, whose
    state is recurrent, beside attention layers with a KV cache): the keys
    and tensors vendor/llama.cpp/src/models/lfm2.cpp reads, one layer per
    letter of ``kinds`` ("c" convolution, "a" attention; a layer is
    recurrent where its KV head count is 0), the LM head tied to
    token_embd, with the default model's tokenizer."""
    import gguf

    rng = np.random.default_rng(seed)
    arch, head = "lfm2", n_embd // n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.name", "llama-runner test lfm2")
    for key, value in (("context_length", 4096), ("embedding_length", n_embd),
                       ("block_count", len(kinds)), ("feed_forward_length", n_ff),
                       ("attention.head_count", n_head), ("shortconv.l_cache", l_cache)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_array(f"{arch}.attention.head_count_kv", [0 if k == "c" else n_head_kv for k in kinds])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    n_vocab = copy_tokenizer(w)
    w.add_tensor("token_embd.weight", _matrix(rng, n_vocab, n_embd))
    w.add_tensor("token_embd_norm.weight", _ones(n_embd))
    for il, kind in enumerate(kinds):
        b = f"blk.{il}"
        w.add_tensor(f"{b}.attn_norm.weight", _ones(n_embd))
        w.add_tensor(f"{b}.ffn_norm.weight", _ones(n_embd))
        w.add_tensor(f"{b}.ffn_gate.weight", _matrix(rng, n_ff, n_embd))
        w.add_tensor(f"{b}.ffn_up.weight", _matrix(rng, n_ff, n_embd))
        w.add_tensor(f"{b}.ffn_down.weight", _matrix(rng, n_embd, n_ff))
        if kind == "c":
            w.add_tensor(f"{b}.shortconv.conv.weight", _normal(rng, n_embd, l_cache))
            w.add_tensor(f"{b}.shortconv.in_proj.weight", _matrix(rng, 3 * n_embd, n_embd))
            w.add_tensor(f"{b}.shortconv.out_proj.weight", _matrix(rng, n_embd, n_embd))
        else:
            w.add_tensor(f"{b}.attn_q_norm.weight", _ones(head))
            w.add_tensor(f"{b}.attn_k_norm.weight", _ones(head))
            w.add_tensor(f"{b}.attn_q.weight", _matrix(rng, n_embd, n_embd))
            w.add_tensor(f"{b}.attn_k.weight", _matrix(rng, n_head_kv * head, n_embd))
            w.add_tensor(f"{b}.attn_v.weight", _matrix(rng, n_head_kv * head, n_embd))
            w.add_tensor(f"{b}.attn_output.weight", _matrix(rng, n_embd, n_embd))
    finish_gguf(w)
    return path


def test_hybrid_state_is_restored_only_for_prompts_extending_it(tmp_path):
    """A hybrid memory (LFM2: convolution state beside a KV cache) cannot be
    cut back either: the tier treats it as recurrent.  The returning
    conversation is restored whole and generates what an engine that kept
    it generates; an edit inside it is evaluated again."""
    path = str(write_lfm2(tmp_path / "lfm2.gguf"))
    config = dict(n_ctx=1024, n_threads=2)

    def session(parallel):
        with Engine(EngineConfig(path, parallel=parallel, **config)) as e:
            assert e.model.is_recurrent and e.model.n_swa == 0
            a = e.tokenize("one two three four five six seven eight nine ten " * 4)
            b = e.tokenize("completely different words about the sea " * 4)
            reply, _ = run(e, a, num_predict=6)
            run(e, b, num_predict=6)
            follow = a + reply + e.tokenize(" and more")
            tokens, final = run(e, follow, num_predict=6)
            run(e, b, num_predict=6)
            _, edit = run(e, a[:10] + e.tokenize(" elsewhere"), num_predict=6)
            return len(a) + len(reply) - 1, tokens, final, edit, e.info()["host_cache"]

    held, tokens, final, edit, info = session(1)
    assert final.cached_count == held and edit.cached_count == 0
    assert info["hits"] == 1 and info["restore_failures"] == 0
    _, kept_tokens, kept_final, _, kept_info = session(2)
    assert kept_info["hits"] == 0 and kept_final.cached_count == held
    assert tokens == kept_tokens
