// See fastsample.h.  The stages follow llama.cpp's samplers of the same name
// (llama-sampler.cpp at the pinned commit); only the data layout differs.
#include "fastsample.h"
#include "vecscan.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <deque>
#include <new>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

struct Cand {
    float logit;
    int32_t id;
};

// A token of the penalty window and how often it occurs there.  The sampler
// reads them all for every pick, so they sit in one array, not in a hash
// map's scattered nodes (a cache miss each once other rows have been read).
struct Pen {
    int32_t token;
    int32_t count;
};

// Descending by logit; ties by id so the order never depends on the scan.
inline bool better(const Cand & a, const Cand & b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

// splitmix64, to spread a 32-bit seed over xoshiro's state.
inline uint64_t splitmix(uint64_t & x) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// Index of the lowest set bit of bits (!= 0).
inline int lowest_bit(uint32_t bits) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctz(bits);
#else
    int j = 0;
    while ((bits & 1u) == 0) {
        bits >>= 1;
        ++j;
    }
    return j;
#endif
}

// From this m on, top_raw keeps its candidates in a buffer, not a heap.
// Below it the heap's floor reaches the top of the row within a few
// blocks and few entries pass (m = 1 is an argmax that skips penalised
// tokens); at m = 8 the two were even on SmolLM2's logits.
constexpr int32_t kBufferMinM = 16;

// Which top-k a sampler uses next (runner_fast_sampler::flat).  On a peaked
// row (a trained model, most positions) the one-pass scan's floor reaches
// the top within a few blocks: SmolLM2's rows let 30-70 blocks of 16 past
// it, and one read is cheapest.  On a flat row (a random-weight model, an
// unsure position) 260-300 blocks passed, and reading block maxima first
// halves the cost.  Each path measures its row and sets the flag for the
// next: more blocks of 16 past the one-pass floor than kFlatBlocks16, or
// more block maxima past the floor over maxima than kFlatMaxima (about 115
// on SmolLM2's rows, 225 on the random model's), means flat.
constexpr int32_t kFlatBlocks16 = 120;
constexpr int32_t kFlatMaxima = 170;

// penalised_mask's flags.
constexpr uint8_t kInWindow = 1;
constexpr uint8_t kBiased = 2;

}  // namespace

struct runner_fast_sampler {
    int32_t n_vocab;          // logits per row
    float temperature;        // <= 0: greedy
    int32_t top_k;            // candidates kept before top-p (sampling only)
    float top_p;              // nucleus mass; >= 1 disables
    float min_p;              // relative probability floor; <= 0 disables
    int32_t last_n;           // penalty window in tokens; 0 disables penalties
    float repeat;             // repeat penalty (1: none)
    float freq;               // frequency penalty per occurrence
    float present;            // presence penalty
    bool penalise;            // any penalty is active
    bool flat = false;        // the last rows were flat: top_raw reads block maxima first
    int scan = RUNNER_FAST_SCAN_AUTO;  // top_raw's choice: by `flat`, or fixed
    uint64_t rng[4];          // xoshiro256** state
    std::deque<int32_t> window;                   // the last last_n accepted tokens
    std::vector<Pen> pens;                        // the window's distinct tokens, in no order
    std::unordered_map<int32_t, int32_t> pen_at;  // token -> its index in pens
    std::unordered_map<int32_t, float> bias;      // token -> logit bias (llama.cpp's stage, before penalties)
    // n_vocab flags, per token: kInWindow (in pens), kBiased (a key
    // of bias).  A flagged token's logit is adjusted on the side.
    std::vector<uint8_t> penalised_mask;
    // per block of RUNNER_MAXIMA_BLOCK tokens, how many of them are flagged
    std::vector<uint16_t> flagged_in_block;
    std::vector<Cand> heap;   // scratch: the best raw logits (a min-heap in top_raw_heap)
    std::vector<float> maxima;  // scratch: top_raw's block maxima
    std::vector<float> order;   // scratch: their copy, side blocks at -inf
    std::vector<float> kept;    // scratch: the largest of them so far
    std::vector<int32_t> side_blocks;  // scratch: the blocks that hold side tokens
    std::vector<Cand> cands;  // scratch: candidates through the stages
    std::vector<float> probs; // scratch: their probabilities
};

