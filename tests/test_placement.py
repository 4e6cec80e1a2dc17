"""n_gpu_layers "auto" (runner.model.placement): pure policy on fake device lists,
then the real path end to end on this machine's devices."""

from __future__ import annotations

import bisect
from types import SimpleNamespace

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from runner.engine.requests import BadRequest  # noqa: E402
from runner.model import placement  # noqa: E402
from runner.model.gguf import read_gguf  # noqa: E402
from runner.model.memory import Device, gpu_reserve  # noqa: E402

MiB = 1 << 20
N_LAYER = 6


def _model(tmp_path, n_layer: int = N_LAYER):
    """A llama header with ``n_layer`` layers of one 256x256 f32 matrix (256 KiB each)."""
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": n_layer, "embedding_length": 256, "attention.head_count": 4,
                       "attention.head_count_kv": 4, "context_length": 4096, "feed_forward_length": 512,
                       "vocab_size": 1024}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((1024, 256), np.float32))
    for il in range(n_layer):
        w.add_tensor(f"blk.{il}.attn_q.weight", np.zeros((256, 256), np.float32))
    w.add_tensor("output_norm.weight", np.zeros(256, np.float32))
    w.add_tensor("output.weight", np.zeros((1024, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read_gguf(path)


def _config(**kw):
    """A load's settings with the load defaults (only the fields placement reads)."""
    base = dict(n_ctx=4096, parallel=1, n_batch=512, n_gpu_layers="auto", main_gpu=None, tensor_split=None,
                devices=None,
                flash_attn="auto", type_k="f16", type_v="f16", kv_unified=False, swa_full=False, embeddings=False,
                cache_ram_mb=256)
    return SimpleNamespace(**{**base, **kw})


def gpu(i: int, free: int, total: int = 8 << 30) -> Device:
    return Device(f"CUDA{i}", f"GPU {i}", "gpu", free, total)


HOST = Device("CPU", "host", "cpu", 64 << 30, 64 << 30)


def _llama_cpp_layers(n_layer: int, n_gpu_layers: int, split: list[float] | None, n_gpus: int) -> list[list[int]]:
    """Which items (layers, n_layer = output) llama.cpp gives each GPU for this
    n_gpu_layers and tensor_split: llama_model::load_tensors' rule, in float32."""
    shares = np.array(split if split else [1.0] + [0.0] * (n_gpus - 1), dtype=np.float32)
    points = list(np.cumsum(shares, dtype=np.float32) / np.float32(shares.sum()))
    start = max(n_layer + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1)
    out: list[list[int]] = [[] for _ in range(n_gpus)]
    for il in range(start, n_layer + 1):
        out[bisect.bisect_right(points, np.float32(il - start) / np.float32(act))].append(il)
    return out


def _agrees_with_llama_cpp(p: placement.Placement, n_gpus: int) -> None:
    """The plan's per-GPU layers are the ones llama.cpp will place for its n_gpu_layers and split."""
    got = _llama_cpp_layers(p.plan.n_layer, p.n_gpu_layers, p.tensor_split, n_gpus)
    for g, usage in enumerate(p.plan.usage[:n_gpus]):
        assert got[g] == list(usage.layers) + ([p.plan.n_layer] if usage.output else []), g


def test_no_gpu_means_the_cpu(tmp_path):
    p = placement.place(_config(), _model(tmp_path), [HOST])
    assert (p.auto, p.n_gpu_layers, p.tensor_split) == (True, 0, None)
    host = p.plan.usage[-1]
    assert host.layers == tuple(range(N_LAYER)) and host.output and host.fits
    assert host.host_cache == 256 * MiB


def test_one_gpu_with_room_takes_everything(tmp_path):
    p = placement.place(_config(), _model(tmp_path), [gpu(0, 8 << 30), HOST])
    assert (p.n_gpu_layers, p.tensor_split) == (N_LAYER + 1, None)
    assert p.plan.usage[0].layers == tuple(range(N_LAYER)) and p.plan.usage[0].output
    _agrees_with_llama_cpp(p, 1)


def test_partial_offload_stops_at_the_headroom(tmp_path):
    info = _model(tmp_path)
    full = placement.place(_config(), info, [gpu(0, 8 << 30), HOST]).plan.usage[0]
    per_layer = (full.weights + full.kv) // (N_LAYER + 1)  # about one item
    # room for the partial graph and 3 of the 7 items, short of a 4th, above the headroom
    probe = placement.place(_config(n_gpu_layers=3), info, [gpu(0, 8 << 30), HOST]).plan.usage[0]
    free = gpu_reserve(gpu(0, 0)) + probe.used + per_layer // 2
    p = placement.place(_config(), info, [gpu(0, free), HOST])
    assert p.n_gpu_layers == 3
    assert p.plan.usage[0].used + p.plan.usage[0].reserve <= free
    assert p.plan.usage[-1].layers == tuple(range(N_LAYER + 1 - 3))
    assert any("partial offload: 3 of 7" in n for n in p.plan.notes)
    _agrees_with_llama_cpp(p, 1)


def test_no_room_for_a_layer_falls_back_to_the_cpu(tmp_path):
    p = placement.place(_config(), _model(tmp_path), [gpu(0, 100 * MiB, 100 * MiB), HOST])
    assert p.n_gpu_layers == 0 and p.tensor_split is None
    assert "no GPU has room for a single layer; running on the CPU" in p.plan.notes
    assert p.plan.usage[0].graph == 0 and p.plan.usage[0].fits


@pytest.mark.parametrize("frees", [(3, 1), (1, 1), (2, 5), (1, 1, 1)])
def test_several_gpus_split_in_whole_layers_as_llama_cpp_places_them(tmp_path, frees):
    info = _model(tmp_path, n_layer=12)
    gpus = [gpu(i, f << 30) for i, f in enumerate(frees)]
    p = placement.place(_config(), info, gpus + [HOST])
    assert p.n_gpu_layers == 13
    assert p.tensor_split is not None and sum(p.tensor_split) == 13
    assert all(u.fits for u in p.plan.usage)
    _agrees_with_llama_cpp(p, len(gpus))
    # more room, more layers: the split follows the free memory
    counts = p.tensor_split
    for a, b in zip(range(len(frees)), range(1, len(frees))):
        if frees[a] > frees[b]:
            assert counts[a] >= counts[b]


def test_several_gpus_partial(tmp_path):
    info = _model(tmp_path, n_layer=12)
    probe = placement.place(_config(n_gpu_layers=4), info, [gpu(0, 8 << 30), HOST]).plan.usage[0]
    free = gpu_reserve(gpu(0, 0)) + probe.used
    p = placement.place(_config(), info, [gpu(0, free), gpu(1, free), HOST])
    assert 4 <= p.n_gpu_layers < 13
    assert all(u.fits for u in p.plan.usage[:2])
    _agrees_with_llama_cpp(p, 2)


def test_host_short_of_memory_is_refused_saying_what_and_how_much(tmp_path):
    small = Device("CPU", "host", "cpu", 200 * MiB, 200 * MiB)
    with pytest.raises(placement.NoRoom) as exc:
        placement.place(_config(), _model(tmp_path), [small])
    message = str(exc.value)
    assert message.startswith("the model does not fit with n_gpu_layers 0 of 7: CPU needs ")
    assert "host cache 256.00 MiB" in message and "but has 200.00 MiB free" in message
    assert exc.value.code == "bad_request"
    # without the host cache it fits
    assert placement.place(_config(cache_ram_mb=0), _model(tmp_path), [small]).n_gpu_layers == 0


def test_an_explicit_count_is_passed_through(tmp_path):
    info = _model(tmp_path)
    tiny = [gpu(0, 10 * MiB, 10 * MiB), HOST]
    p = placement.place(_config(n_gpu_layers=-1), info, tiny)  # overfills the GPU: reported, not refused
    assert (p.auto, p.n_gpu_layers) == (False, -1) and not p.plan.usage[0].fits
    p = placement.place(_config(n_gpu_layers=2, tensor_split=[1.0]), info, tiny)
    assert (p.n_gpu_layers, p.tensor_split) == (2, [1.0])


def test_auto_with_a_tensor_split_is_refused(tmp_path):
    with pytest.raises(BadRequest, match="tensor_split needs an explicit n_gpu_layers"):
        placement.place(_config(tensor_split=[1.0, 1.0]), _model(tmp_path), [HOST])


def test_without_an_estimate_auto_means_all_or_none():
    assert placement.place(_config(), None, [HOST]).n_gpu_layers == 0
    p = placement.place(_config(), None, [gpu(0, 1 << 30), HOST])
    assert p.n_gpu_layers == -1 and p.plan is None
    assert p.to_dict()["notes"] == ["the model's memory could not be estimated"]


def _dev(i, name, kind, free=1 << 30, device_id=None):
    return {"index": i, "name": name, "description": name, "type": kind, "backend": name[:4],
            "device_id": device_id, "free": free, "total": free}


def test_devices_as_llama_cpp_picks_them():
    found = [_dev(0, "CPU", "cpu"), _dev(1, "CUDA0", "gpu", device_id="0000:01"),
             _dev(2, "Vulkan0", "gpu", device_id="0000:01"), _dev(3, "CUDA1", "gpu", device_id="0000:02"),
             _dev(4, "Vulkan1", "igpu"), _dev(5, "BLAS", "accel")]
    names = [d.id for d in placement.devices_for(_config(), found, host_free=123)]
    assert names == ["CUDA0", "CUDA1", "CPU"]  # one per device id, no iGPU beside GPUs, no accelerator
    assert placement.devices_for(_config(), found, host_free=123)[-1].free == 123
    only_igpu = [d for d in found if d["type"] != "gpu"]
    assert [d.id for d in placement.devices_for(_config(), only_igpu)] == ["Vulkan1", "CPU"]
    chosen = placement.devices_for(_config(devices=["Vulkan0"]), found)
    assert [d.id for d in chosen] == ["Vulkan0", "CPU"]
    with pytest.raises(BadRequest, match="unknown device 'CUDA7'"):
        placement.devices_for(_config(devices=["CUDA7"]), found)
    # main_gpu: that one of llama.cpp's GPUs alone (split mode "none"); no GPU, no effect
    assert [d.id for d in placement.devices_for(_config(main_gpu=1), found)] == ["CUDA1", "CPU"]
    with pytest.raises(BadRequest, match=r"main_gpu 2: there are 2 GPUs \(CUDA0, CUDA1\)"):
        placement.devices_for(_config(main_gpu=2), found)
    assert [d.id for d in placement.devices_for(_config(main_gpu=0), found[:1])] == ["CPU"]


# -- the real path, on this machine's devices ---------------------------------

@pytest.mark.model
def test_auto_is_the_default_and_loads(default_model_path):
    from runner.engine.core import Engine, EngineConfig
    from runner.engine.requests import CompletionOptions, CompletionRequest

    with Engine(EngineConfig(default_model_path, n_ctx=512, n_threads=2, cache_ram_mb=0)) as engine:
        got = engine.info()["placement"]
        assert got["auto"] is True and got["fits"] is True
        gpus = [d for d in got["devices"] if d["type"] != "cpu"]
        if not gpus:  # this machine: no GPU, so auto means the CPU
            assert got["n_gpu_layers"] == 0
            assert got["devices"][-1]["layers"] == list(range(engine.model.n_layer))
        # Default sampling draws the end-of-generation token now and then
        # (a fresh-clone CI run met it within 4 tokens): ignore_eos makes the
        # 4 tokens certain.
        request = CompletionRequest(prompt="Hello", options=CompletionOptions.from_dict(
            {"num_predict": 4, "ignore_eos": True}))
        final = list(engine.submit(request))[-1]
        assert (final.done_reason, final.eval_count) == ("length", 4)


@pytest.mark.model
def test_a_load_that_cannot_fit_is_refused_before_llama_cpp_allocates(default_model_path):
    from runner.engine.core import Engine, EngineConfig

    with pytest.raises(placement.NoRoom, match=r"CPU needs .* KV cache .* but has .* free"):
        Engine(EngineConfig(default_model_path, n_ctx=2**31 - 1, n_threads=2))
