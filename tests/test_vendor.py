"""vendor/llama.cpp must equal the pinned sdist plus patches/."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_sync():
    spec = importlib.util.spec_from_file_location("sync_vendor", ROOT / "scripts" / "sync_vendor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_patches_are_numbered_and_explained():
    patches = sorted((ROOT / "patches").glob("*.patch"))
    assert patches
    for i, p in enumerate(patches, 1):
        assert p.name.startswith(f"{i:04d}-"), p.name
        text = p.read_text()
        assert text.startswith("From:") and "Subject: [PATCH]" in text
        why = text.split("\n\n", 1)[1].split("\n---\n", 1)[0]
        assert len(why.split()) >= 20, f"{p.name} does not say why it is needed"


def test_vendor_matches_pristine_plus_patches():
    sync = load_sync()
    assert sync.check() == []


def test_hand_edit_is_detected(tmp_path):
    sync = load_sync()
    copy = tmp_path / "llama.cpp"
    # Hard links keep the copy cheap; edited files are replaced, not written through.
    shutil.copytree(sync.VENDOR, copy, copy_function=os.link, symlinks=True)
    target = copy / "src" / "llama.cpp"
    text = target.read_text()
    target.unlink()
    target.write_text(text + "\n// hand edit\n")
    (copy / "ggml" / "NEW_FILE.txt").write_text("x")
    gone = copy / "README.md"
    gone.unlink()
    problems = sync.check(copy)
    assert "modified: vendor/llama.cpp/src/llama.cpp" in problems
    assert "added: vendor/llama.cpp/ggml/NEW_FILE.txt" in problems
    assert "missing: vendor/llama.cpp/README.md" in problems
    assert sync.check() == []  # the real tree was not touched


def test_bad_patch_is_a_clear_error(tmp_path, monkeypatch):
    sync = load_sync()
    bad = tmp_path / "patches"
    bad.mkdir()
    for p in sorted((ROOT / "patches").glob("*.patch")):
        shutil.copy(p, bad / p.name)
    (bad / "0099-broken.patch").write_text(
        "From: x\nSubject: [PATCH] broken\n\nbroken on purpose\n---\n"
        "diff --git a/nonexistent.c b/nonexistent.c\n--- a/nonexistent.c\n+++ b/nonexistent.c\n"
        "@@ -1,1 +1,1 @@\n-old\n+new\n")
    monkeypatch.setattr(sync, "PATCHES", bad)
    with pytest.raises(sync.SyncError, match="0099-broken.patch"):
        sync.build_expected(tmp_path)


def test_hash_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    sync = load_sync()
    monkeypatch.setattr(sync, "SDIST_SHA256", "0" * 64)
    with pytest.raises(sync.SyncError, match="does not match"):
        sync.fetch_sdist()