namespace {

double uniform01(runner_fast_sampler * s) {
    uint64_t * st = s->rng;
    const uint64_t result = rotl(st[1] * 5, 7) * 9;
    const uint64_t t = st[1] << 17;
    st[2] ^= st[0];
    st[3] ^= st[1];
    st[1] ^= st[2];
    st[0] ^= st[3];
    st[2] ^= t;
    st[3] = rotl(st[3], 45);
    return (double) (result >> 11) * 0x1.0p-53;
}

// The mask of tokens the raw scan skips (their logits are adjusted on the
// side), or NULL when no token is.
const uint8_t * side_mask(const runner_fast_sampler * s) {
    const bool any = (s->penalise && !s->pens.empty()) || !s->bias.empty();
    return any ? s->penalised_mask.data() : nullptr;
}

// Set or clear `flag` in a token's mask entry, keeping flagged_in_block.
void set_flag(runner_fast_sampler * s, int32_t token, uint8_t flag) {
    uint8_t & f = s->penalised_mask[(size_t) token];
    if (f == 0) {
        s->flagged_in_block[(size_t) token / RUNNER_MAXIMA_BLOCK]++;
    }
    f |= flag;
}

void clear_flag(runner_fast_sampler * s, int32_t token, uint8_t flag) {
    uint8_t & f = s->penalised_mask[(size_t) token];
    if (f != 0 && (f &= (uint8_t) ~flag) == 0) {
        s->flagged_in_block[(size_t) token / RUNNER_MAXIMA_BLOCK]--;
    }
}

float penalised(const runner_fast_sampler * s, float logit, int32_t count) {
    logit = logit <= 0 ? logit * s->repeat : logit / s->repeat;
    return logit - float(count) * s->freq - (count > 0 ? s->present : 0.0f);
}

// top_raw for small m, with a min-heap whose top is the floor.  Blocks of
// 16 with no value at or above the heap's floor are skipped by
// runner_next_block_ge (vecscan.h), a vector compare that NaN never passes
// (consider() drops NaN too); the penalised flag is read only for a value
// that could enter.
void top_raw_heap(runner_fast_sampler * s, const float * logits, int32_t n, int32_t m) {
    const uint8_t * skip = side_mask(s);
    auto & heap = s->heap;
    heap.clear();
    auto worse = [](const Cand & a, const Cand & b) { return better(a, b); };  // min-heap on top
    float floor = -INFINITY;
    int32_t i = 0;
    auto consider = [&](int32_t j) {
        const float x = logits[j];
        if (!(x >= floor) || (skip != nullptr && skip[j])) {  // also drops NaN
            return;
        }
        const Cand c{x, j};
        if ((int32_t) heap.size() < m) {
            heap.push_back(c);
            std::push_heap(heap.begin(), heap.end(), worse);
            if ((int32_t) heap.size() == m) {
                floor = heap.front().logit;
            }
        } else if (better(c, heap.front())) {
            std::pop_heap(heap.begin(), heap.end(), worse);
            heap.back() = c;
            std::push_heap(heap.begin(), heap.end(), worse);
            floor = heap.front().logit;
        }
    };
    const int32_t n16 = n - n % 16;
    while ((i = runner_next_block_ge(logits, i, n16, floor)) < n16) {
        for (int j = 0; j < 16; ++j) {
            consider(i + j);
        }
        i += 16;
    }
    for (; i < n; ++i) {
        consider(i);
    }
    std::sort(heap.begin(), heap.end(), better);
}

// top_raw for m >= kBufferMinM when top_raw_blocks would read much of the
// row twice.  One pass; blocks of 16 with no value at or above the floor
// are skipped by runner_next_block_ge (vecscan.h), a vector compare that
// NaN never passes.  What reaches the floor is appended to a buffer, and
// when the buffer holds 2m + 16 its m best are kept (nth_element) and the
// floor rises to the m-th.  On SmolLM2's logits at top_k 40 about 220
// entries pass a floor that keeps rising, and keeping them in a heap costs
// 30-40 ns each; with the entries of a passing block taken by their bits
// (runner_mask16_ge) rather than tested one by one, 5.3-8.3 us against the
// heap's 6.3-12.6 (the row's one read, an argmax, is 2.5).
void top_raw_rising(runner_fast_sampler * s, const float * logits, int32_t n, int32_t m) {
    const uint8_t * skip = side_mask(s);
    auto & out = s->heap;
    out.clear();
    const size_t cap = 2 * (size_t) m + 16;
    float floor = -INFINITY;
    auto take = [&](int32_t j) {
        if (skip == nullptr || !skip[j]) {
            out.push_back(Cand{logits[j], j});
        }
    };
    int32_t i = 0;
    int32_t passed = 0;
    const int32_t n16 = n - n % 16;
    while ((i = runner_next_block_ge(logits, i, n16, floor)) < n16) {
        ++passed;
        // Only the entries that reach the floor, by their bits.
        for (uint32_t bits = runner_mask16_ge(logits + i, floor); bits != 0; bits &= bits - 1) {
            take(i + lowest_bit(bits));
        }
        if (out.size() >= cap) {
            std::nth_element(out.begin(), out.begin() + (m - 1), out.end(), better);
            out.resize((size_t) m);
            floor = out.back().logit;  // the m-th best: an entry below it can never be kept
        }
        i += 16;
    }
    for (; i < n; ++i) {
        if (logits[i] >= floor) {  // false for NaN
            take(i);
        }
    }
    if ((int32_t) out.size() > m) {
        std::nth_element(out.begin(), out.begin() + m, out.end(), better);
        out.resize((size_t) m);
    }
    std::sort(out.begin(), out.end(), better);
    s->flat = passed > kFlatBlocks16;
}


// The `m` largest of logits[0:n] (NaN and -inf never enter) among the
// tokens that are not adjusted on the side, into s->heap sorted by `better`.
//
// Two passes.  The first takes the maximum of every block of 64
// (runner_block_maxima: one streaming read, no branches on the data).
// Among the blocks that hold no side token, the m-th largest maximum T is a
// floor: those m blocks each hold a plain token >= T, so nothing below T can
// be among the m best.  The second pass reads only the blocks whose maximum
// reaches T (about m of SmolLM2's 768) and keeps their entries >= T; only
// in blocks that hold a side token is the side mask read.
//
// The single pass it replaces (top_raw_rising) raised a floor as it went:
// cheap on a peaked row, but on a flat one (a random-weight model, a
// high-entropy position) 500 entries in 290 blocks of 16 passed that floor,
// each a mispredicted branch, with 8 rounds of nth_element.
void top_raw_blocks(runner_fast_sampler * s, const float * logits, int32_t n, int32_t m) {
    const uint8_t * skip = side_mask(s);
    constexpr int32_t kB = RUNNER_MAXIMA_BLOCK;
    const int32_t n_blocks = n / kB;
    auto & maxima = s->maxima;
    maxima.resize((size_t) n_blocks);
    runner_block_maxima(logits, n_blocks, maxima.data());
    const uint16_t * flagged = skip == nullptr ? nullptr : s->flagged_in_block.data();  // side tokens per block
    // The m-th largest maximum among the blocks without a side token, by a
    // floor that rises as the scan goes (as in top_raw_rising, over 768
    // values in cache instead of 49,152).
    auto & order = s->order;
    auto & side_blocks = s->side_blocks;
    side_blocks.clear();
    const float * from = maxima.data();
    if (skip != nullptr) {
        // A block counts as it is unless a side token holds its maximum;
        // such a block is left out here and counted below with its largest
        // plain entry.
        order.assign(maxima.begin(), maxima.end());
        auto mark = [&](int32_t token) {
            const size_t b = (size_t) token / kB;
            // once: a marked block is at -inf; NaN never holds a maximum
            if ((int32_t) b < n_blocks && order[b] > -INFINITY && logits[token] >= order[b]) {
                order[b] = -INFINITY;
                side_blocks.push_back((int32_t) b);
            }
        };
        if (s->penalise) {
            for (const Pen & p : s->pens) {
                mark(p.token);
            }
        }
        for (const auto & kv : s->bias) {
            mark(kv.first);
        }
        from = order.data();
    }
    auto & buf = s->kept;
    buf.clear();
    const size_t cap = 2 * (size_t) m + 16;
    auto later = [](float a, float c) { return a > c; };
    float floor = -INFINITY;
    int32_t pushed = 0;
    int32_t b = 0;
    const int32_t nb16 = n_blocks - n_blocks % 16;
    while ((b = runner_next_block_ge(from, b, nb16, floor)) < nb16) {
        for (uint32_t bits = runner_mask16_ge(from + b, floor); bits != 0; bits &= bits - 1) {
            buf.push_back(from[b + lowest_bit(bits)]);
            ++pushed;
        }
        if (buf.size() >= cap) {
            std::nth_element(buf.begin(), buf.begin() + (m - 1), buf.end(), later);
            buf.resize((size_t) m);
            floor = buf.back();
        }
        b += 16;
    }
    for (; b < n_blocks; ++b) {
        if (from[b] >= floor) {
            buf.push_back(from[b]);
        }
    }
    // A block that holds side tokens counts with its largest plain entry,
    // computed only where its maximum beats the floor so far: on a real
    // model the window's tokens sit in the blocks with the highest maxima,
    // and leaving those blocks out would sink the floor.
    floor = -INFINITY;
    if ((int32_t) buf.size() >= m) {
        std::nth_element(buf.begin(), buf.begin() + (m - 1), buf.end(), later);
        floor = buf[(size_t) m - 1];
    }
    bool more = false;
    for (const int32_t sb : side_blocks) {
        if (maxima[(size_t) sb] > floor) {
            const float * x = logits + (size_t) sb * kB;
            const uint8_t * k = skip + (size_t) sb * kB;
            float best = -INFINITY;
            for (int32_t j = 0; j < kB; ++j) {
                best = (k[j] == 0 && x[j] > best) ? x[j] : best;  // false for NaN
            }
            if (best > floor) {
                buf.push_back(best);
                more = true;
            }
        }
    }
    if (more) {
        std::nth_element(buf.begin(), buf.begin() + (m - 1), buf.end(), later);
        floor = buf[(size_t) m - 1];
    } else if ((int32_t) buf.size() < m) {  // every finite entry is a candidate
        floor = -INFINITY;
    }
    // -inf is never a candidate (its probability is 0 at every stage): rows
    // a grammar masked are mostly -inf.
    if (!(floor > -INFINITY)) {
        floor = -FLT_MAX;
    }
    auto & out = s->heap;
    out.clear();
    auto take_block = [&](int32_t i) {
        const bool check = flagged != nullptr && flagged[i / kB] != 0;
        for (int32_t q = 0; q < kB; q += 16) {
            for (uint32_t bits = runner_mask16_ge(logits + i + q, floor); bits != 0; bits &= bits - 1) {
                const int32_t j = i + q + lowest_bit(bits);
                if (!check || !skip[j]) {
                    out.push_back(Cand{logits[j], j});
                }
            }
        }
    };
    // The blocks whose maximum reaches the floor, 16 maxima at a time.
    b = 0;
    while ((b = runner_next_block_ge(maxima.data(), b, nb16, floor)) < nb16) {
        for (uint32_t bits = runner_mask16_ge(maxima.data() + b, floor); bits != 0; bits &= bits - 1) {
            take_block((b + lowest_bit(bits)) * kB);
        }
        b += 16;
    }
    for (; b < n_blocks; ++b) {
        if (maxima[(size_t) b] >= floor) {
            take_block(b * kB);
        }
    }
    for (int32_t i = n_blocks * kB; i < n; ++i) {  // the tail past the last block
        if (logits[i] >= floor && (skip == nullptr || !skip[i])) {
            out.push_back(Cand{logits[i], i});
        }
    }
    if ((int32_t) out.size() > m) {
        std::nth_element(out.begin(), out.begin() + m, out.end(), better);
        out.resize((size_t) m);
    }
    std::sort(out.begin(), out.end(), better);
    s->flat = pushed > kFlatMaxima;
}

// The `m` largest of logits[0:n] among the tokens not adjusted on the side,
// into s->heap sorted by `better`: by a heap for small m, by block maxima
// while m is a small share of the blocks (top_k up to 192 on SmolLM2's
// 768), else in one pass.
void top_raw(runner_fast_sampler * s, const float * logits, int32_t n, int32_t m) {
    if (m < kBufferMinM) {
        top_raw_heap(s, logits, n, m);
        return;
    }
    const bool blocks = s->scan == RUNNER_FAST_SCAN_BLOCKS || (s->scan == RUNNER_FAST_SCAN_AUTO && s->flat);
    if (blocks && (size_t) m * 4 <= (size_t) (n / RUNNER_MAXIMA_BLOCK)) {
        top_raw_blocks(s, logits, n, m);
    } else {
        top_raw_rising(s, logits, n, m);
    }
}

// s->cands := the candidates after logit bias, penalties and top-k (sorted
// by `better`): the k best of (raw logits of the tokens neither biased nor
// penalised) and (the adjusted logits of those that are).
void candidates(runner_fast_sampler * s, const float * logits, int32_t k) {
    const int32_t n_pen = s->penalise ? (int32_t) s->pens.size() : 0;
    top_raw(s, logits, s->n_vocab, std::min(s->n_vocab, k));
    auto & out = s->cands;
    out.assign(s->heap.begin(), s->heap.end());
    if (n_pen > 0 || !s->bias.empty()) {
        // With k raw entries in hand, an adjusted entry that does not beat
        // the k-th cannot be among the k best (the window holds up to
        // repeat_last_n of them, few of which reach the top after penalty).
        const size_t n_raw = out.size();
        const bool full = (int32_t) n_raw >= k;
        auto offer = [&](int32_t id, float x) {
            if (!std::isnan(x)) {
                const Cand c{x, id};
                if (!full || better(c, out[n_raw - 1])) {
                    out.push_back(c);
                }
            }
        };
        const uint8_t * mask = s->penalised_mask.data();
        for (const auto & kv : s->bias) {  // biased tokens outside the window
            if (n_pen == 0 || !(mask[kv.first] & kInWindow)) {
                offer(kv.first, logits[kv.first] + kv.second);
            }
        }
        for (int32_t i = 0; i < n_pen; ++i) {
            const Pen & p = s->pens[(size_t) i];
            const float bias = (mask[p.token] & kBiased) ? s->bias.find(p.token)->second : 0.0f;
            offer(p.token, penalised(s, logits[p.token] + bias, p.count));
        }
        std::sort(out.begin() + (std::ptrdiff_t) n_raw, out.end(), better);
        std::inplace_merge(out.begin(), out.begin() + (std::ptrdiff_t) n_raw, out.end(), better);
    }
    if ((int32_t) out.size() > k) {
        out.resize(k);
    }
}

// top-p, min-p and temperature over s->cands (sorted, non-empty); fills
// s->probs with the normalised probabilities of what is kept.
void stages(runner_fast_sampler * s) {
    auto & c = s->cands;
    auto & p = s->probs;
    const size_t n = c.size();
    p.resize(n);
    // top-p on the softmax of the untempered logits (llama.cpp: top_p runs
    // before temp in this chain).
    if (s->top_p < 1.0f && n > 1) {
        double sum = 0.0;
        for (size_t i = 0; i < n; ++i) {
            p[i] = expf(c[i].logit - c[0].logit);
            sum += p[i];
        }
        double cum = 0.0;
        size_t keep = n;
        for (size_t i = 0; i < n; ++i) {
            cum += p[i] / sum;
            if (cum >= s->top_p) {
                keep = i + 1;
                break;
            }
        }
        c.resize(keep);
    }
    if (s->min_p > 0.0f && c.size() > 1) {
        const float min_logit = c[0].logit + logf(s->min_p);
        size_t keep = 1;
        while (keep < c.size() && c[keep].logit >= min_logit) {
            ++keep;
        }
        c.resize(keep);
    }
    const size_t m = c.size();
    p.resize(m);
    double sum = 0.0;
    for (size_t i = 0; i < m; ++i) {
        p[i] = expf((c[i].logit - c[0].logit) / s->temperature);
        sum += p[i];
    }
    for (size_t i = 0; i < m; ++i) {
        p[i] = (float) (p[i] / sum);
    }
}

int32_t greedy(runner_fast_sampler * s, const float * logits) {
    candidates(s, logits, 1);
    return s->cands.empty() ? -1 : s->cands[0].id;
}

}  // namespace

