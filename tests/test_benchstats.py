"""``llama-runner bench`` without a model: statistics, report formats, prompt
building on a stand-in tokenizer, and the request scheduler on a stand-in runner."""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time

import numpy as np
import pytest

from runner.bench.harness import PromptBuilder, filler_text, run_requests
from runner.bench.stats import (RequestSample, RunSample, build_report, check_plot_available,
                               distribution, format_interval, format_table, human_bytes, human_count,
                               median_interval,
                               model_summary, percentile, rate, summarize, summarize_run, to_json)
from runner.engine.requests import Chunk, Final


@pytest.mark.parametrize("values, q, expected", [
    ([1, 2, 3, 4], 50, 2.5),
    ([1, 2, 3, 4], 90, 3.7),
    ([1, 2, 3, 4], 99, 3.97),
    ([1, 2, 3, 4], 0, 1),
    ([1, 2, 3, 4], 100, 4),
    ([4, 1, 3, 2], 50, 2.5),   # order does not matter
    ([7], 99, 7),
])
def test_percentile_table(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_matches_numpy_linear():
    rng = random.Random(1)
    for n in (2, 3, 10, 101):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for q in (50, 90, 99):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1], 101)
    assert rate(10, 0) == 0.0 and rate(10, 2) == 5.0
    d = distribution([])
    assert d["n"] == 0 and math.isnan(d["p50"]) and math.isnan(d["mean"])


def sample(ttft, total, eval_count=5, eval_s=0.4, prompt=10, evaluated=10, prompt_s=0.1, gaps=()):
    return RequestSample(prompt_count=prompt, prompt_eval_count=evaluated,
                         cached_count=prompt - evaluated, prompt_eval_s=prompt_s,
                         eval_count=eval_count, eval_s=eval_s, ttft_s=ttft, total_s=total,
                         gaps_s=list(gaps), done_reason="length")


def test_summarize_run_pools_rates_and_takes_medians():
    run = RunSample(epoch=1, wall_s=2.0, requests=[
        sample(0.1, 1.0, gaps=[0.1, 0.1]),
        sample(0.3, 1.4, evaluated=6, prompt_s=0.3, gaps=[0.2]),
        sample(0.2, 1.2, eval_count=9, eval_s=0.8),
    ])
    row = summarize_run(run)
    assert row["requests"] == 3
    assert row["prompt_tokens"] == 30
    assert row["cached_tokens"] == 4
    assert row["generated_tokens"] == 19
    assert row["prompt_eval_rate"] == pytest.approx(26 / 0.5)
    # The first token of each request is the prompt's: (4 + 4 + 8) over the eval times.
    assert row["eval_rate"] == pytest.approx(16 / 1.6)
    assert row["ttft_p50_s"] == pytest.approx(0.2)
    assert row["total_p50_s"] == pytest.approx(1.2)
    assert row["throughput"] == pytest.approx(19 / 2.0)
    assert row["requests_per_s"] == pytest.approx(1.5)


def test_speculative_acceptance_is_pooled_and_shown():
    a, b = sample(0.1, 1.0), sample(0.1, 1.0)
    a.draft_proposed, a.draft_accepted = 30, 12
    b.draft_proposed, b.draft_accepted = 10, 8
    s = summarize([RunSample(epoch=1, wall_s=1.0, requests=[a, b])])
    assert (s["draft_proposed"], s["draft_accepted"]) == (40, 20)
    assert s["acceptance"] == pytest.approx(0.5)
    plain = summarize([RunSample(epoch=1, wall_s=1.0, requests=[sample(0.1, 1.0)])])
    assert plain["draft_proposed"] == 0 and plain["acceptance"] == 0.0


def test_summarize_over_runs():
    runs = [RunSample(epoch=e, wall_s=w, requests=[sample(0.1 * e, 1.0, gaps=[0.01 * e] * 4)])
            for e, w in ((1, 1.0), (2, 2.0), (3, 0.5))]
    s = summarize(runs)
    assert s["runs"] == 3 and s["requests"] == 3 and s["generated_tokens"] == 15
    assert s["throughput"] == {"median": 5.0, "min": 2.5, "max": 10.0}
    assert s["ttft_s"]["p50"] == pytest.approx(0.2)
    assert s["ttft_s"]["n"] == 3
    assert s["inter_token_s"]["n"] == 12
    assert s["inter_token_s"]["p99"] == pytest.approx(0.03)


