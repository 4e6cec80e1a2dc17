/* A native sampler for the common chain: penalties, top-k, top-p, min-p,
 * temperature, then a seeded draw (or greedy).  It gives the distribution
 * that llama.cpp's chain of the same stages gives, without building an
 * n_vocab candidate array: the penalised tokens (at most repeat_last_n of
 * them) are adjusted on the side, and one pass over the logits keeps only
 * the top k + |penalised| entries.  Implemented in fastsample.cpp. */
#ifndef RUNNER_FASTSAMPLE_H
#define RUNNER_FASTSAMPLE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct runner_fast_sampler runner_fast_sampler;

/* The largest top_k this sampler takes; larger ones use llama.cpp's chain. */
#define RUNNER_FAST_MAX_TOP_K 1024

/* NULL when the parameters are outside what it implements (top_k outside
 * 1..RUNNER_FAST_MAX_TOP_K for a sampling chain) or on allocation failure.
 * temperature <= 0 means greedy (top_k/top_p/min_p are then irrelevant). */
runner_fast_sampler * runner_fast_new(int32_t n_vocab, float temperature, int32_t top_k, float top_p,
                                      float min_p, int32_t repeat_last_n, float repeat_penalty,
                                      float frequency_penalty, float presence_penalty, uint64_t seed);
void runner_fast_free(runner_fast_sampler * s);

/* Add logit biases (llama.cpp's logit_bias stage, which runs before the
 * penalties; a token given twice gets the sum; -inf bans it): 0, or -1 for
 * a token outside the vocabulary, a NaN bias or no memory (then some of
 * them may be set). */
int runner_fast_set_bias(runner_fast_sampler * s, const int32_t * tokens, const float * biases, int32_t n);

/* How top-k (from 16) finds its candidates: AUTO picks per row from what
 * the last row showed (one pass on a peaked row, block maxima first on a
 * flat one); the others fix it (benchmarks, and tests of each path). */
#define RUNNER_FAST_SCAN_AUTO 0
#define RUNNER_FAST_SCAN_ONE_PASS 1
#define RUNNER_FAST_SCAN_BLOCKS 2
void runner_fast_set_scan(runner_fast_sampler * s, int scan);

/* Record a token in the penalty window (prompt tokens and sampled ones). */
void runner_fast_accept(runner_fast_sampler * s, int32_t token);
void runner_fast_reset(runner_fast_sampler * s);

/* Sample from `logits` (n_vocab floats) and accept the token; -1 when no
 * logit is a number. */
int32_t runner_fast_sample(runner_fast_sampler * s, const float * logits);

/* The same draw without accepting the token (the caller accepts it once a
 * grammar has allowed it; see guard.h). */
int32_t runner_fast_pick(runner_fast_sampler * s, const float * logits);

/* The final distribution the draw would use (after every stage): up to
 * `cap` (token, probability) pairs in descending order; returns how many.
 * Does not draw or accept.  For tests and for checking the stages. */
int32_t runner_fast_distribution(runner_fast_sampler * s, const float * logits, int32_t * tokens,
                                 float * probs, int32_t cap);

#ifdef __cplusplus
}
#endif

#endif
