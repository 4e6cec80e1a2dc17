"""The native sampler chain (ext/fastsample.cpp) against llama.cpp's chain of
the same stages and against a numpy statement of those stages, on the real
default model's logits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.model

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"


@pytest.fixture
def decoded(llama, model, make_ctx):
    """A context whose last batch row holds the logits after PROMPT."""
    ctx = make_ctx(n_ctx=512)
    batch = llama.Batch(128)
    tokens = model.tokenize(PROMPT, add_special=True)
    batch.add_tokens(tokens, 0, 0, output_last=True)
    ctx.decode(batch)
    yield ctx, len(batch) - 1, tokens
    batch.close()


def reference(logits, window, *, temperature, top_k, top_p, min_p, repeat, freq, present, bias=None):
    """llama.cpp's stages, in its order: logit bias, penalties, top-k, top-p,
    min-p, temperature."""
    x = logits.astype(np.float64).copy()
    for t, b in (bias or {}).items():
        x[t] += b
    counts: dict[int, int] = {}
    for t in window:
        counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        x[t] = x[t] * repeat if x[t] <= 0 else x[t] / repeat
        x[t] -= c * freq + present
    order = np.lexsort((np.arange(len(x)), -x))[:top_k]
    cand, lg = order, x[order]
    p = np.exp(lg - lg[0])
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p) + 1) if top_p < 1 else len(cand)
    cand, lg = cand[:keep], lg[:keep]
    if min_p > 0:
        keep = max(1, int((lg >= lg[0] + np.log(min_p)).sum()))
        cand, lg = cand[:keep], lg[:keep]
    p = np.exp((lg - lg[0]) / temperature)
    return cand, p / p.sum()


CASES = [
    dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, repeat=1.1, freq=0.0, present=0.0),  # defaults
    dict(temperature=1.5, top_k=200, top_p=1.0, min_p=0.05, repeat=1.3, freq=0.2, present=0.4),
    dict(temperature=0.3, top_k=1, top_p=0.5, min_p=0.0, repeat=1.0, freq=0.0, present=0.0),
    dict(temperature=1.0, top_k=1024, top_p=0.99, min_p=0.0, repeat=0.8, freq=-0.5, present=0.0),
]


def _biases(model, tokens, logits):
    """Logit biases that move the distribution: the two likeliest tokens
    banned (-inf) and pushed down, a penalised prompt token and an unlikely
    one raised, a token outside the window lowered a little."""
    order = np.argsort(-logits)
    window = set(tokens[-64:])
    in_window = [int(t) for t in order[:200] if int(t) in window]
    outside = [int(t) for t in order[2:200] if int(t) not in window]
    return {int(order[0]): -np.inf, int(order[1]): -3.0, in_window[0]: 2.5,
            int(order[5000]): 12.0, outside[0]: -0.5}


@pytest.mark.parametrize("case", CASES)
def test_distribution_with_logit_bias_matches_the_stages(llama, model, decoded, case):
    ctx, idx, tokens = decoded
    logits = np.array(ctx.logits(idx))
    bias = _biases(model, tokens, logits)
    s = llama.Sampler(model, temperature=case["temperature"], top_k=case["top_k"], top_p=case["top_p"],
                      min_p=case["min_p"], repeat_last_n=64, repeat_penalty=case["repeat"],
                      frequency_penalty=case["freq"], presence_penalty=case["present"], seed=1,
                      logit_bias=bias)
    assert s.native
    for t in tokens:
        s.accept(t)
    got_tokens, got_probs = s.distribution(ctx, idx)
    want_tokens, want_probs = reference(logits, tokens[-64:], bias=bias, **case)
    assert list(got_tokens) == list(want_tokens)
    np.testing.assert_allclose(got_probs, want_probs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_distribution_matches_the_stages(llama, model, decoded, case):
    ctx, idx, tokens = decoded
    window = tokens[-64:]
    s = llama.Sampler(model, temperature=case["temperature"], top_k=case["top_k"], top_p=case["top_p"],
                      min_p=case["min_p"], repeat_last_n=64, repeat_penalty=case["repeat"],
                      frequency_penalty=case["freq"], presence_penalty=case["present"], seed=1)
    assert s.native
    for t in tokens:
        s.accept(t)
    got_tokens, got_probs = s.distribution(ctx, idx)
    want_tokens, want_probs = reference(ctx.logits(idx), window, **case)
    assert list(got_tokens) == list(want_tokens)
    np.testing.assert_allclose(got_probs, want_probs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("penalties,biased", [((1.1, 0.0, 0.0), False), ((1.5, 0.3, 0.2), False),
                                              ((0.9, 0.0, 1.0), False), ((1.1, 0.0, 0.0), True),
                                              ((1.0, 0.0, 0.0), True)])
def test_greedy_with_penalties_equals_llama_cpp(llama, model, make_ctx, penalties, biased):
    """Token-identical to llama.cpp's [logit bias, penalties, greedy] chain
    over a run of generated tokens (each fed back into the context)."""
    repeat, freq, present = penalties
    # Ban " quick" and " fox", raise " dog" and lower " the": each changes
    # the greedy text after PROMPT.
    bias = None
    if biased:
        ids = lambda text: model.tokenize(text, add_special=False)[0]
        bias = {ids(" quick"): float("-inf"), ids(" fox"): float("-inf"), ids(" dog"): 1.5,
                ids(" the"): -2.0}
    outs = []
    for native in (True, False):
        ctx = make_ctx(n_ctx=512)
        s = llama.Sampler(model, temperature=0.0, repeat_last_n=16, repeat_penalty=repeat,
                          frequency_penalty=freq, presence_penalty=present, native=native,
                          logit_bias=bias)
        assert s.native == native
        batch = llama.Batch(128)
        tokens = model.tokenize(PROMPT, add_special=True)
        for t in tokens:
            s.accept(t)
        batch.add_tokens(tokens, 0, 0, output_last=True)
        pos, out = len(tokens), []
        for _ in range(40):
            ctx.decode(batch)
            tok = s.sample(ctx, len(batch) - 1)
            out.append(tok)
            batch.clear()
            batch.add(tok, pos, 0, True)
            pos += 1
        batch.close()
        outs.append(out)
    assert outs[0] == outs[1]


def test_seeded_draws_repeat_and_follow_the_distribution(llama, model, decoded):
    ctx, idx, _ = decoded
    draws = []
    for _ in range(2):
        s = llama.Sampler(model, temperature=1.0, top_k=5, top_p=1.0, seed=1234)
        draws.append([s.sample(ctx, idx) for _ in range(400)])
    assert draws[0] == draws[1]
    s = llama.Sampler(model, temperature=1.0, top_k=5, top_p=1.0, seed=1)
    tokens, probs = s.distribution(ctx, idx)
    freq = np.array([draws[0].count(int(t)) for t in tokens]) / 400
    assert set(draws[0]) <= set(int(t) for t in tokens)
    # 400 draws: each frequency within 5 standard deviations of its probability.
    assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / 400) + 1e-9)


def test_nan_logits_are_never_chosen(llama):
    logits = np.array([np.nan, 1.0, np.nan, 3.0, 2.0] + [np.nan] * 40, dtype=np.float32)
    assert llama.fast_sample_once(logits, temperature=0.0) == 3
    assert llama.fast_sample_once(logits, temperature=1.0, top_k=2) in (3, 4)
    assert llama.fast_sample_once(np.full(33, np.nan, dtype=np.float32), temperature=0.0) == -1


def test_what_stays_on_llama_cpp_chain(llama, model):
    assert not llama.Sampler(model, grammar='root ::= "a"').native
    assert not llama.Sampler(model, typical_p=0.5).native
    assert not llama.Sampler(model, top_k=0).native          # the whole vocabulary
    assert not llama.Sampler(model, top_k=5000).native
    assert llama.Sampler(model, logit_bias={1: -1.0}).native
    assert llama.Sampler(model, temperature=0.0, logit_bias={1: -1.0}).native
    assert llama.Sampler(model, temperature=0.0).native       # plain argmax
    assert llama.Sampler(model, temperature=0.0, repeat_penalty=1.1).native


def _step_rows(llama, model, make_ctx, n_seqs):
    """A context whose batch holds one output row per sequence, each after
    a different prompt."""
    ctx = make_ctx(n_ctx=128 * n_seqs, n_seq_max=n_seqs)
    batch = llama.Batch(64 * n_seqs)
    rows = []
    for s in range(n_seqs):
        tokens = model.tokenize(f"{s} {PROMPT[s:]}", add_special=True)
        rows.append(batch.add_tokens(tokens, 0, s, output_last=True))
    ctx.decode(batch)
    batch.close()
    return ctx, rows


@pytest.mark.parametrize("n_seqs", [1, 3, 8])
def test_a_step_sampled_on_several_threads_equals_one_thread(llama, model, make_ctx, n_seqs):
    """Rows are independent: spreading them over threads changes no token,
    for seeded chains, greedy rows and llama.cpp-chain rows mixed."""
    ctx, rows = _step_rows(llama, model, make_ctx, n_seqs)

    def samplers():
        out = []
        for s in range(n_seqs):
            if s % 3 == 1:
                out.append(llama.Sampler(model, temperature=0.0))
            elif s % 3 == 2:
                out.append(llama.Sampler(model, temperature=0.9, top_k=0, seed=s, native=False))
            else:
                out.append(llama.Sampler(model, temperature=1.2, top_k=200, repeat_penalty=1.1,
                                         seed=100 + s))
        return out

    runs = []
    for n_threads in (1, 2, 8):
        ss = samplers()
        picks = [llama.sample_batch(ctx, ss, rows, n_threads) for _ in range(5)]
        runs.append(picks)
        for s in ss:
            s.close()
    assert runs[0] == runs[1] == runs[2]
    assert all(type(t) is int for picks in runs[0] for t in picks)


def test_a_sampler_listed_twice_is_refused(llama, model, make_ctx):
    ctx, rows = _step_rows(llama, model, make_ctx, 2)
    s = llama.Sampler(model)
    with pytest.raises(ValueError, match="twice"):
        llama.sample_batch(ctx, [s, s], rows, 2)
    s.close()


# -- the top-k's two passes over block maxima, on rows built to stress them --

def _row(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """A row of logits: flat (a random-weight model), peaked (a trained
    one), clustered (its best entries by fours in blocks of 64, so that a
    block's maximum and runners-up meet the penalty window together), or
    mostly -inf (what a grammar leaves), with NaN sprinkled in."""
    if kind == "flat":
        x = rng.standard_normal(n) * 0.4
    elif kind == "clustered":
        x = rng.standard_normal(n)
        for start in rng.integers(0, n // 64, 40) * 64 + rng.integers(0, 60, 40):
            x[start:start + 4] = rng.uniform(5, 10, 4)
    elif kind == "peaked":
        x = rng.standard_normal(n) * 2.0
        x[rng.integers(0, n, 30)] += rng.uniform(5, 12, 30)
    else:
        x = np.full(n, -np.inf)
        x[rng.integers(0, n, 25)] = rng.standard_normal(25)
    x = x.astype(np.float32)
    x[rng.integers(0, n, 3)] = np.nan
    return x


def _check_against_stages(llama, x, window, bias, *, top_k, repeat, scan):
    got_tokens, got_probs = llama.fast_distribution_once(
        x, window, bias, temperature=0.8, top_k=top_k, top_p=0.95, repeat_penalty=repeat,
        frequency_penalty=0.1, presence_penalty=0.2, scan=scan)
    finite = np.where(np.isnan(x), -np.inf, x)  # llama.cpp's chain never takes NaN either
    want_tokens, want_probs = reference(finite, window, bias=bias, temperature=0.8, top_k=top_k,
                                        top_p=0.95, min_p=0.0, repeat=repeat, freq=0.1, present=0.2)
    # -inf entries: never candidates of the block path, probability 0 in the other
    live, got_live = want_probs > 0, got_probs > 0
    assert list(got_tokens[got_live]) == [int(t) for t in want_tokens[live]]
    np.testing.assert_allclose(got_probs[got_live], want_probs[live], rtol=1e-4, atol=1e-6)


@given(kind=st.sampled_from(["flat", "peaked", "clustered", "masked"]), seed=st.integers(0, 2**32 - 1),
       n=st.sampled_from([49152, 49152 + 37, 20000]), top_k=st.sampled_from([16, 40, 100, 192]),
       n_window=st.sampled_from([0, 8, 64, 256]), n_bias=st.sampled_from([0, 5]),
       repeat=st.sampled_from([1.1, 0.7]), scan=st.sampled_from(["blocks", "one-pass", "auto"]))
@settings(max_examples=80, deadline=None)
def test_top_k_matches_the_stages(llama, kind, seed, n, top_k, n_window, n_bias, repeat, scan):
    """The penalty window and the biases hold the row's best entries and
    their neighbours, which share their blocks of 64: whichever way top-k
    scans, the distribution stays the stages'."""
    rng = np.random.default_rng(seed)
    x = _row(kind, rng, n)
    best = [int(t) for t in np.argsort(-np.nan_to_num(x, nan=-np.inf))[:max(n_window, n_bias) * 2]]
    pool = sorted({min(n - 1, t + d) for t in best for d in (0, 1, 2, 5)})
    window = [int(t) for t in rng.choice(pool, size=n_window)] if n_window else []
    bias = {int(t): float(b) for t, b in zip(rng.choice(pool, size=n_bias, replace=False),
                                             rng.choice([-np.inf, -2.0, 1.5, 9.0], size=n_bias))}
    _check_against_stages(llama, x, window, bias, top_k=top_k, repeat=repeat, scan=scan)


@pytest.mark.parametrize("scan", ["blocks", "one-pass"])
@pytest.mark.parametrize("seed", range(12))
def test_a_block_held_by_two_window_tokens_counts_once(llama, scan, seed):
    """Blocks whose maximum is in the penalty window, with a second window
    token after it and a plain runner-up among the best, in a flat row: such
    a block must count once, by that runner-up, or the floor over block
    maxima rises past a candidate of another block."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(49152) * 0.4).astype(np.float32)
    window = []
    for start in rng.choice(768, size=12, replace=False) * 64:
        x[start + 3], x[start + 9] = 4.0 + rng.random(), 3.0 + rng.random()
        window += [int(start) + 3, int(start) + 20, int(start) + 40]
    _check_against_stages(llama, x, window, {}, top_k=40, repeat=1.1, scan=scan)


def test_block_maxima_are_numpy_s(llama):
    rng = np.random.default_rng(3)
    for n in (63, 64, 65, 49152, 49190):
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.integers(0, n, 40)] = np.nan
        x[128:192] = np.nan  # a block with no number
        x[192:256] = -np.inf
        blocks = x[:n // 64 * 64].reshape(-1, 64) if n >= 64 else np.zeros((0, 64), np.float32)
        with np.errstate(all="ignore"):
            want = np.array([np.nanmax(b) if not np.isnan(b).all() else -np.inf for b in blocks],
                            dtype=np.float32)
        np.testing.assert_array_equal(llama.block_maxima(x), want)