extern "C" runner_fast_sampler * runner_fast_new(int32_t n_vocab, float temperature, int32_t top_k,
                                                 float top_p, float min_p, int32_t repeat_last_n,
                                                 float repeat_penalty, float frequency_penalty,
                                                 float presence_penalty, uint64_t seed) {
    if (n_vocab <= 0 || repeat_penalty <= 0.0f) {
        return nullptr;
    }
    if (temperature > 0.0f && (top_k < 1 || top_k > RUNNER_FAST_MAX_TOP_K)) {
        return nullptr;
    }
    auto * s = new (std::nothrow) runner_fast_sampler();
    if (s == nullptr) {
        return nullptr;
    }
    s->n_vocab = n_vocab;
    s->temperature = temperature;
    s->top_k = std::min(top_k, n_vocab);
    s->top_p = top_p;
    s->min_p = min_p;
    s->last_n = std::max(repeat_last_n, 0);
    s->repeat = repeat_penalty;
    s->freq = frequency_penalty;
    s->present = presence_penalty;
    s->penalise = s->last_n > 0 && (repeat_penalty != 1.0f || frequency_penalty != 0.0f ||
                                    presence_penalty != 0.0f);
    try {
        s->penalised_mask.assign((size_t) n_vocab, 0);
        s->flagged_in_block.assign((size_t) n_vocab / RUNNER_MAXIMA_BLOCK + 1, 0);
    } catch (...) {
        delete s;
        return nullptr;
    }
    uint64_t x = seed;
    for (auto & w : s->rng) {
        w = splitmix(x);
    }
    return s;
}

