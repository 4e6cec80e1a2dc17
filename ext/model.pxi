# Model: weights + vocabulary.

cdef dict _SPLIT_MODES = {
    "none": LLAMA_SPLIT_MODE_NONE,
    "layer": LLAMA_SPLIT_MODE_LAYER,
    "row": LLAMA_SPLIT_MODE_ROW,
    "tensor": LLAMA_SPLIT_MODE_TENSOR,
}


cdef class _LoadProgress:
    """State shared with the C progress callback during one model load."""
    cdef object callback   # user callable(progress: float) -> bool | None
    cdef object error      # exception raised by the callback, re-raised after the load
    cdef bint aborted      # the callback asked to stop


cdef bint _progress_trampoline(float progress, void * user_data) noexcept with gil:
    cdef _LoadProgress state = <_LoadProgress> user_data
    try:
        keep_going = state.callback(progress)
    except BaseException as exc:
        state.error = exc
        state.aborted = True
        return False
    if keep_going is False:
        state.aborted = True
        return False
    return True


_placement_re = re.compile(r"layer\s+(\d+) assigned to device ([^,\s]+)")


cdef void _start_placement(bint record):
    global _capture_placement
    _placement_lines.clear()
    _capture_placement = record


cdef dict _end_placement():
    """The recorded "layer N assigned to device D" lines as {N: D}.  One load
    records at a time: loads in two threads at once would mix their lines."""
    global _capture_placement
    _capture_placement = False
    out = {}
    for line in _placement_lines:
        m = _placement_re.search(line)
        if m:
            out[int(m.group(1))] = m.group(2)
    _placement_lines.clear()
    return out


