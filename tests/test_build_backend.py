"""build_backend/llama_runner_backend.py: variant settings and wheel renaming
(no build: the wheels here are a few bytes)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build_backend"))

import llama_runner_backend as backend

from runner import buildinfo


def test_every_distribution_is_known_to_the_import_check():
    assert {v.distribution for v in backend.VARIANTS.values()} == set(buildinfo.DISTRIBUTIONS)


def test_every_preset_named_by_a_variant_exists():
    presets = {p["name"] for p in json.loads((ROOT / "CMakePresets.json").read_text())["configurePresets"]}
    for v in backend.VARIANTS.values():
        assert v.preset is None or v.preset in presets, v


@pytest.mark.parametrize("name, dist, defines", [
    ("cpu", "llama-runner",
     {"GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "ON", "GGML_CPU_ALL_VARIANTS": "ON"}),
    ("cuda12", "llama-runner-cuda12", {"GGML_CUDA": "ON", "GGML_BACKEND_DL": "ON", "GGML_NATIVE": "OFF"}),
    ("cuda13", "llama-runner-cuda13", {"GGML_CUDA": "ON", "GGML_CUDA_NCCL": "OFF"}),
    ("rocm", "llama-runner-rocm", {"GGML_HIP": "ON", "GGML_CPU_ALL_VARIANTS": "ON"}),
    ("vulkan", "llama-runner-vulkan", {"GGML_VULKAN": "ON", "GGML_CPU_ALL_VARIANTS": "ON"}),
    ("metal", "llama-runner", {"GGML_METAL": "ON", "GGML_NATIVE": "OFF"}),
])
def test_variant_settings_come_from_its_preset(name, dist, defines):
    variant, settings = backend.split_settings({"variant": name})
    assert variant.distribution == dist
    for key, value in defines.items():
        assert settings[f"cmake.define.{key}"] == value
    assert "cmake.define.CMAKE_BUILD_TYPE" not in settings  # inherited from "base"; scikit-build-core's
    assert settings["cmake.define.RUNNER_VARIANT"] == name
    assert settings["cmake.define.RUNNER_DISTRIBUTION"] == dist
    assert settings["build-dir"] == f"build/{{wheel_tag}}-{name}"
    assert "variant" not in settings


def test_native_is_plain_scikit_build_core():
    variant, settings = backend.split_settings(None)
    assert variant.name == "native"
    assert settings == {"cmake.define.RUNNER_VARIANT": "native",
                        "cmake.define.RUNNER_DISTRIBUTION": "llama-runner"}


def test_command_line_settings_win_over_the_preset():
    _, settings = backend.split_settings({
        "variant": "cpu", "build-dir": "build/mine", "cmake.define.GGML_CPU_ALL_VARIANTS": "OFF"})
    assert settings["build-dir"] == "build/mine"
    assert settings["cmake.define.GGML_CPU_ALL_VARIANTS"] == "OFF"


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(backend.VariantError, match="unknown variant 'cuda11'.*cpu"):
        backend.split_settings({"variant": "cuda11"})


def test_preset_inheritance_earlier_parent_wins(tmp_path):
    presets = tmp_path / "CMakePresets.json"
    presets.write_text(json.dumps({"configurePresets": [
        {"name": "a", "cacheVariables": {"X": "a", "A": "1"}},
        {"name": "b", "cacheVariables": {"X": "b", "B": {"type": "BOOL", "value": "ON"}}},
        {"name": "c", "inherits": ["a", "b"], "cacheVariables": {"C": True}},
    ]}))
    assert backend.preset_cache_variables("c", presets) == {"X": "a", "A": "1", "B": "ON", "C": "ON"}


METADATA = (
    "Metadata-Version: 2.1\nName: llama-runner\nVersion: 0.1.0\n"
    "Requires-Dist: numpy>=1.24\nProvides-Extra: test\n"
    "Requires-Dist: pytest>=8; extra == \"test\"\n\n# llama-runner\n\nName: not a header\n")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder: Path) -> Path:
    path = folder / "llama_runner-0.1.0-cp311-cp311-linux_x86_64.whl"
    files = {
        "runner/__init__.py": b"",
        "runner/_llama.so": b"\x7fELF",
        "llama_runner-0.1.0.dist-info/METADATA": METADATA.encode(),
        "llama_runner-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\n",
        "llama_runner-0.1.0.dist-info/entry_points.txt": b"[console_scripts]\n",
        "llama_runner-0.1.0.dist-info/licenses/LICENSE": b"MIT\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            z.writestr(info, data)
        z.writestr("llama_runner-0.1.0.dist-info/RECORD", "".join(
            f"{n},{_record_hash(d)},{len(d)}\n" for n, d in files.items()))
    return path


def test_rename_wheel(tmp_path):
    variant = backend.VARIANTS["cuda13"]
    new = backend.rename_wheel(make_wheel(tmp_path), variant)
    assert new.name == "llama_runner_cuda13-0.1.0-cp311-cp311-linux_x86_64.whl"
    assert [p.name for p in tmp_path.iterdir()] == [new.name]
    info = "llama_runner_cuda13-0.1.0.dist-info/"
    with zipfile.ZipFile(new) as z:
        names = z.namelist()
        assert sorted(names) == sorted([
            "runner/__init__.py", "runner/_llama.so", info + "METADATA", info + "WHEEL",
            info + "entry_points.txt", info + "licenses/LICENSE", info + "RECORD"])
        assert z.getinfo("runner/_llama.so").external_attr >> 16 == 0o755
        meta = z.read(info + "METADATA").decode()
        record = list(csv.reader(io.StringIO(z.read(info + "RECORD").decode())))
        for name, digest, size in record:
            if name == info + "RECORD":
                assert digest == size == ""
            else:
                data = z.read(name)
                assert (digest, int(size)) == (_record_hash(data), len(data)), name
        assert sorted(r[0] for r in record) == sorted(names)
    assert meta.split("\n")[:8] == [
        "Metadata-Version: 2.1", "Name: llama-runner-cuda13", "Version: 0.1.0",
        "Requires-Dist: numpy>=1.24", "Requires-Dist: nvidia-cuda-runtime>=13.0,<14",
        "Requires-Dist: nvidia-cublas>=13.0,<14", "Provides-Extra: test",
        "Requires-Dist: pytest>=8; extra == \"test\""]
    assert meta.endswith("\n\n# llama-runner\n\nName: not a header\n")  # the body is untouched


def test_rename_dist_info(tmp_path):
    info = tmp_path / "llama_runner-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(METADATA)
    name = backend.rename_dist_info(str(tmp_path), info.name, backend.VARIANTS["rocm"])
    assert name == "llama_runner_rocm-0.1.0.dist-info"
    assert not info.exists()
    assert "\nName: llama-runner-rocm\n" in (tmp_path / name / "METADATA").read_text()


def test_sdist_of_a_gpu_variant_is_refused(tmp_path):
    with pytest.raises(backend.VariantError, match="sdist"):
        backend.build_sdist(str(tmp_path), {"variant": "vulkan"})
