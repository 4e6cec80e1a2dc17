"""Embeddings of several texts, the pooling choices, and rerank, on the real
extension with tiny models: the benchmarks' tiny llama (a causal LM, whose
per-token rows let each pooling be checked against the others) and a tiny
Qwen3-Reranker-shaped GGUF (tests/rerank_models.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from runner.engine.core import Engine, EngineConfig
from runner.engine.requests import BadRequest, CompletionOptions, CompletionRequest, InputTooLong
from runner.engine.rerank import rerank_inputs

from rerank_models import RERANK_TEMPLATE, write_tiny_reranker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from tiny_model import write_tiny_llama  # noqa: E402

pytestmark = pytest.mark.model

TEXTS = ["The capital of France is Paris.", "ünïcödé 🐉 数据 \u200b", "a", "The capital of France is Paris.",
         "def f(x):\n    return x * 2\n", "Ein langer Satz " * 20, "\t\n", "!"]


def assert_same_vector(a, b):
    """``a`` and ``b`` are one text's embedding computed in different batches.
    A one-token text decoded alone takes ggml's matrix-vector path (on some
    CPUs with its activations rounded to f16), in a batch the matrix-matrix
    path: measured up to 6.8e-4 apart on an AMD EPYC, cosine 1.0.  A pooling
    that mixed sequences is off by far more."""
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-3)
    a, b = np.ravel(a), np.ravel(b)  # pooling none: one row per token
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99999


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("embed")
    return {"llama": write_tiny_llama(d / "tiny.gguf"),
            "reranker": write_tiny_reranker(d / "reranker.gguf"),
            "plain_reranker": write_tiny_reranker(d / "plain.gguf", seed=1, template=False,
                                                  pooling_rank=False)}


@pytest.fixture(scope="module")
def engines(paths):
    made = {}

    def get(pooling, model="llama", **kw):
        key = (pooling, model, tuple(sorted(kw.items())))
        if key not in made:
            kw.setdefault("parallel", 3)
            made[key] = Engine(EngineConfig(str(paths[model]), n_ctx=1024, n_batch=128, n_threads=2,
                                            pooling=pooling, **kw))
        return made[key]

    yield get
    for e in made.values():
        e.close()


@pytest.mark.parametrize("unified", [False, True])
def test_several_texts_equal_each_alone(engines, unified):
    """8 texts over 3 slots and a 128-token batch: several decodes, each
    with several sequences (any lengths with one KV buffer, equal lengths
    with one stream per slot); every vector equals the text embedded alone."""
    e = engines("mean", kv_unified=unified)
    many = e.embed_many(TEXTS)
    assert [r.prompt_eval_count for r in many] == [len(e.tokenize(t, add_special=True)) for t in TEXTS]
    for text, r in zip(TEXTS, many):
        alone = e.embed(text)
        assert r.embedding.shape == (e.model.n_embd,)
        assert_same_vector(r.embedding, alone.embedding)
    np.testing.assert_allclose(many[0].embedding, many[3].embedding, rtol=1e-5, atol=1e-6)  # twice
    assert not np.allclose(many[0].embedding, many[1].embedding)


@pytest.mark.parametrize("unified", [False, True])
def test_requests_from_many_threads_share_decodes_and_get_their_own(engines, unified):
    """Texts of requests queued together are packed into the same decodes;
    each request gets its own texts' vectors, in its order."""
    import threading

    e = engines("last", kv_unified=unified)
    alone = {t: e.embed(t).embedding for t in TEXTS}
    got: dict[int, list] = {}

    def ask(k: int) -> None:
        texts = TEXTS[k:] + TEXTS[:k]
        got[k] = [(t, r.embedding) for t, r in zip(texts, e.embed_many(texts))]

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(6))
    for pairs in got.values():
        for text, vec in pairs:
            # The same vector up to rounding: one KV buffer shared by the
            # batch sums attention in another order than alone (~1e-3 here).
            np.testing.assert_allclose(vec, alone[text], rtol=0, atol=5e-3)
            assert cosine(vec, alone[text]) > 0.99999, text