cdef class Model:
    """A loaded model (llama_model) and its vocabulary.

    ``progress`` is called with a float in [0, 1] from the loading thread
    while the GIL is released around the load; returning ``False`` aborts the
    load (:class:`ModelLoadError`).  The model must outlive its contexts:
    ``close()`` raises while a context made from it is still open.
    """
    cdef llama_model * ptr          # owned; NULL after close
    cdef const llama_vocab * vocab  # borrowed from ptr
    cdef readonly str path          # file the model was loaded from
    cdef readonly int32_t n_vocab   # vocabulary size (valid token ids: 0..n_vocab-1)
    cdef int open_contexts          # contexts not yet closed (guards close())
    cdef dict layer_devices         # layer index (n_layer: the output layer) -> device name
    cdef object __weakref__

    def __cinit__(self, path, *, int n_gpu_layers=0, int main_gpu=0, str split_mode="layer",
                  tensor_split=None, devices=None, bint use_mmap=True, bint use_mlock=False,
                  bint vocab_only=False, bint check_tensors=False, progress=None):
        backend_init()
        self.ptr = NULL
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model file not found: {path}")
        if os.path.isdir(path):
            raise ModelLoadError(f"model path is a directory, not a GGUF file: {path}")
        if split_mode not in _SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {sorted(_SPLIT_MODES)}, not {split_mode!r}")
        self.path = path

        cdef llama_model_params params = llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.main_gpu = main_gpu
        params.split_mode = _SPLIT_MODES[split_mode]
        params.vocab_only = vocab_only
        params.check_tensors = check_tensors
        if use_mmap:
            params.load_mode = LLAMA_LOAD_MODE_MMAP_MLOCK if use_mlock else LLAMA_LOAD_MODE_MMAP
        else:
            params.load_mode = LLAMA_LOAD_MODE_MLOCK if use_mlock else LLAMA_LOAD_MODE_NONE

        cdef size_t max_dev = llama_max_devices()
        cdef float * split = NULL
        cdef ggml_backend_dev_t * devs = NULL
        cdef _LoadProgress state = _LoadProgress()
        cdef llama_model * model = NULL
        cdef bytes bpath = os.fsencode(path)
        cdef const char * cpath = bpath
        cdef size_t i
        try:
            if tensor_split:
                if len(tensor_split) > max_dev:
                    raise ValueError(f"tensor_split has {len(tensor_split)} entries; at most {max_dev} devices")
                split = <float *> malloc(max_dev * sizeof(float))
                for i in range(max_dev):
                    split[i] = float(tensor_split[i]) if i < len(tensor_split) else 0.0
                params.tensor_split = split
            if devices is not None:
                devs = <ggml_backend_dev_t *> malloc((len(devices) + 1) * sizeof(ggml_backend_dev_t))
                for i, name in enumerate(devices):
                    devs[i] = ggml_backend_dev_by_name(str(name).encode())
                    if devs[i] == NULL:
                        known = [d["name"] for d in globals()["devices"]()]
                        raise ValueError(f"unknown device {name!r}; known devices: {known}")
                devs[len(devices)] = NULL
                params.devices = devs
            if progress is not None:
                state.callback = progress
                params.progress_callback = _progress_trampoline
                params.progress_callback_user_data = <void *> state
            _log_state.last_error = ""
            mark = error_mark()
            _start_placement(not vocab_only)
            with nogil:
                model = llama_model_load_from_file(cpath, params)
        finally:
            self.layer_devices = _end_placement()
            free(split)
            free(devs)
        if state.error is not None:
            if model != NULL:
                llama_model_free(model)
            raise ModelLoadError(f"model load aborted by the progress callback: {state.error!r}") from state.error
        if model == NULL:
            if state.aborted:
                raise ModelLoadError(f"model load aborted by the progress callback: {path}")
            # Every line llama.cpp logged meanwhile: the reason comes before
            # the generic "failed to load model" line.
            reason = errors_since(mark)
            raise ModelLoadError(f"failed to load model {path}: {reason}" if reason
                                 else f"failed to load model {path}")
        self.ptr = model
        self.vocab = llama_model_get_vocab(model)
        self.n_vocab = llama_vocab_n_tokens(self.vocab)

    def __dealloc__(self):
        if self.ptr != NULL:
            llama_model_free(self.ptr)
            self.ptr = NULL

    cdef inline int _check(self) except -1:
        if self.ptr == NULL:
            raise ClosedError("model is closed")
        return 0

    cdef inline int _check_token(self, llama_token token) except -1:
        if token < 0 or token >= self.n_vocab:
            raise ValueError(f"token id {token} out of range [0, {self.n_vocab})")
        return 0

    def close(self):
        """Free the model.  Idempotent; raises while contexts are open."""
        if self.open_contexts > 0:
            raise LlamaError(f"model still has {self.open_contexts} open context(s); close them first")
        cdef llama_model * ptr = self.ptr
        if ptr != NULL:
            self.ptr = NULL
            self.vocab = NULL
            with nogil:  # frees buffers on remote devices too (see Context.close)
                llama_model_free(ptr)

    @property
    def closed(self):
        return self.ptr == NULL

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def placement(self):
        """Where llama.cpp put each layer: ``{"layers": [device name per
        repeating layer], "output": device name}`` ("CPU", "CUDA0", "RPC0",
        ...), from the assignment lines llama.cpp logs while loading.  Empty
        lists and None for a vocab-only model.  Input embeddings always stay
        on the CPU."""
        self._check()
        cdef int n = llama_model_n_layer(self.ptr)
        return {"layers": [self.layer_devices[il] for il in range(n) if il in self.layer_devices],
                "output": self.layer_devices.get(n)}

    # -- shape -----------------------------------------------------------
    @property
    def n_embd(self):
        self._check()
        return llama_model_n_embd(self.ptr)

    @property
    def n_embd_inp(self):
        """Width of an input embedding row (of a media chunk); usually n_embd."""
        self._check()
        return llama_model_n_embd_inp(self.ptr)

    @property
    def n_layer(self):
        self._check()
        return llama_model_n_layer(self.ptr)

    @property
    def n_head(self):
        self._check()
        return llama_model_n_head(self.ptr)

    @property
    def n_head_kv(self):
        self._check()
        return llama_model_n_head_kv(self.ptr)

    @property
    def n_ctx_train(self):
        self._check()
        return llama_model_n_ctx_train(self.ptr)

    @property
    def n_swa(self):
        self._check()
        return llama_model_n_swa(self.ptr)

    @property
    def size(self):
        """Bytes of all tensors."""
        self._check()
        return llama_model_size(self.ptr)

    @property
    def n_params(self):
        self._check()
        return llama_model_n_params(self.ptr)

    @property
    def description(self):
        cdef char buf[256]
        self._check()
        llama_model_desc(self.ptr, buf, sizeof(buf))
        return _str(buf)

    @property
    def ftype_name(self):
        self._check()
        return _str(llama_ftype_name(llama_model_ftype(self.ptr)))

    @property
    def has_encoder(self):
        self._check()
        return bool(llama_model_has_encoder(self.ptr))

    @property
    def is_recurrent(self):
        self._check()
        return bool(llama_model_is_recurrent(self.ptr) or llama_model_is_hybrid(self.ptr))

    @property
    def n_cls_out(self):
        """Classifier outputs of a reranker / classifier head (1 unless the
        GGUF lists labels); the length of a sequence's score under rank pooling."""
        self._check()
        return llama_model_n_cls_out(self.ptr)

    def cls_label(self, uint32_t i):
        """The label of classifier output ``i``, or None when the GGUF names none."""
        self._check()
        if i >= llama_model_n_cls_out(self.ptr):
            raise IndexError(f"classifier output {i} out of range")
        cdef const char * label = llama_model_cls_label(self.ptr, i)
        return None if label == NULL else _str(label)

    def chat_template(self, name=None):
        """The model's chat template (Jinja source), or None."""
        self._check()
        cdef bytes bname
        cdef const char * tmpl
        if name is None:
            tmpl = llama_model_chat_template(self.ptr, NULL)
        else:
            bname = str(name).encode()
            tmpl = llama_model_chat_template(self.ptr, bname)
        return None if tmpl == NULL else _str(tmpl)

    # -- metadata --------------------------------------------------------
    cdef str _meta_string(self, int32_t i, bint key):
        cdef int32_t n
        cdef int32_t size = 256
        cdef char * buf
        while True:
            buf = <char *> malloc(size)
            if buf == NULL:
                raise MemoryError()
            try:
                if key:
                    n = llama_model_meta_key_by_index(self.ptr, i, buf, size)
                else:
                    n = llama_model_meta_val_str_by_index(self.ptr, i, buf, size)
                if n < 0:
                    return None
                if n < size:
                    return buf[:n].decode("utf-8", "replace")
                size = n + 1
            finally:
                free(buf)

    def metadata(self):
        """All GGUF key/values as strings (llama.cpp's rendering; arrays are
        summarised by llama.cpp)."""
        self._check()
        out = {}
        for i in range(llama_model_meta_count(self.ptr)):
            out[self._meta_string(i, True)] = self._meta_string(i, False)
        return out

    def meta(self, str key, default=None):
        """One metadata value as a string, or ``default``."""
        self._check()
        cdef bytes bkey = key.encode()
        cdef int32_t n = llama_model_meta_val_str(self.ptr, bkey, NULL, 0)
        if n < 0:
            return default
        cdef bytearray buf = bytearray(n + 1)
        llama_model_meta_val_str(self.ptr, bkey, <char *> buf, n + 1)
        return bytes(buf[:n]).decode("utf-8", "replace")

    # -- vocabulary ------------------------------------------------------
    @property
    def add_bos(self):
        """True when the model wants BOS prepended to a prompt."""
        self._check()
        return bool(llama_vocab_get_add_bos(self.vocab))

    @property
    def add_eos(self):
        self._check()
        return bool(llama_vocab_get_add_eos(self.vocab))

    @property
    def bos(self):
        self._check()
        return llama_vocab_bos(self.vocab)

    @property
    def eos(self):
        self._check()
        return llama_vocab_eos(self.vocab)

    @property
    def add_sep(self):
        """True when the model joins two texts with SEP (rerankers)."""
        self._check()
        return bool(llama_vocab_get_add_sep(self.vocab))

    @property
    def sep(self):
        """The separator token (-1: none)."""
        self._check()
        return llama_vocab_sep(self.vocab)

    @property
    def eot(self):
        self._check()
        return llama_vocab_eot(self.vocab)

    @property
    def nl(self):
        self._check()
        return llama_vocab_nl(self.vocab)

    def is_eog(self, llama_token token):
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        self._check()
        self._check_token(token)
        return bool(llama_vocab_is_eog(self.vocab, token))

    def is_control(self, llama_token token):
        self._check()
        self._check_token(token)
        return bool(llama_vocab_is_control(self.vocab, token))

    def token_text(self, llama_token token):
        """The vocabulary entry of ``token`` (raw, as stored in the GGUF)."""
        self._check()
        self._check_token(token)
        return _str(llama_vocab_get_text(self.vocab, token))

    def tokenize(self, text, *, bint add_special=False, bint parse_special=False):
        """Token ids of ``text`` (str or UTF-8 bytes).

        ``add_special`` adds BOS/EOS as the model asks; ``parse_special``
        turns special-token text such as ``<|im_start|>`` into its id.  The
        GIL is released for long inputs.
        """
        self._check()
        cdef bytes data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        cdef Py_ssize_t n_bytes = len(data)
        if n_bytes > 0x7FFFFFF0:
            raise ValueError("text too long to tokenize")
        if n_bytes == 0 and not add_special:
            return []
        cdef const char * src = data
        cdef int32_t cap = <int32_t> n_bytes + 8
        cdef int32_t n
        cdef llama_token * toks = <llama_token *> malloc(cap * sizeof(llama_token))
        cdef char err[256]
        err[0] = 0
        if toks == NULL:
            raise MemoryError()
        try:
            if n_bytes > 4096:
                with nogil:
                    n = runner_tokenize(self.vocab, src, <int32_t> n_bytes, toks, cap, add_special,
                                        parse_special, err, sizeof(err))
            else:
                n = runner_tokenize(self.vocab, src, <int32_t> n_bytes, toks, cap, add_special,
                                    parse_special, err, sizeof(err))
            if n < 0 and n != RUNNER_THREW:
                # Cannot happen with cap > n_bytes + specials, but never trust it.
                cap = -n
                free(toks)
                toks = <llama_token *> malloc(cap * sizeof(llama_token))
                if toks == NULL:
                    raise MemoryError()
                with nogil:
                    n = runner_tokenize(self.vocab, src, <int32_t> n_bytes, toks, cap, add_special,
                                        parse_special, err, sizeof(err))
            if n == RUNNER_THREW:
                raise LlamaError(f"tokenization failed in llama.cpp: {err.decode('utf-8', 'replace')}")
            if n < 0:
                raise LlamaError("tokenization failed")
            return [toks[i] for i in range(n)]
        finally:
            free(toks)

    def token_to_piece(self, llama_token token, *, bint special=False):
        """The bytes ``token`` stands for (may be part of a UTF-8 sequence).
        ``special`` renders control tokens' text instead of nothing."""
        self._check()
        self._check_token(token)
        cdef char buf[128]
        cdef char err[256]
        cdef int32_t n = runner_token_to_piece(self.vocab, token, buf, sizeof(buf), 0, special, err, sizeof(err))
        if n >= 0:
            return buf[:n]
        if n == RUNNER_THREW:
            raise LlamaError(f"token_to_piece failed for token {token}: {err.decode('utf-8', 'replace')}")
        cdef bytearray big = bytearray(-n)
        n = runner_token_to_piece(self.vocab, token, <char *> big, len(big), 0, special, err, sizeof(err))
        if n < 0:
            raise LlamaError(f"token_to_piece failed for token {token}")
        return bytes(big[:n])

    def detokenize_bytes(self, tokens, *, bint remove_special=False, bint unparse_special=False):
        """UTF-8 bytes of ``tokens`` joined the way llama.cpp joins them."""
        self._check()
        cdef Py_ssize_t count = len(tokens)
        if count == 0:
            return b""
        cdef llama_token * toks = <llama_token *> malloc(count * sizeof(llama_token))
        cdef int32_t cap = <int32_t> (count * 8 + 16)
        cdef char * out = NULL
        cdef int32_t n
        cdef char err[256]
        if toks == NULL:
            raise MemoryError()
        try:
            for i, t in enumerate(tokens):
                toks[i] = t
                self._check_token(toks[i])
            while True:
                out = <char *> malloc(cap)
                if out == NULL:
                    raise MemoryError()
                n = runner_detokenize(self.vocab, toks, <int32_t> count, out, cap, remove_special,
                                      unparse_special, err, sizeof(err))
                if n >= 0:
                    return out[:n]
                if n == RUNNER_THREW:
                    raise LlamaError(f"detokenize failed in llama.cpp: {err.decode('utf-8', 'replace')}")
                free(out)
                out = NULL
                cap = -n
        finally:
            free(toks)
            free(out)

    def detokenize(self, tokens, *, bint remove_special=False, bint unparse_special=False):
        """Text of ``tokens``; invalid UTF-8 is replaced with U+FFFD."""
        return self.detokenize_bytes(tokens, remove_special=remove_special,
                                     unparse_special=unparse_special).decode("utf-8", "replace")

    def __repr__(self):
        if self.ptr == NULL:
            return f"<Model closed {self.path!r}>"
        return f"<Model {self.description!r} from {self.path!r}>"
