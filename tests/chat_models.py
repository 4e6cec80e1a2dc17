"""Tiny random-weight models carrying the chat templates of model families.

Each is the benchmarks' tiny llama (1 layer of width 64) with the default
model's tokenizer, except what a chat template reads from the vocabulary:
the texts of BOS and EOS (tokens 1 and 2 renamed to the family's), whether the
tokenizer adds BOS, and ``tokenizer.chat_template`` itself, the family's real
template as llama.cpp's tree ships it (vendor/llama.cpp/models/templates).
The family's other special tokens are not in this vocabulary: they tokenize
as ordinary text, which rendering never sees.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "vendor" / "llama.cpp" / "models" / "templates"
sys.path.insert(0, str(ROOT / "benchmarks"))

from tiny_model import write_tiny_llama  # noqa: E402

BOS_ID, EOS_ID = 1, 2  # the default model's BOS and EOS ids


@dataclass(frozen=True)
class Family:
    """A family's template and the vocabulary facts it depends on."""

    template: str                    # file under vendor/llama.cpp/models/templates
    bos: str | None                  # BOS text; None: the default model's (<|im_start|>)
    eos: str | None                  # EOS text; None: the default model's (<|im_end|>)
    add_bos: bool                    # the tokenizer adds BOS


FAMILIES = {
    "llama3": Family("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", True),
    "llama32": Family("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", True),
    "qwen25": Family("Qwen-Qwen2.5-7B-Instruct.jinja", None, None, False),
    "gemma2": Family("google-gemma-2-2b-it.jinja", "<bos>", "<eos>", True),
    "mistral": Family("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>", True),
    "qwen3": Family("Qwen-Qwen3-0.6B.jinja", None, None, False),
}


def write_chat_model(directory: Path, name: str) -> Path:
    """Write family ``name``'s tiny model into ``directory`` (if absent)."""
    from runner.model.gguf import read_gguf
    from runner.model.models import default_model_path

    family = FAMILIES[name]
    tokens = list(read_gguf(default_model_path()).fields["tokenizer.ggml.tokens"].value)
    if family.bos is not None:
        tokens[BOS_ID] = family.bos
    if family.eos is not None:
        tokens[EOS_ID] = family.eos
    replace = {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.add_bos_token": family.add_bos,
        "tokenizer.chat_template": (TEMPLATES / family.template).read_text(encoding="utf-8"),
    }
    return write_tiny_llama(Path(directory) / f"chat-{name}.gguf", n_layer=1,
                            tokenizer_replace=replace)
