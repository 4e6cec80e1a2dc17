"""The estimate (runner/model/placement.py) against what llama.cpp then allocates,
and the ``estimate`` op and ``inspect`` saying the same thing.

The bracket stated in docs/design.md ("Placement"): on the CPU, weights and
KV cache are exact, the compute and output buffers within 2 % of llama.cpp's,
the whole within 2 %.  llama.cpp's figures are read from its load log lines
(``model buffer size``, ``KV buffer size``, ``compute buffer size``, ``output
buffer size``), printed in MiB with two decimals.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from handserve import deferred_runner  # noqa: E402
from runner.engine.core import Engine, EngineConfig  # noqa: E402
from runner.model import placement  # noqa: E402

pytestmark = pytest.mark.model

BUFFER = re.compile(r"(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")
MiB = 1 << 20
ROUNDING = 0.01 * MiB  # llama.cpp prints MiB with two decimals


@pytest.fixture(scope="module")
def models(default_model_path, tmp_path_factory):
    """The default model and the tiny writers' architectures (llama, gemma3 with SWA, qwen2vl)."""
    import gemma3_models
    import qwen2vl_models
    import tiny_model

    d = tmp_path_factory.mktemp("estimate")
    return {"default": default_model_path,
            "llama": str(tiny_model.write_tiny_llama(d / "tiny.gguf")),
            "gemma3": str(gemma3_models.write_gemma3_text_model(d / "gemma3.gguf")),
            "qwen2vl": str(qwen2vl_models.write_qwen2vl_text_model(d / "qwen2vl.gguf"))}


def _allocated(llama, caplog, config: EngineConfig) -> dict[str, float]:
    """Bytes llama.cpp reports for each kind of buffer while loading ``config``."""
    llama.set_log_level(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="runner.llama"):
            caplog.clear()
            with Engine(config):
                pass
    finally:
        llama.set_log_level(logging.WARNING)
    sizes: dict[str, float] = {}
    for record in caplog.records:
        m = BUFFER.search(record.getMessage())
        if m:
            sizes[m.group(1)] = sizes.get(m.group(1), 0.0) + float(m.group(2)) * MiB
    return sizes


SETTINGS = [
    dict(n_ctx=512),
    dict(n_ctx=4096, parallel=4),
    dict(n_ctx=4096, parallel=4, kv_unified=True),
    dict(n_ctx=2048, flash_attn="off"),
    dict(n_ctx=0, n_batch=2048),  # the trained context
]


