"""The wheels as users get them.

The portable CPU wheel is built like a release (scripts/build_wheels.py cpu:
``pip wheel . -C variant=cpu``, then ``auditwheel repair``), installed into a
fresh virtual environment without the source tree, and run from a temporary
folder on the default model.  The CUDA variant is only configured (there is
no GPU or full toolkit on the build machines).

Cost: the wheel is kept in build/wheel-test/<digest of the sources that go
into it>/, so it is built once per change of those sources.  A cold build
(ggml's CPU backend compiled for 14 x86-64 variants; 387 compile steps)
took 17 minutes on 2 shared cores (about 20 with an empty ccache); a rebuild
after a source change reuses build/{wheel_tag}-cpu (10-30 seconds), and a
build in a new folder with a warm ccache takes under a minute.  With the
wheel cached the tests here take about 30 seconds.  The dependencies'
wheels (numpy, pyzmq, msgspec, jinja2, MarkupSafe, at the versions of the running environment)
are downloaded once into build/wheel-test/deps/ and installed with
--no-index.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "wheel-test"
DEPS = CACHE / "deps"
# Everything a wheel is built from (vendor/ through its sync state).
SOURCES = ["CMakeLists.txt", "CMakePresets.json", "pyproject.toml", "README.md",
           "build_backend/*.py", "scripts/build_wheels.py", "ext/*", "runner/**/*.py",
           "vendor/.sync-state.json"]
RUNTIME_DEPS = ("numpy", "pyzmq", "msgspec", "jinja2", "MarkupSafe")

pytestmark = pytest.mark.slow
# The CPU wheel checked here is the Linux x86-64 one (14 CPU variants).
linux_x86_64 = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="the portable CPU wheel is checked on Linux x86-64")


def source_digest() -> str:
    h = hashlib.sha256()
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    """Run outside the source tree, with nothing of it on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(kw.pop("env", {}))
    return subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def cpu_wheel() -> Path:
    folder = CACHE / source_digest()
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        for old in CACHE.glob("*"):  # wheels of older sources
            if old != DEPS:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        partial = folder.with_suffix(".partial")
        CACHE.mkdir(parents=True, exist_ok=True)
        log = CACHE / "build.log"
        with open(log, "w") as out:
            proc = subprocess.run([sys.executable, ROOT / "scripts" / "build_wheels.py", "cpu",
                                   "--out", partial], check=False, cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            pytest.fail(f"building the CPU wheel failed; {log}:\n{log.read_text()[-4000:]}")
        partial.rename(folder)  # only a finished build counts as cached
        wheels = sorted(folder.glob("*.whl"))
    (wheel,) = wheels
    return wheel


@pytest.fixture(scope="module")
def dep_wheels() -> Path:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in RUNTIME_DEPS]
    stamp = DEPS / "pins.txt"
    if not stamp.is_file() or stamp.read_text().split() != pins:
        DEPS.mkdir(parents=True, exist_ok=True)
        proc = run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                    "--only-binary", ":all:", "-d", DEPS, *pins])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        stamp.write_text("\n".join(pins) + "\n")
    return DEPS


@pytest.fixture(scope="module")
def venv(tmp_path_factory, cpu_wheel, dep_wheels) -> Path:
    """A fresh environment holding the CPU wheel and its dependencies only."""
    path = tmp_path_factory.mktemp("wheel-venv")
    proc = run([sys.executable, "-m", "venv", path])
    assert proc.returncode == 0, proc.stderr
    proc = run([path / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check",
                "--no-index", "--find-links", dep_wheels, cpu_wheel])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working folder with no source tree in it."""
    return tmp_path


@pytest.fixture(scope="module")
def package_dir(venv, tmp_path_factory) -> Path:
    """Where the venv's runner package is."""
    proc = run([venv / "bin" / "python", "-c", "import runner; print(runner.__file__)"],
               cwd=tmp_path_factory.mktemp("cwd"))
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip()).parent


