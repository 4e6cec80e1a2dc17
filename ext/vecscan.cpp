// See vecscan.h.
#include "vecscan.h"

#include <cmath>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RUNNER_VECSCAN_X86 1
#include <immintrin.h>
#elif defined(__aarch64__)
#define RUNNER_VECSCAN_NEON 1
#include <arm_neon.h>
#endif

namespace {

constexpr int32_t kBlock = 256;  // floats per block of the argmax's first pass

// The shared argmax: `block_max(p)` returns the largest non-NaN of p[0:256]
// (-inf if none).  Blocks raise `best` only when strictly larger, so the
// block that holds the first occurrence of the maximum is the one recorded,
// and the index is searched for from there.
template <typename BlockMax>
inline int32_t argmax_with(const float * x, int32_t n, BlockMax block_max) {
    float best = x[0];  // NaN here: nothing compares greater, the answer stays 0
    int32_t start = 0;
    int32_t i = 0;
    for (; i + kBlock <= n; i += kBlock) {
        const float m = block_max(x + i);
        if (m > best) {
            best = m;
            start = i;
        }
    }
    for (; i < n; ++i) {
        if (x[i] > best) {
            best = x[i];
            start = i;
        }
    }
    for (i = start; i < n; ++i) {
        if (x[i] == best) {
            return i;
        }
    }
    return 0;
}

template <int N>
float block_max_scalar(const float * p) {
    float lane[16];
    for (int j = 0; j < 16; ++j) {
        lane[j] = -INFINITY;
    }
    for (int k = 0; k < N; k += 16) {
        for (int j = 0; j < 16; ++j) {
            lane[j] = p[k + j] > lane[j] ? p[k + j] : lane[j];
        }
    }
    float m = lane[0];
    for (int j = 1; j < 16; ++j) {
        m = lane[j] > m ? lane[j] : m;
    }
    return m;
}

int32_t next_ge_scalar(const float * x, int32_t i, int32_t end, float floor) {
    for (; i < end; i += 16) {
        for (int j = 0; j < 16; ++j) {
            if (x[i + j] >= floor) {
                return i;
            }
        }
    }
    return end;
}

uint32_t mask_ge_scalar(const float * x, float floor) {
    uint32_t bits = 0;
    for (int j = 0; j < 16; ++j) {
        bits |= (uint32_t) (x[j] >= floor) << j;  // false for NaN
    }
    return bits;
}

#if RUNNER_VECSCAN_X86
// maxps(a, b) returns b when either operand is NaN: with the data as `a`
// and the accumulator as `b`, a NaN in the data leaves the accumulator as is.
template <int N>
float block_max_sse2(const float * p) {
    __m128 a0 = _mm_set1_ps(-INFINITY), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < N; k += 16) {
        a0 = _mm_max_ps(_mm_loadu_ps(p + k), a0);
        a1 = _mm_max_ps(_mm_loadu_ps(p + k + 4), a1);
        a2 = _mm_max_ps(_mm_loadu_ps(p + k + 8), a2);
        a3 = _mm_max_ps(_mm_loadu_ps(p + k + 12), a3);
    }
    __m128 m = _mm_max_ps(_mm_max_ps(a0, a1), _mm_max_ps(a2, a3));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

int32_t next_ge_sse2(const float * x, int32_t i, int32_t end, float floor) {
    const __m128 f = _mm_set1_ps(floor);
    for (; i < end; i += 16) {
        // cmpge is false for NaN, as the contract wants.
        const __m128 c = _mm_or_ps(_mm_or_ps(_mm_cmpge_ps(_mm_loadu_ps(x + i), f),
                                             _mm_cmpge_ps(_mm_loadu_ps(x + i + 4), f)),
                                   _mm_or_ps(_mm_cmpge_ps(_mm_loadu_ps(x + i + 8), f),
                                             _mm_cmpge_ps(_mm_loadu_ps(x + i + 12), f)));
        if (_mm_movemask_ps(c) != 0) {
            return i;
        }
    }
    return end;
}

uint32_t mask_ge_sse2(const float * x, float floor) {
    const __m128 f = _mm_set1_ps(floor);
    return (uint32_t) _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(x), f)) |
           (uint32_t) _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(x + 4), f)) << 4 |
           (uint32_t) _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(x + 8), f)) << 8 |
           (uint32_t) _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(x + 12), f)) << 12;
}

template <int N>
__attribute__((target("avx2"))) float block_max_avx2(const float * p) {
    __m256 a0 = _mm256_set1_ps(-INFINITY), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < N; k += 32) {
        a0 = _mm256_max_ps(_mm256_loadu_ps(p + k), a0);
        a1 = _mm256_max_ps(_mm256_loadu_ps(p + k + 8), a1);
        a2 = _mm256_max_ps(_mm256_loadu_ps(p + k + 16), a2);
        a3 = _mm256_max_ps(_mm256_loadu_ps(p + k + 24), a3);
    }
    const __m256 m8 = _mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

__attribute__((target("avx2"))) int32_t next_ge_avx2(const float * x, int32_t i, int32_t end,
                                                     float floor) {
    const __m256 f = _mm256_set1_ps(floor);
    for (; i < end; i += 16) {
        // _CMP_GE_OQ: ordered, so false for NaN.
        const __m256 c = _mm256_or_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), f, _CMP_GE_OQ),
                                      _mm256_cmp_ps(_mm256_loadu_ps(x + i + 8), f, _CMP_GE_OQ));
        if (_mm256_movemask_ps(c) != 0) {
            return i;
        }
    }
    return end;
}

__attribute__((target("avx2"))) uint32_t mask_ge_avx2(const float * x, float floor) {
    const __m256 f = _mm256_set1_ps(floor);
    return (uint32_t) _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), f, _CMP_GE_OQ)) |
           (uint32_t) _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8), f, _CMP_GE_OQ)) << 8;
}