INFO_ENGINE = {
    "model": {"path": "/m/SmolLM2.gguf", "description": "llama 256M Q4_1", "architecture": "llama",
              "n_params": 134515008, "size": 96576768, "ftype": "Q4_1", "n_ctx_train": 8192,
              "n_embd": 576, "n_vocab": 49152},
    "config": {"parallel": 2, "n_threads": 2},
    "n_ctx": 2048, "n_batch": 512, "slot_ctx": 1024,
    "slots": [{"id": 0}, {"id": 1}],
}


def test_model_summary_from_info():
    m = model_summary(INFO_ENGINE, {"general.name": "Smol"})
    assert m == {"name": "Smol", "path": "/m/SmolLM2.gguf", "architecture": "llama",
                 "quantization": "Q4_1", "parameters": 134515008, "size_bytes": 96576768,
                 "n_ctx": 2048, "slot_ctx": 1024, "slots": 2, "n_batch": 512, "n_ctx_train": 8192,
                 "n_threads": 2}
    assert model_summary(INFO_ENGINE, None)["name"] == "SmolLM2.gguf"
    assert human_count(134515008) == "134.5M" and human_count(7e9) == "7.0B"
    assert human_count(None) == "?" and human_count(12) == "12"
    assert human_bytes(96576768) == "92.1 MiB" and human_bytes(100) == "100 B"


def make_report(epochs=2, gaps=(0.01,)):
    runs = [RunSample(epoch=e, wall_s=1.0 + e, requests=[sample(0.1, 1.0, gaps=gaps),
                                                         sample(0.2, 1.1, gaps=gaps)])
            for e in range(1, epochs + 1)]
    config = {"requests": 2, "parallel": 2, "prompt_tokens": 10, "max_tokens": 5, "warmup": 1,
              "epochs": epochs}
    return build_report(model_summary(INFO_ENGINE, {}), config, runs, {"date": "today"})


def test_report_table_and_json():
    report = make_report()
    assert report["date"] == "today"
    assert [r["epoch"] for r in report["runs"]] == [1, 2]
    assert len(report["runs"][0]["samples"]) == 2
    table = format_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("model     SmolLM2.gguf (llama, Q4_1, 134.5M parameters, 92.1 MiB)")
    assert "1024 tokens per request (2 slots, n_ctx 2048, trained 8192)" in lines[1]
    assert any(line.startswith("run ") and "prompt tok/s" in line for line in lines)
    assert any(line.startswith("all ") for line in lines)
    assert any(line.startswith("time to first token") for line in lines)
    doc = json.loads(to_json(report))
    assert doc["summary"]["generated_tokens"] == 20
    assert doc["runs"][1]["samples"][0]["gaps_s"] == [0.01]


def test_json_turns_statistics_of_nothing_into_null():
    doc = json.loads(to_json(make_report(epochs=1, gaps=())))   # one token each: no gaps
    assert doc["summary"]["inter_token_s"]["p50"] is None
    assert "inter-token" in format_table(make_report(epochs=1, gaps=()))


def test_plot_needs_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import raises ImportError
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        check_plot_available()


def test_cli_refuses_plot_before_starting_anything(monkeypatch, capsys):
    from runner.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--plot", "out.png", "--model", "/nonexistent.gguf"]) == 1
    assert "matplotlib" in capsys.readouterr().err


