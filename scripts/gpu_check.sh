#!/usr/bin/env bash
# The engine and process benchmarks on a machine with an NVIDIA GPU, beside
# llama-batched-bench compiled in the same build against the same ggml (so
# ggml-cuda is compiled once, for both).  Two halves, because such a machine
# reaches no network and takes at most 64 MiB of files with a call:
#
#   scripts/gpu_check.sh pack     on a development checkout (vendor synced,
#                                 PyPI reachable): fills .gpu/ (kept out of
#                                 git by .git/info/exclude) with
#                                   vendor.tar.xz  vendor/llama.cpp as patched, without
#                                                  docs, models, tests and other backends
#                                   wheels/        what the GPU machine's Python (3.12) lacks
#                                   tiny.gguf      the tiny fast-decode model
#   scripts/gpu_check.sh device   on the GPU machine, from the repository root
#                                 with .gpu carried: build (CUDA where nvcc is
#                                 found; otherwise CPU, which is how this half
#                                 is tried out on a machine without a GPU),
#                                 then the benchmarks in order of importance
#                                 until GPU_CHECK_BUDGET_S seconds (default
#                                 540) after the start.  Everything goes to
#                                 $OUT (else build/gpu-check): log.txt, the
#                                 benchmarks' JSON, times.txt.
#
# With the device tool: pack here, then one call of `bash scripts/gpu_check.sh
# device` with carry [".gpu"] and timeout_s 600; on the warm machine a second
# call at once (the machine is held 30 s) rebuilds nothing and runs the
# benchmarks the first had no time for.
#
# Time.  The 144 CUDA objects for sm_90 took about 4,800 CPU-seconds on the
# 2-core development VM (nvcc 13.0; from 8 s for a small kernel file to 96 s
# for mmvq.cu; 64 s per mmq instance, 20-60 s per flash-attention one): about
# 4-6 minutes on 16 cores with the rest of ggml, leaving the first
# benchmarks 3-4 minutes of a 540 s budget.  Never measured on a GPU machine.
#
# The default model (98 MB) cannot travel; the device half writes a
# random-weight model of its shape (benchmarks/tiny_model.py --smol, Q4_1),
# whose decode costs what the default model's does.
#
# Environment: PYTHON (default python3), GPU_CHECK_CUDA=0 (a CPU build even
# where nvcc is found), GPU_ARCH (CMAKE_CUDA_ARCHITECTURES,
# default 90-real: H100/H200), GPU_CHECK_BUDGET_S, GPU_CHECK_JOBS (build jobs,
# default nproc), GPU_CHECK_THREADS (CPU threads of both benchmark sides,
# default 4), GPU_CHECK_TRIAL=1 (every benchmark once at B=1,2 on the tiny
# model: to try the commands out on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
PACK=$ROOT/.gpu

