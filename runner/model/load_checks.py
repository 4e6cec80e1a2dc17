"""Refuse model files that would abort llama.cpp, before it sees them.

llama.cpp's loader refuses most bad files by throwing, which
``llama_model_load_from_file`` turns into a NULL model and a logged reason.
But some hyperparameters reach a ``GGML_ASSERT`` instead, and that aborts the
whole process (the runner, with every stream on it). ``check_model_file``
reads the header with the project's own reader (runner.model.gguf) and refuses, with
the reason, every file the pinned llama.cpp would abort on for these causes:

* ``llama_model_base::load_hparams`` (src/llama-model.cpp) asserts that
  ``block_count`` is 1..LLAMA_MAX_LAYERS, ``nextn_predict_layers`` is at most
  ``block_count``, the expert counts are consistent (at most
  LLAMA_MAX_EXPERTS experts; used experts and expert groups only with
  experts, and fewer than them), wavtokenizer's posnet/convnext block counts,
  and that ``rope.scaling.type`` is a known name.
* ``llama_vocab::impl::load`` (src/llama-vocab.cpp) asserts that the token
  strings are distinct; tokenizing with special tokens (every prompt) asserts
  that a BOS/EOS token the file asks to add exists (``add_bos_token`` true
  with no BOS id in the vocabulary, neither the file's nor the tokenizer's
  default).
* The graph of many architectures (src/models/<arch>.cpp, listed in
  SAME_HEAD_AND_ROPE) asserts ``value_length == key_length == rope
  dimension count``; ggml's CPU rope asserts an even count. The graph is built
  when the context is created, still inside the runner's load.
* Grouped-query attention broadcasts K/V heads over the query heads: ggml
  asserts ``head_count % head_count_kv == 0`` in every layer that has KV heads.
* ggml's CPU norm, RMS-norm and group-norm kernels assert ``eps >= 0`` (a
  NaN fails too) when the first prompt runs.

Keys are checked only when llama.cpp would read them as this module does
(a UINT32 scalar, or an integer array for the per-layer keys). A key of
another type makes llama.cpp throw ("wrong type"), which is a clean refusal;
this module names it as well. Files llama.cpp refuses cleanly for other
reasons (missing keys or tensors, tensor shapes that do not match the
hyperparameters) are left to llama.cpp, whose reason the load error carries.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from runner.model.gguf import MAX_LAYERS, GGUFError, GGUFFile, SkippedArray, ValueType, read_gguf

MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS (src/llama-hparams.h)
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # LLAMA_ROPE_SCALING_TYPES (src/llama-model.cpp)
# Architectures whose graph asserts n_embd_head_v == n_embd_head_k == n_rot
# (src/models/<name>.cpp; tests/test_load_checks.py checks the list against
# the vendored source).
SAME_HEAD_AND_ROPE = frozenset(
    """apertus arcee arctic baichuan chameleon codeshell cogvlm cohere2moe dbrx deci deepseek dots1
    dream exaone falcon granite grok grovemoe hunyuan-moe internlm2 jais2 llada-moe llada llama
    llama4 maincoder mellum minimax-01 minimax-m2 mistral3 nemotron olmo olmo2 olmoe orion
    paddleocr plamo pockettts qwen2 qwen2moe qwen2vl qwen3 qwen3moe qwen3vl qwen3vlmoe rnd1
    smallthinker smollm3 starcoder2 xverse""".split()
)
# Architectures for which load_hparams resets expert_count <= 1 to "no experts".
_EXPERTS_RESET = frozenset({"hunyuan_vl", "hunyuan-dense"})
_PER_LAYER_ELEMENTS = frozenset({ValueType.UINT32, ValueType.INT32, ValueType.BOOL})  # llama.cpp get_arr
# epsilon keys (FLOAT32) the norm kernels assert non-negative
_EPSILON_KEYS = ("attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon", "attention.group_norm_epsilon")
_NO_VOCAB = frozenset({"no_vocab", "none"})  # tokenizer.ggml.model values that skip the token list
# tokenizer.ggml.model -> default (BOS, EOS) ids (llama_vocab::impl::load); None: no such token
_DEFAULT_BOS_EOS: dict[str, tuple[int | None, int | None]] = {
    "llama": (1, 2),
    "gpt2": (11, 11),
    "hybriddna": (11, 11),
    "whitespace": (11, 11),
    "t5": (None, 1),
    "rwkv": (None, None),
    "plamo2": (1, 2),
    "gemma4": (None, None),
}


class ModelFileError(GGUFError):
    """The model file is one llama.cpp would abort on, or not a GGUF header the reader accepts."""


def check_model_file(path: str | os.PathLike[str]) -> GGUFFile | None:
    """Read the header at ``path`` and raise ModelFileError naming every problem.

    Returns the header, or None when the file cannot be opened or read (a
    missing file, a directory): llama.cpp then reports that itself.
    """
    try:
        info = read_gguf(path)
    except OSError:
        return None
    except GGUFError as exc:
        raise ModelFileError(str(exc)) from None
    problems = model_problems(info)
    if problems:
        raise ModelFileError(f"{os.fspath(path)}: " + "; ".join(problems))
    return info


def model_problems(info: GGUFFile) -> list[str]:
    """Why llama.cpp would abort loading ``info`` (empty when it would not).

    A key the checks need that has an unusable type (llama.cpp throws for it)
    is reported as the problem.
    """
    try:
        if info.architecture in ("", "clip"):
            return []  # llama.cpp throws for a missing architecture and reads no hparams for clip
        return list(_hparam_problems(info)) + list(_vocab_problems(info))
    except GGUFError as exc:
        return [str(exc)]


class _Reader:
    """Typed reads of ``{arch}.*`` keys, collecting the type problems."""

    def __init__(self, info: GGUFFile) -> None:
        self.info = info  # the header
        self.problems: list[str] = []  # keys of a type llama.cpp refuses

    def u32(self, name: str, default: int = 0) -> int | None:
        """The UINT32 value of ``{arch}.name``; ``default`` if absent, None if of another type."""
        key = self.info.arch_key(name)
        f = self.info.fields.get(key)
        if f is None:
            return default
        if f.type is not ValueType.UINT32:
            self.problems.append(f"{key} is {f.type.name}; llama.cpp reads it as UINT32")
            return None
        return int(f.value)

    def per_layer(self, name: str, n_layer: int, default: tuple[int, ...]) -> tuple[int, ...] | None:
        """``{arch}.name`` as one value per layer (llama.cpp get_key_or_arr); None if unusable."""
        key = self.info.arch_key(name)
        f = self.info.fields.get(key)
        if f is None:
            return default
        if f.type is not ValueType.ARRAY:
            value = self.u32(name)
            return None if value is None else (value,) * n_layer
        if f.element_type not in _PER_LAYER_ELEMENTS or isinstance(f.value, SkippedArray):
            self.problems.append(f"{key} is an array of {f.element_type.name}; llama.cpp reads UINT32 or INT32")
            return None
        if len(f.value) != n_layer:
            self.problems.append(f"{key} has {len(f.value)} entries for {n_layer} layers")
            return None
        # INT32 elements are reinterpreted as uint32
        return tuple(int(v) & 0xFFFFFFFF for v in f.value)


def _hparam_problems(info: GGUFFile) -> Iterator[str]:
    arch = info.architecture
    r = _Reader(info)
    n_layer = r.u32("block_count", default=-1)
    if n_layer == -1 or n_layer is None:
        yield from r.problems  # missing: llama.cpp throws "key not found"
        return
    if not 1 <= n_layer <= MAX_LAYERS:
        yield f"{info.arch_key('block_count')} = {n_layer} is out of range (llama.cpp loads 1 to {MAX_LAYERS} layers)"
        return
    nextn = r.u32("nextn_predict_layers")
    if nextn is not None and nextn > n_layer:
        yield f"{info.arch_key('nextn_predict_layers')} = {nextn} is more than block_count {n_layer}"
    if arch == "wavtokenizer-dec":
        for name in ("posnet.block_count", "convnext.block_count"):
            value = r.u32(name)
            if value is not None and value > n_layer:
                yield f"{info.arch_key(name)} = {value} is more than block_count {n_layer}"
    yield from _expert_problems(info, r, n_layer)
    yield from _rope_scaling_problems(info)
    yield from _epsilon_problems(info)
    yield from _attention_problems(info, r, n_layer)
    yield from r.problems


def _expert_problems(info: GGUFFile, r: _Reader, n_layer: int) -> Iterator[str]:
    n_expert = r.u32("expert_count")
    used = r.per_layer("expert_used_count", n_layer, (0,) * n_layer)
    groups = r.u32("expert_group_count")
    group_used = r.u32("expert_group_used_count")
    if n_expert is None or used is None or groups is None or group_used is None:
        return
    if info.architecture in _EXPERTS_RESET and n_expert <= 1:
        n_expert, used = 0, (0,) * n_layer
    used_max = max(used, default=0)
    k = info.arch_key
    if n_expert > MAX_EXPERTS:
        yield f"{k('expert_count')} = {n_expert} is more than llama.cpp's limit of {MAX_EXPERTS}"
    elif used_max > n_expert:
        yield f"{k('expert_used_count')} = {used_max} is more than expert_count {n_expert}"
    elif n_expert > 0:
        if used_max == 0:
            yield f"{k('expert_used_count')} is 0 (or missing) but the model has {n_expert} experts"
        if groups >= n_expert:
            yield f"{k('expert_group_count')} = {groups} must be less than expert_count {n_expert}"
        elif groups > 1:
            if n_expert % groups:
                yield f"expert_count {n_expert} is not a multiple of {k('expert_group_count')} {groups}"
            if not 0 < group_used < groups:
                yield f"{k('expert_group_used_count')} = {group_used} must be 1 to {groups - 1}"
    elif groups:
        yield f"{k('expert_group_count')} = {groups} but the model has no experts"


def _rope_scaling_problems(info: GGUFFile) -> Iterator[str]:
    key = info.arch_key("rope.scaling.type")
    f = info.fields.get(key)
    if f is not None and f.type is ValueType.STRING and f.value not in ROPE_SCALING_TYPES:
        yield f"{key} = {f.value!r} is not one of {', '.join(ROPE_SCALING_TYPES)}"


def _epsilon_problems(info: GGUFFile) -> Iterator[str]:
    for name in _EPSILON_KEYS:
        f = info.fields.get(info.arch_key(name))
        if f is not None and f.type is ValueType.FLOAT32 and not f.value >= 0.0:
            yield f"{info.arch_key(name)} = {f.value} must be >= 0"


def _attention_problems(info: GGUFFile, r: _Reader, n_layer: int) -> Iterator[str]:
    heads = r.per_layer("attention.head_count", n_layer, (0,) * n_layer)
    if heads is None:
        return
    heads_kv = r.per_layer("attention.head_count_kv", n_layer, heads)
    if heads_kv is None:
        return
    for il, (h, hkv) in enumerate(zip(heads, heads_kv)):
        if h and hkv and h % hkv:
            yield (
                f"layer {il}: {hkv} KV heads do not divide {h} attention heads "
                f"({info.arch_key('attention.head_count_kv')})"
            )
            break
    if info.architecture not in SAME_HEAD_AND_ROPE or not heads[0]:
        return
    if any(info.arch_key(n) in info.fields for n in ("attention.key_length_swa", "attention.value_length_swa",
                                                      "rope.dimension_count_swa")):
        return  # the graph compares layer 0's sizes, which then depend on its sliding-window flag
    n_embd = r.u32("embedding_length")
    if n_embd is None:
        return
    head_k = r.u32("attention.key_length", n_embd // heads[0])
    head_v = r.u32("attention.value_length", n_embd // heads[0])
    n_rot = r.u32("rope.dimension_count", head_k if head_k is not None else 0)
    if head_k is None or head_v is None or n_rot is None:
        return
    if not head_k == head_v == n_rot:
        yield (
            f"{info.architecture} needs equal K head size, V head size and rope dimensions; "
            f"file has {head_k}, {head_v} and {n_rot} (attention.key_length, attention.value_length, "
            f"rope.dimension_count)"
        )
    elif n_rot % 2:
        yield f"rope dimension count {n_rot} is odd (ggml rotates pairs)"


def _vocab_problems(info: GGUFFile) -> Iterator[str]:
    model = info.fields.get("tokenizer.ggml.model")
    tokens = info.fields.get("tokenizer.ggml.tokens")
    if model is None or model.type is not ValueType.STRING or model.value in _NO_VOCAB:
        return
    if tokens is None or tokens.element_type is not ValueType.STRING or not isinstance(tokens.value, list):
        return  # llama.cpp throws for a missing or mistyped token list
    seen: dict[str, int] = {}
    for i, text in enumerate(tokens.value):
        word = text or f"[EMPTY_{i}]"  # what llama.cpp stores for an empty token
        first = seen.setdefault(word, i)
        # invalid UTF-8 reads as U+FFFD, so equal text proves equal bytes only without it
        if first != i and "\ufffd" not in word:
            yield f"tokenizer.ggml.tokens: token {i} {word[:40]!r} repeats token {first}"
            break
    defaults = _DEFAULT_BOS_EOS.get(model.value)
    if defaults is None:
        return  # this tokenizer's defaults are not modelled
    n_vocab = len(tokens.value)
    for which, default in zip(("bos", "eos"), defaults):
        add = info.fields.get(f"tokenizer.ggml.add_{which}_token")
        if add is None or add.type is not ValueType.BOOL or not add.value:
            continue
        explicit = info.fields.get(f"tokenizer.ggml.{which}_token_id")
        if explicit is not None and explicit.type is ValueType.UINT32 and explicit.value < n_vocab:
            continue
        if default is not None and default < n_vocab:
            continue
        yield (
            f"tokenizer.ggml.add_{which}_token is true but the {n_vocab}-token vocabulary has no "
            f"{which.upper()} token (tokenizer.ggml.{which}_token_id)"
        )
