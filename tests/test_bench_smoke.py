"""Smoke runs of the benchmark tools on the default model with tiny counts, so
that they do not rot.  Nothing here asserts a speed: only structure, counts,
and that every rate came out positive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cli import main
from runner.process.client import Runner

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parent.parent
PEERS = [ROOT / "build" / "peers" / "bin" / name for name in ("llama-batched-bench", "llama-server")]


def test_cli_bench_json_on_a_spawned_runner(default_model_path, capsys):
    assert main(["bench", "--model", default_model_path, "--requests", "2", "--parallel", "2",
                 "--prompt-tokens", "16", "--max-tokens", "4", "--epochs", "1", "--warmup", "1",
                 "--threads", "2", "--num-ctx", "128", "--speculative", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    m = report["model"]
    assert (m["architecture"], m["quantization"]) == ("llama", "Q4_1")
    assert m["parameters"] > 1e8 and m["size_bytes"] > 0
    # The context is read back from the runner, not echoed: llama.cpp rounds
    # n_ctx up (to a multiple of 256 at this vendor commit: 2 x 128 -> 512).
    assert m["slots"] == 2 and m["slot_ctx"] >= 128 and m["n_ctx"] == 2 * m["slot_ctx"]
    assert report["config"]["spawned"] is True
    assert "--num-ctx 128" in report["command"] and report["machine"]["cores"] >= 1
    [run] = report["runs"]
    assert run["requests"] == 2 and len(run["samples"]) == 2
    for s in run["samples"]:
        assert s["prompt_count"] == 16            # built to length on the model's tokenizer
        assert s["cached_count"] == 0             # no prompt shares a prefix with another
        assert s["eval_count"] == 4 and s["done_reason"] == "length"
        assert 0 < s["ttft_s"] <= s["total_s"]
        assert len(s["gaps_s"]) >= 1
    for key in ("prompt_eval_rate", "eval_rate", "throughput", "requests_per_s"):
        assert run[key] > 0, key
    summary = report["summary"]
    assert summary["requests"] == 2 and summary["generated_tokens"] == 8
    # --speculative: the requests asked for it, the finals' counts came over the wire
    assert report["config"]["options"]["speculative"] is True and "--speculative" in report["command"]
    assert 0 <= summary["draft_accepted"] <= summary["draft_proposed"]
    assert 0.0 <= summary["acceptance"] <= 1.0
    assert summary["prompt_eval_rate"] > 0 and summary["eval_rate"] > 0
    for key in ("ttft_s", "total_s", "inter_token_s"):
        d = summary[key]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"], key


def test_cli_bench_table_against_an_endpoint(default_model_path, capsys):
    with Runner.spawn(default_model_path, n_ctx=256, parallel=1, n_threads=2) as runner:
        assert main(["bench", "--endpoint", runner.endpoint, "--requests", "2",
                     "--prompt-tokens", "8", "--max-tokens", "3", "--epochs", "2",
                     "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "256 tokens per request (1 slots, n_ctx 256" in lines[1]
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"], ["all"])]
    assert [r[0] for r in rows] == ["1", "2", "all"]
    assert [r[1] for r in rows] == ["2", "2", "4"]
    assert all(float(r[3]) > 0 for r in rows)     # eval tok/s


NO_PEERS = pytest.mark.skipif(not all(p.exists() for p in PEERS),
                              reason="peer binaries not built (scripts/build_peers.sh builds "
                                     "llama-batched-bench and llama-server, ~8 min cold)")


@NO_PEERS
def test_peers_script_smoke(tmp_path):
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--smoke",
                           "--quiet", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    [row] = doc["streams"]
    assert row["parallel"] == 2 and row["batched_bench_S_TG"] > 0
    for side in ("llama-server", "runner"):
        streams = row[side]
        assert streams["generated"] == 2 * doc["settings"]["tg"]
        assert streams["window_tok_s"] > 0 and streams["wall_tok_s"] > 0
        chat = doc["conversations"][side]
        assert 0 < chat["cache_hit_rate"] <= 1           # later turns reuse the earlier ones
        assert chat["warm_ttft_s"] > 0 and chat["cold_ttft_s"] > 0
        long = doc["long_prompt"][side]
        assert long["max_gap_during_prompt_s"] > 0 and long["prompt_eval_s"] > 0
        assert doc["embeddings"][side]["embeddings_per_s"] > 0
    # Same model, same pooling: both sides embed alike.
    assert doc["embeddings"]["min_cosine"] > 0.99
    assert "runner/server" in proc.stdout


def test_rpc_bench_smoke(tmp_path):
    """benchmarks/bench_rpc.py on the tiny model: two loopback rpc-servers,
    both runner sides, the bytes the servers' connections carried."""
    out = tmp_path / "rpc.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_rpc.py"), "--smoke",
                           "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["tok_s"]["runner_local"] > 0 and doc["tok_s"]["runner_split"] > 0
    assert set(doc["placement"]["layers"]) == {"RPC0"} and doc["placement"]["output"] == "RPC1"
    # The output layer is remote: at least the logits (n_vocab = 49152 f32,
    # the default model's vocabulary) come back for every token.
    assert doc["bytes_per_generated_token"] > 4 * 49152