extern "C" void runner_fast_free(runner_fast_sampler * s) { delete s; }

extern "C" void runner_fast_accept(runner_fast_sampler * s, int32_t token) {
    if (!s->penalise) {
        return;
    }
    if ((int32_t) s->window.size() >= s->last_n) {
        const int32_t old = s->window.front();
        s->window.pop_front();
        auto it = s->pen_at.find(old);
        if (it != s->pen_at.end() && --s->pens[(size_t) it->second].count <= 0) {
            const int32_t at = it->second;
            s->pen_at.erase(it);
            if ((size_t) at + 1 < s->pens.size()) {  // the last one takes its place
                s->pens[(size_t) at] = s->pens.back();
                s->pen_at[s->pens[(size_t) at].token] = at;
            }
            s->pens.pop_back();
            clear_flag(s, old, kInWindow);
        }
    }
    s->window.push_back(token);
    auto [it, fresh] = s->pen_at.try_emplace(token, (int32_t) s->pens.size());
    if (fresh) {
        s->pens.push_back(Pen{token, 1});
        set_flag(s, token, kInWindow);
    } else {
        s->pens[(size_t) it->second].count++;
    }
}

extern "C" int runner_fast_set_bias(runner_fast_sampler * s, const int32_t * tokens, const float * biases,
                                    int32_t n) {
    for (int32_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= s->n_vocab || std::isnan(biases[i])) {
            return -1;
        }
    }
    try {
        for (int32_t i = 0; i < n; ++i) {
            s->bias[tokens[i]] += biases[i];
            set_flag(s, tokens[i], kBiased);
        }
    } catch (...) {
        return -1;
    }
    return 0;
}