@pytest.mark.model  # builds and runs the extension
@linux_x86_64
def test_cpu_wheel_holds_only_what_it_needs(cpu_wheel):
    # auditwheel: the oldest manylinux policy the symbols allow (glibc,
    # libstdc++ of the build machine).
    assert re.search(r"-cp3\d+-cp3\d+-manylinux_2_\d+_x86_64", cpu_wheel.name), cpu_wheel.name
    assert cpu_wheel.name.startswith("llama_runner-")
    with zipfile.ZipFile(cpu_wheel) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]  # auditwheel adds folder entries
        variant = z.read("runner/_variant.py").decode()
    libs = {n.removeprefix("runner/") for n in names if n.startswith("runner/") and ".so" in n}
    cpu = {n[len("libggml-cpu-"):-3] for n in libs if n.startswith("libggml-cpu-")}
    assert cpu == {"x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex",
                   "cannonlake", "cascadelake", "icelake", "cooperlake", "zen4", "alderlake",
                   "sapphirerapids"}
    ext = [n for n in libs if n.startswith("_llama.")]
    assert len(ext) == 1
    # One file per library: no libllama.so.0 / .so.0.5.0 copies of symlinks.
    assert libs - set(ext) == {"libllama.so", "libggml.so", "libggml-base.so", "libmtmd.so",
                               "libggml-rpc.so"} | {f"libggml-cpu-{v}.so" for v in cpu}
    # What auditwheel grafted: OpenMP (ggml's threads), nothing else.
    grafted = [n for n in names if n.startswith("llama_runner.libs/")]
    assert [re.sub(r"-[0-9a-f]{8}", "", n) for n in grafted] == ["llama_runner.libs/libgomp.so.1.0.0"]
    assert {n for n in names if n.startswith("runner/licenses/")} == {
        "runner/licenses/llama.cpp-LICENSE", "runner/licenses/stb_image-LICENSE",
        "runner/licenses/miniaudio-LICENSE", "runner/licenses/llamafile-sgemm-LICENSE"}
    for name in names:
        assert not name.endswith((".h", ".hpp", ".a", ".pc", ".cmake", ".pyx", ".pxd", ".pxi", ".c")), name
        assert name.startswith(("runner/", "llama_runner.libs/", "llama_runner-")), name
    assert 'VARIANT = "cpu"' in variant and 'DISTRIBUTION = "llama-runner"' in variant
    assert "BACKEND_DL = True" in variant and "NATIVE = False" in variant


@pytest.mark.model  # builds and runs the extension
@linux_x86_64
def test_runner_is_imported_from_the_venv(venv, outside):
    code = ("import runner, runner._llama, runner._variant as v; "
            "print(runner.__file__); print(runner._llama.__file__); print(v.VARIANT)")
    proc = run([venv / "bin" / "python", "-c", code], cwd=outside)
    assert proc.returncode == 0, proc.stderr
    init, ext, variant = proc.stdout.split()
    site = str(venv / "lib")
    assert init.startswith(site) and ext.startswith(site), proc.stdout
    assert variant == "cpu"