def test_layout_bench_smoke(tmp_path):
    """benchmarks/bench_layout.py on the tiny model, one step per set: every
    set timed for both KV layouts."""
    out = tmp_path / "layout.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_layout.py"), "--model", "tiny",
                           "--threads", "1", "--prompt", "8", "--steps", "1", "--rounds", "1",
                           "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for layout in ("per slot", "unified"):
        assert len(doc[layout]) == 9 and all(ms > 0 for ms in doc[layout].values()), doc[layout]
    assert "8 out of order" in proc.stdout


def test_step_rows_bench_smoke(tmp_path):
    """benchmarks/bench_sampling.py --step-rows on the tiny model: every
    option set timed over a real step's rows."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sampling.py"), "--step-rows", "4",
                           "--steps", "2", "--rounds", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["arm"] for r in rows] == ["greedy", "greedy+rp", "defaults, rp 1.0", "defaults"]
    assert all(r["parallel"] == 4 and r["step_ms"] > 0 for r in rows)


def test_the_smol_shaped_stand_in_has_the_default_models_tensors(default_model_path, tmp_path):
    # scripts/gpu_check.sh benchmarks this random-weight model where the
    # default model cannot travel: same tensors, types and shapes, so a
    # decode does the same work.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tiny_model import SMOL_SHAPE, write_tiny_llama

    from runner import _llama
    from runner.model.gguf import read_gguf

    path = write_tiny_llama(tmp_path / "smol.gguf", **SMOL_SHAPE)
    smol, real = read_gguf(path), read_gguf(default_model_path)
    keys = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "rope.dimension_count")
    assert {k: smol.fields[f"llama.{k}"].value for k in keys} == \
        {k: real.fields[f"llama.{k}"].value for k in keys}

    def layout(g):
        return sorted((t.name, t.type.name, t.shape) for t in g.tensors)
    assert layout(smol) == layout(real)
    model = _llama.Model(str(path))
    ctx = _llama.Context(model, n_ctx=256, n_batch=64, n_threads=2)
    batch = _llama.Batch(64)
    batch.add_tokens(model.tokenize("Hello there", add_special=True), 0, 0, output_last=True)
    ctx.decode(batch)
    import numpy as np

    logits = np.asarray(ctx.logits(len(batch) - 1))
    assert logits.shape == (model.n_vocab,) and np.isfinite(logits).all()


@NO_PEERS
def test_process_peer_bench_smoke(tmp_path):
    """bench_process.py --peer-only on the tiny model, one round: the
    client's rate beside batched-bench's, and the loop's busy share."""
    out = tmp_path / "process.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_process.py"), "--model", "tiny",
                           "--peer-only", "--threads", "1", "--parallel", "2", "--tokens", "16", "--pp", "8",
                           "--rounds", "1", "--options", "defaults", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = json.loads(out.read_text())["peer"]
    assert row["parallel"] == 2 and row["S_TG"][0] > 0 and row["client_tok_s"][0] > 0
    assert 0.0 < row["busy_median"] <= 1.0


@NO_PEERS
def test_engine_graph_sampling_bench_smoke(tmp_path):
    """bench_engine.py --sampling cpu,graph on the tiny model, one round:
    both sampling sides beside batched-bench."""
    out = tmp_path / "engine.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--model", "tiny",
                           "--threads", "1", "--parallel", "2", "--pp", "8", "--tg", "16", "--burst-ms", "30",
                           "--sampling", "cpu,graph", "--rounds", "1", "--options", "defaults",
                           "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["burst_ab"]
    assert [r["sampling"] for r in rows] == ["cpu", "graph"]
    assert all(r["engine_tok_s"][0] > 0 and r["S_TG"][0] > 0 for r in rows)
