# ext/guard.h: the C++ shim that keeps llama.cpp's exceptions inside one request.

from libc.stdint cimport int32_t

from c_llama cimport llama_context, llama_sampler, llama_token, llama_token_data, llama_vocab

cdef extern from "guard.h" nogil:
    enum:
        RUNNER_SAMPLE_OK
        RUNNER_SAMPLE_NO_TOKEN
        RUNNER_SAMPLE_ERROR

    int runner_sample(llama_sampler * chain, llama_sampler * grammar, llama_context * ctx,
                      int32_t idx, int32_t n_vocab, llama_token_data * cur, llama_token * token,
                      char * err, size_t err_len)
    int runner_sampler_accept(llama_sampler * smpl, llama_token token, char * err, size_t err_len)
    int runner_grammar_allows(llama_sampler * grammar, llama_token token, char * err, size_t err_len)
    llama_sampler * runner_grammar_init(const llama_vocab * vocab, const char * grammar,
                                        const char * root, char * err, size_t err_len)
