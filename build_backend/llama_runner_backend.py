"""PEP 517 build backend: scikit-build-core, plus one setting for the variant.

    pip wheel . -C variant=cuda12        # -> llama_runner_cuda12-*.whl

Every GPU backend ships as its own distribution (``llama-runner-cuda12``,
``-cuda13``, ``-rocm``, ``-vulkan``) holding the same import package
``runner``; the CPU (Linux) and Metal (macOS) builds are ``llama-runner``.
A variant is a configure preset of CMakePresets.json, whose cache variables
are handed to scikit-build-core as ``cmake.define.*`` settings (a setting
given on the command line wins), and a distribution name.

The distribution name cannot come from scikit-build-core: ``[project].name``
is static (PEP 621 forbids it in ``dynamic``) and overrides only reach
``[tool.scikit-build]``.  So this backend renames what scikit-build-core
built -- the .dist-info folder, ``Name:`` in METADATA, the wheel file name
and RECORD -- and adds the variant's own requirements (NVIDIA's runtime
wheels for CUDA).  Only the standard wheel format is touched, never
scikit-build-core's internals.

Without ``variant`` (or with ``variant=native``) this is plain
scikit-build-core: a build tuned for this machine, named ``llama-runner``,
in ``build/{wheel_tag}`` (the editable development build).  A variant builds
in ``build/{wheel_tag}-{variant}`` unless ``build-dir`` is given.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from scikit_build_core import build as _skbuild

__all__ = [
    "VARIANTS",
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_editable",
    "prepare_metadata_for_build_wheel",
]

PROJECT = "llama-runner"  # [project].name in pyproject.toml
SETTING = "variant"  # the config setting this backend reads (and removes)
PRESETS = Path(__file__).resolve().parent.parent / "CMakePresets.json"


@dataclass(frozen=True)
class Variant:
    name: str  # value of -C variant=...; recorded as runner._variant.VARIANT
    distribution: str  # distribution (PyPI project) name of its wheels
    preset: str | None  # configure preset whose cache variables it uses; None: pyproject's
    requires: tuple[str, ...] = ()  # Requires-Dist added to the project's own
    cuda_runtime_min: str = ""  # lowest CUDA runtime `requires` allows (checked against the toolkit)


VARIANTS = {v.name: v for v in (
    Variant("native", PROJECT, None),
    Variant("cpu", PROJECT, "cpu"),
    Variant("metal", PROJECT, "metal"),
    Variant("cuda12", "llama-runner-cuda12", "cuda",
            ("nvidia-cuda-runtime-cu12>=12.8", "nvidia-cublas-cu12>=12.8"), "12.8"),
    Variant("cuda13", "llama-runner-cuda13", "cuda",
            ("nvidia-cuda-runtime>=13.0,<14", "nvidia-cublas>=13.0,<14"), "13.0"),
    Variant("rocm", "llama-runner-rocm", "rocm"),
    Variant("vulkan", "llama-runner-vulkan", "vulkan"),
)}


class VariantError(ValueError):
    pass


# ---------------------------------------------------------------------------
# Config settings
# ---------------------------------------------------------------------------

def preset_cache_variables(name: str, presets_file: Path = PRESETS) -> dict[str, str]:
    """Cache variables of a configure preset, inherited ones included
    (a preset's own value wins over those it inherits)."""
    presets = {p["name"]: p for p in json.loads(presets_file.read_text())["configurePresets"]}
    if name not in presets:
        raise VariantError(f"no configure preset {name!r} in {presets_file.name}")
    preset = presets[name]
    parents = preset.get("inherits", [])
    if isinstance(parents, str):
        parents = [parents]
    out: dict[str, str] = {}
    # Earlier parents take precedence over later ones (CMake's rule).
    for parent in reversed(parents):
        out.update(preset_cache_variables(parent, presets_file))
    for key, value in preset.get("cacheVariables", {}).items():
        if isinstance(value, dict):
            value = value.get("value", "")
        out[key] = "ON" if value is True else "OFF" if value is False else str(value)
    return out


def split_settings(config_settings: dict | None) -> tuple[Variant, dict]:
    """The variant asked for, and the settings scikit-build-core gets."""
    settings = dict(config_settings or {})
    name = settings.pop(SETTING, None) or "native"
    if isinstance(name, list):
        name = name[-1]
    if name not in VARIANTS:
        raise VariantError(f"unknown variant {name!r}: choose one of {', '.join(VARIANTS)}")
    variant = VARIANTS[name]
    if variant.preset is not None:
        for key, value in preset_cache_variables(variant.preset).items():
            if key != "CMAKE_BUILD_TYPE":  # scikit-build-core's cmake.build-type
                settings.setdefault(f"cmake.define.{key}", value)
        settings.setdefault("build-dir", f"build/{{wheel_tag}}-{variant.name}")
    settings.setdefault("cmake.define.RUNNER_VARIANT", variant.name)
    settings.setdefault("cmake.define.RUNNER_DISTRIBUTION", variant.distribution)
    if variant.cuda_runtime_min:
        settings.setdefault("cmake.define.RUNNER_CUDA_RUNTIME_MIN", variant.cuda_runtime_min)
    return variant, settings


# ---------------------------------------------------------------------------
# Renaming a built wheel or its metadata
# ---------------------------------------------------------------------------

def normalize(name: str) -> str:
    """Distribution name as wheel and .dist-info file names spell it."""
    return re.sub(r"[-_.]+", "_", name).lower()


def rewrite_metadata(text: str, variant: Variant) -> str:
    """METADATA with the variant's name and extra Requires-Dist lines."""
    head, sep, body = text.partition("\n\n")
    lines = head.split("\n")
    lines = [f"Name: {variant.distribution}" if line.startswith("Name: ") else line for line in lines]
    # After the project's own unconditional requirements (before the extras').
    at = max((i + 1 for i, line in enumerate(lines)
              if line.startswith("Requires-Dist: ") and "extra ==" not in line), default=len(lines))
    lines[at:at] = [f"Requires-Dist: {req}" for req in variant.requires]
    return "\n".join(lines) + sep + body


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def rename_wheel(path: Path, variant: Variant) -> Path:
    """Rewrite a llama-runner wheel as the variant's distribution; returns
    the new wheel (the old one is removed)."""
    old = normalize(PROJECT)
    new = normalize(variant.distribution)
    name, version, rest = path.name.split("-", 2)
    if name != old:
        raise VariantError(f"{path.name} is not a {PROJECT} wheel")
    old_info, new_info = f"{old}-{version}.dist-info/", f"{new}-{version}.dist-info/"
    target = path.with_name(f"{new}-{version}-{rest}")
    record_rows = []
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename == old_info + "RECORD":
                continue
            data = src.read(info)
            filename = info.filename
            if filename.startswith(old_info):
                filename = new_info + filename[len(old_info):]
                if filename == new_info + "METADATA":
                    data = rewrite_metadata(data.decode("utf-8"), variant).encode("utf-8")
            copy = zipfile.ZipInfo(filename, date_time=info.date_time)
            copy.external_attr = info.external_attr
            copy.compress_type = info.compress_type
            dst.writestr(copy, data)
            record_rows.append((filename, _record_hash(data), str(len(data))))
        record_rows.append((new_info + "RECORD", "", ""))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(record_rows)
        record = src.getinfo(old_info + "RECORD")
        copy = zipfile.ZipInfo(new_info + "RECORD", date_time=record.date_time)
        copy.external_attr = record.external_attr
        copy.compress_type = zipfile.ZIP_DEFLATED
        dst.writestr(copy, buf.getvalue())
    path.unlink()
    return target


def rename_dist_info(metadata_directory: str, dist_info: str, variant: Variant) -> str:
    """Rename a prepared .dist-info folder and its METADATA; returns its new name."""
    old = Path(metadata_directory) / dist_info
    version = dist_info[len(normalize(PROJECT)) + 1:-len(".dist-info")]
    new = old.with_name(f"{normalize(variant.distribution)}-{version}.dist-info")
    if new.exists():
        shutil.rmtree(new)
    old.rename(new)
    meta = new / "METADATA"
    meta.write_text(rewrite_metadata(meta.read_text(encoding="utf-8"), variant), encoding="utf-8")
    return new.name


# ---------------------------------------------------------------------------
# PEP 517 / PEP 660 hooks
# ---------------------------------------------------------------------------

def _build(hook, wheel_directory, config_settings):
    variant, settings = split_settings(config_settings)
    # scikit-build-core would compare the renamed metadata with its own.
    filename = hook(wheel_directory, settings, None)
    if variant.distribution == PROJECT:
        return filename
    return rename_wheel(Path(wheel_directory) / filename, variant).name


def _prepare(hook, metadata_directory, config_settings):
    variant, settings = split_settings(config_settings)
    dist_info = hook(metadata_directory, settings)
    if variant.distribution == PROJECT:
        return dist_info
    return rename_dist_info(metadata_directory, dist_info, variant)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(_skbuild.build_wheel, wheel_directory, config_settings)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(_skbuild.build_editable, wheel_directory, config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return _prepare(_skbuild.prepare_metadata_for_build_wheel, metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    return _prepare(_skbuild.prepare_metadata_for_build_editable, metadata_directory, config_settings)


def get_requires_for_build_wheel(config_settings=None):
    return _skbuild.get_requires_for_build_wheel(split_settings(config_settings)[1])


def get_requires_for_build_editable(config_settings=None):
    return _skbuild.get_requires_for_build_editable(split_settings(config_settings)[1])


def build_sdist(sdist_directory, config_settings=None):
    variant, settings = split_settings(config_settings)
    if variant.distribution != PROJECT:
        # An sdist of llama-runner-cuda12 would build a wheel named llama-runner.
        raise VariantError(f"the sdist is {PROJECT}'s only; build {variant.distribution} as a wheel")
    return _skbuild.build_sdist(sdist_directory, settings)


def get_requires_for_build_sdist(config_settings=None):
    return _skbuild.get_requires_for_build_sdist(split_settings(config_settings)[1])
