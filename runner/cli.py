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


# generate's sampling flags: (flag, CompletionOptions field, type, what it does).
# Each defaults to None and is left out of the request unless given, so
# CompletionOptions' own default applies (the help shows it).
_SAMPLING_FLAGS = (
    ("--temperature", "temperature", float, "0 = greedy"),
    ("--top-k", "top_k", int, "0 disables"),
    ("--top-p", "top_p", float, "1.0 disables"),
    ("--min-p", "min_p", float, "0.0 disables"),
    ("--typical-p", "typical_p", float, "1.0 disables"),
    ("--repeat-last-n", "repeat_last_n", int, "penalty window; 0 disables the penalties, -1 = context"),
    ("--repeat-penalty", "repeat_penalty", float, "1.0 disables"),
    ("--frequency-penalty", "frequency_penalty", float, "subtracted once per occurrence in the window"),
    ("--presence-penalty", "presence_penalty", float, "subtracted for every token seen in the window"),
    ("--seed", "seed", int, "negative: random"),
)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from runner.engine.requests import CompletionOptions

    g = p.add_argument_group("sampling")
    for flag, name, kind, what in _SAMPLING_FLAGS:
        g.add_argument(flag, dest=name, type=kind, default=None,
                       help=f"{what} (default {getattr(CompletionOptions, name)})")
    g.add_argument("--grammar-file", default=None, help="GBNF grammar constraining the output")


def _gpu_layers(text: str) -> int | str:
    """``--n-gpu-layers``: "auto" or an integer >= -1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "auto" or an integer, not {text!r}') from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"expected -1 (all) or more, not {value}")
    return value


def _add_context_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("context")
    g.add_argument("--ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    g.add_argument("--batch", type=int, default=512, help="n_batch (default 512)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--n-gpu-layers", type=_gpu_layers, default="auto",
                   help='layers to offload: "auto" (default: as many as fit, see docs/design.md), N, or -1 (all)')
    g.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")


def _completion_options(args: argparse.Namespace) -> dict:
    """The generate command's sampling options, as CompletionOptions fields."""
    options = {"num_predict": args.n_predict}
    for _flag, name, _kind, _what in _SAMPLING_FLAGS:
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.grammar_file:
        with open(args.grammar_file, encoding="utf-8") as f:
            options["grammar"] = f.read()
    lora_scales = getattr(args, "lora_scale", None)
    if lora_scales:
        options["lora"] = [_lora_scale(text) for text in lora_scales]
    return options


def _lora_scale(text: str) -> dict:
    """generate --lora-scale ID=SCALE as an entry of the ``lora`` option."""
    ident, sep, scale = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return {"id": int(ident), "scale": float(scale)}
    except ValueError:
        raise SystemExit(f"--lora-scale takes ID=SCALE (e.g. 0=0.5), got {text!r}") from None


def _media_prompt(args: argparse.Namespace) -> tuple[str, list[bytes]]:
    """The prompt and the bytes of ``--image`` files; a prompt that places
    none of them gets ``[img-0] [img-1] ...`` in front."""
    media = []
    for path in args.image:
        with open(path, "rb") as f:
            media.append(f.read())
    prompt = args.prompt
    if media and "[img-" not in prompt and "<__media__>" not in prompt:
        prompt = " ".join(f"[img-{i}]" for i in range(len(media))) + "\n" + prompt
    return prompt, media


def _chat_messages(args: argparse.Namespace, prompt: str) -> list[dict]:
    """generate --chat: the user's message, after the --system one if given."""
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    return messages + [{"role": "user", "content": prompt}]


