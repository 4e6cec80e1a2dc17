#!/usr/bin/env bash
# Build llama.cpp's own tools from the same vendor tree, for side-by-side
# benchmarks: llama-batched-bench (the raw llama_decode limit) and
# llama-server (the peer a user would pick instead).  Output: build/peers/bin.
# Same CPU flags as the extension's default build (GGML_NATIVE=ON; AMX is
# gated at run time by patches/0001).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/sync_vendor.py >&2 || .venv/bin/python scripts/sync_vendor.py >&2
export CCACHE_BASEDIR=$(pwd) CCACHE_NOHASHDIR=1
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S vendor/llama.cpp -B build/peers "${gen[@]}" "${launcher[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF >&2
cmake --build build/peers --target llama-batched-bench llama-server -j "$(nproc)" >&2
ls build/peers/bin/llama-batched-bench build/peers/bin/llama-server
