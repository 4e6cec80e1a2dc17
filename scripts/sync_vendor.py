#!/usr/bin/env python3
"""Populate, verify and re-patch ``vendor/llama.cpp``.

The llama.cpp source is never committed.  Its pristine copy (upstream commit
0c1e57098) is taken from the sdist of ``llama-cpp-python==0.3.36`` on PyPI,
verified by sha256, and ``patches/NNNN-*.patch`` are applied on top in order.

    sync_vendor.py            fetch + extract + patch (a no-op when up to date)
    sync_vendor.py --check    prove vendor/llama.cpp == pristine + patches
    sync_vendor.py --make-patch SUBJECT
                              turn hand edits under vendor/llama.cpp into the
                              next numbered patch file, then re-sync
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "vendor" / "llama.cpp"
STATE = ROOT / "vendor" / ".sync-state.json"
PATCHES = ROOT / "patches"

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
UPSTREAM_COMMIT = "0c1e57098"
# Folder of the sdist that holds llama.cpp.
SDIST_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
# Parts of the tree we never need: the submodule gitlink would confuse git.
SKIP_TOP = {".git"}


class SyncError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("LLAMA_RUNNER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama-runner")
    return Path(base)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist() -> Path:
    """Return the verified sdist, downloading it with pip when not cached."""
    dest = cache_dir() / "sdist"
    path = dest / SDIST_FILE
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        # --no-build-isolation: pip only prepares metadata, and an isolated
        # environment would try to build cmake from source (--no-binary :all:
        # applies to the build requirements too).
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "--disable-pip-version-check",
               f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise SyncError(f"pip download of {SDIST_NAME}=={SDIST_VERSION} failed:\n"
                            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise SyncError(f"{path}: sha256 {digest} does not match the pinned {SDIST_SHA256}; "
                        "delete the file and re-run")
    return path


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def wanted_state() -> dict:
    return {
        "upstream_commit": UPSTREAM_COMMIT,
        "sdist": SDIST_FILE,
        "sdist_sha256": SDIST_SHA256,
        "patches": [{"file": p.name, "sha256": sha256_file(p)} for p in patch_files()],
    }


def extract(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(SDIST_PREFIX):
                continue
            rel = m.name[len(SDIST_PREFIX):]
            if not rel or rel.split("/", 1)[0] in SKIP_TOP:
                continue
            m.name = rel
            members.append(m)
        tar.extractall(dest, members=members, filter="data")


def apply_patches(tree: Path) -> None:
    for patch in patch_files():
        proc = subprocess.run(["git", "apply", "--whitespace=nowarn", str(patch)],
                              cwd=tree, capture_output=True, text=True,
                              env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)})
        if proc.returncode != 0:
            raise SyncError(f"patch {patch.name} ({patch}) does not apply:\n{proc.stderr}")


def build_expected(workdir: Path) -> Path:
    """Extract pristine llama.cpp into workdir and apply our patches."""
    tree = workdir / "llama.cpp"
    tree.mkdir()
    extract(fetch_sdist(), tree)
    apply_patches(tree)
    return tree


def tree_digest(tree: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(tree).as_posix()
            out[rel] = ("link:" + os.readlink(p)) if p.is_symlink() else sha256_file(p)
    return out


def diff_trees(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    lines = []
    for rel in sorted(expected.keys() | actual.keys()):
        a, b = expected.get(rel), actual.get(rel)
        if a == b:
            continue
        what = "missing" if b is None else "added" if a is None else "modified"
        lines.append(f"{what}: vendor/llama.cpp/{rel}")
    return lines


def sync(force: bool = False) -> bool:
    """Make vendor/llama.cpp equal pristine + patches. Returns True if it changed."""
    want = wanted_state()
    if not force and VENDOR.is_dir() and STATE.exists():
        try:
            if json.loads(STATE.read_text()) == want:
                return False
        except ValueError:
            pass
    VENDOR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=VENDOR.parent) as tmp:
        tree = build_expected(Path(tmp))
        if VENDOR.exists():
            shutil.rmtree(VENDOR)
        tree.rename(VENDOR)
    STATE.write_text(json.dumps(want, indent=2) + "\n")
    return True


def check(vendor: Path = VENDOR) -> list[str]:
    """Differences between `vendor` and pristine + patches (empty = clean)."""
    if not vendor.is_dir():
        return [f"{vendor} does not exist: run scripts/sync_vendor.py"]
    with tempfile.TemporaryDirectory() as tmp:
        expected = tree_digest(build_expected(Path(tmp)))
    return diff_trees(expected, tree_digest(vendor))


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    except UnicodeDecodeError as exc:
        raise SyncError(f"{path}: binary files cannot become patches") from exc


def make_patch(subject: str) -> Path:
    """Write the edits under vendor/llama.cpp as the next numbered patch."""
    with tempfile.TemporaryDirectory() as tmp:
        base = build_expected(Path(tmp))
        changed = diff_trees(tree_digest(base), tree_digest(VENDOR))
        if not changed:
            raise SyncError("vendor/llama.cpp has no edits to turn into a patch")
        body = []
        for line in changed:
            rel = line.split("vendor/llama.cpp/", 1)[1]
            old = _read_lines(base / rel) if (base / rel).exists() else []
            new = _read_lines(VENDOR / rel) if (VENDOR / rel).exists() else []
            a = f"a/{rel}" if old or (base / rel).exists() else "/dev/null"
            b = f"b/{rel}" if new or (VENDOR / rel).exists() else "/dev/null"
            body.append(f"diff --git a/{rel} b/{rel}\n")
            for d in difflib.unified_diff(old, new, a, b, n=3):
                body.append(d if d.endswith("\n") else d + "\n\\ No newline at end of file\n")
    number = len(patch_files()) + 1
    slug = "-".join("".join(c if c.isalnum() else " " for c in subject.lower()).split())[:50]
    out = PATCHES / f"{number:04d}-{slug}.patch"
    header = (f"From: llama-runner\nSubject: [PATCH] {subject}\n\n"
              "Describe here why this change is needed.\n---\n")
    out.write_text(header + "".join(body))
    sync(force=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="verify vendor/llama.cpp")
    group.add_argument("--make-patch", metavar="SUBJECT", help="turn vendor edits into a patch")
    ap.add_argument("--force", action="store_true", help="re-extract even when up to date")
    args = ap.parse_args(argv)
    try:
        if args.check:
            problems = check()
            for p in problems:
                print(p, file=sys.stderr)
            if problems:
                print("vendor/llama.cpp differs from pristine + patches "
                      "(scripts/sync_vendor.py --make-patch SUBJECT keeps the edits)", file=sys.stderr)
                return 1
            print("vendor/llama.cpp matches pristine + patches")
            return 0
        if args.make_patch:
            print(f"wrote {make_patch(args.make_patch).relative_to(ROOT)}")
            return 0
        changed = sync(force=args.force)
        print("vendor/llama.cpp synced" if changed else "vendor/llama.cpp up to date")
        return 0
    except SyncError as exc:
        print(f"sync_vendor: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
