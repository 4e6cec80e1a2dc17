"""runner.buildinfo: the one-distribution check and the CPU variant name."""

from __future__ import annotations

import pytest

from runner import buildinfo


def dist_info(folder, name):
    (folder / name).mkdir(parents=True)
    (folder / name / "METADATA").write_text("Metadata-Version: 2.1\n")


@pytest.mark.parametrize("names, found", [
    ([], {}),
    (["llama_runner-0.1.0.dist-info"], {"llama-runner": 1}),
    (["llama_runner_cuda12-0.1.0.dist-info", "numpy-2.0.dist-info", "llama_runner_tools-1.0.dist-info"],
     {"llama-runner-cuda12": 1}),
    (["llama_runner-0.1.0.dist-info", "llama_runner_vulkan-0.1.0.dist-info"],
     {"llama-runner": 1, "llama-runner-vulkan": 1}),
    (["LLAMA_RUNNER-0.1.0.dist-info", "Llama.Runner_ROCm-0.1.0.dist-info"],  # unnormalized spellings
     {"llama-runner": 1, "llama-runner-rocm": 1}),
    (["llama_runner-0.1.0.egg-info", "llama_runner-0.1.0.dist-info.bak"], {}),
])
def test_installed_distributions(tmp_path, names, found):
    for name in names:
        dist_info(tmp_path, name)
    got = buildinfo.installed_distributions([str(tmp_path), str(tmp_path / "missing"), str(tmp_path)])
    assert {k: len(v) for k, v in got.items()} == found


def test_same_distribution_in_two_folders_is_not_a_conflict(tmp_path):
    dist_info(tmp_path / "user", "llama_runner-0.1.0.dist-info")
    dist_info(tmp_path / "venv", "llama_runner-0.1.0.dist-info")
    buildinfo.check_single_distribution([str(tmp_path / "user"), str(tmp_path / "venv")])


def test_two_distributions_are_refused_with_the_fix(tmp_path):
    dist_info(tmp_path / "site", "llama_runner-0.1.0.dist-info")
    dist_info(tmp_path / "user", "llama_runner_cuda13-0.1.0.dist-info")
    with pytest.raises(buildinfo.ConflictingDistributions) as err:
        buildinfo.check_single_distribution([str(tmp_path / "site"), str(tmp_path / "user")])
    msg = str(err.value)
    assert f"llama-runner in {tmp_path / 'site'}" in msg
    assert f"llama-runner-cuda13 in {tmp_path / 'user'}" in msg
    assert "pip uninstall -y llama-runner llama-runner-cuda13" in msg
    assert isinstance(err.value, ImportError)


@pytest.mark.parametrize("library, variant", [
    ("/venv/site-packages/runner/libggml-cpu-zen4.so", "zen4"),
    ("/x/libggml-cpu-sapphirerapids.so", "sapphirerapids"),
    ("/x/libggml-cpu-armv8.2_1.so", "armv8.2_1"),
    ("/x/libggml-cpu-apple_m2_m3.dylib", "apple_m2_m3"),
    ("C:/x/ggml-cpu-haswell.dll", "haswell"),
    ("/x/libggml-cpu.so", None),
    ("/x/libggml.so", None),
    ("", None),
])
def test_cpu_variant(library, variant):
    assert buildinfo.cpu_variant(library) == variant


def test_variant_record_has_every_field():
    assert set(buildinfo.variant()) == {
        "variant", "distribution", "backends", "cpu_variants", "backend_dl", "native"}