def _chat_prompt(model, args: argparse.Namespace, prompt: str) -> str:
    """generate --chat in-process: the messages rendered with the model's template."""
    from runner.process.chat import ChatRequest, ChatTemplates

    return ChatTemplates(model).render(ChatRequest(messages=_chat_messages(args, prompt))).prompt


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.system is not None and not args.chat:
        raise SystemExit("--system needs --chat")
    if args.endpoint:
        return _generate_remote(args)
    if args.image or args.mmproj or args.lora:
        return _generate_engine(args)
    from runner import _llama
    from runner.engine.requests import CompletionOptions
    from runner.generate import GenerationStats, generate
    from runner.model.models import resolve_model

    path = resolve_model(args.model)
    options = CompletionOptions.from_dict(_completion_options(args))
    progress = _progress_bar() if sys.stderr.isatty() and not args.quiet else None
    if args.rpc:
        from runner.model import rpc

        rpc.add_servers(rpc.parse_endpoints(args.rpc))
    from runner.engine.core import EngineConfig
    from runner.model.placement import place_load

    # the same placement a served load gets (one sequence, no host cache)
    placed = place_load(EngineConfig(path, n_ctx=args.ctx, n_batch=args.batch, n_gpu_layers=args.n_gpu_layers,
                                     flash_attn=args.flash_attn, cache_ram_mb=0))
    model = _llama.Model(path, n_gpu_layers=placed.n_gpu_layers, tensor_split=placed.tensor_split,
                         progress=progress)
    if progress is not None:
        sys.stderr.write("\n")
    stats = GenerationStats()
    with model, _llama.Context(model, n_ctx=args.ctx, n_batch=args.batch, n_threads=args.threads,
                               flash_attn=args.flash_attn) as ctx:
        prompt = _chat_prompt(model, args, args.prompt) if args.chat else args.prompt
        for piece in generate(model, ctx, prompt, options, stats):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        _print_timings(stats.prompt_tokens, stats.prompt_seconds, stats.generated_tokens,
                       stats.generate_seconds, stats.done_reason)
    return 0


def _generate_engine(args: argparse.Namespace) -> int:
    """generate with media or LoRA adapters: through the in-process engine,
    which owns the projector and applies the request's adapter scales."""
    from runner.engine.core import Engine, EngineConfig
    from runner.engine.media import MediaItem
    from runner.engine.requests import CompletionOptions, CompletionRequest
    from runner.model.models import resolve_model

    if args.image and not args.mmproj:
        raise SystemExit("--image needs --mmproj (the model's multimodal projector)")
    prompt, media = _media_prompt(args)
    config = EngineConfig(resolve_model(args.model), n_ctx=args.ctx, n_batch=args.batch,
                          n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                          flash_attn=args.flash_attn, projector_path=args.mmproj,
                          lora_paths=tuple(args.lora), rpc_servers=_rpc_list(args.rpc))
    with Engine(config) as engine:
        if args.chat:
            prompt = _chat_prompt(engine.model, args, prompt)
        request = CompletionRequest(prompt=prompt, options=CompletionOptions.from_dict(_completion_options(args)),
                                    media=[MediaItem(i, data) for i, data in enumerate(media)])
        final = _print_stream(args, engine.submit(request))
    return 0 if final is not None and final.done_reason != "error" else 1


def _generate_remote(args: argparse.Namespace) -> int:
    options = _completion_options(args)
    prompt, media = _media_prompt(args)
    with _connect(args) as runner:
        if args.chat:
            stream = runner.chat(_chat_messages(args, prompt), media=media, **options)
        else:
            stream = runner.complete(prompt, media=media, **options)
        _print_stream(args, stream)
    return 0


def _add_connect_args(p: argparse.ArgumentParser, endpoint_help: str) -> None:
    """--endpoint of a running runner, and the CURVE keys to reach it with."""
    p.add_argument("--endpoint", default=None, help=endpoint_help)
    p.add_argument("--server-key", default=None, metavar="FILE",
                   help="the runner's public key (server.key from 'llama-runner keys'): connect "
                        "with CURVE security, as a runner on a non-loopback address requires")
    p.add_argument("--client-key", default=None, metavar="FILE",
                   help="this client's NAME.key_secret (its public key must be among the "
                        "runner's authorized clients); with --server-key")


def _connect(args: argparse.Namespace):
    """A Runner connected to ``--endpoint``, with CURVE keys when given."""
    from runner.process.client import Runner
    from runner.process.security import ClientKeys

    keys = None
    if args.server_key or args.client_key:
        if not (args.server_key and args.client_key):
            raise ValueError("--server-key and --client-key go together")
        keys = ClientKeys.load(args.server_key, args.client_key)
    return Runner.connect(args.endpoint, keys=keys)


