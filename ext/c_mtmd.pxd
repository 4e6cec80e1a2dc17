# Declarations of libmtmd (tools/mtmd/mtmd.h, mtmd-helper.h), grouped like the
# headers.  The multimodal wrappers build on these.
from libc.stdint cimport int32_t, uint32_t
from libc.stddef cimport size_t

from c_ggml cimport ggml_backend_dev_t, ggml_log_callback
from c_llama cimport llama_model, llama_context, llama_token, llama_pos, llama_seq_id, llama_flash_attn_type


cdef extern from "mtmd.h" nogil:
    enum mtmd_input_chunk_type:
        MTMD_INPUT_CHUNK_TYPE_TEXT
        MTMD_INPUT_CHUNK_TYPE_IMAGE
        MTMD_INPUT_CHUNK_TYPE_AUDIO

    ctypedef struct mtmd_context
    ctypedef struct mtmd_bitmap
    ctypedef struct mtmd_image_tokens
    ctypedef struct mtmd_input_chunk
    ctypedef struct mtmd_input_chunks

    ctypedef struct mtmd_input_text:
        const char * text
        size_t text_len
        bint add_special
        bint parse_special

    struct mtmd_context_params:
        bint use_gpu
        ggml_backend_dev_t device
        bint print_timings
        int n_threads
        const char * media_marker
        llama_flash_attn_type flash_attn_type
        bint warmup
        int image_min_tokens
        int image_max_tokens
        int32_t batch_max_tokens

    const char * mtmd_default_marker()
    mtmd_context_params mtmd_context_params_default()
    mtmd_context * mtmd_init_from_file(const char * mmproj_fname, const llama_model * text_model,
                                       const mtmd_context_params ctx_params)
    void mtmd_free(mtmd_context * ctx)
    bint mtmd_decode_use_non_causal(const mtmd_context * ctx, const mtmd_input_chunk * chunk)
    bint mtmd_decode_use_mrope(const mtmd_context * ctx)
    bint mtmd_support_vision(const mtmd_context * ctx)
    bint mtmd_support_audio(const mtmd_context * ctx)
    int mtmd_get_audio_sample_rate(const mtmd_context * ctx)
    const char * mtmd_get_marker(const mtmd_context * ctx)

    mtmd_bitmap * mtmd_bitmap_init(uint32_t nx, uint32_t ny, const unsigned char * data)
    mtmd_bitmap * mtmd_bitmap_init_from_audio(size_t n_samples, const float * data)
    uint32_t mtmd_bitmap_get_nx(const mtmd_bitmap * bitmap)
    uint32_t mtmd_bitmap_get_ny(const mtmd_bitmap * bitmap)
    size_t mtmd_bitmap_get_n_bytes(const mtmd_bitmap * bitmap)
    bint mtmd_bitmap_is_audio(const mtmd_bitmap * bitmap)
    void mtmd_bitmap_free(mtmd_bitmap * bitmap)
    const char * mtmd_bitmap_get_id(const mtmd_bitmap * bitmap)
    void mtmd_bitmap_set_id(mtmd_bitmap * bitmap, const char * id)

    mtmd_input_chunks * mtmd_input_chunks_init()
    size_t mtmd_input_chunks_size(const mtmd_input_chunks * chunks)
    const mtmd_input_chunk * mtmd_input_chunks_get(const mtmd_input_chunks * chunks, size_t idx)
    void mtmd_input_chunks_free(mtmd_input_chunks * chunks)

    mtmd_input_chunk_type mtmd_input_chunk_get_type(const mtmd_input_chunk * chunk)
    const llama_token * mtmd_input_chunk_get_tokens_text(const mtmd_input_chunk * chunk, size_t * n_tokens_output)
    const mtmd_image_tokens * mtmd_input_chunk_get_tokens_image(const mtmd_input_chunk * chunk)
    size_t mtmd_input_chunk_get_n_tokens(const mtmd_input_chunk * chunk)
    const char * mtmd_input_chunk_get_id(const mtmd_input_chunk * chunk)
    llama_pos mtmd_input_chunk_get_n_pos(const mtmd_input_chunk * chunk)

    struct mtmd_decoder_pos:
        uint32_t t
        uint32_t x
        uint32_t y
        uint32_t z
    mtmd_decoder_pos mtmd_image_tokens_get_decoder_pos(const mtmd_image_tokens * image_tokens,
                                                       llama_pos pos_0, size_t i)
    mtmd_input_chunk * mtmd_input_chunk_copy(const mtmd_input_chunk * chunk)
    void mtmd_input_chunk_free(mtmd_input_chunk * chunk)

    int32_t mtmd_tokenize(const mtmd_context * ctx, mtmd_input_chunks * output,
                          const mtmd_input_text * text, const mtmd_bitmap * const * bitmaps,
                          size_t n_bitmaps)
    int32_t mtmd_encode_chunk(mtmd_context * ctx, const mtmd_input_chunk * chunk)
    float * mtmd_get_output_embd(mtmd_context * ctx)
    void mtmd_log_set(ggml_log_callback log_callback, void * user_data)


cdef extern from "mtmd-helper.h" nogil:
    ctypedef struct mtmd_helper_video

    ctypedef struct mtmd_helper_init_opt:
        pass

    struct mtmd_helper_bitmap_wrapper:
        mtmd_bitmap * bitmap
        mtmd_helper_video * video_ctx

    mtmd_helper_init_opt mtmd_helper_init_opt_default()
    mtmd_helper_bitmap_wrapper mtmd_helper_bitmap_init_from_buf(
        const mtmd_context * ctx, const unsigned char * buf, size_t len, bint placeholder,
        mtmd_helper_init_opt opt)
    void mtmd_helper_video_free(mtmd_helper_video * ctx)
    void mtmd_helper_log_set(ggml_log_callback log_callback, void * user_data)
    size_t mtmd_helper_get_n_tokens(const mtmd_input_chunks * chunks)
    int32_t mtmd_helper_eval_chunk_single(mtmd_context * ctx, llama_context * lctx,
                                          const mtmd_input_chunk * chunk, llama_pos n_past,
                                          llama_seq_id seq_id, int32_t n_batch, bint logits_last,
                                          llama_pos * new_n_past)
    llama_pos mtmd_helper_get_n_pos(const mtmd_input_chunks * chunks)
    int32_t mtmd_helper_eval_chunk_single(mtmd_context * ctx, llama_context * lctx,
                                          const mtmd_input_chunk * chunk, llama_pos n_past,
                                          llama_seq_id seq_id, int32_t n_batch, bint logits_last,
                                          llama_pos * new_n_past)
