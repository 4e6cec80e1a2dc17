"""Generation local vs split across two loopback RPC servers, beside llama.cpp's own.

    python benchmarks/bench_rpc.py --threads 1 [--model default|tiny|PATH] [--json out.json]
    python benchmarks/bench_rpc.py --smoke          # tiny counts: checks that it still works

Sides, each generating ``--tg`` tokens greedily (ignore_eos) after a
``--pp``-word prompt, one stream:

* **runner, local**: ``Runner.spawn(model, n_gpu_layers=0)``, the CPU only;
* **runner, split**: two ``llama-runner rpc-server`` processes on 127.0.0.1
  serving their CPU (``--threads`` each), and a runner with
  ``rpc_servers=[both]`` and ``--n-gpu-layers`` (default -1: every layer on
  the servers, the runner keeping the input embeddings);
* **llama.cpp**, when ``build/peers-rpc/bin`` holds llama-batched-bench and
  rpc-server built with ``GGML_RPC=ON`` (the command is printed when it does
  not): S_TG at B=1 with ``-ngl 0``, then with ``--rpc`` to two of its own
  rpc-servers and the same ``-ngl``.

The runner's rate is eval_count / eval_duration of its final (first generated
token to the end); llama-batched-bench's S_TG is the same window.  Bytes moved
are what the servers' connections carried both ways (the kernel's tcp_info
bytes_received + bytes_sent of each server's socket, read with ``ss -ti``)
during a completion: per generated token from the difference between a ``1 + tg`` and
a one-token completion of equal-length prompts, and per prompt token from the
one-token completion.  Medians of ``--repeat`` runs, the four sides taking
turns within each.
On a loaded machine every rate is noisy; the ratios in the same run are what
to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runner.bench.harness import OPTIONS, cpu_model, filler_text  # noqa: E402
from runner.model import rpc  # noqa: E402
from runner.model.models import resolve_model  # noqa: E402
from runner.process.client import Runner  # noqa: E402
import tiny_model  # noqa: E402

PEERS = ROOT / "build" / "peers-rpc" / "bin"
PEER_BUILD = ("cmake -S vendor/llama.cpp -B build/peers-rpc -G Ninja -DCMAKE_BUILD_TYPE=Release "
              "-DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=ON "
              "-DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF -DGGML_RPC=ON -DGGML_RPC_RDMA=OFF && "
              "cmake --build build/peers-rpc --target llama-batched-bench ggml-rpc-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_bytes(port: int) -> int:
    """Bytes received plus bytes sent on the established TCP connections of
    local port ``port`` (the kernel's tcp_info counters, through ``ss -ti``)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    total = 0
    for match in re.finditer(r"\bbytes_(?:sent|received):(\d+)", out):
        total += int(match.group(1))
    return total


class Servers:
    """Two RPC server processes on 127.0.0.1: ours, or llama.cpp's rpc-server."""

    def __init__(self, threads: int, peer: bool = False) -> None:
        self.endpoints: list[str] = []
        self.processes: list[subprocess.Popen] = []
        for _ in range(2):
            port = free_port()
            if peer:
                cmd = [str(PEERS / "ggml-rpc-server"), "-p", str(port), "-t", str(threads)]
            else:
                cmd = [sys.executable, "-m", "runner.cli", "rpc-server", "--port", str(port),
                       "--threads", str(threads)]
            self.processes.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.endpoints.append(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for endpoint in self.endpoints:
            while True:
                try:
                    rpc.probe(endpoint)
                    break
                except rpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def moved(self) -> int:
        return sum(tcp_bytes(int(e.rpartition(":")[2])) for e in self.endpoints)

    def close(self) -> None:
        for p in self.processes:
            p.kill()
            p.wait()


def completion(runner: Runner, prompt: str, n: int):
    _, final = runner.complete(prompt, **{**OPTIONS, "num_predict": n}).text()
    if final.done_reason != "length" or final.eval_count != n:
        raise RuntimeError(f"completion ended {final.done_reason}: {final.error}")
    return final


def runner_rate(runner: Runner, seed: int, pp: int, tg: int) -> float:
    final = completion(runner, filler_text(seed, pp), tg)
    return final.eval_count / final.eval_duration


def runner_bytes(runner: Runner, servers: Servers, seed: int, pp: int, tg: int) -> dict:
    before = servers.moved()
    first = completion(runner, filler_text(seed, pp), 1)
    middle = servers.moved()
    completion(runner, filler_text(seed + 1, pp), 1 + tg)
    after = servers.moved()
    one, full = middle - before, after - middle
    return {"per_generated_token": (full - one) / tg,
            "per_prompt_token": one / max(first.prompt_eval_count, 1)}


def batched_bench(model: str, threads: int, ngl: int, pp: int, tg: int, rpc_list: str | None) -> float:
    cmd = [str(PEERS / "llama-batched-bench"), "-m", model, "-c", "2048", "-b", "512",
           "-npp", str(pp), "-ntg", str(tg), "-npl", "1", "-t", str(threads), "-tb", str(threads),
           "-ngl", str(ngl), "-fa", "auto"]
    if rpc_list:
        cmd += ["--rpc", rpc_list]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cols) == 10 and cols[0].isdigit():
            return float(cols[7])
    raise RuntimeError(f"no S_TG in llama-batched-bench's output:\n{out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="default, tiny, or a GGUF path")
    ap.add_argument("--threads", type=int, default=1, help="threads of the runner and of each server")
    ap.add_argument("--n-gpu-layers", type=int, default=-1, help="layers on the servers (-1: all)")
    ap.add_argument("--pp", type=int, default=64, help="prompt words")
    ap.add_argument("--tg", type=int, default=64, help="tokens generated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, metavar="FILE")
    ap.add_argument("--smoke", action="store_true", help="tiny counts, no peer")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.pp, args.tg, args.repeat = "tiny", 8, 8, 1
    model = str(resolve_model(tiny_model.resolve(args.model)))
    peer = not args.smoke and (PEERS / "ggml-rpc-server").exists() and (PEERS / "llama-batched-bench").exists()
    ngl = 99 if args.n_gpu_layers < 0 else args.n_gpu_layers

    rates: dict[str, list[float]] = {"runner_local": [], "runner_split": []}
    if peer:
        rates["llama_local"], rates["llama_split"] = [], []
    else:
        print(f"(no llama.cpp side: build it with\n  {PEER_BUILD})", file=sys.stderr)
    moved: list[dict] = []
    ours = Servers(args.threads)
    theirs = Servers(args.threads, peer=True) if peer else None  # idle ones wait in accept()
    try:
        common = {"n_ctx": 2048, "n_threads": args.threads}
        local = Runner.spawn(model, n_gpu_layers=0, **common)
        split = Runner.spawn(model, n_gpu_layers=args.n_gpu_layers, rpc_servers=ours.endpoints, **common)
        placement = split.info(timeout=60).engine["layer_devices"]
        with local, split:
            for side in (local, split):  # warm-up
                completion(side, filler_text(7, args.pp), 2)
            # The four sides take turns within every repeat: a loaded
            # machine's drift then touches all of them alike.
            for r in range(args.repeat):
                rates["runner_local"].append(runner_rate(local, 100 + r, args.pp, args.tg))
                rates["runner_split"].append(runner_rate(split, 200 + r, args.pp, args.tg))
                if theirs is not None:
                    rates["llama_local"].append(batched_bench(model, args.threads, 0, args.pp, args.tg, None))
                    rates["llama_split"].append(batched_bench(model, args.threads, ngl, args.pp, args.tg,
                                                              ",".join(theirs.endpoints)))
                moved.append(runner_bytes(split, ours, 300 + 2 * r, args.pp, args.tg))
    finally:
        ours.close()
        if theirs is not None:
            theirs.close()

    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "model": model, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
        "pp_words": args.pp, "tg": args.tg, "repeat": args.repeat, "n_gpu_layers": args.n_gpu_layers,
        "placement": placement, "tok_s": med, "runs": rates,
        "split_over_local": {"runner": med["runner_split"] / med["runner_local"]},
        "bytes_per_generated_token": statistics.median(m["per_generated_token"] for m in moved),
        "bytes_per_prompt_token": statistics.median(m["per_prompt_token"] for m in moved),
    }
    if peer:
        result["split_over_local"]["llama.cpp"] = med["llama_split"] / med["llama_local"]
        result["runner_over_llama"] = {"local": med["runner_local"] / med["llama_local"],
                                       "split": med["runner_split"] / med["llama_split"]}
    print(f"{Path(model).name}, {args.threads} thread(s) per process, pp {args.pp} words, tg {args.tg}, "
          f"median of {args.repeat}")
    layers = placement["layers"]
    print("placement: " + ", ".join(f"{d}: {layers.count(d)}" for d in dict.fromkeys(layers))
          + f", output on {placement['output']}")
    for name, value in med.items():
        print(f"  {name:<13} {value:8.1f} tok/s")
    for name, value in result["split_over_local"].items():
        print(f"  split/local ({name}): {value:.2f}")
    for name, value in result.get("runner_over_llama", {}).items():
        print(f"  runner/llama.cpp ({name}): {value:.2f}")
    print(f"  bytes moved per generated token: {result['bytes_per_generated_token'] / 1024:.1f} KiB, "
          f"per prompt token: {result['bytes_per_prompt_token'] / 1024:.1f} KiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
