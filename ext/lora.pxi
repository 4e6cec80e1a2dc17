# LoRA adapters.

cdef class LoraAdapter:
    """A LoRA adapter loaded for one model; apply it with Context.set_loras."""
    cdef llama_adapter_lora * ptr  # owned; NULL after close
    cdef readonly Model model      # base model (must outlive the adapter)
    cdef readonly str path         # adapter file

    def __cinit__(self, Model model not None, path):
        model._check()
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"LoRA adapter not found: {path}")
        self.model = model
        self.path = path
        cdef bytes bpath = os.fsencode(path)
        _log_state.last_error = ""
        self.ptr = llama_adapter_lora_init(model.ptr, bpath)
        if self.ptr == NULL:
            raise ModelLoadError(_with_last_error(f"failed to load LoRA adapter {path}"))

    def __dealloc__(self):
        # llama.cpp frees adapters with their model; only free while it lives.
        if self.ptr != NULL and self.model is not None and self.model.ptr != NULL:
            llama_adapter_lora_free(self.ptr)
        self.ptr = NULL

    def close(self):
        if self.ptr != NULL and self.model.ptr != NULL:
            llama_adapter_lora_free(self.ptr)
        self.ptr = NULL

    cdef inline int _check(self) except -1:
        if self.ptr == NULL:
            raise ClosedError("LoRA adapter is closed")
        self.model._check()
        return 0
