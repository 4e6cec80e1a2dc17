// See guard.h.  Nothing here decides policy: it keeps C++ exceptions and the
// aborts that follow from an empty candidate set inside the request that
// caused them.
#include "guard.h"

#include "fastsample.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>

namespace {

void set_error(char * err, size_t err_len, const char * what) {
    if (err != nullptr && err_len > 0) {
        std::snprintf(err, err_len, "%s", what);
    }
}

// Any entry that is neither -inf nor NaN.  A grammar marks a token it rejects
// with -inf; when it rejects them all, a greedy stage would still pick entry
// 0 and a dist stage would divide by zero, and accepting that token into the
// grammar throws or aborts.
bool any_finite(const llama_token_data_array & arr) {
    for (size_t i = 0; i < arr.size; ++i) {
        if (std::isfinite(arr.data[i].logit)) {
            return true;
        }
    }
    return false;
}

void fill(llama_token_data * cur, const float * logits, int32_t n_vocab) {
    for (int32_t i = 0; i < n_vocab; ++i) {
        cur[i].id = i;
        cur[i].logit = logits[i];
        cur[i].p = 0.0f;
    }
}

// Runs the chain over `arr`; the selected token, or -1 when the chain chose
// nothing valid (llama_sampler_sample would assert there).
llama_token run_chain(llama_sampler * chain, llama_token_data_array & arr) {
    arr.selected = -1;
    arr.sorted = false;
    llama_sampler_apply(chain, &arr);
    if (arr.selected < 0 || arr.selected >= (int64_t) arr.size) {
        return -1;
    }
    return arr.data[arr.selected].id;
}

bool grammar_allows(llama_sampler * grammar, llama_token token) {
    llama_token_data single = {token, 1.0f, 0.0f};
    llama_token_data_array arr = {&single, 1, -1, false};
    llama_sampler_apply(grammar, &arr);
    return std::isfinite(single.logit);
}

// `arr` := every token of `logits` in `cur`, the grammar applied (what it
// rejects at -inf); false when it allows none.  The slow part of a redraw.
bool apply_grammar(llama_sampler * grammar, const float * logits, int32_t n_vocab, llama_token_data * cur,
                   llama_token_data_array & arr) {
    fill(cur, logits, n_vocab);
    arr = {cur, (size_t) n_vocab, -1, false};
    llama_sampler_apply(grammar, &arr);
    return any_finite(arr);
}

// The grammar applied to every token of `logits`, then the chain run again
// (the slow half of runner_sample); the token, or -1 with `*rc` set.
llama_token constrain_and_sample(llama_sampler * chain, llama_sampler * grammar, const float * logits,
                                 int32_t n_vocab, llama_token_data * cur, int * rc) {
    llama_token_data_array arr;
    if (!apply_grammar(grammar, logits, n_vocab, cur, arr)) {
        *rc = RUNNER_SAMPLE_NO_TOKEN;
        return -1;
    }
    llama_token tok = run_chain(chain, arr);
    if (tok >= 0 && !std::isfinite(arr.data[arr.selected].logit)) {
        tok = -1;
    }
    *rc = tok < 0 ? RUNNER_SAMPLE_ERROR : RUNNER_SAMPLE_OK;
    return tok;
}

// Accepts `tok` into the grammar (if any) and the chain.
void accept_both(llama_sampler * chain, llama_sampler * grammar, llama_token tok) {
    if (grammar != nullptr) {
        llama_sampler_accept(grammar, tok);
    }
    llama_sampler_accept(chain, tok);
}

const char * const kNoSelection = "the sampler chain selected no token (are the logits finite?)";

// The native chain's draw from `row` with every token the grammar rejects
// set to -inf in place; the token, or -1 with `*rc` set.  Rounding in the
// draw can fall through to the last candidate, which may be a masked one:
// then the best allowed token is taken.
llama_token fast_constrained(runner_fast_sampler * fast, llama_sampler * grammar, float * row,
                             int32_t n_vocab, llama_token_data * cur, int * rc) {
    llama_token_data_array arr;
    if (!apply_grammar(grammar, row, n_vocab, cur, arr)) {
        *rc = RUNNER_SAMPLE_NO_TOKEN;
        return -1;
    }
    for (size_t i = 0; i < arr.size; ++i) {
        if (!std::isfinite(arr.data[i].logit)) {
            row[arr.data[i].id] = -INFINITY;
        }
    }
    llama_token tok = runner_fast_pick(fast, row);
    if (tok < 0 || !std::isfinite(row[tok])) {
        tok = -1;
        for (int32_t i = 0; i < n_vocab; ++i) {
            if (std::isfinite(row[i]) && (tok < 0 || row[i] > row[tok])) {
                tok = i;
            }
        }
    }
    *rc = tok < 0 ? RUNNER_SAMPLE_ERROR : RUNNER_SAMPLE_OK;
    return tok;
}

void fast_accept_both(runner_fast_sampler * fast, llama_sampler * grammar, llama_token tok) {
    llama_sampler_accept(grammar, tok);
    runner_fast_accept(fast, tok);
}

// Runs `body`, which returns a RUNNER_SAMPLE_* code, with any exception
// turned into RUNNER_SAMPLE_ERROR and its message.
template <typename Body>
int guarded(char * err, size_t err_len, Body && body) {
    try {
        return body();
    } catch (const std::exception & e) {
        set_error(err, err_len, e.what());
    } catch (...) {
        set_error(err, err_len, "unknown C++ exception");
    }
    return RUNNER_SAMPLE_ERROR;
}

// The end of a pick: NO_TOKEN is passed on, no token is an error, else
// `accept` takes the token, which is stored in `*token`.
template <typename Accept>
int settle(int rc, llama_token tok, llama_token * token, char * err, size_t err_len, Accept && accept) {
    if (rc == RUNNER_SAMPLE_NO_TOKEN) {
        return rc;
    }
    if (tok < 0) {
        set_error(err, err_len, kNoSelection);
        return RUNNER_SAMPLE_ERROR;
    }
    accept(tok);
    *token = tok;
    return RUNNER_SAMPLE_OK;
}

}  // namespace

extern "C" int runner_fast_grammar_sample(runner_fast_sampler * fast, llama_sampler * grammar,
                                          const float * logits, int32_t n_vocab, llama_token_data * cur,
                                          float * keep, int defer, llama_token * token, char * err,
                                          size_t err_len) {
    return guarded(err, err_len, [&] {
        auto accept = [&](llama_token t) { fast_accept_both(fast, grammar, t); };
        llama_token tok = runner_fast_pick(fast, logits);
        if (tok >= 0 && std::isfinite(logits[tok]) && grammar_allows(grammar, tok)) {
            return settle(RUNNER_SAMPLE_OK, tok, token, err, err_len, accept);
        }
        std::memcpy(keep, logits, sizeof(float) * (size_t) n_vocab);
        if (defer) {
            return (int) RUNNER_SAMPLE_DEFERRED;
        }
        int rc = RUNNER_SAMPLE_OK;
        tok = fast_constrained(fast, grammar, keep, n_vocab, cur, &rc);
        return settle(rc, tok, token, err, err_len, accept);
    });
}

extern "C" int runner_fast_grammar_constrained(runner_fast_sampler * fast, llama_sampler * grammar,
                                               float * row, int32_t n_vocab, llama_token_data * cur,
                                               llama_token * token, char * err, size_t err_len) {
    return guarded(err, err_len, [&] {
        int rc = RUNNER_SAMPLE_OK;
        const llama_token tok = fast_constrained(fast, grammar, row, n_vocab, cur, &rc);
        return settle(rc, tok, token, err, err_len,
                      [&](llama_token t) { fast_accept_both(fast, grammar, t); });
    });
}

