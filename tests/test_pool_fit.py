"""runner/process/pool_fit.py: where a pooled model goes (fake discover lists) and what it needs."""

from __future__ import annotations

import pytest

from runner.model.gguf import read_gguf
from runner.model.memory import LoadOptions, estimate
from runner.process import pool_fit
from runner.process.pool_policy import Room

GiB = 1 << 30
CPU = {"index": 0, "name": "CPU", "type": "cpu", "free": 60 * GiB, "total": 64 * GiB}
GPU0 = {"index": 1, "name": "CUDA0", "type": "gpu", "free": 20 * GiB, "total": 24 * GiB}
GPU1 = {"index": 2, "name": "CUDA1", "type": "gpu", "free": 10 * GiB, "total": 24 * GiB}
BLAS = {"index": 3, "name": "BLAS", "type": "accel", "free": 0, "total": 0}


@pytest.mark.parametrize("devices, load, room", [
    ([CPU], {}, Room(60 * GiB, 64 * GiB, "CPU")),
    ([CPU, BLAS], {}, Room(60 * GiB, 64 * GiB, "CPU")),
    ([CPU, GPU0, GPU1], {}, Room(30 * GiB, 48 * GiB, "CUDA0+CUDA1")),
    ([CPU, GPU0, GPU1], {"devices": ["CUDA1"]}, Room(10 * GiB, 24 * GiB, "CUDA1")),
    ([CPU, GPU0, GPU1], {"n_gpu_layers": 0}, Room(60 * GiB, 64 * GiB, "CPU")),
    ([], {}, Room(0, 0, "no known device")),
])
def test_the_room_is_where_the_model_goes(devices, load, room):
    message = pool_fit.load_message(load)
    assert pool_fit.room(devices, message) == room
    assert pool_fit.offloads(devices, message) == room.where.startswith("CUDA")


def test_bad_load_fields_are_refused_by_name():
    with pytest.raises(ValueError, match="parallel"):
        pool_fit.load_message({"parallel": 0})
    with pytest.raises(ValueError, match="no_such_field"):
        pool_fit.load_message({"no_such_field": 1})


def test_the_footprint_is_the_runners_own_estimate(default_model_path):
    path = str(default_model_path)
    load = pool_fit.load_message({"n_ctx": 2048, "parallel": 2, "cache_ram_mb": 0})
    mem = estimate(read_gguf(path), LoadOptions(n_ctx=1024, parallel=2, kv_unified=False))
    assert pool_fit.footprint(path, load, on_gpu=True) == mem.full_offload
    cpu = pool_fit.footprint(path, load, on_gpu=False)
    w = mem.weights
    assert cpu == w.input + sum(w.layers) + w.output + mem.kv.total + max(mem.graph.cpu, mem.graph.full)
    # the host tier of the prefix cache counts at its bound, on the CPU only
    cached = pool_fit.load_message({"n_ctx": 2048, "parallel": 2, "cache_ram_mb": 100})
    assert pool_fit.footprint(path, cached, on_gpu=False) == cpu + (100 << 20)
    assert pool_fit.footprint(path, cached, on_gpu=True) == mem.full_offload
    bigger = pool_fit.load_message({"n_ctx": 8192, "parallel": 2, "cache_ram_mb": 0})
    assert pool_fit.footprint(path, bigger, on_gpu=False) > cpu


@pytest.mark.model  # the child process needs the built extension
def test_discover_here_lists_this_machines_devices():
    devices = pool_fit.discover_here()
    assert any(d["type"] == "cpu" and d["total"] > 0 for d in devices)


def test_a_projector_and_its_media_cache_count(default_model_path, tmp_path):
    from mmproj import write_vision_projector

    from runner.model.memory import projector_size

    path, projector = str(default_model_path), str(write_vision_projector(tmp_path / "vision.gguf"))
    plain = pool_fit.load_message({"n_ctx": 1024, "cache_ram_mb": 0})
    with_projector = pool_fit.load_message({"n_ctx": 1024, "cache_ram_mb": 0, "projector_path": projector,
                                            "media_cache_bytes": 10 << 20})
    extra = projector_size(read_gguf(projector)).total
    assert pool_fit.footprint(path, with_projector, on_gpu=False) == \
        pool_fit.footprint(path, plain, on_gpu=False) + extra + (10 << 20)
    assert pool_fit.footprint(path, with_projector, on_gpu=True) == \
        pool_fit.footprint(path, plain, on_gpu=True) + extra