@pytest.mark.parametrize("arch", ["default", "llama", "gemma3", "qwen2vl"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_estimate_brackets_what_llama_cpp_allocates(llama, caplog, models, arch, settings):
    config = EngineConfig(models[arch], n_threads=2, cache_ram_mb=0, **settings)
    report = placement.estimate_load(config)
    cpu = report["placement"]["devices"][-1]
    assert cpu["type"] == "cpu" and cpu["output"]  # no GPU here: everything on the CPU
    got = _allocated(llama, caplog, config)
    assert abs(got["model"] - cpu["weights"]) <= ROUNDING
    assert abs(got["KV"] - cpu["kv"]) <= ROUNDING
    assert cpu["kv"] == report["memory"]["kv_cache"]["total"]
    compute = got["compute"] + got["output"]
    assert 0.98 * compute <= cpu["graph"] + cpu["outputs"] <= 1.02 * compute
    total = sum(got.values())
    estimated = cpu["weights"] + cpu["kv"] + cpu["graph"] + cpu["outputs"]
    assert 0.98 * total <= estimated <= 1.02 * total


PROJECTOR_WEIGHTS = re.compile(r"load_hparams: model size:\s+([\d.]+) MiB")


@pytest.mark.parametrize("pair", ["mlp", "gemma3", "qwen2vl"])
def test_projector_weights_match_what_mtmd_loads(llama, caplog, default_model_path, tmp_path, pair):
    """The projector's weights as mtmd reports them (its encode graph is a
    heuristic outside the bracket: see docs/design.md)."""
    import gemma3_models
    import mmproj
    import qwen2vl_models

    if pair == "mlp":  # vision and audio encoders in one file: mtmd logs each
        model = default_model_path
        proj = mmproj.write_projector(tmp_path / "p.gguf", vision=mmproj.VisionEncoder(), audio=mmproj.AudioEncoder())
    elif pair == "gemma3":
        model = gemma3_models.write_gemma3_text_model(tmp_path / "g.gguf")
        proj = gemma3_models.write_gemma3_projector(tmp_path / "gp.gguf")
    else:
        model = qwen2vl_models.write_qwen2vl_text_model(tmp_path / "q.gguf")
        proj = qwen2vl_models.write_qwen2vl_projector(tmp_path / "qp.gguf")
    config = EngineConfig(str(model), n_ctx=512, n_threads=2, cache_ram_mb=0, projector_path=str(proj))
    report = placement.estimate_load(config)
    llama.set_log_level(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="runner.llama"):
            caplog.clear()
            with Engine(config):
                pass
    finally:
        llama.set_log_level(logging.WARNING)
    sizes = [float(m.group(1)) * MiB for r in caplog.records if (m := PROJECTOR_WEIGHTS.search(r.getMessage()))]
    assert sizes and all(abs(size - report["memory"]["projector"]["weights"]) <= ROUNDING for size in sizes)
    assert report["placement"]["devices"][-1]["projector"] == sum(report["memory"]["projector"].values())


def test_the_estimate_op_inspect_and_the_load_agree(default_model_path, capsys):
    """Before a load, ``estimate`` answers with what ``inspect`` prints for
    the same flags; the load then places as estimated, and a load the
    estimate refuses is refused with the same reason."""
    from runner.cli import main
    from runner.engine.requests import BadRequest
    from runner.process.client import Runner

    params = dict(n_ctx=1024, parallel=2, type_k="q8_0", type_v="q8_0", flash_attn="on", cache_ram_mb=64)
    flags = ["--ctx", "1024", "--parallel", "2", "--type-k", "q8_0", "--type-v", "q8_0", "--flash-attn", "on",
             "--cache-ram-mb", "64"]
    assert main(["inspect", default_model_path, "--json", *flags]) == 0
    inspected = json.loads(capsys.readouterr().out)

    with deferred_runner(default_model_path) as (proc, endpoint):
        with Runner.connect(endpoint) as r:
            est = r.estimate(timeout=60, **params)
            assert r.health(timeout=60).state == "launched"  # nothing was loaded
            assert est.memory == inspected["memory"]
            assert est.model == inspected["model"]
            for key in ("auto", "n_gpu_layers", "tensor_split", "fits", "problem", "notes"):
                assert est.placement[key] == inspected["placement"][key], key
            kv = est.memory["kv_cache"]
            assert (kv["type_k"], kv["n_ctx"], kv["kv_size"], kv["n_stream"]) == ("q8_0", 1024, 512, 2)
            assert est.placement["devices"][-1]["host_cache"] == 64 * MiB

            huge = r.estimate(timeout=60, n_ctx=2**31 - 1)
            assert huge.placement["fits"] is False
            assert huge.placement["problem"].startswith("the model does not fit with n_gpu_layers 0")
            with pytest.raises(BadRequest, match="tensor_split needs an explicit n_gpu_layers"):
                r.estimate(timeout=60, tensor_split=[1.0])
            r.load(n_ctx=2**31 - 1, n_threads=2)
            with pytest.raises(BadRequest) as refused:
                r.wait_ready()
            needed = huge.placement["problem"].split(" but has ")[0]  # the host's free memory moves
            assert str(refused.value).startswith(f"load failed: {needed} but has ")

            r.load(n_threads=2, **params)
            assert r.wait_ready().state == "ready"
            loaded = r.info(timeout=60).engine["placement"]
            for key in ("auto", "n_gpu_layers", "tensor_split", "fits", "problem", "notes"):
                assert loaded[key] == est.placement[key], key
            assert r.estimate(timeout=60, **params).memory == est.memory  # still answered once loaded
            r.shutdown()
        assert proc.wait(60) == 0