extern "C" int runner_sample(llama_sampler * chain, llama_sampler * grammar, llama_context * ctx,
                             int32_t idx, int32_t n_vocab, llama_token_data * cur,
                             llama_token * token, float * keep, char * err, size_t err_len) {
    return guarded(err, err_len, [&] {
        const float * logits = llama_get_logits_ith(ctx, idx);
        if (logits == nullptr) {
            set_error(err, err_len, "no logits for this batch index");
            return (int) RUNNER_SAMPLE_ERROR;
        }
        fill(cur, logits, n_vocab);
        llama_token_data_array arr = {cur, (size_t) n_vocab, -1, false};
        llama_token tok = -1;
        if (grammar == nullptr || any_finite(arr)) {
            tok = run_chain(chain, arr);
        }
        int rc = RUNNER_SAMPLE_OK;
        if (grammar != nullptr && (tok < 0 || !grammar_allows(grammar, tok))) {
            // The chain's choice breaks the grammar: constrain the whole
            // vocabulary first, then sample again -- now, or later from a
            // copy of the row when the caller asked for that.
            if (keep != nullptr) {
                std::memcpy(keep, logits, sizeof(float) * (size_t) n_vocab);
                return (int) RUNNER_SAMPLE_DEFERRED;
            }
            tok = constrain_and_sample(chain, grammar, logits, n_vocab, cur, &rc);
        }
        return settle(rc, tok, token, err, err_len,
                      [&](llama_token t) { accept_both(chain, grammar, t); });
    });
}

extern "C" int runner_sample_constrained(llama_sampler * chain, llama_sampler * grammar,
                                         const float * logits, int32_t n_vocab, llama_token_data * cur,
                                         llama_token * token, char * err, size_t err_len) {
    return guarded(err, err_len, [&] {
        int rc = RUNNER_SAMPLE_OK;
        const llama_token tok = constrain_and_sample(chain, grammar, logits, n_vocab, cur, &rc);
        return settle(rc, tok, token, err, err_len,
                      [&](llama_token t) { accept_both(chain, grammar, t); });
    });
}

extern "C" int runner_sampler_accept(llama_sampler * smpl, llama_token token, char * err, size_t err_len) {
    try {
        llama_sampler_accept(smpl, token);
        return 0;
    } catch (const std::exception & e) {
        set_error(err, err_len, e.what());
    } catch (...) {
        set_error(err, err_len, "unknown C++ exception");
    }
    return -1;
}

extern "C" int runner_graph_attach(llama_context * ctx, llama_seq_id seq, llama_sampler * chain,
                                   char * err, size_t err_len) {
    try {
        return llama_set_sampler(ctx, seq, chain) ? 1 : 0;
    } catch (const std::exception & e) {
        set_error(err, err_len, e.what());
    } catch (...) {
        set_error(err, err_len, "unknown C++ exception");
    }
    return -1;
}

extern "C" int runner_graph_sample(llama_sampler * chain, llama_context * ctx, int32_t idx,
                                   llama_token_data * cur, int32_t n_vocab, llama_token * token,
                                   char * err, size_t err_len) {
    try {
        llama_token tok = llama_get_sampled_token_ith(ctx, idx);
        if (tok == LLAMA_TOKEN_NULL) {
            // Part of the chain ran in the graph: finish it on what it left.
            // (llama_sampler_sample does the same, but aborts the process on
            // an empty pick; here the request fails instead.)
            const llama_token * ids = llama_get_sampled_candidates_ith(ctx, idx);
            const float * logits = llama_get_sampled_logits_ith(ctx, idx);
            const float * probs = llama_get_sampled_probs_ith(ctx, idx);
            uint32_t n = probs != nullptr ? llama_get_sampled_probs_count_ith(ctx, idx)
                                          : llama_get_sampled_logits_count_ith(ctx, idx);
            if (ids == nullptr || logits == nullptr || n == 0 || n > (uint32_t) n_vocab) {
                set_error(err, err_len, "the decode graph sampled nothing for this row");
                return RUNNER_SAMPLE_ERROR;
            }
            for (uint32_t i = 0; i < n; ++i) {
                cur[i].id = ids[i];
                cur[i].logit = logits[i];
                cur[i].p = probs != nullptr ? probs[i] : 0.0f;
            }
            llama_token_data_array arr = {cur, n, -1, false};
            if (!any_finite(arr)) {
                set_error(err, err_len, "no candidate left for this row is a number");
                return RUNNER_SAMPLE_ERROR;
            }
            llama_sampler_apply(chain, &arr);
            if (arr.selected < 0 || (size_t) arr.selected >= arr.size) {
                set_error(err, err_len, "the sampler chain picked no candidate");
                return RUNNER_SAMPLE_ERROR;
            }
            tok = arr.data[arr.selected].id;
        }
        if (tok < 0 || tok >= n_vocab) {
            set_error(err, err_len, "the decode graph sampled a token outside the vocabulary");
            return RUNNER_SAMPLE_ERROR;
        }
        llama_sampler_accept(chain, tok);
        *token = tok;
        return RUNNER_SAMPLE_OK;
    } catch (const std::exception & e) {
        set_error(err, err_len, e.what());
    } catch (...) {
        set_error(err, err_len, "unknown C++ exception");
    }
    return RUNNER_SAMPLE_ERROR;
}

