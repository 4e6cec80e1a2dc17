"""One image over a conversation whose system prompt changes every turn:
encoder calls and time to first token, the runner beside llama-server.

    scripts/build_peers.sh                      # builds llama-server (the peer column)
    python benchmarks/bench_media.py [--turns 5] [--repeats 3] [--json out.json]
    python benchmarks/bench_media.py --smoke --no-server   # tiny counts: checks that it still works

Each conversation attaches one image to its first user message and keeps it
there for ``--turns`` turns; every turn starts with a new system prompt
("You are assistant #k. ..."), so nothing after the first few tokens of the
previous turn's prompt can be reused from the KV cache.  The runner takes the
image's embeddings from its media cache (one encoder call per conversation);
llama-server, whose KV prefix stops before the image, encodes it again.
Assistant turns are fixed text, not what was generated, so both sides get
the same prompt to the token.  ``--repeats`` conversations run one after the
other, each with an image of its own; a turn's TTFT is the median over them.

Both sides get the same model, the same projector file, threads, n_ctx,
n_batch and one slot, and each answers one throw-away request with another
image first (the runner loads the projector without mtmd's warm-up run,
llama-server with it).  The two run turn by turn, alternating which goes
first, so that load from elsewhere on the machine falls on both alike.

The projector is written into a temporary directory by tests/mmproj.py: a
random-weight CLIP-style ViT with LLaVA's MLP (``--image-size`` /
``--patch-size`` squared image tokens); the embeddings mean nothing, the
work the encoder does is real.  The default is ViT-B's width (768, 12 heads,
FFN 3072) with 7 layers at 224 px / patch 14 = 256 image tokens, ~100 MB:
one encode takes ~180 ms on two AVX-512 EPYC cores, against ~1 s to decode
the 256 image rows into SmolLM2-135M's KV cache there, so the encoder is
the smaller part of a turn's TTFT; ``--layers`` / ``--hidden`` move it.

How encoder calls are counted:

* runner: the ``misses`` of ``info().engine["media_cache"]`` before and after
  each request; encoder time from its ``encode_seconds``.
* llama-server: its log, at verbosity 4 (``-lv 4``), has one
  ``encoding mtmd batch from idx = I, n_chunks = N`` line per call of
  mtmd_batch_encode (server-context.cpp, process_mtmd_chunk); the chunks it
  encoded are the sum of N.  Its encoder time is the gap from that line to
  the next ``decoding image batch`` line (mtmd-helper, written once the
  embeddings are out), from the log's timestamps.  The log is read once the
  request's ``stop processing`` line is in it.  The HTTP timings say nothing
  about the encoder.

TTFT is the client's: from sending the request to the first streamed token.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))   # mmproj.py: the projector writer of the test suite

from mmproj import VisionEncoder, png_bytes, write_vision_projector  # noqa: E402

from llama_server import SERVER, LlamaServer  # noqa: E402

from runner.bench.harness import OPTIONS, cpu_model, filler_text, greedy_options  # noqa: E402
from runner.engine.requests import Chunk  # noqa: E402
from runner.process.client import Runner  # noqa: E402

PLACEHOLDER = "[img-0]"   # where the image goes; the server side swaps in its own marker
IMAGE_SIZE = (320, 240)   # pixels of the PNGs sent (the projector resizes them)


# -- the conversation -------------------------------------------------------------------

QUESTIONS = ["What is in this picture?", "Which colours stand out?", "Is there any text in it?",
             "Describe the top left corner.", "What would you call it?", "Is it a photograph?",
             "How many shapes can you see?", "Summarise it in one sentence."]
ANSWERS = ["It shows a grid of small coloured squares, like noise on an old television.",
           "Mostly saturated reds, greens and blues, with no colour dominating the rest.",
           "No, there is no readable text anywhere in the picture.",
           "The top left corner is as busy as the rest: random pixels of every colour.",
           "I would call it random noise, or a test pattern.",
           "No, it looks generated rather than taken with a camera.",
           "There are no shapes, only single pixels.",
           "A picture of random coloured pixels."]


def turn_prompt(turn: int, system_words: int) -> str:
    """The prompt of turn ``turn`` (1-based), ChatML as SmolLM2 reads it; the
    image sits in the first user message as ``[img-0]``."""
    system = f"You are assistant #{turn}. " + filler_text(7, system_words)
    parts = [f"<|im_start|>system\n{system}<|im_end|>\n",
             f"<|im_start|>user\n{PLACEHOLDER}\n{QUESTIONS[0]}<|im_end|>\n"]
    for t in range(1, turn):
        parts.append(f"<|im_start|>assistant\n{ANSWERS[(t - 1) % len(ANSWERS)]}<|im_end|>\n")
        parts.append(f"<|im_start|>user\n{QUESTIONS[t % len(QUESTIONS)]}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


@dataclass
class Turn:
    """One request as a side saw it."""

    ttft_s: float               # client-side: request sent -> first streamed token
    encodes: int                # encoder calls made for this request
    encode_s: float             # time in the encoder for this request
    prompt_tokens: int          # prompt inputs in total (text tokens + image rows)
    cached_tokens: int          # of those, reused from the KV cache
    prompt_eval_s: float        # the side's own prompt time (runner: tokenize + decode;
                                # llama-server: timings.prompt_ms, encoder included)


# -- the runner -------------------------------------------------------------------------------

class RunnerSide:
    """The runner, spawned with the projector and driven through its client."""

    name = "runner"

    def __init__(self, model: str, projector: str, threads: int, n_ctx: int, n_batch: int) -> None:
        self.runner = Runner.spawn(model, projector_path=projector, n_ctx=n_ctx, n_batch=n_batch,
                                   parallel=1, n_threads=threads)

    def _media_cache(self) -> dict:
        return self.runner.info(timeout=60).engine["media_cache"]

    def turn(self, prompt: str, image: bytes, n_predict: int) -> Turn:
        before = self._media_cache()
        t0 = time.perf_counter()
        first = None
        final = None
        for event in self.runner.complete(prompt, media=[image], **greedy_options(n_predict)):
            if type(event) is Chunk:
                if first is None and event.tokens:
                    first = time.perf_counter()
            else:
                final = event
        end = time.perf_counter()
        if final is None or final.error:
            raise RuntimeError(f"runner request failed: {getattr(final, 'error', 'no final event')}")
        after = self._media_cache()
        return Turn(ttft_s=(first or end) - t0, encodes=after["misses"] - before["misses"],
                    encode_s=after["encode_seconds"] - before["encode_seconds"],
                    prompt_tokens=final.prompt_count, cached_tokens=final.cached_count,
                    prompt_eval_s=final.prompt_eval_duration)

    def close(self) -> None:
        self.runner.close()


# -- llama-server -------------------------------------------------------------------------------

ENCODE_LINE = re.compile(r"encoding mtmd batch from idx = \d+, n_chunks = (\d+)")
DECODE_LINE = re.compile(r"decoding image batch")
RELEASE_LINE = re.compile(r"stop processing")
STAMP = re.compile(r"^(?:\x1b\[[0-9;]*m)?(\d+)\.(\d+)\.(\d+)\.(\d+)")   # minutes.seconds.ms.us


def _stamp(line: str) -> float | None:
    m = STAMP.match(line)
    if m is None:
        return None
    minutes, seconds, ms, us = map(int, m.groups())
    return minutes * 60 + seconds + ms / 1e3 + us / 1e6


def count_encodes(lines: list[str]) -> tuple[int, float, int]:
    """(chunks encoded, seconds in the encoder, image batches decoded) from
    llama-server log lines at verbosity 4: each ``encoding mtmd batch`` line
    is one call, its time the gap to the next ``decoding image batch`` line."""
    chunks, seconds, decoded, started = 0, 0.0, 0, None
    for line in lines:
        m = ENCODE_LINE.search(line)
        if m:
            chunks += int(m.group(1))
            started = _stamp(line)
        elif DECODE_LINE.search(line):
            decoded += 1
            done = _stamp(line)
            if started is not None and done is not None:
                seconds += done - started
            started = None
    return chunks, seconds, decoded


class ServerSide:
    """llama-server with ``--mmproj``, logging verbosely to ``log_path`` (the
    encoder calls are counted from the log); stopped by :meth:`close`."""

    name = "llama-server"

    def __init__(self, model: str, projector: str, threads: int, n_ctx: int, n_batch: int,
                 log_path: Path) -> None:
        self.server = LlamaServer(
            ["-m", model, "--mmproj", projector, "-c", str(n_ctx), "-b", str(n_batch),
             "-ub", str(n_batch), "-t", str(threads), "-tb", str(threads), "-np", "1", "-no-kvu",
             "-fa", "auto", "-lv", "4"], log_path=log_path)
        self._read_at = 0           # log bytes already looked at
        self._requests = 0          # requests answered, = "stop processing" lines expected
        self._released = 0          # "stop processing" lines seen
        self.marker = self.server.get("/props")["media_marker"]   # random per server start
        self._new_lines()                     # skip the start-up log

    def _new_lines(self) -> list[str]:
        """Complete log lines written since the last call."""
        data = self.server.log_bytes(self._read_at)
        end = data.rfind(b"\n") + 1
        self._read_at += end
        return data[:end].decode("utf-8", "replace").splitlines()

    def _lines_of_request(self, timeout: float = 10.0) -> list[str]:
        """The log lines of the request just answered, once its slot is released."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            new = self._new_lines()
            lines += new
            self._released += sum(1 for line in new if RELEASE_LINE.search(line))
            if self._released >= self._requests:
                return lines
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server's log has no 'stop processing' line for the last "
                                   "request; is it still started with -lv 4?")
            time.sleep(0.01)

    def turn(self, prompt: str, image: bytes, n_predict: int) -> Turn:
        body = {"prompt": {"prompt_string": prompt.replace(PLACEHOLDER, self.marker),
                           "multimodal_data": [base64.b64encode(image).decode()]},
                "n_predict": n_predict, "cache_prompt": True, **OPTIONS}
        t0 = time.perf_counter()
        first = None
        timings: dict = {}
        for now, event in self.server.stream_completion(body):
            if first is None and event.get("tokens"):
                first = now
            if event.get("stop"):
                timings = event.get("timings", {})
        end = time.perf_counter()
        self._requests += 1
        encodes, encode_s, decoded = count_encodes(self._lines_of_request())
        if decoded and not encodes:
            # The server keeps encoded media only within one request (slot.mbatch
            # is reset with the slot), so image rows decoded without an encode
            # line means the line has changed, not that the encoder was spared.
            raise RuntimeError("llama-server decoded image rows but logged no 'encoding mtmd "
                               "batch' line: its log format has changed; see count_encodes")
        cached = timings.get("cache_n", 0)
        return Turn(ttft_s=(first or end) - t0, encodes=encodes, encode_s=encode_s,
                    prompt_tokens=cached + timings.get("prompt_n", 0), cached_tokens=cached,
                    prompt_eval_s=timings.get("prompt_ms", 0.0) / 1e3)

    def close(self) -> None:
        self.server.close()


