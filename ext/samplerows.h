/* Sampling the rows of one step on several threads.  After a decode the
 * decode threads are idle, and each sequence's sampling reads its own
 * n_vocab logits and its own sampler state: the rows are independent, so a
 * step of B sequences can be sampled B-wide.  Implemented in samplerows.cpp. */
#ifndef RUNNER_SAMPLEROWS_H
#define RUNNER_SAMPLEROWS_H

#include <stdint.h>

#include "fastsample.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Greedy pick of one row: index of the largest of x[0:n]. */
typedef int32_t (*runner_argmax_fn)(const float * x, int32_t n);

/* For i < n: toks[i] = runner_fast_sample(fasts[i], logits[i]), or
 * argmax(logits[i], n_vocab) where fasts[i] is NULL.  The rows are spread
 * over up to n_threads threads, the caller's included; the others come from
 * a pool kept for the life of the process (at most one call at a time uses
 * it; a concurrent call runs its rows on its own thread).  Each sampler is
 * used by exactly one thread, so a sampler listed twice would race: the
 * caller lists each at most once. */
void runner_sample_rows(runner_fast_sampler ** fasts, const float ** logits, int32_t * toks, int32_t n,
                        int32_t n_vocab, runner_argmax_fn argmax, int32_t n_threads);

#ifdef __cplusplus
}
#endif

#endif