def _print_stream(args: argparse.Namespace, events):
    """Write the text of a completion's chunks to stdout as they come, then
    (with --verbose) its timings to stderr; returns the Final event."""
    final = None
    for event in events:
        if hasattr(event, "text"):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        else:
            final = event
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose and final is not None:
        _print_timings(final.prompt_eval_count, final.prompt_eval_duration, final.eval_count,
                       final.eval_duration, final.done_reason, cached=final.cached_count,
                       slot=final.slot)
        if final.error:
            print(f"error: {final.error}", file=sys.stderr)
    return final


def _print_timings(n_prompt: int, prompt_s: float, n_gen: int, gen_s: float, done: str, *,
                   cached: int | None = None, slot: int | None = None) -> None:
    """generate --verbose: prompt and generation counts, times and rates, to stderr."""
    def rate(n: int, seconds: float) -> float:
        return n / seconds if seconds else 0.0

    cached_text = f" ({cached} cached)" if cached is not None else ""
    slot_text = f", slot {slot}" if slot is not None else ""
    print(f"prompt: {n_prompt} tokens{cached_text} in {prompt_s * 1000:.1f} ms "
          f"({rate(n_prompt, prompt_s):.1f} tok/s)\n"
          f"generation: {n_gen} tokens in {gen_s * 1000:.1f} ms ({rate(n_gen, gen_s):.1f} tok/s), "
          f"done: {done}{slot_text}", file=sys.stderr)


def _add_rpc_arg(p) -> None:
    p.add_argument("--rpc", default=None, metavar="HOST:PORT[,...]",
                   help="add the devices of these 'llama-runner rpc-server's before loading; "
                        "layers go to them like to GPUs (docs/rpc.md)")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    """The ``load`` request's parameters not covered by _add_context_args."""
    g = p.add_argument_group("load")
    g.add_argument("--parallel", type=int, default=1, help="slots decoded together (default 1)")
    g.add_argument("--main-gpu", type=int, default=None, metavar="N",
                   help="put the whole model on GPU N of those llama.cpp uses (default: split by layers)")
    g.add_argument("--tensor-split", default=None, help="comma-separated share per device")
    g.add_argument("--devices", default=None, help="comma-separated device names (see discover)")
    _add_rpc_arg(g)
    g.add_argument("--type-k", default="f16", help="K cache type (f16, q8_0, q4_0, ...)")
    g.add_argument("--type-v", default="f16", help="V cache type")
    g.add_argument("--no-mmap", action="store_true", help="read the model instead of mapping it")
    g.add_argument("--lora", action="append", default=[], help="LoRA adapter (repeatable)")
    g.add_argument("--mmproj", default=None, help="multimodal projector file")
    g.add_argument("--media-cache-mb", type=int, default=256,
                   help="bound on cached media embeddings in MiB (0: no cache)")
    g.add_argument("--cache-policy", choices=["single", "multi"], default="single")
    g.add_argument("--cache-ram-mb", type=int, default=256,
                   help="host memory for prompts evicted from the slots, in MiB (0: off)")
    g.add_argument("--swa-full", action="store_true",
                   help="full-size cache for sliding-window layers (more memory; prefixes stay reusable)")
    g.add_argument("--max-queue", type=int, default=64, help="requests queued beyond the slots")
    g.add_argument("--embeddings", action="store_true",
                   help="an embedding runner: the context stays in embeddings mode, completions are refused")
    g.add_argument("--pooling", choices=["none", "mean", "cls", "last", "rank"], default=None,
                   help="embedding pooling (default: the model's own, mean when it names none; rank: rerankers)")
    g.add_argument("--prefill-budget", type=int, default=256,
                   help="prompt inputs per step while other sequences generate (default 256)")
    g.add_argument("--kv-unified", action="store_true",
                   help="one KV buffer shared by all slots instead of one stream per slot")
    g.add_argument("--delivery", choices=["auto", "thread", "inline"], default="auto",
                   help="where tokens become text: a thread of its own, the loop, or auto")
    g.add_argument("--no-native-sampler", action="store_true",
                   help="sample every request with llama.cpp's CPU chain instead of the native one")
    g.add_argument("--backend-sampling", action="store_true",
                   help="sample the requests that allow it inside the decode graph, on the device that "
                        "computes it, unless a request's option backend_sampling says false (for GPU "
                        "builds; on the CPU the native chain is faster)")
    g.add_argument("--slot-save-dir", default=None, metavar="DIR",
                   help="directory for 'llama-runner slot save/restore' files (default: those ops are off)")
    g.add_argument("--burst-ms", type=float, default=30.0,
                   help="while every running request only generates, run steps natively for up to this "
                        "long before Python sees their tokens (0: one step at a time; default 30)")
    g.add_argument("--draft-room", type=int, default=16,
                   help="speculative requests' proposals fill a step up to this many inputs (0: never; default 16)")
    g.add_argument("--draft-model", default=None, metavar="GGUF",
                   help="draft model with the model's vocabulary: it proposes for speculative requests "
                        "(default: prompt lookup)")