def test_cli_checks_counts(capsys):
    from runner.cli import main

    assert main(["bench", "--requests", "0"]) == 1
    assert "--requests must be at least 1" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from runner.bench.stats import plot

    path = tmp_path / "bench.png"
    plot(make_report(), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- prompts of a given token count -------------------------------------------------

class WordTokenizer:
    """Stand-in tokenizer: one token per word and one per space; BOS first
    with add_special.  ``sloppy`` makes detokenize append a space, so that a
    cut list does not read back as the same number of tokens."""

    BOS = 1

    def __init__(self, bos=True, sloppy=False):
        self.vocab: dict[str, int] = {}
        self.bos, self.sloppy = bos, sloppy
        self.calls = 0

    def tokenize(self, text, add_special):
        self.calls += 1
        pieces = [p for p in text.replace(" ", "\0 \0").split("\0") if p]
        ids = [self.vocab.setdefault(p, len(self.vocab) + 10) for p in pieces]
        return ([self.BOS] if add_special and self.bos else []) + ids

    def detokenize(self, tokens):
        back = {v: k for k, v in self.vocab.items()}
        return "".join(back[t] for t in tokens) + (" " if self.sloppy else "")


@pytest.mark.parametrize("bos, sloppy", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("n", [3, 7, 64, 513])
def test_prompt_builder_hits_the_token_count(bos, sloppy, n):
    tok = WordTokenizer(bos=bos, sloppy=sloppy)
    builder = PromptBuilder(tok.tokenize, tok.detokenize)
    assert builder.n_special == (1 if bos else 0)
    assert 1.5 < builder.tokens_per_word < 2.5   # a word and a space
    for seed in (1, 2, 3):
        text, count = builder.build(n, seed)
        assert count == n
        assert len(tok.tokenize(text, True)) == n


def test_prompt_builder_refuses_prompts_of_only_special_tokens():
    tok = WordTokenizer()
    with pytest.raises(ValueError):
        PromptBuilder(tok.tokenize, tok.detokenize).build(1, 1)


def test_filler_texts_differ_from_the_first_word():
    firsts = {filler_text(seed, 5).split()[0] for seed in range(1, 100)}
    assert len(firsts) == 99
    assert filler_text(5, 30) == filler_text(5, 30)
    assert len(filler_text(5, 30).split()) == 30


# -- the scheduler, on a stand-in runner ---------------------------------------------

class FakeRunner:
    """complete() yields ``tokens`` chunks then a Final; records concurrency."""

    def __init__(self, tokens=3, fail_on=None):
        self.tokens, self.fail_on = tokens, fail_on
        self.lock = threading.Lock()
        self.in_flight = self.most = 0
        self.seen: list[str] = []

    def complete(self, prompt, **options):
        assert options["num_predict"] == self.tokens and options["ignore_eos"]
        with self.lock:
            self.seen.append(prompt)
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            if prompt == self.fail_on:
                raise RuntimeError("boom")
            for _ in range(self.tokens):
                time.sleep(0.002)
                yield Chunk(text="x", tokens=[5])
            yield Final(done_reason="length", prompt_eval_count=4, prompt_eval_duration=0.01,
                        eval_count=self.tokens, eval_duration=0.004, prompt_count=4)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_run_requests_keeps_parallel_in_flight_and_order():
    fake = FakeRunner()
    prompts = [f"p{i}" for i in range(7)]
    wall, samples = run_requests(fake, prompts, {"num_predict": 3, "ignore_eos": True}, 3)
    assert sorted(fake.seen) == sorted(prompts)
    assert fake.most <= 3
    assert wall > 0
    assert [s.eval_count for s in samples] == [3] * 7
    for s in samples:
        assert 0 < s.ttft_s <= s.total_s
        assert len(s.gaps_s) == 2
        assert s.prompt_count == 4 and s.done_reason == "length"


def test_run_requests_raises_the_first_failure():
    fake = FakeRunner(fail_on="p2")
    with pytest.raises(RuntimeError, match="boom"):
        run_requests(fake, [f"p{i}" for i in range(5)], {"num_predict": 3, "ignore_eos": True}, 2)


@pytest.mark.parametrize("n, k, coverage", [
    (1, 1, 0.0), (5, 1, 0.9375), (6, 1, 0.96875), (9, 2, 0.9609375), (20, 6, 0.9586105),
])
def test_the_median_interval_takes_the_widest_k_that_reaches_the_level(n, k, coverage):
    values = [float(v) for v in range(n, 0, -1)]  # given out of order
    low, high, got = median_interval(values)
    assert (low, high) == (float(k), float(n - k + 1))
    assert got == pytest.approx(coverage, abs=1e-6)


def test_the_median_interval_of_nothing_is_nan_and_a_bad_level_is_refused():
    assert all(math.isnan(x) for x in median_interval([]))
    assert format_interval(median_interval([])) == "-"
    with pytest.raises(ValueError):
        median_interval([1.0, 2.0], level=1.0)
    assert format_interval(median_interval([0.9, 1.0, 0.95, 0.8, 1.2, 0.85, 0.99, 1.01, 0.7])) \
        == "[0.80, 1.01] 96%"


def test_the_median_interval_holds_the_median_as_often_as_it_says():
    """Nine ratios per row, as a 9-round benchmark gives: over many rows
    drawn from a skewed distribution with a known median, the interval holds
    that median about as often as its stated coverage (96%)."""
    rng = random.Random(7)
    median = math.log(2)  # of an exponential distribution with rate 1
    trials, held = 4000, 0
    for _ in range(trials):
        low, high, coverage = median_interval([rng.expovariate(1.0) for _ in range(9)])
        held += low <= median <= high
    assert abs(held / trials - coverage) < 0.015
