# Multimodal projector (libmtmd): media bytes -> chunks -> embedding rows.
#
# Policy (which chunk to encode, caching embeddings, where they go in the KV
# cache) lives in runner.engine.media and runner.engine.core; this file owns the mtmd
# context, bitmaps and chunks, and copies encoder output into numpy arrays.

cdef dict _CHUNK_KINDS = {
    c_mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT: "text",
    c_mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE: "image",
    c_mtmd.MTMD_INPUT_CHUNK_TYPE_AUDIO: "audio",
}


class MediaError(LlamaError, ValueError):
    """Media bytes that cannot be decoded, or a prompt whose markers and media
    do not match."""


class EncodeError(LlamaError):
    """The projector failed to encode a chunk."""


cdef class Bitmap:
    """Decoded media (RGB pixels or PCM samples), ready for tokenizing.

    ``id`` names the media; chunks made from it carry the same id.
    """
    cdef c_mtmd.mtmd_bitmap * ptr   # owned; NULL after close

    def __dealloc__(self):
        if self.ptr != NULL:
            c_mtmd.mtmd_bitmap_free(self.ptr)
            self.ptr = NULL

    def close(self):
        if self.ptr != NULL:
            c_mtmd.mtmd_bitmap_free(self.ptr)
            self.ptr = NULL

    cdef inline int _check(self) except -1:
        if self.ptr == NULL:
            raise ClosedError("bitmap is closed")
        return 0

    @property
    def id(self):
        self._check()
        return _str(c_mtmd.mtmd_bitmap_get_id(self.ptr))


cdef class MediaChunk:
    """One media chunk of a tokenized prompt (an owned copy of mtmd's chunk).

    ``n_tokens`` embedding rows go into the KV cache at ``n_pos`` positions
    (equal except for M-RoPE models).  Holds the preprocessed media until
    closed, so it can be encoded later.
    """
    cdef c_mtmd.mtmd_input_chunk * ptr  # owned; NULL after close
    cdef readonly str kind              # "image" or "audio"
    cdef readonly str id                # id of the bitmap it came from
    cdef readonly Py_ssize_t n_tokens   # embedding rows
    cdef readonly int32_t n_pos         # KV positions it occupies

    def __dealloc__(self):
        if self.ptr != NULL:
            c_mtmd.mtmd_input_chunk_free(self.ptr)
            self.ptr = NULL

    def close(self):
        if self.ptr != NULL:
            c_mtmd.mtmd_input_chunk_free(self.ptr)
            self.ptr = NULL

    def __repr__(self):
        return f"<MediaChunk {self.kind} {self.id[:12]} {self.n_tokens} tokens>"

    def mrope_positions(self, llama_pos pos0):
        """The four M-RoPE positions of every row when the chunk starts at
        ``pos0``, as an int32 array of shape (4, n_tokens), section-major like
        an embedding batch wants them (see :class:`Batch`).

        An image's rows share the temporal position ``pos0`` and take their
        row and column from ``pos0`` in the next two sections (mtmd's decoder
        positions); audio rows advance by one in every section.  Only for a
        projector whose ``uses_mrope`` is true.
        """
        if self.ptr == NULL:
            raise ClosedError("chunk is closed")
        out = np.empty((4, self.n_tokens), dtype=np.int32)
        cdef int32_t[:, ::1] view = out
        cdef const c_mtmd.mtmd_image_tokens * image = NULL
        cdef c_mtmd.mtmd_decoder_pos dp
        cdef Py_ssize_t i
        if c_mtmd.mtmd_input_chunk_get_type(self.ptr) == c_mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            image = c_mtmd.mtmd_input_chunk_get_tokens_image(self.ptr)
            if image == NULL:
                raise MediaError("the image chunk has no image tokens")
            for i in range(self.n_tokens):
                dp = c_mtmd.mtmd_image_tokens_get_decoder_pos(image, pos0, <size_t> i)
                view[0, i] = dp.t
                view[1, i] = dp.y
                view[2, i] = dp.x
                view[3, i] = dp.z
        else:
            for i in range(self.n_tokens):
                view[0, i] = view[1, i] = view[2, i] = view[3, i] = pos0 + <llama_pos> i
        return out