extern "C" int runner_grammar_allows(llama_sampler * grammar, llama_token token, char * err, size_t err_len) {
    try {
        return grammar_allows(grammar, token) ? 1 : 0;
    } catch (const std::exception & e) {
        set_error(err, err_len, e.what());
    } catch (...) {
        set_error(err, err_len, "unknown C++ exception");
    }
    return -1;
}

extern "C" int runner_grammar_probe(llama_sampler * grammar, int32_t first, int32_t stride, int32_t n,
                                    llama_token_data * cur, char * err, size_t err_len) {
    try {
        for (int32_t i = 0; i < n; ++i) {
            cur[i] = {first + i * stride, 0.0f, 0.0f};
        }
        llama_token_data_array arr = {cur, (size_t) n, -1, false};
        llama_sampler_apply(grammar, &arr);
        return 0;
    } catch (const std::exception & e) {
        set_error(err, err_len, e.what());
    } catch (...) {
        set_error(err, err_len, "unknown C++ exception");
    }
    return -1;
}

extern "C" llama_sampler * runner_grammar_init(const llama_vocab * vocab, const char * grammar,
                                               const char * root, char * err, size_t err_len) {
    try {
        return llama_sampler_init_grammar(vocab, grammar, root);
    } catch (const std::exception & e) {
        set_error(err, err_len, e.what());
    } catch (...) {
        set_error(err, err_len, "unknown C++ exception");
    }
    return nullptr;
}

extern "C" llama_sampler * runner_dry_init(const llama_vocab * vocab, float multiplier, float base,
                                           int32_t allowed_length, int32_t penalty_last_n,
                                           const char ** breakers, size_t n_breakers, char * err,
                                           size_t err_len) {
    try {
        return llama_sampler_init_dry(vocab, multiplier, base, allowed_length, penalty_last_n, breakers,
                                      n_breakers);
    } catch (const std::exception & e) {
        set_error(err, err_len, e.what());
    } catch (...) {
        set_error(err, err_len, "unknown C++ exception");
    }
    return nullptr;
}

#define RUNNER_GUARD_VOCAB(call)                       \
    try {                                              \
        return call;                                   \
    } catch (const std::exception & e) {               \
        set_error(err, err_len, e.what());             \
    } catch (...) {                                    \
        set_error(err, err_len, "unknown C++ exception"); \
    }                                                  \
    return RUNNER_THREW;

extern "C" int32_t runner_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len,
                                   llama_token * tokens, int32_t n_tokens_max, bool add_special,
                                   bool parse_special, char * err, size_t err_len) {
    RUNNER_GUARD_VOCAB(llama_tokenize(vocab, text, text_len, tokens, n_tokens_max, add_special, parse_special))
}

extern "C" int32_t runner_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf,
                                         int32_t length, int32_t lstrip, bool special, char * err,
                                         size_t err_len) {
    RUNNER_GUARD_VOCAB(llama_token_to_piece(vocab, token, buf, length, lstrip, special))
}

extern "C" int32_t runner_detokenize(const llama_vocab * vocab, const llama_token * tokens,
                                     int32_t n_tokens, char * text, int32_t text_len_max,
                                     bool remove_special, bool unparse_special, char * err,
                                     size_t err_len) {
    RUNNER_GUARD_VOCAB(llama_detokenize(vocab, tokens, n_tokens, text, text_len_max, remove_special,
                                        unparse_special))
}
