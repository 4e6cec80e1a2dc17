"""Smoke run of benchmarks/bench_media.py, the runner's side only (no
llama-server): tiny projector, one conversation of two turns.  Nothing here
asserts a speed: only the structure of its JSON and the encoder count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parent.parent


def test_media_bench_smoke_runner_only(default_model_path, tmp_path):
    out = tmp_path / "media.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_media.py"), "--smoke",
                           "--no-server", "--quiet", "--model", default_model_path, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["llama-server"] is None and doc["server_skipped"] == "--no-server"
    assert "llama-server: skipped (--no-server)" in proc.stdout
    image_tokens = doc["projector"]["image_tokens"]
    assert image_tokens == 16

    [conversation] = doc["runner"]
    assert len(conversation) == doc["settings"]["turns"] == 2
    first, second = conversation
    for turn in conversation:
        assert set(turn) == {"ttft_s", "encodes", "encode_s", "prompt_tokens", "cached_tokens",
                             "prompt_eval_s"}
        assert turn["ttft_s"] > 0 and turn["prompt_eval_s"] > 0
        # A new system prompt every turn: the KV prefix stops before the image,
        # so its rows are decoded again each turn.
        assert turn["prompt_tokens"] - turn["cached_tokens"] >= image_tokens
    assert second["prompt_tokens"] > first["prompt_tokens"]
    # ... but encoded once: turn 2 takes them from the media cache.
    assert (first["encodes"], second["encodes"]) == (1, 0)
    assert first["encode_s"] > 0 and second["encode_s"] == 0

    summary = doc["summary"]
    assert "llama-server" not in summary and "later_ttft_runner_over_server" not in summary
    runner = summary["runner"]
    assert runner["encodes_total"] == 1 and runner["encodes_per_conversation"] == [1]
    assert runner["encodes_per_turn"] == [[1], [0]]
    assert len(runner["ttft_s_per_turn"]) == 2 and runner["later_ttft_s"] == second["ttft_s"]