def _rpc_list(text: str | None) -> list[str] | None:
    from runner.model.rpc import parse_endpoints

    return parse_endpoints(text) or None


def _load_params(args: argparse.Namespace) -> dict:
    def floats(text):
        return None if not text else [float(x) for x in text.split(",")]

    return {
        "n_ctx": args.ctx, "n_batch": args.batch, "parallel": args.parallel,
        "n_threads": args.threads, "n_gpu_layers": args.n_gpu_layers, "main_gpu": args.main_gpu,
        "tensor_split": floats(args.tensor_split),
        "devices": args.devices.split(",") if args.devices else None,
        "rpc_servers": _rpc_list(args.rpc),
        "flash_attn": args.flash_attn, "type_k": args.type_k, "type_v": args.type_v,
        "use_mmap": not args.no_mmap, "lora_paths": args.lora, "projector_path": args.mmproj,
        "media_cache_bytes": args.media_cache_mb << 20, "cache_policy": args.cache_policy, "max_queue": args.max_queue,
        "cache_ram_mb": args.cache_ram_mb, "swa_full": args.swa_full,
        "embeddings": args.embeddings, "pooling": args.pooling, "prefill_budget": args.prefill_budget,
        "kv_unified": args.kv_unified, "delivery": args.delivery,
        "native_sampler": not args.no_native_sampler, "backend_sampling": args.backend_sampling,
        "slot_save_dir": args.slot_save_dir,
        "draft_room": args.draft_room, "draft_model": args.draft_model, "burst_ms": args.burst_ms,
    }


def _cmd_serve(args: argparse.Namespace) -> int:
    import msgspec

    from runner.process import protocol as P
    from runner.process.security import ServerKeys
    from runner.process.server import serve

    load = None
    if not args.defer_load:
        try:
            load = msgspec.convert({"id": 0, **_load_params(args)}, P.Load)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid load parameters: {exc}") from None
    parent = os.getppid() if args.parent_pid is None else args.parent_pid
    curve = None if args.curve_dir is None else ServerKeys.load(args.curve_dir)
    return serve(args.model, args.endpoint, load, parent_pid=parent or None,
                 max_message_bytes=args.max_message_bytes, drain_timeout=args.drain_timeout,
                 workers=args.workers, curve=curve, allow_abstract_ipc=args.allow_abstract_ipc)


def _cmd_keys(args: argparse.Namespace) -> int:
    from runner.process.security import create_keys

    for path in create_keys(args.directory, args.client):
        print(path)
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from runner.process.client import Runner

    if args.endpoint:
        runner = _connect(args)
    else:
        runner = Runner.spawn(args.model, log_level=args.log_level, **_load_params(args))
    with runner:
        results = runner.embed_many(args.text, normalize=args.normalize, truncate=args.truncate)
        for text, result in zip(args.text, results):
            values = result.embedding.astype(float).round(6).tolist()  # rows under pooling none
            print(json.dumps({"text": text, "tokens": result.prompt_eval_count, "embedding": values}
                             if args.json else values))
    return 0


