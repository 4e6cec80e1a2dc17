/* C entry points that call the parts of llama.cpp's C API which can throw a
 * C++ exception or reach an abort for input a request controls (grammars,
 * sampler chains).  Each one catches what it can and reports it as a return
 * code plus a message, so that one request fails instead of the process.
 * Implemented in guard.cpp; declared to Cython in c_guard.pxd. */
#ifndef RUNNER_GUARD_H
#define RUNNER_GUARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes of runner_sample. */
#define RUNNER_SAMPLE_OK 0        /* *token holds the sampled token */
#define RUNNER_SAMPLE_NO_TOKEN 1  /* the grammar allows no token at all */
#define RUNNER_SAMPLE_ERROR -1    /* llama.cpp threw; err holds its message */
#define RUNNER_SAMPLE_DEFERRED 2  /* the grammar rejected the chain's pick; the row is in `keep` */

/* Sample one token from the logits of output row `idx` of `ctx`.
 *
 * `chain` holds every stage but the grammar; `grammar` (may be NULL) is kept
 * apart, as llama.cpp's common sampler does: the chain samples from the full
 * vocabulary first, and only when the grammar rejects that token is the
 * grammar applied to the whole vocabulary and the chain run again.  The
 * chosen token is accepted into both.  `cur` is scratch space of `n_vocab`
 * entries owned by the caller.
 *
 * With `keep` (n_vocab floats, or NULL), a pick the grammar rejects is not
 * redone here: the row is copied into `keep`, nothing is accepted, and the
 * call returns RUNNER_SAMPLE_DEFERRED; runner_sample_constrained finishes it
 * later, on any thread.  Applying a grammar to the whole vocabulary is the
 * one part of sampling whose cost a request controls (milliseconds for JSON,
 * seconds for a grammar of deep repeats). */
int runner_sample(struct llama_sampler * chain, struct llama_sampler * grammar,
                  struct llama_context * ctx, int32_t idx, int32_t n_vocab,
                  llama_token_data * cur, llama_token * token, float * keep,
                  char * err, size_t err_len);

/* The second half of a deferred runner_sample: the grammar applied to every
 * token of `logits` (the kept row), the chain run again, and the token
 * accepted into both.  Returns as runner_sample does (never DEFERRED). */
int runner_sample_constrained(struct llama_sampler * chain, struct llama_sampler * grammar,
                              const float * logits, int32_t n_vocab, llama_token_data * cur,
                              llama_token * token, char * err, size_t err_len);

/* runner_sample for a request whose chain the native sampler serves
 * (fastsample.h), with a grammar: the native draw from the raw row first
 * (nothing accepted), the grammar checks that token, and only a rejected
 * pick applies the grammar to every token -- now, or with `defer` later
 * through runner_fast_grammar_constrained -- and draws again from the row
 * with the rejected tokens at -inf.  The row is copied into `keep` (n_vocab
 * floats) whenever the pick is rejected.  Returns as runner_sample does. */
struct runner_fast_sampler;
int runner_fast_grammar_sample(struct runner_fast_sampler * fast, struct llama_sampler * grammar,
                               const float * logits, int32_t n_vocab, llama_token_data * cur,
                               float * keep, int defer, llama_token * token, char * err,
                               size_t err_len);

/* The second half of a deferred runner_fast_grammar_sample: `row` (the kept
 * row, masked in place) constrained by the grammar, the native draw, the
 * token accepted into both.  Never DEFERRED. */
int runner_fast_grammar_constrained(struct runner_fast_sampler * fast, struct llama_sampler * grammar,
                                    float * row, int32_t n_vocab, llama_token_data * cur,
                                    llama_token * token, char * err, size_t err_len);

/* llama_sampler_accept with exceptions caught: 0, or -1 with err set. */
int runner_sampler_accept(struct llama_sampler * smpl, llama_token token, char * err, size_t err_len);

/* Sampling inside the decode graph (llama.cpp's experimental backend
 * sampling).  runner_graph_attach hands `chain` (a llama_sampler_chain) to
 * `ctx` for sequence `seq` (llama_set_sampler), or takes the sequence's
 * chain back when `chain` is NULL; the context then holds a pointer to the
 * chain until it is taken back.  Returns 1 when the context took it, 0 when
 * it refused (the chain then samples nothing in the graph), -1 when
 * llama.cpp threw (err set).  The next decode rebuilds the graph's buffers.
 * Each chain may be handed over once: llama.cpp keeps it initialised for
 * the graph afterwards. */
int runner_graph_attach(struct llama_context * ctx, llama_seq_id seq, struct llama_sampler * chain,
                        char * err, size_t err_len);

/* The token the graph sampled for output row `idx` of `ctx`, accepted into
 * `chain` (the one attached for that row's sequence).  When a stage of the
 * chain could not run in the graph, the graph hands back what the stages
 * before it left (candidates, logits, maybe probabilities) and the rest of
 * the chain runs here on them (`cur`: n_vocab entries of scratch).  Returns
 * RUNNER_SAMPLE_OK, or RUNNER_SAMPLE_ERROR with err set (nothing to sample
 * for the row, no candidate picked, or llama.cpp threw). */
int runner_graph_sample(struct llama_sampler * chain, struct llama_context * ctx, int32_t idx,
                        llama_token_data * cur, int32_t n_vocab, llama_token * token,
                        char * err, size_t err_len);

/* Whether `grammar` would allow `token` next (1), not (0), or threw (-1). */
int runner_grammar_allows(struct llama_sampler * grammar, llama_token token, char * err, size_t err_len);

/* The grammar applied to `n` candidates, token ids first, first + stride,
 * ... (logits 0), with exceptions caught: 0, or -1 with err set.  For
 * timing what a check of the vocabulary costs (Sampler.grammar_check_seconds);
 * the grammar's state is unchanged. */
int runner_grammar_probe(struct llama_sampler * grammar, int32_t first, int32_t stride, int32_t n,
                         llama_token_data * cur, char * err, size_t err_len);

/* llama_sampler_init_grammar with exceptions caught: NULL on any failure,
 * with err set when the failure was an exception. */
struct llama_sampler * runner_grammar_init(const struct llama_vocab * vocab, const char * grammar,
                                           const char * root, char * err, size_t err_len);

/* llama_sampler_init_dry with exceptions caught (it searches the vocabulary
 * for the tokens that can spell each sequence breaker): NULL with err set. */
struct llama_sampler * runner_dry_init(const struct llama_vocab * vocab, float multiplier, float base,
                                       int32_t allowed_length, int32_t penalty_last_n,
                                       const char ** breakers, size_t n_breakers, char * err,
                                       size_t err_len);

/* The vocabulary calls with exceptions caught: llama.cpp's own return value
 * (see llama.h), or INT32_MIN with err set when it threw (a vocabulary that
 * lacks byte tokens makes tokenize throw std::out_of_range, for example). */
#define RUNNER_THREW INT32_MIN
int32_t runner_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                        llama_token * tokens, int32_t n_tokens_max, bool add_special,
                        bool parse_special, char * err, size_t err_len);
int32_t runner_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf,
                              int32_t length, int32_t lstrip, bool special, char * err, size_t err_len);
int32_t runner_detokenize(const struct llama_vocab * vocab, const llama_token * tokens,
                          int32_t n_tokens, char * text, int32_t text_len_max, bool remove_special,
                          bool unparse_special, char * err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif
