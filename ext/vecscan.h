/* Scans over a row of logits with the widest vector unit the CPU has.
 *
 * The greedy pick and the native chain's top-k both read all n_vocab logits
 * of a row (49,152 for SmolLM2) once per sampled token.  Written as plain C
 * loops, the compiler keeps them scalar: a max reduction is not allowed to
 * be reordered without -ffast-math, because of NaN.  These versions use
 * vector max/compare instructions, whose NaN rules are stated below, and
 * pick AVX2 at run time on x86-64 where the CPU has it (SSE2 otherwise; NEON
 * on arm64).  Implemented in vecscan.cpp. */
#ifndef RUNNER_VECSCAN_H
#define RUNNER_VECSCAN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Index of the first largest of x[0:n] (n >= 1).  NaNs are skipped; if x[0]
 * is NaN the answer is 0, and so it is when every entry is NaN or -inf. */
int32_t runner_argmax_f32(const float * x, int32_t n);

/* The first i in [from, end) with i - from a multiple of 16 such that one of
 * x[i:i+16] is >= floor (NaN never is); `end` when there is none.  The
 * caller keeps end - from a multiple of 16. */
int32_t runner_next_block_ge(const float * x, int32_t from, int32_t end, float floor);

/* Bit j set, for j < 16, where x[j] >= floor (never for NaN): which
 * entries of a block that runner_next_block_ge found reach the floor.
 * (NEON builds compute it without branches in scalar code.) */
uint32_t runner_mask16_ge(const float * x, float floor);

/* out[j] := the largest non-NaN of x[64j:64j+64] (-inf if none), for
 * j < n_blocks: the first pass of the native chain's top-k, which then
 * reads only the blocks whose maximum could matter. */
#define RUNNER_MAXIMA_BLOCK 64
void runner_block_maxima(const float * x, int32_t n_blocks, float * out);

/* Which implementation was chosen, once per process: "avx2", "sse2", "neon"
 * or "scalar".  The environment variable LLAMA_RUNNER_VECSCAN=scalar (or
 * =sse2 on x86-64) asks for a narrower one, so that tests can check each. */
const char * runner_vecscan_isa(void);

#ifdef __cplusplus
}
#endif

#endif