# -- the run --------------------------------------------------------------------------------------

SMOKE = {"turns": 2, "repeats": 1, "n_predict": 2, "n_ctx": 512, "system_words": 8,
         "image_size": 32, "patch_size": 8, "hidden": 32, "n_head": 4, "n_ff": 48, "layers": 2,
         "proj_hidden": 64}


def projector_shape(args: argparse.Namespace) -> VisionEncoder:
    return VisionEncoder(image_size=args.image_size, patch_size=args.patch_size, hidden=args.hidden,
                         n_head=args.n_head, n_ff=args.n_ff, n_layer=args.layers,
                         proj_hidden=args.proj_hidden)


def run(args: argparse.Namespace, workdir: Path) -> dict:
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if not args.quiet else (lambda _: None)
    shape = projector_shape(args)
    projector = str(write_vision_projector(workdir / "mmproj.gguf", **asdict(shape)))
    say(f"projector: {shape.n_tokens} image tokens, {Path(projector).stat().st_size / 2**20:.1f} MiB")

    common = (args.model, projector, args.threads, args.n_ctx, args.n_batch)
    sides: list = []
    results: dict = {"runner": [], "llama-server": None, "server_skipped": None}
    load_before = os.getloadavg()[0]
    try:
        say("starting the runner")
        sides.append(RunnerSide(*common))
        if args.no_server:
            results["server_skipped"] = "--no-server"
        elif not SERVER.exists():
            results["server_skipped"] = f"{SERVER} is missing: run scripts/build_peers.sh first"
        else:
            say("starting llama-server")
            log = Path(args.server_log) if args.server_log else workdir / "llama-server.log"
            sides.append(ServerSide(*common, log_path=log))
            results["llama-server"] = []
        if results["server_skipped"]:
            say(f"llama-server column skipped: {results['server_skipped']}")

        warm_up = png_bytes(*IMAGE_SIZE, seed=10_000)
        for side in sides:
            side.turn("<|im_start|>user\nWarm up: [img-0]<|im_end|>\n", warm_up, 2)

        for r in range(args.repeats):
            image = png_bytes(*IMAGE_SIZE, seed=r)
            for side in sides:
                results[side.name].append([])
            for t in range(1, args.turns + 1):
                prompt = turn_prompt(t, args.system_words)
                order = sides if (r + t) % 2 else sides[::-1]
                for side in order:
                    results[side.name][r].append(asdict(side.turn(prompt, image, args.n_predict)))
                say(f"conversation {r + 1}/{args.repeats}, turn {t}/{args.turns}: " + ", ".join(
                    f"{side.name} {results[side.name][r][-1]['ttft_s'] * 1e3:.0f} ms" for side in sides))
    finally:
        for side in sides:
            side.close()
    return {"projector": {**asdict(shape), "image_tokens": shape.n_tokens,
                          "file_bytes": Path(projector).stat().st_size},
            "load_average": [load_before, os.getloadavg()[0]],   # 1-minute, before and after
            **results, "summary": summarise(results, args.turns)}


