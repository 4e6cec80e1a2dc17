"""The load settings are one shape: EngineConfig's fields, the wire's Load
struct, the `serve` flags and docs/protocol.md's load message must agree."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import msgspec

from runner.cli import _load_params, build_parser
from runner.engine.core import EngineConfig
from runner.process import protocol as P

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def engine_fields() -> dict:
    return {f.name: f.default for f in dataclasses.fields(EngineConfig) if f.name != "model_path"}


def test_load_struct_has_every_engine_setting_with_the_same_default():
    load = P.Load(id=1)
    wire = {name: getattr(load, name) for name in P.Load.__struct_fields__ if name not in ("id", "v")}
    engine = engine_fields()
    assert set(wire) == set(engine)
    for name, default in engine.items():
        got = wire[name]
        want = list(default) if isinstance(default, tuple) else default
        assert got == want, name


def test_serve_flags_cover_every_load_field_with_its_default():
    args = build_parser().parse_args(["serve", "--model", "default"])
    params = _load_params(args)
    assert set(params) == set(engine_fields())
    decoded = msgspec.convert({"op": "load", "id": 1, **params}, P.Load)
    assert decoded == P.Load(id=1)


def test_the_documented_load_message_lists_every_field():
    text = DOC.read_text()
    block = text[text.index("#### `load`"):]
    block = block[:block.index("```", block.index("```") + 3)]
    named = set(re.findall(r"(\w+):", block)) - {"op", "id", "type", "state"}
    assert named == set(engine_fields())


def test_inspect_reads_ctx_and_parallel_as_serve_does(default_model_path, capsys):
    """`inspect --ctx N --parallel P` estimates the KV cache `serve` with the
    same flags allocates: N cells in total, P streams of N / P (issue 18)."""
    import json as _json

    from runner.cli import main
    from runner.engine.core import Engine

    for extra, streams in (([], 2), (["--kv-unified"], 1)):
        assert main(["inspect", default_model_path, "--ctx", "1024", "--parallel", "2", "--json", *extra]) == 0
        kv = _json.loads(capsys.readouterr().out)["memory"]["kv_cache"]
        assert kv["n_ctx"] == 1024
        assert [(c["cells"], c["streams"]) for c in kv["caches"]] == [(1024 // streams, streams)]
    with Engine(EngineConfig(default_model_path, n_ctx=1024, parallel=2, n_threads=2)) as e:
        assert (e.ctx.n_ctx, e.slot_ctx) == (1024, 512)


def _documented_reply(op: str) -> set[str]:
    text = DOC.read_text()
    block = text[text.index(f"← {{type: \"{op}\""):]
    block = block[:block.index("```")]
    return set(re.findall(r"(\w+)[,}:]", block.replace("\n", " "))) - {"id", "type"}


def test_every_op_has_a_section_and_the_new_replies_list_their_fields():
    text = DOC.read_text()
    headings = " ".join(re.findall(r"^#### (.*)$", text, re.M))
    for op in P.OPS:
        assert f"`{op}`" in headings, op
    metrics = set(P.MetricsReply.__struct_fields__) - {"id"}
    assert _documented_reply("metrics") == metrics
    estimate = set(P.EstimateReply.__struct_fields__) - {"id"}
    assert estimate <= _documented_reply("estimate")


def test_n_ctx_0_takes_the_trained_context_and_main_gpu_is_read(default_model_path):
    """As documented: n_ctx 0 is the model's trained context, shared by the
    slots, in the engine and in the estimate alike; main_gpu selects llama.cpp's
    split mode "none" (on a machine without a GPU it places nothing)."""
    from runner.engine.core import Engine
    from runner.model.placement import estimate_load

    config = EngineConfig(default_model_path, n_ctx=0, parallel=2, n_threads=2, main_gpu=0, cache_ram_mb=0)
    with Engine(config) as e:
        trained = e.model.n_ctx_train
        assert (e.ctx.n_ctx, e.slot_ctx) == (trained, trained // 2)
        placed = e.info()["placement"]
    kv = estimate_load(config)["memory"]["kv_cache"]
    assert (kv["n_ctx"], kv["kv_size"], kv["n_stream"]) == (trained, trained // 2, 2)
    assert placed["devices"][-1]["kv"] == kv["total"]


def test_the_foreign_client_knows_every_terminal_reply():
    from wire import TERMINAL

    tags = {t.__struct_config__.tag for t in P.REPLY_TYPES}
    assert TERMINAL == tags - {"chunk", "chunks"}