def test_callers_sending_one_text_at_a_time_each_get_their_own(engines):
    """Four callers embed one text per request, each sending the next as
    soon as the last came back (the loop holds texts for them: runner.engine.embedwait),
    and one caller stops early; every vector equals its text embedded alone,
    and a text sent after all that is answered (nothing waits for callers
    that are gone)."""
    import threading

    e = engines("mean", kv_unified=True, parallel=4)
    alone = {t: e.embed(t).embedding for t in TEXTS}
    got: dict[int, list] = {k: [] for k in range(4)}

    def ask(k: int) -> None:
        for j in range(3 if k == 0 else 12):
            text = TEXTS[(k + j) % len(TEXTS)]
            got[k].append((text, e.embed(text).embedding))

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [len(got[k]) for k in range(4)] == [3, 12, 12, 12]
    for pairs in got.values():
        for text, vec in pairs:
            np.testing.assert_allclose(vec, alone[text], rtol=0, atol=5e-3)
            assert cosine(vec, alone[text]) > 0.99999, text
    assert_same_vector(e.embed(TEXTS[0]).embedding, alone[TEXTS[0]])


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_poolings_agree_with_the_token_rows(engines):
    """Pooling none gives one row per token; mean, cls (first) and last
    pooling are the mean, the first and the last of those rows."""
    rows = engines("none").embed_many(TEXTS)
    for pooling, pick in (("mean", lambda m: m.mean(axis=0)), ("cls", lambda m: m[0]),
                          ("last", lambda m: m[-1])):
        pooled = engines(pooling).embed_many(TEXTS)
        for text, r, p in zip(TEXTS, rows, pooled):
            assert r.embedding.shape == (r.prompt_eval_count, 64), text
            np.testing.assert_allclose(p.embedding, pick(r.embedding), rtol=1e-3, atol=1e-4,
                                       err_msg=f"{pooling}: {text!r}")


def test_normalize_scales_each_vector_and_each_row(engines):
    for pooling in ("mean", "none"):
        e = engines(pooling)
        raw, unit = e.embed_many(TEXTS[:3]), e.embed_many(TEXTS[:3], normalize=True)
        for r, u in zip(raw, unit):
            np.testing.assert_allclose(np.linalg.norm(u.embedding, axis=-1), 1.0, rtol=1e-5)
            ratio = r.embedding / u.embedding
            np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), rtol=1e-3)


def test_long_empty_and_too_many_texts(engines):
    e = engines("mean")
    long = "word " * 400  # over the 128-token embedding limit
    with pytest.raises(InputTooLong, match=r"input of \d+ tokens \(text 1\) exceeds the embedding limit of 128"):
        e.embed_many(["ok", long])
    cut = e.embed(long, truncate=True)
    assert cut.prompt_eval_count == 128
    head = e.model.detokenize(e.tokenize(long, add_special=True)[:128])
    assert_same_vector(cut.embedding, e.embed(head).embedding)
    with pytest.raises(BadRequest, match="cannot embed empty text"):
        e.embed("")
    with pytest.raises(BadRequest, match=r"cannot embed empty text \(text 1\)"):
        e.embed_many(["x", ""])
    with pytest.raises(BadRequest, match="no text to embed"):
        e.embed_many([])
    with pytest.raises(BadRequest, match="texts has 2049 items, over the limit of 2048"):
        e.embed_many(["x"] * 2049)
    assert e.embed("still fine").prompt_eval_count > 0


def test_embeddings_beside_a_running_completion(engines):
    """Embedding batches take free slots between the steps of a completion,
    which still produces what it produces alone."""
    e = engines("mean", parallel=4)
    opts = CompletionOptions.from_dict(dict(temperature=0.0, num_predict=48, ignore_eos=True))
    alone, _ = e.submit(CompletionRequest("Once upon a time", opts)).result()
    h = e.submit(CompletionRequest("Once upon a time", opts))
    vectors = [e.embed_many(TEXTS) for _ in range(3)]
    text, final = h.result()
    assert final.done_reason == "length" and text == alone
    for v in vectors[1:]:
        for a, b in zip(vectors[0], v):
            assert_same_vector(a.embedding, b.embedding)