pack() {
  set -e
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  [ -f vendor/llama.cpp/CMakeLists.txt ] || { echo "vendor/llama.cpp missing: run scripts/dev.sh setup" >&2; exit 1; }
  rm -rf "$PACK" && mkdir -p "$PACK/wheels"
  # What the build reads: the top CMake files, ggml without the other
  # backends, src, include, common, vendor (headers common needs), and the
  # two tools built (mtmd, batched-bench).
  local others=(blas cann et hexagon metal musa opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn hip)
  local excl=()
  for b in "${others[@]}"; do excl+=(--exclude="llama.cpp/ggml/src/ggml-$b"); done
  tar -C vendor -cJf "$PACK/vendor.tar.xz" "${excl[@]}" \
    llama.cpp/CMakeLists.txt llama.cpp/cmake llama.cpp/LICENSE llama.cpp/ggml llama.cpp/src \
    llama.cpp/include llama.cpp/common llama.cpp/vendor llama.cpp/tools/mtmd \
    llama.cpp/tools/batched-bench llama.cpp/licenses
  # The GPU machine's image (KINDS.md) has numpy, cython, cmake, ninja,
  # jinja2, msgpack, prometheus-client, pyyaml, tqdm; not these.
  local plat=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat+=(--platform "$p")
  done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$PACK/wheels" "pyzmq==27.3.0" "msgspec==0.23.0" "gguf==0.19.0" "cython==3.3.1"
  local tiny
  tiny=$("$PY" benchmarks/tiny_model.py)
  cp "$tiny" "$PACK/tiny.gguf"
  du -sh "$PACK" "$PACK"/*
  local total
  total=$(( $(du -sb "$PACK" | cut -f1) + $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) ))
  echo "travels: $((total / 1048576)) MiB of 64 (tree + .gpu)"
  [ "$total" -lt $((64 * 1048576)) ] || { echo "over the 64 MiB a call may carry" >&2; exit 1; }
}

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# step NAME SECONDS_NEEDED CMD...: run CMD under the time that is left
# (never starting one that cannot have SECONDS_NEEDED), logging how long it
# took.  A benchmark (bench-*) that ended well leaves a mark in the build
# folder and is not run again: a second call on the same (still warm)
# machine runs the ones the first had no time for.
step() {
  local name=$1 need=$2
  shift 2
  local l mark=$ROOT/build/gpu/done/$name
  if [[ $name == bench-* && -f $mark ]]; then
    echo "== $name: done in an earlier call"
    return 0
  fi
  l=$(left)
  if [ "$l" -lt "$need" ]; then
    echo "== $name: skipped, ${l}s left (needs ${need}s)"
    [[ $name == bench-* ]]  # a build step that could not run ends the call
    return
  fi
  echo "== $name ($(date +%T), ${l}s left)"
  local t=$(date +%s)
  timeout --kill-after=5 "$l" "$@"
  local rc=$?
  echo "== $name: rc $rc in $(( $(date +%s) - t ))s"
  echo "$name $(( $(date +%s) - t ))s rc=$rc" >> "$RESULTS/times.txt"
  if [[ $name == bench-* && $rc == 0 ]]; then
    mkdir -p "$(dirname "$mark")" && touch "$mark"
  fi
  return $rc
}

device() {
  T0=$(date +%s)
  BUDGET=${GPU_CHECK_BUDGET_S:-540}
  RESULTS=${OUT:-$ROOT/build/gpu-check}
  mkdir -p "$RESULTS"
  exec > >(tee -a "$RESULTS/log.txt") 2>&1
  echo "== $(date -u +%FT%TZ) $(uname -m), $(nproc) CPUs, budget ${BUDGET}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"

  local site=/tmp/gpu-check-site
  if ls "$PACK"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$PACK"/wheels/*.whl || echo "the wheels did not install (another Python?)"
  fi
  export PYTHONPATH=$site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  "$PY" -c "import sys, zmq, msgspec, gguf, Cython, numpy; print(sys.version.split()[0], 'zmq', zmq.__version__, 'msgspec', msgspec.__version__, 'cython', Cython.__version__)" \
    || { echo "a Python package is missing"; return 1; }
  "$PY" -c "import sysconfig, os; h = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); assert os.path.exists(h), h" \
    || { echo "Python.h is missing: the extension cannot be built with this Python"; return 1; }

  if [ ! -f vendor/llama.cpp/CMakeLists.txt ]; then
    mkdir -p vendor && tar -C vendor -xJf "$PACK/vendor.tar.xz" || { echo "no vendor tree"; return 1; }
  fi

  local nvcc gpu=()
  nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
  [ "${GPU_CHECK_CUDA:-1}" = 0 ] && nvcc=""
  if [ -n "$nvcc" ]; then
    export CUDACXX=$nvcc
    gpu=(-DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF "-DCMAKE_CUDA_ARCHITECTURES=${GPU_ARCH:-90-real}")
    echo "== CUDA: $("$nvcc" --version | tail -1)"
  else
    echo "== no nvcc: a CPU build (trying the script out)"
  fi
  local build=$ROOT/build/gpu
  local gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  local cfg=(cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON
             -DRUNNER_PEER_TOOLS=ON "-DPython_EXECUTABLE=$(command -v "$PY")" "${gpu[@]}")
  if ! step configure 30 "${cfg[@]}"; then
    # A toolkit without cuBLAS: take it from NVIDIA's pip package, if there
    # (a re-configure of the same folder finds it).
    local cublas
    cublas=$("$PY" - <<'EOF'
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
for base in (spec.submodule_search_locations if spec else []):
    for sub in ("cu13", "cublas"):
        lib = os.path.join(base, sub, "lib")
        if os.path.isdir(lib) and any(f.startswith("libcublas.so") for f in os.listdir(lib)):
            print(os.path.join(base, sub))
            raise SystemExit
EOF
)
    [ -n "$cublas" ] && cfg+=("-DRUNNER_CUBLAS_ROOT=$cublas")
    # No driver library to link (libcuda.so): ggml-cuda without its VMM pool.
    step configure-cublas 30 "${cfg[@]}" || step configure-no-vmm 30 "${cfg[@]}" -DGGML_CUDA_NO_VMM=ON || return 1
  fi
  step build 60 cmake --build "$build" --target _llama llama-batched-bench -j "${GPU_CHECK_JOBS:-$(nproc)}" || return 1
  step install 20 cmake --install "$build" --prefix "$build/stage" || return 1
  cp -a "$build"/stage/runner/. runner/
  export LLAMA_RUNNER_BATCHED_BENCH
  LLAMA_RUNNER_BATCHED_BENCH=$(find "$build" -name llama-batched-bench -type f -perm -u+x | head -1)
  export LD_LIBRARY_PATH=$ROOT/runner:$(find "$build" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  "$PY" -c "import runner._llama as m; print('== runner from', m.__file__)" || return 1
  "$PY" -m runner.cli discover || true

  mkdir -p build/bench-models
  [ -f build/bench-models/tiny-llama-64x2.gguf ] || cp "$PACK/tiny.gguf" build/bench-models/tiny-llama-64x2.gguf
  step smol-model 30 "$PY" benchmarks/tiny_model.py --smol --vocab-from build/bench-models/tiny-llama-64x2.gguf || return 1
  local smol=build/bench-models/smol-shape-q4_1.gguf tiny=build/bench-models/tiny-llama-64x2.gguf
  local th=${GPU_CHECK_THREADS:-4} r=$RESULTS
  local levels=1,8,32,64 few=1,8,32 rounds=3 tokens=256 tg=128
  if [ "${GPU_CHECK_TRIAL:-0}" = 1 ]; then  # every command once, small: trying the script out
    levels=1,2 few=1,2 rounds=1 tokens=32 tg=32 smol=$tiny
  fi

  # In order of importance; each starts only if its usual time is left.
  step bench-engine-smol 90 "$PY" benchmarks/bench_engine.py --model "$smol" --threads "$th" \
    --parallel "$levels" --tg "$tg" --burst-ms 0,30 --rounds "$rounds" --json "$r/engine_smol.json"
  # The runner's chains against the chain inside the decode graph
  # (backend_sampling), default options, burst 30 ms: the sampling the GPU
  # wheels would use.
  step bench-engine-graph-sampling 120 "$PY" benchmarks/bench_engine.py --model "$smol" --threads "$th" \
    --parallel "$levels" --tg "$tg" --burst-ms 30 --sampling cpu,graph --rounds "$rounds" \
    --options defaults --json "$r/engine_smol_graph_sampling.json"
  step bench-process-smol-asyncio 120 "$PY" benchmarks/bench_process.py --model "$smol" --peer-only \
    --threads "$th" --parallel "$levels" --tokens "$tokens" --rounds "$rounds" --consumers asyncio \
    --json "$r/process_smol_asyncio.json"
  step bench-engine-tiny-defaults 90 "$PY" benchmarks/bench_engine.py --model "$tiny" --threads "$th" \
    --parallel "$levels" --tg "$tg" --burst-ms 0,30 --rounds "$rounds" --options defaults \
    --json "$r/engine_tiny_defaults.json"
  step bench-process-tiny-threads-defaults 120 "$PY" benchmarks/bench_process.py --model "$tiny" --peer-only \
    --threads "$th" --parallel "$few" --tokens "$tokens" --rounds "$rounds" --consumers threads \
    --options defaults --json "$r/process_tiny_threads_defaults.json"
  # One n_ctx for all of its engines and batched-bench: room for 32 x 272 tokens.
  step bench-engine-smol-ttft 120 "$PY" benchmarks/bench_engine.py --model "$smol" --threads "$th" \
    --parallel "$few" --tg "$tg" --repeat "$rounds" --n-ctx 16384 --json "$r/engine_smol_ttft.json"
  echo "== done in $(( $(date +%s) - T0 ))s"
}

case "${1:-}" in
  pack) pack ;;
  device) device ;;
  *) echo "usage: scripts/gpu_check.sh pack | device" >&2; exit 2 ;;
esac
