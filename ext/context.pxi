# Context: KV cache, compute buffers, decode.

cdef dict _KV_TYPES = {
    "f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16,
    "q8_0": GGML_TYPE_Q8_0, "q4_0": GGML_TYPE_Q4_0, "q4_1": GGML_TYPE_Q4_1,
    "q5_0": GGML_TYPE_Q5_0, "q5_1": GGML_TYPE_Q5_1,
}
cdef dict _FLASH_ATTN = {
    "auto": LLAMA_FLASH_ATTN_TYPE_AUTO, "on": LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": LLAMA_FLASH_ATTN_TYPE_DISABLED,
    True: LLAMA_FLASH_ATTN_TYPE_ENABLED, False: LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
cdef dict _POOLING = {
    None: LLAMA_POOLING_TYPE_UNSPECIFIED, "none": LLAMA_POOLING_TYPE_NONE,
    "mean": LLAMA_POOLING_TYPE_MEAN, "cls": LLAMA_POOLING_TYPE_CLS,
    "last": LLAMA_POOLING_TYPE_LAST, "rank": LLAMA_POOLING_TYPE_RANK,
}
POOLING_NAMES = {v: k for k, v in _POOLING.items() if k is not None}


cdef bint _abort_trampoline(void * data) noexcept nogil:
    return (<volatile int *> data)[0] != 0


cdef class Context:
    """A llama_context: the KV cache of ``n_seq_max`` sequences plus compute
    buffers.  ``decode`` releases the GIL; logits/embeddings are handed out as
    zero-copy float32 arrays valid until the next decode.
    """
    cdef llama_context * ptr     # owned; NULL after close
    cdef llama_memory_t mem      # borrowed from ptr
    cdef readonly Model model    # kept alive for the context's lifetime
    cdef readonly int32_t n_embd # model embedding width
    cdef volatile int abort_flag # read by the abort callback inside decode
    cdef object _loras           # adapters applied now (kept alive while applied)
    cdef readonly bint graph_sampling  # made for samplers in the decode graph (Sampler.attach)
    cdef dict _graph_samplers    # seq id -> the Sampler attached for it (the context holds its chain)

    def __cinit__(self, Model model not None, *, uint32_t n_ctx=4096, uint32_t n_batch=512,
                  n_ubatch=None, uint32_t n_seq_max=1, n_threads=None, n_threads_batch=None,
                  flash_attn="auto", str type_k="f16", str type_v="f16", bint embeddings=False,
                  pooling=None, bint kv_unified=False, bint swa_full=False, bint offload_kqv=True,
                  bint graph_sampling=False):
        self.ptr = NULL
        self._graph_samplers = {}
        model._check()
        if n_ctx == 0:
            raise ValueError("n_ctx must be positive")
        if n_batch == 0:
            raise ValueError("n_batch must be positive")
        if n_seq_max == 0 or n_seq_max > llama_max_parallel_sequences():
            raise ValueError(f"n_seq_max must be in 1..{llama_max_parallel_sequences()}")
        if type_k not in _KV_TYPES or type_v not in _KV_TYPES:
            raise ValueError(f"KV cache types must be one of {sorted(_KV_TYPES)}")
        if flash_attn not in _FLASH_ATTN:
            raise ValueError("flash_attn must be 'auto', 'on' or 'off'")
        if pooling not in _POOLING:
            raise ValueError(f"pooling must be one of {[k for k in _POOLING if k]}")
        cdef int cpu = os.cpu_count() or 1
        cdef llama_context_params p = llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_batch if n_ubatch is None else int(n_ubatch)
        p.n_seq_max = n_seq_max
        p.n_threads = cpu if n_threads is None else int(n_threads)
        p.n_threads_batch = p.n_threads if n_threads_batch is None else int(n_threads_batch)
        p.flash_attn_type = _FLASH_ATTN[flash_attn]
        p.type_k = _KV_TYPES[type_k]
        p.type_v = _KV_TYPES[type_v]
        p.embeddings = embeddings
        p.pooling_type = _POOLING[pooling]
        p.kv_unified = kv_unified
        p.swa_full = swa_full
        p.offload_kqv = offload_kqv
        # Sampling in the decode graph takes at most this many outputs per
        # sequence and step; llama.cpp keeps the penalties stage on the CPU
        # (and with it every stage after it) unless that limit is 1.
        self.graph_sampling = graph_sampling
        if graph_sampling:
            p.n_outputs_max_per_seq = 1
        p.no_perf = True
        self.abort_flag = 0
        p.abort_callback = _abort_trampoline
        p.abort_callback_data = <void *> &self.abort_flag
        _log_state.last_error = ""
        with nogil:
            self.ptr = llama_init_from_model(model.ptr, p)
        if self.ptr == NULL:
            raise ContextError(_with_last_error("failed to create the llama context"))
        self.mem = llama_get_memory(self.ptr)
        self.model = model
        self.n_embd = llama_model_n_embd(model.ptr)
        model.open_contexts += 1

    def __dealloc__(self):
        if self.ptr != NULL:
            llama_free(self.ptr)
            self.ptr = NULL

    def close(self):
        """Free the context.  Idempotent.  The GIL is released: freeing
        buffers on a remote device waits for its connection's thread, which
        may log through our callback."""
        cdef llama_context * ptr = self.ptr
        if ptr != NULL:
            self.ptr = NULL
            self.mem = NULL
            with nogil:
                llama_free(ptr)
            self.model.open_contexts -= 1

    @property
    def closed(self):
        return self.ptr == NULL

    @property
    def n_graph_samplers(self):
        """Samplers attached to this context's decode graph now (Sampler.attach)."""
        return len(self._graph_samplers)

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    cdef inline int _check(self) except -1:
        if self.ptr == NULL:
            raise ClosedError("context is closed")
        return 0

    # -- sizes -----------------------------------------------------------
    @property
    def n_ctx(self):
        self._check()
        return llama_n_ctx(self.ptr)

    @property
    def n_ctx_seq(self):
        """Context available to one sequence."""
        self._check()
        return llama_n_ctx_seq(self.ptr)

    @property
    def n_batch(self):
        self._check()
        return llama_n_batch(self.ptr)

    @property
    def n_ubatch(self):
        self._check()
        return llama_n_ubatch(self.ptr)

    @property
    def n_seq_max(self):
        self._check()
        return llama_n_seq_max(self.ptr)

    @property
    def pooling(self):
        self._check()
        return POOLING_NAMES.get(llama_get_pooling_type(self.ptr), "none")

    def set_threads(self, int32_t n_threads, int32_t n_threads_batch=0):
        self._check()
        llama_set_n_threads(self.ptr, n_threads, n_threads_batch or n_threads)

    def set_embeddings(self, bint on):
        self._check()
        llama_set_embeddings(self.ptr, on)

    def set_causal_attn(self, bint causal):
        self._check()
        llama_set_causal_attn(self.ptr, causal)

    # -- decode ----------------------------------------------------------
    cdef int _validate(self, Batch batch) except -1:
        batch._check()
        cdef int32_t n = batch.batch.n_tokens
        cdef int32_t i, k
        cdef int32_t n_vocab = self.model.n_vocab
        cdef uint32_t n_seq = llama_n_seq_max(self.ptr)
        if n == 0:
            raise ValueError("cannot decode an empty batch")
        if <uint32_t> n > llama_n_batch(self.ptr):
            raise ValueError(f"batch of {n} entries exceeds n_batch={llama_n_batch(self.ptr)}")
        if batch.embd == 0:
            for i in range(n):
                if batch.batch.token[i] < 0 or batch.batch.token[i] >= n_vocab:
                    raise ValueError(f"batch entry {i}: token id {batch.batch.token[i]} "
                                     f"out of range [0, {n_vocab})")
        elif batch.embd != llama_model_n_embd_inp(self.model.ptr):
            raise ValueError(f"embedding batch width {batch.embd} != the model's input width "
                             f"(n_embd_inp) {llama_model_n_embd_inp(self.model.ptr)}")
        for i in range(n):
            for k in range(batch.batch.n_seq_id[i]):
                if batch.batch.seq_id[i][k] < 0 or <uint32_t> batch.batch.seq_id[i][k] >= n_seq:
                    raise ValueError(f"batch entry {i}: sequence id {batch.batch.seq_id[i][k]} "
                                     f"out of range [0, {n_seq})")
        return 0

    def decode(self, Batch batch not None, int doorbell=-1):
        """Run the model on ``batch`` (GIL released).

        ``doorbell``: a file descriptor (an eventfd or a pipe's write end) to
        write an 8-byte 1 to once the GIL is released, just before the
        decode: a thread waiting on it wakes to find the GIL free, so its
        work overlaps the decode instead of queueing behind the caller's
        Python (runner.engine.delivery rings the delivery thread this way).

        Raises :class:`NoKVSlotError` (retry smaller), :class:`DecodeAbortedError`
        or :class:`DecodeError`; a bad batch raises ValueError before any C call.
        Once an RPC server was added, the decode is waited for here, and
        :class:`DeviceLostError` is raised when a server's connection is lost
        (its outputs would be zeros).
        """
        self._check()
        self._validate(batch)
        cdef int32_t rc
        cdef uint64_t one = 1
        self.abort_flag = 0
        with nogil:
            if doorbell >= 0:
                write(doorbell, &one, 8)  # a full pipe means the reader is awake anyway
            rc = llama_decode(self.ptr, batch.batch)
            if rc == 0 and _rpc_watch:
                llama_synchronize(self.ptr)
        if _rpc_watch:
            _check_rpc_lost(rc)
        check_decode(rc)

    def encode(self, Batch batch not None):
        """Run an encoder (embedding / encoder-decoder models); GIL released."""
        self._check()
        self._validate(batch)
        cdef int32_t rc
        self.abort_flag = 0
        with nogil:
            rc = llama_encode(self.ptr, batch.batch)
            if rc == 0 and _rpc_watch:
                llama_synchronize(self.ptr)
        if _rpc_watch:
            _check_rpc_lost(rc)
        check_decode(rc)

    def abort(self):
        """Ask an in-flight decode to stop (callable from any thread)."""
        self.abort_flag = 1

    def synchronize(self):
        self._check()
        with nogil:
            llama_synchronize(self.ptr)

    cdef void _sync(self) noexcept:
        """Wait for the last decode without the GIL.  Every read of its
        outputs synchronizes first; doing that wait under the GIL blocks
        every Python thread meanwhile, and deadlocks when a backend thread
        (ggml-rpc's dispatcher) logs through our callback, which takes the
        GIL, before the decode can finish."""
        with nogil:
            llama_synchronize(self.ptr)

    # -- outputs (valid until the next decode) ----------------------------
    def logits(self, int32_t i):
        """Logits of batch entry ``i`` (-1 = last output) as a float32[n_vocab] view."""
        self._check()
        self._sync()
        cdef float * p = llama_get_logits_ith(self.ptr, i)
        if p == NULL:
            raise IndexError(f"no logits for batch index {i} (output flag not set?)")
        return _float_array(p, self.model.n_vocab, self)

    def embeddings(self, int32_t i):
        """Embedding of batch entry ``i`` as a float32[n_embd] view."""
        self._check()
        self._sync()
        cdef float * p = llama_get_embeddings_ith(self.ptr, i)
        if p == NULL:
            raise IndexError(f"no embeddings for batch index {i}")
        return _float_array(p, self.n_embd, self)

    def embeddings_seq(self, llama_seq_id seq_id):
        """Pooled embedding of a sequence as a float32 view: n_embd values, or
        under rank pooling the model's n_cls_out scores (llama.cpp keeps only
        those for the sequence)."""
        self._check()
        self._sync()
        cdef float * p = llama_get_embeddings_seq(self.ptr, seq_id)
        if p == NULL:
            raise IndexError(f"no pooled embeddings for sequence {seq_id}")
        cdef int32_t n = self.n_embd
        if llama_get_pooling_type(self.ptr) == LLAMA_POOLING_TYPE_RANK:
            n = llama_model_n_cls_out(self.model.ptr)
        return _float_array(p, n, self)

    # -- KV memory -------------------------------------------------------
    cdef inline int _check_seq(self, llama_seq_id seq) except -1:
        self._check()
        if seq < -1 or seq >= <llama_seq_id> llama_n_seq_max(self.ptr):
            raise ValueError(f"sequence id {seq} out of range")
        return 0

    def clear(self, bint data=True):
        """Remove every sequence from the KV cache (``data``: and zero its
        buffers, without the GIL: on a remote device that is an exchange)."""
        self._check()
        with nogil:
            llama_memory_clear(self.mem, data)

    def seq_rm(self, llama_seq_id seq, llama_pos p0=-1, llama_pos p1=-1):
        """Remove positions [p0, p1) of ``seq`` (-1 = open end).  Returns False
        when the memory cannot remove a partial range (recurrent models)."""
        self._check_seq(seq)
        return bool(llama_memory_seq_rm(self.mem, seq, p0, p1))

    def seq_cp(self, llama_seq_id src, llama_seq_id dst, llama_pos p0=-1, llama_pos p1=-1):
        self._check_seq(src)
        self._check_seq(dst)
        llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_keep(self, llama_seq_id seq):
        self._check_seq(seq)
        llama_memory_seq_keep(self.mem, seq)

    def seq_add(self, llama_seq_id seq, llama_pos p0, llama_pos p1, llama_pos delta):
        """Shift positions [p0, p1) of ``seq`` by ``delta`` (needs can_shift)."""
        self._check_seq(seq)
        if not llama_memory_can_shift(self.mem):
            raise LlamaError("this model's memory cannot shift positions")
        llama_memory_seq_add(self.mem, seq, p0, p1, delta)

    def seq_pos_min(self, llama_seq_id seq):
        """Smallest position of ``seq`` in the cache, or -1 if empty."""
        self._check_seq(seq)
        return llama_memory_seq_pos_min(self.mem, seq)

    def seq_pos_max(self, llama_seq_id seq):
        """Largest position of ``seq`` in the cache, or -1 if empty."""
        self._check_seq(seq)
        return llama_memory_seq_pos_max(self.mem, seq)

    def can_shift(self):
        self._check()
        return bool(llama_memory_can_shift(self.mem))

    # -- per-sequence state ----------------------------------------------
    def state_seq_get(self, llama_seq_id seq):
        """The KV state of one sequence as bytes."""
        self._check_seq(seq)
        cdef size_t size = llama_state_seq_get_size(self.ptr, seq)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef size_t n
        cdef uint8_t * dst = <uint8_t *> PyBytes_AS_STRING(out)
        with nogil:
            n = llama_state_seq_get_data(self.ptr, dst, size, seq)
        if n != size:
            raise LlamaError(f"state_seq_get wrote {n} of {size} bytes")
        return out

    def state_seq_size(self, llama_seq_id seq):
        """Bytes the state of ``seq`` takes now (what :meth:`state_seq_get`
        would return); a walk over the cells, no copy."""
        self._check_seq(seq)
        return llama_state_seq_get_size(self.ptr, seq)

    def state_seq_get_into(self, llama_seq_id seq, uint8_t[::1] out not None):
        """Write the state of ``seq`` into the start of ``out`` (a writable
        buffer of at least :meth:`state_seq_size` bytes) without allocating;
        returns the bytes written.  ``out`` is held for the call only."""
        self._check_seq(seq)
        cdef size_t size = llama_state_seq_get_size(self.ptr, seq)
        cdef size_t n
        if size == 0:
            raise LlamaError(_with_last_error("state_seq_get_into: no state size"))
        if <size_t> out.shape[0] < size:
            raise ValueError(f"state_seq_get_into: the state is {size} bytes, the buffer "
                             f"{out.shape[0]}")
        with nogil:
            n = llama_state_seq_get_data(self.ptr, &out[0], size, seq)
        if n != size:
            raise LlamaError(f"state_seq_get_into wrote {n} of {size} bytes")
        return n

    def state_seq_set(self, const uint8_t[::1] data, llama_seq_id seq):
        """Restore a sequence from :meth:`state_seq_get` bytes."""
        self._check_seq(seq)
        cdef size_t n
        if data.shape[0] == 0:
            raise ValueError("empty state")
        with nogil:
            n = llama_state_seq_set_data(self.ptr, &data[0], data.shape[0], seq)
        if n == 0:
            raise LlamaError(_with_last_error("state_seq_set failed"))
        return n

    # -- LoRA ------------------------------------------------------------
    def set_loras(self, adapters):
        """Apply ``[(LoraAdapter, scale), ...]``; an empty list removes all."""
        self._check()
        cdef Py_ssize_t n = len(adapters)
        cdef llama_adapter_lora ** ptrs = <llama_adapter_lora **> malloc((n or 1) * sizeof(void *))
        cdef float * scales = <float *> malloc((n or 1) * sizeof(float))
        cdef LoraAdapter a
        cdef int32_t rc
        try:
            for i, (adapter, scale) in enumerate(adapters):
                a = adapter
                a._check()
                if a.model is not self.model:
                    raise ValueError("LoRA adapter belongs to another model")
                ptrs[i] = a.ptr
                scales[i] = scale
            rc = llama_set_adapters_lora(self.ptr, ptrs, n, scales)
            if rc != 0:
                raise LlamaError(_with_last_error(f"llama_set_adapters_lora failed ({rc})"))
            self._loras = list(adapters)
        finally:
            free(ptrs)
            free(scales)