# -- rerank ----------------------------------------------------------------

DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "🐉", "Paris is the capital of France."]


def test_rerank_scores_each_document(engines):
    e = engines(None, "reranker")
    assert e.ctx.pooling == "rank" and e.model.n_cls_out == 2
    assert [e.model.cls_label(i) for i in range(2)] == ["yes", "no"]
    scores, n = e.rerank("What is the capital of France?", DOCS)
    assert len(scores) == 4 and all(0.0 < s < 1.0 for s in scores)
    assert scores[0] == pytest.approx(scores[3], abs=1e-6)  # the same pair twice
    assert len(set(round(s, 6) for s in scores[:3])) == 3
    # batched with others or alone: the same score
    for doc, score in zip(DOCS, scores):
        alone, _ = e.rerank("What is the capital of France?", [doc])
        assert alone[0] == pytest.approx(score, abs=1e-5)
    # the pair is the model's rerank prompt; the head's two outputs are a softmax
    pair = RERANK_TEMPLATE.replace("{query}", "q").replace("{document}", "d")
    assert rerank_inputs(e.model, b"q", [b"d"]) == [e.tokenize(pair, parse_special=True)]
    assert n == sum(len(t) for t in rerank_inputs(e.model, b"What is the capital of France?",
                                                    [d.encode() for d in DOCS]))
    both = e.embed(pair).embedding  # (tokenized with BOS as the model asks; still two outputs)
    assert both.shape == (2,) and both.sum() == pytest.approx(1.0, abs=1e-5)


def test_rerank_without_a_template_and_with_rank_asked_at_load(engines):
    """A reranker that ships no rerank prompt gets llama-server's
    [BOS] query [EOS] [SEP] document [EOS], each as the vocabulary asks."""
    e = engines("rank", "plain_reranker")
    m = e.model
    q, d = "capital of France?", "Paris"
    want = ([m.bos] if m.add_bos else []) + e.tokenize(q) + ([m.eos] if m.add_eos else []) \
        + ([m.sep] if m.add_sep else []) + e.tokenize(d) + ([m.eos] if m.add_eos else [])
    assert rerank_inputs(m, q.encode(), [d.encode()]) == [want]
    scores, _ = e.rerank(q, [d, "Bananas"])
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)


def test_rerank_needs_a_reranker(engines, paths):
    with pytest.raises(BadRequest, match="rerank needs a reranker loaded with pooling 'rank'; "
                                         "this runner's pooling is 'mean'"):
        engines("mean").rerank("q", ["d"])
    with pytest.raises(BadRequest, match="pooling 'rank' needs a reranker: this model has no classifier head"):
        Engine(EngineConfig(str(paths["llama"]), n_ctx=256, n_threads=2, pooling="rank"))
    e = engines(None, "reranker")
    with pytest.raises(BadRequest, match="at least one document"):
        e.rerank("q", [])
    with pytest.raises(InputTooLong, match=r"\(text 1\) exceeds the embedding limit"):
        e.rerank("q", ["d", "long " * 300])
    assert len(e.rerank("q", ["d", "long " * 300], truncate=True)[0]) == 2


# -- over the wire ---------------------------------------------------------

def test_embedding_and_rerank_ops(paths):
    from runner.process.client import Runner

    with Runner.spawn(str(paths["llama"]), n_ctx=512, n_batch=128, n_threads=2, parallel=2,
                      pooling="none") as r:
        many = r.embed_many(TEXTS[:3], normalize=True)
        one = r.embed(TEXTS[0], normalize=True)
        assert [x.embedding.shape for x in many] == [(x.prompt_eval_count, 64) for x in many]
        assert_same_vector(many[0].embedding, one.embedding)
        with pytest.raises(BadRequest, match="rerank needs a reranker"):
            r.rerank("q", ["d"])
    with Runner.spawn(str(paths["reranker"]), n_ctx=512, n_batch=128, n_threads=2, parallel=2) as r:
        scores = r.rerank("What is the capital of France?", DOCS)
        assert len(scores) == 4 and scores[0] == pytest.approx(scores[3], abs=1e-6)
