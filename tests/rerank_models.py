"""A tiny random-weight reranker in the shape of Qwen3-Reranker's GGUF.

llama.cpp's converter writes Qwen3-Reranker as a ``qwen3`` model with
``pooling_type`` rank (4), a classifier head ``cls.output.weight`` of one row
per label (``qwen3.classifier.output_labels``: "yes", "no"), and the rerank
prompt in ``tokenizer.chat_template.rerank``.  Under rank pooling llama.cpp
takes the last token's hidden state, applies the head and a softmax
(src/llama-graph.cpp, ``build_pooling``), so each pair gets two
probabilities summing to 1; the score is the first.  This file has the
same keys and tensors at width 64 with the default model's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmproj import _matrix, _ones, finish_gguf, text_model_writer

RERANK_TEMPLATE = ("<|im_start|>system\nJudge whether the Document meets the requirements based on "
                   "the Query. Answer only \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
                   "<Query>: {query}\n<Document>: {document}<|im_end|>\n<|im_start|>assistant\n")


def write_tiny_reranker(path: str | Path, *, seed: int = 0, n_embd: int = 64, n_layer: int = 2,
                        n_head: int = 4, n_ff: int = 128, template: bool = True,
                        pooling_rank: bool = True) -> Path:
    """Write the reranker (if absent) and return its path.  ``template``:
    ship the rerank prompt; ``pooling_rank``: declare rank pooling (without
    it the load must ask for it)."""
    path = Path(path)
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    replace = {"tokenizer.chat_template.rerank": RERANK_TEMPLATE} if template else None
    w, n_vocab = text_model_writer(tmp, "qwen3", seed, n_ctx=4096, n_embd=n_embd, n_layer=n_layer,
                                   n_ff=n_ff, n_head=n_head, n_head_kv=n_head,
                                   rope_freq_base=1e6, tokenizer_replace=replace)
    head = n_embd // n_head
    w.add_uint32("qwen3.attention.key_length", head)
    w.add_uint32("qwen3.attention.value_length", head)
    if pooling_rank:
        w.add_uint32("qwen3.pooling_type", 4)
    w.add_array("qwen3.classifier.output_labels", ["yes", "no"])
    w.add_tensor("token_embd.weight", _matrix(rng, n_vocab, n_embd))
    for i in range(n_layer):
        blk = f"blk.{i}"
        w.add_tensor(f"{blk}.attn_norm.weight", _ones(n_embd))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"{blk}.{name}.weight", _matrix(rng, n_embd, n_embd))
        w.add_tensor(f"{blk}.attn_q_norm.weight", _ones(head))
        w.add_tensor(f"{blk}.attn_k_norm.weight", _ones(head))
        w.add_tensor(f"{blk}.ffn_norm.weight", _ones(n_embd))
        w.add_tensor(f"{blk}.ffn_gate.weight", _matrix(rng, n_ff, n_embd))
        w.add_tensor(f"{blk}.ffn_up.weight", _matrix(rng, n_ff, n_embd))
        w.add_tensor(f"{blk}.ffn_down.weight", _matrix(rng, n_embd, n_ff))
    w.add_tensor("output_norm.weight", _ones(n_embd))
    w.add_tensor("cls.output.weight", (_matrix(rng, 2, n_embd) * 8).astype(np.float32))
    finish_gguf(w)
    tmp.rename(path)
    return path
