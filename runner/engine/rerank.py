"""The token sequence a reranker scores for one (query, document) pair.

Written as llama-server's /rerank builds it (tools/server/server-common.cpp,
``format_prompt_rerank``), so that the same model gives the same scores:

* a model that ships a rerank prompt (GGUF ``tokenizer.chat_template.rerank``,
  e.g. Qwen3-Reranker) has ``{query}`` and ``{document}`` replaced in it, and
  the text is tokenized with special tokens parsed and none added;
* otherwise (BERT-style cross-encoders) the pair is
  ``[BOS] query [EOS] [SEP] document [EOS]``, each special token present only
  when the vocabulary asks for it (``add_bos``, ``add_eos``, ``add_sep``),
  with SEP standing in for a missing EOS.

The query and the documents are tokenized as plain text (special-token text
in them stays text).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from runner import _llama

NO_TOKEN = -1  # llama.cpp's LLAMA_TOKEN_NULL


def rerank_inputs(model: "_llama.Model", query: bytes, documents: list[bytes]) -> list[list[int]]:
    """One token list per document (UTF-8 ``query`` and ``documents``)."""
    template = model.chat_template("rerank")
    if template is not None:
        out = []
        for doc in documents:
            # str.replace on the template, as llama-server's string_replace_all
            text = template.replace("{query}", query.decode()).replace("{document}", doc.decode())
            out.append(model.tokenize(text.encode(), add_special=False, parse_special=True))
        return out
    eos = model.eos if model.eos != NO_TOKEN else model.sep
    prefix = [model.bos] if model.add_bos else []
    prefix += model.tokenize(query, add_special=False, parse_special=False)
    if model.add_eos:
        prefix.append(eos)
    if model.add_sep:
        prefix.append(model.sep)
    out = []
    for doc in documents:
        tokens = prefix + model.tokenize(doc, add_special=False, parse_special=False)
        if model.add_eos:
            tokens.append(eos)
        out.append(tokens)
    return out