def _cmd_rerank(args: argparse.Namespace) -> int:
    from runner.process.client import Runner

    if args.endpoint:
        runner = _connect(args)
    else:
        runner = Runner.spawn(args.model, log_level=args.log_level, **_load_params(args))
    with runner:
        scores = runner.rerank(args.query, args.document, truncate=args.truncate)
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        print(json.dumps({"index": i, "score": round(scores[i], 6), "document": args.document[i]}))
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
    from runner.model.models import resolve_model

    with _llama.Model(resolve_model(args.model), vocab_only=True) as model:
        tokens = model.tokenize(args.text, add_special=args.add_special, parse_special=True)
        if args.json:
            print(json.dumps(tokens))
        else:
            for t in tokens:
                print(t, repr(model.token_to_piece(t, special=True).decode("utf-8", "replace")))
    return 0


def _cmd_slot(args: argparse.Namespace) -> int:
    if not args.endpoint:
        raise ValueError("llama-runner slot needs --endpoint (a runner served with --slot-save-dir)")
    with _connect(args) as runner:
        call = runner.save_slot if args.action == "save" else runner.restore_slot
        reply = call(args.slot, args.name, timeout=args.timeout)
    print(f"slot {reply.slot} {'saved to' if args.action == 'save' else 'restored from'} "
          f"{reply.name!r}: {reply.n_inputs} tokens, {reply.n_bytes} bytes, "
          f"{reply.seconds * 1000:.1f} ms ({reply.loop_seconds * 1000:.1f} ms on the engine loop)")
    return 0