@pytest.mark.model  # builds and runs the extension
@linux_x86_64
def test_generate(venv, outside, default_model_path):
    proc = run([venv / "bin" / "llama-runner", "generate", "--model", default_model_path,
                "--prompt", "The capital of France is", "-n", "8", "--temperature", "0",
                "--threads", "2", "--verbose", "--quiet"], cwd=outside, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, proc.stdout  # greedy: " Paris.\n\nThe United States has"
    assert "generation: 8 tokens" in proc.stderr, proc.stderr


@pytest.mark.model  # builds and runs the extension
@linux_x86_64
def test_info_names_the_variant_and_the_cpu_variant(venv, outside, package_dir):
    proc = run([venv / "bin" / "llama-runner", "info", "--json"], cwd=outside, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    v = info["variant"]
    assert (v["variant"], v["distribution"], v["backends"], v["backend_dl"]) == (
        "cpu", "llama-runner", ["cpu", "rpc"], True)
    # ggml loaded one of the wheel's CPU variants from the package folder.
    assert v["cpu_variant"] in v["cpu_variants"], v
    assert Path(v["cpu_library"]).parent == package_dir
    assert [d["type"] for d in info["devices"]] == ["cpu"]

    proc = run([venv / "bin" / "llama-runner", "info"], cwd=outside, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "variant: cpu (llama-runner; backends cpu, rpc loaded from the package folder)" in proc.stdout
    assert f"cpu variant: {v['cpu_variant']} (picked from 14: libggml-cpu-{v['cpu_variant']}.so)" in proc.stdout


@pytest.mark.model  # builds and runs the extension
@linux_x86_64
def test_a_second_variant_is_refused_at_import(venv, outside, package_dir):
    fake = package_dir.parent / "llama_runner_cuda12-0.1.0.dist-info"
    fake.mkdir()
    try:
        (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: llama-runner-cuda12\nVersion: 0.1.0\n")
        proc = run([venv / "bin" / "llama-runner", "info"], cwd=outside)
    finally:
        shutil.rmtree(fake)
    assert proc.returncode != 0
    assert "ConflictingDistributions: more than one llama-runner distribution is installed" in proc.stderr
    assert "pip uninstall -y llama-runner llama-runner-cuda12" in proc.stderr


# ---------------------------------------------------------------------------
# CUDA: configure only
# ---------------------------------------------------------------------------

def _nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (str(p) for p in [Path("/usr/local/cuda/bin/nvcc")] if p.exists()), None)


def _toolkit_lib(nvcc: str, pattern: str) -> bool:
    toolkit = Path(nvcc).resolve().parent.parent
    return any(toolkit.glob(f"lib64/{pattern}")) or any(toolkit.glob(f"targets/*/lib/{pattern}"))


def cuda_configure(build: Path, variant: str, nvcc: str, cublas: Path | None) -> subprocess.CompletedProcess:
    """`cmake` configure of a CUDA variant with the settings its wheel build uses."""
    sys.path.insert(0, str(ROOT / "build_backend"))
    import llama_runner_backend as backend

    _, settings = backend.split_settings({"variant": variant})
    defines = {k.removeprefix("cmake.define."): v for k, v in settings.items() if k.startswith("cmake.define.")}
    defines["CMAKE_CUDA_COMPILER"] = nvcc
    defines["Python_EXECUTABLE"] = sys.executable
    if cublas is not None:
        defines["RUNNER_CUBLAS_ROOT"] = str(cublas)
    if not _toolkit_lib(nvcc, "stubs/libcuda.so"):
        defines["GGML_CUDA_NO_VMM"] = "ON"  # no driver stub to link against
    return run(["cmake", "-S", ROOT, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                *(f"-D{k}={v}" for k, v in defines.items())], timeout=600)


@pytest.fixture(scope="module")
def cuda(tmp_path_factory):
    """(nvcc, CUDA major version, cuBLAS root or None)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    out = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    major = re.search(r"release (\d+)\.", out).group(1)
    cublas = os.environ.get("RUNNER_CUBLAS_ROOT")
    if cublas is None and not _toolkit_lib(nvcc, "libcublas.so*"):
        # A bare nvcc install has no cuBLAS; configuring only needs its files
        # to exist (the README shows the real one, from the nvidia-cublas wheel).
        stub = tmp_path_factory.mktemp("cublas-stub")
        (stub / "lib").mkdir()
        (stub / "include").mkdir()
        for name in (f"libcublas.so.{major}", f"libcublasLt.so.{major}"):
            (stub / "lib" / name).write_bytes(b"")
        (stub / "include" / "cublas_v2.h").write_text("")
        cublas = stub
    return nvcc, major, None if cublas is None else Path(cublas)


def test_cuda_variant_configures(cuda, tmp_path):
    nvcc, major, cublas = cuda
    proc = cuda_configure(tmp_path, f"cuda{major}", nvcc, cublas)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    variant = (tmp_path / "_variant.py").read_text()
    assert f'VARIANT = "cuda{major}"' in variant
    assert f'DISTRIBUTION = "llama-runner-cuda{major}"' in variant
    assert 'BACKENDS = ("cpu", "cuda", "rpc",)' in variant
    # ggml-cuda finds NVIDIA's runtime wheels next to the package.
    ninja = (tmp_path / "build.ninja").read_text()
    link = ninja[ninja.index("build bin/libggml-cuda.so:"):]
    link = link[:link.index("\n\n")]
    wheel_lib = f"nvidia/cu{major}/lib" if int(major) >= 13 else "nvidia/cublas/lib"
    assert f"$$ORIGIN/../{wheel_lib}" in link, link


def test_cuda_variant_refuses_the_wrong_toolkit(cuda, tmp_path):
    nvcc, major, cublas = cuda
    other = "12" if major != "12" else "13"
    proc = cuda_configure(tmp_path, f"cuda{other}", nvcc, cublas)
    assert proc.returncode != 0
    assert re.search(rf"variant cuda{other} needs a CUDA {other} toolkit,\s+found {major}\.", proc.stderr), \
        proc.stderr