def summarise(results: dict, turns: int) -> dict:
    """Per side: median TTFT of each turn (over the conversations), median
    TTFT over turns 2+, encoder calls per conversation."""
    out: dict = {}
    for name in ("runner", "llama-server"):
        convs = results.get(name)
        if not convs:
            continue
        per_turn = [statistics.median(c[t]["ttft_s"] for c in convs) for t in range(turns)]
        later = [c[t]["ttft_s"] for c in convs for t in range(1, turns)]
        out[name] = {
            "ttft_s_per_turn": per_turn,
            "encodes_per_turn": [[c[t]["encodes"] for c in convs] for t in range(turns)],
            "encode_s_per_turn": [statistics.median(c[t]["encode_s"] for c in convs)
                                  for t in range(turns)],
            "turn1_ttft_s": per_turn[0],
            "later_ttft_s": statistics.median(later) if later else None,
            "encodes_per_conversation": [sum(t["encodes"] for t in c) for c in convs],
            "encodes_total": sum(t["encodes"] for c in convs for t in c),
        }
    if "llama-server" in out and out["runner"]["later_ttft_s"] and out["llama-server"]["later_ttft_s"]:
        out["later_ttft_runner_over_server"] = (out["runner"]["later_ttft_s"]
                                                / out["llama-server"]["later_ttft_s"])
    return out