extern "C" void runner_fast_set_scan(runner_fast_sampler * s, int scan) {
    s->scan = scan;
}

extern "C" void runner_fast_reset(runner_fast_sampler * s) {
    for (const Pen & p : s->pens) {
        clear_flag(s, p.token, kInWindow);
    }
    s->window.clear();
    s->pens.clear();
    s->pen_at.clear();
}

extern "C" int32_t runner_fast_sample(runner_fast_sampler * s, const float * logits) {
    const int32_t tok = runner_fast_pick(s, logits);
    if (tok >= 0) {
        runner_fast_accept(s, tok);
    }
    return tok;
}

extern "C" int32_t runner_fast_pick(runner_fast_sampler * s, const float * logits) {
    int32_t tok;
    if (s->temperature <= 0.0f) {
        tok = greedy(s, logits);
    } else {
        candidates(s, logits, s->top_k);
        if (s->cands.empty()) {
            return -1;
        }
        stages(s);
        const double r = uniform01(s);
        double cum = 0.0;
        size_t pick = s->cands.size() - 1;
        for (size_t i = 0; i < s->cands.size(); ++i) {
            cum += s->probs[i];
            if (r < cum) {
                pick = i;
                break;
            }
        }
        tok = s->cands[pick].id;
    }
    return tok;
}

extern "C" int32_t runner_fast_distribution(runner_fast_sampler * s, const float * logits,
                                            int32_t * tokens, float * probs, int32_t cap) {
    if (s->temperature <= 0.0f) {
        const int32_t tok = greedy(s, logits);
        if (tok < 0 || cap < 1) {
            return 0;
        }
        tokens[0] = tok;
        probs[0] = 1.0f;
        return 1;
    }
    candidates(s, logits, s->top_k);
    if (s->cands.empty()) {
        return 0;
    }
    stages(s);
    const int32_t n = std::min<int32_t>(cap, (int32_t) s->cands.size());
    for (int32_t i = 0; i < n; ++i) {
        tokens[i] = s->cands[i].id;
        probs[i] = s->probs[i];
    }
    return n;
}