def _cmd_discover(args: argparse.Namespace) -> int:
    from runner import _llama

    if args.rpc:
        from runner.model import rpc

        rpc.add_servers(rpc.parse_endpoints(args.rpc))
    devices = _llama.devices()
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    for d in devices:
        print(f"{d['index']}: {d['name']:<12} {d['type']:<5} {d['description']}  "
              f"free {d['free'] / 2**30:.1f} GiB / total {d['total'] / 2**30:.1f} GiB")
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    try:
        from runner.engine.metrics import render_prometheus
        import prometheus_client  # noqa: F401
    except ImportError:
        print("error: llama-runner metrics needs prometheus_client "
              "(pip install 'llama-runner[metrics]')", file=sys.stderr)
        return 2
    if not args.endpoint:
        print("error: llama-runner metrics needs --endpoint", file=sys.stderr)
        return 2
    import msgspec

    from runner.engine.requests import NotReady

    with _connect(args) as runner:
        try:
            reply = runner.metrics(timeout=30)
        except NotReady as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    sys.stdout.write(render_prometheus(msgspec.to_builtins(reply)).decode())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    if args.endpoint:
        import msgspec

        with _connect(args) as runner:
            reply = runner.info(timeout=30)
        print(json.dumps(msgspec.to_builtins(reply), indent=2, default=str))
        return 0
    from runner import _llama, buildinfo
    from runner.model.models import resolve_model

    build = _llama.build_info()
    # The CPU backend's library says which CPU variant ggml picked.
    cpu_library = next((be["library"] for be in build["backends"] if be["name"] == "CPU"), None)
    variant = {**buildinfo.variant(), "cpu_library": cpu_library,
               "cpu_variant": buildinfo.cpu_variant(cpu_library) if cpu_library else None}
    info = {"version": __import__("runner").__version__, "variant": variant, "build": build,
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
    if variant["variant"] is None:
        print("variant: unknown (no build record: a source tree that was never built)")
    else:
        how = "loaded from the package folder" if variant["backend_dl"] else "linked in"
        tuned = ", tuned for the build machine" if variant["native"] else ""
        print(f"variant: {variant['variant']} ({variant['distribution']}; backends "
              f"{', '.join(variant['backends'])} {how}{tuned})")
    if variant["cpu_variant"]:
        print(f"cpu variant: {variant['cpu_variant']} (picked from {len(variant['cpu_variants'])}: "
              f"{os.path.basename(cpu_library)})")
    elif cpu_library is not None:
        print(f"cpu variant: single build ({os.path.basename(cpu_library)})")
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


def _cmd_rpc_server(args: argparse.Namespace) -> int:
    from runner import _llama
    from runner.model import rpc

    _llama.set_plain_aborts()
    devices = None if not args.device else [d for v in args.device for d in v.split(",") if d]
    rpc.serve(args.host, args.port, devices=devices, n_threads=args.threads,
              cache_dir=args.cache_dir, allow_network=args.allow_network)
    return 0


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from runner.model.models import fetch_default_model

    print(fetch_default_model())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llama-runner", description=__doc__)
    ap.add_argument("--log-level", default=os.environ.get("LLAMA_RUNNER_LOG", "WARNING"),
                    help="log level for llama.cpp messages (default WARNING)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text for a prompt (streams to stdout)")
    _add_model_arg(p)
    p.add_argument("--prompt", "-p", required=True,
                   help="the prompt; with --chat, the user's message")
    p.add_argument("--chat", action="store_true",
                   help="render --prompt (and --system) with the model's chat template and "
                        "generate the assistant's answer")
    p.add_argument("--system", default=None, help="with --chat: a system message first")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate")
    p.add_argument("--verbose", "-v", action="store_true", help="print timings to stderr")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_connect_args(p, "generate through the runner listening there (--model and context "
                         "ignored)")
    p.add_argument("--mmproj", default=None, help="multimodal projector for --image")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="image or audio file placed by [img-N] in the prompt (repeatable; "
                        "prepended when the prompt places none)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="LoRA adapter to load, id 0, 1, ... in order (repeatable; each at scale 1 "
                        "unless --lora-scale says otherwise)")
    p.add_argument("--lora-scale", action="append", default=[], metavar="ID=SCALE",
                   help="run under adapter ID at SCALE; adapters not named run at scale 0 "
                        "(repeatable; with --endpoint, the ids of the runner's --lora list)")
    _add_rpc_arg(p)
    _add_context_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="run a runner process (ZeroMQ ROUTER, docs/protocol.md)")
    _add_model_arg(p)
    p.add_argument("--endpoint", default=None,
                   help="ipc://PATH or tcp://HOST:PORT (tcp://127.0.0.1:* picks a port); default: "
                        "ipc:// in a fresh private directory. The bound endpoint is printed. "
                        "Any tcp address but loopback needs --curve-dir.")
    p.add_argument("--curve-dir", default=None, metavar="DIR",
                   help="serve with CURVE security: DIR/server.key_secret is the runner's key, "
                        "DIR/authorized_clients/*.key the clients it admits (made by "
                        "'llama-runner keys DIR --client NAME'; read at start)")
    p.add_argument("--allow-abstract-ipc", action="store_true",
                   help="serve an abstract ipc://@NAME endpoint without --curve-dir: such a "
                        "socket has no file permissions, so any local user can connect")
    p.add_argument("--defer-load", action="store_true",
                   help="wait for a load request instead of loading at start")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process dies (default: the parent; 0: never)")
    p.add_argument("--max-message-bytes", type=int, default=16 << 20,
                   help="larger requests are refused (default 16 MiB)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds in-flight requests get to finish on SIGTERM (default 60)")
    p.add_argument("--workers", type=int, default=4,
                   help="threads for embedding/tokenize/info requests (default 4)")
    _add_context_args(p)
    _add_load_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("embed", help="print the embedding of each text (JSON, one per line)")
    _add_model_arg(p)
    p.add_argument("text", nargs="+")
    _add_connect_args(p, "use the runner listening there")
    p.add_argument("--normalize", action="store_true", help="scale to unit length")
    p.add_argument("--truncate", action="store_true", help="cut texts over the embedding limit")
    p.add_argument("--json", action="store_true", help="objects with text and token count")
    _add_context_args(p)
    _add_load_args(p)
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("rerank", help="score documents for a query with a reranker (JSON lines, best first)")
    _add_model_arg(p)
    p.add_argument("query")
    p.add_argument("document", nargs="+")
    _add_connect_args(p, "use the runner listening there")
    p.add_argument("--truncate", action="store_true", help="cut pairs over the embedding limit")
    _add_context_args(p)
    _add_load_args(p)
    p.set_defaults(func=_cmd_rerank)

    p = sub.add_parser("tokenize", help="print the tokens of a text")
    _add_model_arg(p)
    p.add_argument("text")
    p.add_argument("--add-special", action="store_true", help="add BOS/EOS as the model asks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("info", help="build, backends, devices (and a model's metadata)")
    p.add_argument("--model", "-m", default=None)
    _add_connect_args(p, "ask the runner listening there")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("metrics", help="a runner's running totals in the Prometheus text format")
    _add_connect_args(p, "the runner to ask (required)")
    p.set_defaults(func=_cmd_metrics)

    p = sub.add_parser("slot", help="save a slot to a file in the runner's --slot-save-dir, "
                                    "or restore one from it")
    p.add_argument("action", choices=["save", "restore"])
    p.add_argument("--slot", type=int, required=True, help="slot id (0..parallel-1)")
    p.add_argument("--name", required=True,
                   help="file name in the runner's slot directory (NAME.slot; no path)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    _add_connect_args(p, "the runner to ask (required)")
    p.set_defaults(func=_cmd_slot)

    p = sub.add_parser("discover", help="devices ggml sees, with free/total memory")
    p.add_argument("--json", action="store_true")
    _add_rpc_arg(p)
    p.set_defaults(func=_cmd_discover)

    p = sub.add_parser("keys", help="create CURVE key pairs for serve --curve-dir",
                       description="Create the runner's key pair in DIR (unless it has one) and "
                       "one per --client NAME, whose public key is also put in "
                       "DIR/authorized_clients. A client needs DIR/server.key and its "
                       "DIR/NAME.key_secret. Prints the files written.")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="create and authorize a client key pair (repeatable)")
    p.set_defaults(func=_cmd_keys)

    p = sub.add_parser("rpc-server", help="serve this host's devices to runners on other hosts "
                                          "(ggml RPC; docs/rpc.md)",
                       description="Serve this host's ggml devices over TCP with ggml's RPC "
                       "protocol, for 'serve --rpc HOST:PORT' on another host. One client at a "
                       "time. The protocol has no authentication or encryption: keep the "
                       "default loopback address and reach it through an SSH tunnel "
                       "(docs/rpc.md).")
    p.add_argument("--host", default="127.0.0.1",
                   help="IPv4 address to listen on (default 127.0.0.1); any other than loopback "
                        "needs --allow-network")
    p.add_argument("--port", type=int, default=50052, help="TCP port (default 50052)")
    p.add_argument("--device", action="append", default=[], metavar="NAME[,NAME...]",
                   help="devices to serve, as 'discover' names them (default: every GPU, "
                        "else the CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for a served CPU device (default: half the cores)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="keep large tensors a client sends in DIR by hash, so a reload of the "
                        "same model skips sending them")
    p.add_argument("--allow-network", action="store_true",
                   help="listen on a non-loopback --host. UNSAFE on any network you do not "
                        "fully trust: the RPC protocol has no authentication or encryption, and "
                        "whoever reaches the port can read and write this host's device memory "
                        "and run computations on it")
    p.set_defaults(func=_cmd_rpc_server)

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

    from runner.bench import harness as bench

    p = sub.add_parser("bench", help="time completions through a runner: rates, latencies, throughput",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)
    return ap


# libgomp (ggml's OpenMP build) lets idle worker threads spin for ~300,000
# iterations after each parallel region.  In the runner process, where every
# token must also reach the I/O threads of this process and of its client,
# that spinning starves them when decode threads use every core: one stream
# through the protocol made 49 tok/s on 2 cores with the default and 122 with
# 10,000 (benchmarks/bench_process.py).  In-process use keeps the default,
# which decodes faster when nothing else needs the cores.  libgomp reads the
# variable when it is loaded, so it is set before runner._llama is imported;
# an explicit setting in the environment wins.
SERVE_GOMP_SPINCOUNT = "10000"


def main(argv: list[str] | None = None) -> int:
    from runner.engine.requests import EngineError

    args = build_parser().parse_args(argv)
    if args.command == "serve":
        os.environ.setdefault("GOMP_SPINCOUNT", SERVE_GOMP_SPINCOUNT)
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
    except (FileNotFoundError, ValueError, RuntimeError, EngineError) as exc:
        print(f"llama-runner: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