__attribute__((target("avx2"))) int32_t argmax_avx2(const float * x, int32_t n) {
    return argmax_with(x, n, block_max_avx2<kBlock>);
}

int32_t argmax_sse2(const float * x, int32_t n) {
    return argmax_with(x, n, block_max_sse2<kBlock>);
}

bool has_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2");
    return yes;
}
#endif

#if RUNNER_VECSCAN_NEON
// vmaxnmq returns the number when one operand is NaN.
template <int N>
float block_max_neon(const float * p) {
    float32x4_t a0 = vdupq_n_f32(-INFINITY), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < N; k += 16) {
        a0 = vmaxnmq_f32(vld1q_f32(p + k), a0);
        a1 = vmaxnmq_f32(vld1q_f32(p + k + 4), a1);
        a2 = vmaxnmq_f32(vld1q_f32(p + k + 8), a2);
        a3 = vmaxnmq_f32(vld1q_f32(p + k + 12), a3);
    }
    return vmaxnmvq_f32(vmaxnmq_f32(vmaxnmq_f32(a0, a1), vmaxnmq_f32(a2, a3)));
}

int32_t argmax_neon(const float * x, int32_t n) {
    return argmax_with(x, n, block_max_neon<kBlock>);
}

int32_t next_ge_neon(const float * x, int32_t i, int32_t end, float floor) {
    const float32x4_t f = vdupq_n_f32(floor);
    for (; i < end; i += 16) {
        // vcgeq is false for NaN.
        const uint32x4_t c = vorrq_u32(vorrq_u32(vcgeq_f32(vld1q_f32(x + i), f),
                                                 vcgeq_f32(vld1q_f32(x + i + 4), f)),
                                       vorrq_u32(vcgeq_f32(vld1q_f32(x + i + 8), f),
                                                 vcgeq_f32(vld1q_f32(x + i + 12), f)));
        if (vmaxvq_u32(c) != 0) {
            return i;
        }
    }
    return end;
}
#endif

struct Impl {
    const char * isa;                                            // what runner_vecscan_isa reports
    int32_t (*argmax)(const float *, int32_t);                   // runner_argmax_f32's body
    int32_t (*next_ge)(const float *, int32_t, int32_t, float);  // runner_next_block_ge's body
    uint32_t (*mask_ge)(const float *, float);                   // runner_mask16_ge's body
    void (*maxima)(const float *, int32_t, float *);             // runner_block_maxima's body
};

// runner_block_maxima's body for one block function.
template <typename BlockMax>
inline void maxima_with(const float * x, int32_t n_blocks, float * out, BlockMax block_max) {
    for (int32_t j = 0; j < n_blocks; ++j) {
        out[j] = block_max(x + (size_t) j * RUNNER_MAXIMA_BLOCK);
    }
}

void maxima_scalar(const float * x, int32_t n_blocks, float * out) {
    maxima_with(x, n_blocks, out, block_max_scalar<RUNNER_MAXIMA_BLOCK>);
}

#if RUNNER_VECSCAN_X86
void maxima_sse2(const float * x, int32_t n_blocks, float * out) {
    maxima_with(x, n_blocks, out, block_max_sse2<RUNNER_MAXIMA_BLOCK>);
}

__attribute__((target("avx2"))) void maxima_avx2(const float * x, int32_t n_blocks, float * out) {
    maxima_with(x, n_blocks, out, block_max_avx2<RUNNER_MAXIMA_BLOCK>);
}
#elif RUNNER_VECSCAN_NEON
void maxima_neon(const float * x, int32_t n_blocks, float * out) {
    maxima_with(x, n_blocks, out, block_max_neon<RUNNER_MAXIMA_BLOCK>);
}
#endif

int32_t argmax_scalar(const float * x, int32_t n) {
    return argmax_with(x, n, block_max_scalar<kBlock>);
}

// The best the CPU has, unless LLAMA_RUNNER_VECSCAN names a narrower one
// ("scalar", or "sse2" on x86-64): the tests run every path on one machine.
Impl choose() {
    const char * want = std::getenv("LLAMA_RUNNER_VECSCAN");
    const std::string w = want != nullptr ? want : "";
    if (w == "scalar") {
        return {"scalar", argmax_scalar, next_ge_scalar, mask_ge_scalar, maxima_scalar};
    }
#if RUNNER_VECSCAN_X86
    if (w != "sse2" && has_avx2()) {
        return {"avx2", argmax_avx2, next_ge_avx2, mask_ge_avx2, maxima_avx2};
    }
    return {"sse2", argmax_sse2, next_ge_sse2, mask_ge_sse2, maxima_sse2};
#elif RUNNER_VECSCAN_NEON
    return {"neon", argmax_neon, next_ge_neon, mask_ge_scalar, maxima_neon};
#else
    return {"scalar", argmax_scalar, next_ge_scalar, mask_ge_scalar, maxima_scalar};
#endif
}

const Impl & impl() {
    static const Impl chosen = choose();
    return chosen;
}

}  // namespace

extern "C" int32_t runner_argmax_f32(const float * x, int32_t n) {
    return impl().argmax(x, n);
}

extern "C" int32_t runner_next_block_ge(const float * x, int32_t from, int32_t end, float floor) {
    return impl().next_ge(x, from, end, floor);
}

extern "C" uint32_t runner_mask16_ge(const float * x, float floor) {
    return impl().mask_ge(x, floor);
}

extern "C" void runner_block_maxima(const float * x, int32_t n_blocks, float * out) {
    impl().maxima(x, n_blocks, out);
}

extern "C" const char * runner_vecscan_isa(void) {
    return impl().isa;
}