def _counts(values: list[int]) -> str:
    """One number when every conversation agrees, else each one."""
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


def report(doc: dict, args: argparse.Namespace) -> str:
    p, s = doc["projector"], doc["summary"]
    run_, srv = s["runner"], s.get("llama-server")
    out = [f"model {Path(args.model).name}, {args.threads} threads, n_ctx {args.n_ctx}, "
           f"n_batch {args.n_batch}, 1 slot, {cpu_model()}",
           f"projector: random-weight ViT {p['image_size']}px / patch {p['patch_size']} = "
           f"{p['image_tokens']} image tokens, hidden {p['hidden']}, {p['n_layer']} layers, "
           f"FFN {p['n_ff']} ({p['file_bytes'] / 2**20:.1f} MiB)",
           f"{args.repeats} conversation(s) x {args.turns} turns, one image each, new system prompt "
           f"every turn; {args.n_predict} tokens generated; TTFT = median over the conversations", ""]
    if srv is None:
        out.append(f"llama-server: skipped ({doc['server_skipped']})")
        out.append("")
    conv0 = doc["runner"][0]
    out.append(f"{'turn':>4} {'prompt':>6} {'runner TTFT ms':>14} {'encodes':>7} {'encode ms':>9} "
               f"{'server TTFT ms':>14} {'encodes':>7} {'encode ms':>9}")
    for t in range(args.turns):
        row = (f"{t + 1:>4} {conv0[t]['prompt_tokens']:>6} {run_['ttft_s_per_turn'][t] * 1e3:>14.1f} "
               f"{_counts(run_['encodes_per_turn'][t]):>7} {run_['encode_s_per_turn'][t] * 1e3:>9.1f} ")
        if srv is None:
            row += f"{'-':>14} {'-':>7} {'-':>9}"
        else:
            row += (f"{srv['ttft_s_per_turn'][t] * 1e3:>14.1f} {_counts(srv['encodes_per_turn'][t]):>7} "
                    f"{srv['encode_s_per_turn'][t] * 1e3:>9.1f}")
        out.append(row)
    out.append("")
    later = "median TTFT, turn" + (f"s 2-{args.turns}" if args.turns > 2 else " 2")
    if run_["later_ttft_s"] is None:
        out.append(f"{later}: - (one turn only)")
    elif srv is None:
        out.append(f"{later}: runner {run_['later_ttft_s'] * 1e3:.1f} ms")
    else:
        out.append(f"{later}: runner {run_['later_ttft_s'] * 1e3:.1f} ms, llama-server "
                   f"{srv['later_ttft_s'] * 1e3:.1f} ms, runner/server "
                   f"{s['later_ttft_runner_over_server']:.2f}")
    enc = f"encoder calls per conversation: runner {_counts(run_['encodes_per_conversation'])}"
    if srv is not None:
        enc += f", llama-server {_counts(srv['encodes_per_conversation'])}"
    out.append(enc + f" (total over {args.repeats}: runner {run_['encodes_total']}"
               + (f", llama-server {srv['encodes_total']})" if srv is not None else ")"))
    if srv is not None:
        mismatch = [t + 1 for t in range(args.turns)
                    if conv0[t]["prompt_tokens"] != doc["llama-server"][0][t]["prompt_tokens"]]
        if mismatch:
            out.append(f"note: the two sides counted different prompt lengths at turn(s) {mismatch}")
    before, after = doc["load_average"]
    out.append(f"load average (1 min): {before:.2f} before the run, {after:.2f} at its end "
               f"(its own ~1-2 included), {os.cpu_count()} cores")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="conversations, each with its own image")
    ap.add_argument("--n-predict", type=int, default=8, help="tokens generated per turn")
    ap.add_argument("--system-words", type=int, default=24, help="words of system prompt after '#k.'")
    g = ap.add_argument_group("projector (random weights, written into a temporary directory)")
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--patch-size", type=int, default=14)
    g.add_argument("--hidden", type=int, default=768)
    g.add_argument("--n-head", type=int, default=12)
    g.add_argument("--n-ff", type=int, default=3072)
    g.add_argument("--layers", type=int, default=7,
                   help="encoder layers (the llava graph runs all but the last)")
    g.add_argument("--proj-hidden", type=int, default=576, help="width inside the MLP projector")
    ap.add_argument("--no-server", action="store_true", help="the runner only")
    ap.add_argument("--server-log", default=None, help="keep llama-server's log here (default: "
                    "a temporary file)")
    ap.add_argument("--smoke", action="store_true", help="tiny counts and projector (the test suite's run)")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    if args.turns < 1 or args.repeats < 1:
        ap.error("--turns and --repeats must be >= 1")
    from runner.model.models import resolve_model

    args.model = str(resolve_model(args.model))
    with tempfile.TemporaryDirectory(prefix="bench-media-") as workdir:
        results = run(args, Path(workdir))
    print(report(results, args))
    if args.json:
        given = sys.argv[1:] if argv is None else argv
        doc = {"date": time.strftime("%F %T"), "command": shlex.join(["benchmarks/bench_media.py", *given]),
               "machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "settings": vars(args), **results}
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
