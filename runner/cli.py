"""``llama-runner`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="default",
                   help="GGUF file, or 'default' for SmolLM2-135M-Instruct Q4_1 (default)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--typical-p", type=float, default=1.0)
    g.add_argument("--repeat-last-n", type=int, default=64)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--grammar-file", default=None, help="GBNF grammar constraining the output")


def _add_context_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("context")
    g.add_argument("--ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    g.add_argument("--batch", type=int, default=512, help="n_batch (default 512)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--n-gpu-layers", type=int, default=-1, help="layers to offload (-1 = all)")
    g.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")


def _cmd_generate(args: argparse.Namespace) -> int:
    from runner import _llama
    from runner.generate import GenerationStats, SamplingOptions, generate
    from runner.models import resolve_model

    path = resolve_model(args.model)
    grammar = None
    if args.grammar_file:
        with open(args.grammar_file, encoding="utf-8") as f:
            grammar = f.read()
    options = SamplingOptions(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        typical_p=args.typical_p, repeat_last_n=args.repeat_last_n,
        repeat_penalty=args.repeat_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, seed=args.seed, grammar=grammar)
    progress = _progress_bar() if sys.stderr.isatty() and not args.quiet else None
    model = _llama.Model(path, n_gpu_layers=args.n_gpu_layers, progress=progress)
    if progress is not None:
        sys.stderr.write("\n")
    stats = GenerationStats()
    with model, _llama.Context(model, n_ctx=args.ctx, n_batch=args.batch, n_threads=args.threads,
                               flash_attn=args.flash_attn) as ctx:
        for piece in generate(model, ctx, args.prompt, args.n_predict, options, stats):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        pe = stats.prompt_tokens / stats.prompt_seconds if stats.prompt_seconds else 0.0
        ge = stats.generated_tokens / stats.generate_seconds if stats.generate_seconds else 0.0
        print(f"prompt: {stats.prompt_tokens} tokens in {stats.prompt_seconds * 1000:.1f} ms "
              f"({pe:.1f} tok/s)\n"
              f"generation: {stats.generated_tokens} tokens in {stats.generate_seconds * 1000:.1f} ms "
              f"({ge:.1f} tok/s), done: {stats.done_reason}", file=sys.stderr)
    return 0


def _progress_bar():
    def show(fraction: float) -> bool:
        width = 30
        done = int(fraction * width)
        sys.stderr.write(f"\rloading [{'#' * done}{'.' * (width - done)}] {fraction * 100:5.1f}%")
        sys.stderr.flush()
        return True
    return show


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from runner import _llama
    from runner.models import resolve_model

    with _llama.Model(resolve_model(args.model), vocab_only=True) as model:
        tokens = model.tokenize(args.text, add_special=args.add_special, parse_special=True)
        if args.json:
            print(json.dumps(tokens))
        else:
            for t in tokens:
                print(t, repr(model.token_to_piece(t, special=True).decode("utf-8", "replace")))
    return 0


def _cmd_discover(args: argparse.Namespace) -> int:
    from runner import _llama

    devices = _llama.devices()
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    for d in devices:
        print(f"{d['index']}: {d['name']:<12} {d['type']:<5} {d['description']}  "
              f"free {d['free'] / 2**30:.1f} GiB / total {d['total'] / 2**30:.1f} GiB")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from runner import _llama
    from runner.models import resolve_model

    info = {"version": __import__("runner").__version__, "build": _llama.build_info(),
            "devices": _llama.devices()}
    if args.model:
        with _llama.Model(resolve_model(args.model), vocab_only=True) as model:
            info["model"] = {
                "path": model.path, "description": model.description, "n_vocab": model.n_vocab,
                "n_params": model.n_params, "size": model.size, "ftype": model.ftype_name,
                "n_ctx_train": model.n_ctx_train, "n_embd": model.n_embd, "n_layer": model.n_layer,
                "metadata": model.metadata(),
            }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    b = info["build"]
    print(f"llama-runner {info['version']} (llama.cpp {b['llama_version']}, ggml {b['ggml_version']} {b['ggml_commit']})")
    for be in b["backends"]:
        feats = " ".join(k if v == "1" else f"{k}={v}" for k, v in be["features"].items())
        print(f"backend {be['name']}: {be['devices']} device(s) {feats}")
    print(f"system: {b['system_info']}")
    for d in info["devices"]:
        print(f"device {d['index']}: {d['name']} ({d['type']}) {d['description']}")
    if "model" in info:
        m = info["model"]
        print(f"model: {m['description']} {m['ftype']}, {m['n_params']:,} params, "
              f"ctx {m['n_ctx_train']}, {m['n_layer']} layers ({m['path']})")
    return 0


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from runner.models import fetch_default_model

    print(fetch_default_model())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llama-runner", description=__doc__)
    ap.add_argument("--log-level", default=os.environ.get("LLAMA_RUNNER_LOG", "WARNING"),
                    help="log level for llama.cpp messages (default WARNING)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text for a prompt (streams to stdout)")
    _add_model_arg(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate")
    p.add_argument("--verbose", "-v", action="store_true", help="print timings to stderr")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_context_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("tokenize", help="print the tokens of a text")
    _add_model_arg(p)
    p.add_argument("text")
    p.add_argument("--add-special", action="store_true", help="add BOS/EOS as the model asks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("info", help="build, backends, devices (and a model's metadata)")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("discover", help="devices ggml sees, with free/total memory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_discover)

    p = sub.add_parser("fetch-model", help="download the default model into the cache")
    p.set_defaults(func=_cmd_fetch_model)

    try:
        from runner import inspect_cmd
    except ImportError:
        inspect_cmd = None
    if inspect_cmd is not None:
        p = sub.add_parser("inspect", help="GGUF metadata and memory estimate (no load)")
        inspect_cmd.add_arguments(p)
        p.set_defaults(func=inspect_cmd.run)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        from runner import _llama
        _llama.set_log_level(level)
    except ImportError:
        pass
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"llama-runner: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
