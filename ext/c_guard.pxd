# ext/guard.h: the C++ shim that keeps llama.cpp's exceptions inside one request.

from libc.stdint cimport int32_t, uint64_t

from c_llama cimport llama_context, llama_sampler, llama_seq_id, llama_token, llama_token_data, llama_vocab

# ext/fastsample.h's handle, declared first: guard.h's native grammar
# sampling takes it too.
cdef extern from "fastsample.h" nogil:
    ctypedef struct runner_fast_sampler:
        pass

cdef extern from "guard.h" nogil:
    enum:
        RUNNER_SAMPLE_OK
        RUNNER_SAMPLE_NO_TOKEN
        RUNNER_SAMPLE_ERROR
        RUNNER_SAMPLE_DEFERRED

    int runner_sample(llama_sampler * chain, llama_sampler * grammar, llama_context * ctx,
                      int32_t idx, int32_t n_vocab, llama_token_data * cur, llama_token * token,
                      float * keep, char * err, size_t err_len)
    int runner_sample_constrained(llama_sampler * chain, llama_sampler * grammar, const float * logits,
                                  int32_t n_vocab, llama_token_data * cur, llama_token * token,
                                  char * err, size_t err_len)
    int runner_graph_attach(llama_context * ctx, llama_seq_id seq, llama_sampler * chain,
                            char * err, size_t err_len)
    int runner_graph_sample(llama_sampler * chain, llama_context * ctx, int32_t idx,
                            llama_token_data * cur, int32_t n_vocab, llama_token * token,
                            char * err, size_t err_len)
    int runner_fast_grammar_sample(runner_fast_sampler * fast, llama_sampler * grammar, const float * logits,
                                   int32_t n_vocab, llama_token_data * cur, float * keep, int defer,
                                   llama_token * token, char * err, size_t err_len)
    int runner_fast_grammar_constrained(runner_fast_sampler * fast, llama_sampler * grammar, float * row,
                                        int32_t n_vocab, llama_token_data * cur, llama_token * token,
                                        char * err, size_t err_len)
    int runner_sampler_accept(llama_sampler * smpl, llama_token token, char * err, size_t err_len)
    int runner_grammar_allows(llama_sampler * grammar, llama_token token, char * err, size_t err_len)
    int runner_grammar_probe(llama_sampler * grammar, int32_t first, int32_t stride, int32_t n,
                             llama_token_data * cur, char * err, size_t err_len)
    llama_sampler * runner_grammar_init(const llama_vocab * vocab, const char * grammar,
                                        const char * root, char * err, size_t err_len)
    llama_sampler * runner_dry_init(const llama_vocab * vocab, float multiplier, float base,
                                    int32_t allowed_length, int32_t penalty_last_n,
                                    const char ** breakers, size_t n_breakers, char * err, size_t err_len)
    int32_t RUNNER_THREW
    int32_t runner_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len,
                            llama_token * tokens, int32_t n_tokens_max, bint add_special,
                            bint parse_special, char * err, size_t err_len)
    int32_t runner_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf,
                                  int32_t length, int32_t lstrip, bint special, char * err, size_t err_len)
    int32_t runner_detokenize(const llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                              char * text, int32_t text_len_max, bint remove_special,
                              bint unparse_special, char * err, size_t err_len)

# ext/fastsample.h: the native sampler for the common chain.
cdef extern from "fastsample.h" nogil:
    enum:
        RUNNER_FAST_MAX_TOP_K
    runner_fast_sampler * runner_fast_new(int32_t n_vocab, float temperature, int32_t top_k, float top_p,
                                          float min_p, int32_t repeat_last_n, float repeat_penalty,
                                          float frequency_penalty, float presence_penalty, uint64_t seed)
    void runner_fast_free(runner_fast_sampler * s)
    int runner_fast_set_bias(runner_fast_sampler * s, const int32_t * tokens, const float * biases, int32_t n)
    void runner_fast_accept(runner_fast_sampler * s, int32_t token)
    void runner_fast_reset(runner_fast_sampler * s)
    enum:
        RUNNER_FAST_SCAN_AUTO
        RUNNER_FAST_SCAN_ONE_PASS
        RUNNER_FAST_SCAN_BLOCKS
    void runner_fast_set_scan(runner_fast_sampler * s, int scan)
    int32_t runner_fast_sample(runner_fast_sampler * s, const float * logits)
    int32_t runner_fast_distribution(runner_fast_sampler * s, const float * logits, int32_t * tokens,
                                     float * probs, int32_t cap)

# ext/vecscan.h: vector scans over a row of logits.
cdef extern from "vecscan.h" nogil:
    int32_t runner_argmax_f32(const float * x, int32_t n) noexcept
    enum:
        RUNNER_MAXIMA_BLOCK
    void runner_block_maxima(const float * x, int32_t n_blocks, float * out) noexcept
    const char * runner_vecscan_isa() noexcept

# ext/samplerows.h: one step's rows sampled on several threads.
cdef extern from "samplerows.h" nogil:
    ctypedef int32_t (*runner_argmax_fn)(const float * x, int32_t n) noexcept nogil
    void runner_sample_rows(runner_fast_sampler ** fasts, const float ** logits, int32_t * toks,
                            int32_t n, int32_t n_vocab, runner_argmax_fn argmax, int32_t n_threads)

# ext/jsonschema.h: llama.cpp's JSON-schema-to-GBNF converter behind a C entry point.
cdef extern from "jsonschema.h" nogil:
    char * runner_json_schema_to_grammar(const char * schema, size_t len, char * err, size_t err_len)