cdef class MtmdContext:
    """A multimodal projector loaded for one text model.

    Tokenizing is thread-safe; encoding is not (one thread at a time, the
    engine's loop thread).  The text model is kept alive.
    """
    cdef c_mtmd.mtmd_context * ptr   # owned; NULL after close
    cdef readonly Model model        # the text model the projector feeds
    cdef readonly str path           # projector file
    cdef readonly int32_t n_embd     # width of one embedding row
    cdef object _encode_lock         # encoding reuses one output buffer

    def __cinit__(self, Model model not None, str path not None, n_threads=None,
                  bint use_gpu=True, bint warmup=False):
        model._check()
        backend_init()
        if not os.path.isfile(path):
            raise ModelLoadError(f"projector file not found: {path}")
        cdef c_mtmd.mtmd_context_params params = c_mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.warmup = warmup
        params.n_threads = n_threads or os.cpu_count() or 1
        cdef bytes bpath = os.fsencode(path)
        cdef const char * cpath = bpath
        cdef c_mtmd.mtmd_context * ctx
        mark = error_mark()
        with nogil:
            ctx = c_mtmd.mtmd_init_from_file(cpath, model.ptr, params)
        if ctx == NULL:
            detail = errors_since(mark)
            raise ModelLoadError(f"cannot load projector {path}" + (f": {detail}" if detail else ""))
        self.ptr = ctx
        self.model = model
        self.path = path
        self.n_embd = llama_model_n_embd_inp(model.ptr)
        self._encode_lock = threading.Lock()

    def __dealloc__(self):
        if self.ptr != NULL:
            c_mtmd.mtmd_free(self.ptr)
            self.ptr = NULL

    def close(self):
        if self.ptr != NULL:
            c_mtmd.mtmd_free(self.ptr)
            self.ptr = NULL

    @property
    def closed(self):
        return self.ptr == NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef inline int _check(self) except -1:
        if self.ptr == NULL:
            raise ClosedError("projector is closed")
        return 0

    @property
    def supports_vision(self):
        self._check()
        return c_mtmd.mtmd_support_vision(self.ptr)

    @property
    def supports_audio(self):
        self._check()
        return c_mtmd.mtmd_support_audio(self.ptr)

    @property
    def audio_sample_rate(self):
        """Sample rate the audio encoder expects (-1 without one)."""
        self._check()
        return c_mtmd.mtmd_get_audio_sample_rate(self.ptr)

    @property
    def uses_mrope(self):
        """Whether media positions are multi-dimensional (Qwen2-VL style)."""
        self._check()
        return c_mtmd.mtmd_decode_use_mrope(self.ptr)

    @property
    def marker(self):
        self._check()
        return _str(c_mtmd.mtmd_get_marker(self.ptr))

    def non_causal(self, MediaChunk chunk not None):
        """Whether ``chunk`` must be decoded with non-causal attention, in one ubatch."""
        self._check()
        if chunk.ptr == NULL:
            raise ClosedError("chunk is closed")
        return c_mtmd.mtmd_decode_use_non_causal(self.ptr, chunk.ptr)

    def bitmap(self, data, str id not None):
        """Decode image (PNG, JPEG, BMP, GIF, ...) or audio (WAV, MP3, FLAC)
        bytes; raises :class:`MediaError` when they are not media mtmd reads."""
        self._check()
        cdef const unsigned char[::1] view = memoryview(data).cast("B")
        if view.shape[0] == 0:
            raise MediaError("media is empty (0 bytes)")
        cdef c_mtmd.mtmd_helper_bitmap_wrapper w
        with nogil:
            w = c_mtmd.mtmd_helper_bitmap_init_from_buf(self.ptr, &view[0], view.shape[0], False,
                                                        c_mtmd.mtmd_helper_init_opt_default())
        if w.video_ctx != NULL:
            c_mtmd.mtmd_helper_video_free(w.video_ctx)
            if w.bitmap != NULL:
                c_mtmd.mtmd_bitmap_free(w.bitmap)
            raise MediaError("video input is not supported")
        if w.bitmap == NULL:
            raise MediaError("cannot decode the media bytes (not a supported image or audio "
                             "file, or truncated)")
        cdef Bitmap bm = Bitmap.__new__(Bitmap)
        bm.ptr = w.bitmap
        c_mtmd.mtmd_bitmap_set_id(bm.ptr, id.encode())
        return bm

    def bitmap_from_rgb(self, pixels, str id not None):
        """An image from an (height, width, 3) uint8 array (decoded elsewhere)."""
        self._check()
        arr = np.ascontiguousarray(pixels, dtype=np.uint8)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise MediaError(f"RGB pixels must have shape (height, width, 3), not {arr.shape}")
        cdef const unsigned char[::1] flat = arr.reshape(-1)
        cdef Bitmap bm = Bitmap.__new__(Bitmap)
        bm.ptr = c_mtmd.mtmd_bitmap_init(<uint32_t> arr.shape[1], <uint32_t> arr.shape[0], &flat[0])
        if bm.ptr == NULL:
            raise MediaError("cannot create a bitmap")
        c_mtmd.mtmd_bitmap_set_id(bm.ptr, id.encode())
        return bm

    def tokenize(self, str text not None, bitmaps, bint add_special=True, bint parse_special=True):
        """Split ``text`` at its media markers.  Returns a list whose items are
        lists of token ids (text) or :class:`MediaChunk` (one per media chunk;
        a large image may give several).  The k-th marker takes ``bitmaps[k]``."""
        self._check()
        cdef list bms = list(bitmaps)
        cdef Py_ssize_t n = len(bms), i, k
        cdef Bitmap bm
        cdef const c_mtmd.mtmd_bitmap ** arr = NULL
        cdef bytes btext = text.encode("utf-8")
        cdef c_mtmd.mtmd_input_text inp
        inp.text = btext
        inp.text_len = len(btext)
        inp.add_special = add_special
        inp.parse_special = parse_special
        cdef c_mtmd.mtmd_input_chunks * chunks = c_mtmd.mtmd_input_chunks_init()
        cdef int32_t rc
        cdef const c_mtmd.mtmd_input_chunk * ch
        cdef const llama_token * toks
        cdef size_t n_toks = 0
        cdef MediaChunk mc
        if chunks == NULL:
            raise MemoryError()
        mark = error_mark()
        try:
            if n:
                arr = <const c_mtmd.mtmd_bitmap **> malloc(n * sizeof(void *))
                if arr == NULL:
                    raise MemoryError()
                for i in range(n):
                    bm = bms[i]
                    bm._check()
                    arr[i] = bm.ptr
            with nogil:
                rc = c_mtmd.mtmd_tokenize(self.ptr, chunks, &inp, arr, n)
            if rc == 1:
                raise MediaError(f"the prompt has a different number of media markers than the "
                                 f"{n} media given")
            if rc != 0:
                detail = errors_since(mark)
                raise MediaError("cannot preprocess the media" + (f": {detail}" if detail else ""))
            out = []
            for i in range(c_mtmd.mtmd_input_chunks_size(chunks)):
                ch = c_mtmd.mtmd_input_chunks_get(chunks, i)
                kind = c_mtmd.mtmd_input_chunk_get_type(ch)
                if kind == c_mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    toks = c_mtmd.mtmd_input_chunk_get_tokens_text(ch, &n_toks)
                    text_tokens = []
                    for k in range(<Py_ssize_t> n_toks):
                        text_tokens.append(toks[k])
                    out.append(text_tokens)
                    continue
                mc = MediaChunk.__new__(MediaChunk)
                mc.ptr = c_mtmd.mtmd_input_chunk_copy(ch)
                if mc.ptr == NULL:
                    raise MemoryError()
                mc.kind = _CHUNK_KINDS.get(kind, "unknown")
                mc.id = _str(c_mtmd.mtmd_input_chunk_get_id(ch))
                mc.n_tokens = c_mtmd.mtmd_input_chunk_get_n_tokens(ch)
                mc.n_pos = c_mtmd.mtmd_input_chunk_get_n_pos(ch)
                out.append(mc)
            return out
        finally:
            free(arr)
            c_mtmd.mtmd_input_chunks_free(chunks)

    def eval_chunk(self, Context ctx not None, MediaChunk chunk not None, llama_pos n_past,
                   llama_seq_id seq_id=0, int32_t n_batch=512, bint logits_last=True):
        """Encode ``chunk`` and decode it into ``ctx`` at ``n_past`` the way
        mtmd's own helper does (its positions, its causal-attention switch,
        n_batch rows at a time); returns the next free position.  A reference
        path for checks; the engine decodes media itself."""
        self._check()
        ctx._check()
        if chunk.ptr == NULL:
            raise ClosedError("chunk is closed")
        cdef llama_pos new_n_past = n_past
        cdef int32_t rc
        with self._encode_lock:
            mark = error_mark()
            with nogil:
                rc = c_mtmd.mtmd_helper_eval_chunk_single(self.ptr, ctx.ptr, chunk.ptr, n_past, seq_id,
                                                          n_batch, logits_last, &new_n_past)
            if rc != 0:
                detail = errors_since(mark)
                raise EncodeError(f"evaluating the {chunk.kind} failed ({rc})" + (f": {detail}" if detail else ""))
        return new_n_past

    def encode(self, MediaChunk chunk not None):
        """Run the encoder on ``chunk`` (GIL released); returns a new float32
        array of shape (n_tokens, n_embd)."""
        self._check()
        if chunk.ptr == NULL:
            raise ClosedError("chunk is closed")
        cdef int32_t rc
        cdef float * embd
        cdef float[:, ::1] rows
        with self._encode_lock:
            mark = error_mark()
            with nogil:
                rc = c_mtmd.mtmd_encode_chunk(self.ptr, chunk.ptr)
            if rc != 0:
                detail = errors_since(mark)
                raise EncodeError(f"encoding the {chunk.kind} failed ({rc})" + (f": {detail}" if detail else ""))
            embd = c_mtmd.mtmd_get_output_embd(self.ptr)
            if embd == NULL:
                raise EncodeError("the projector produced no output")
            out = np.empty((chunk.n_tokens, self.n_embd), dtype=np.float32)
            if chunk.n_tokens:
                rows = out
                memcpy(&rows[0, 0], embd, chunk.n_tokens * self.n_embd * sizeof(float))
            return out
