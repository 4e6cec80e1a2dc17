# Error types and the one funnel that every llama_decode return code goes through.

class LlamaError(RuntimeError):
    """A llama.cpp call failed; the message carries llama.cpp's last error line."""


class ClosedError(LlamaError):
    """The object was used after close()."""


class ModelLoadError(LlamaError):
    """The model file could not be loaded (bad or truncated file, out of memory...)."""


class ContextError(LlamaError):
    """A context could not be created with the given parameters."""


class DecodeError(LlamaError):
    """llama_decode failed hard (negative return code); the batch was not applied."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class NoKVSlotError(DecodeError):
    """llama_decode returned 1: no KV slot fits the batch.  Retry with a smaller
    batch or after freeing sequences; the context is still usable."""


class DecodeAbortedError(DecodeError):
    """llama_decode returned 2: the abort callback stopped the computation."""


class DeviceLostError(DecodeError):
    """A remote device holding part of the model was lost (its RPC server
    stopped or became unreachable: ``endpoints``).  Nothing computed on it
    since can be trusted, and no later decode of this context can succeed."""

    def __init__(self, message, code, endpoints):
        super().__init__(message, code)
        self.endpoints = list(endpoints)


class GrammarError(ValueError):
    """The GBNF grammar could not be parsed."""


class SamplerError(LlamaError):
    """Sampling failed inside llama.cpp (an exception caught by ext/guard.cpp)."""


class NoTokenError(SamplerError):
    """The request's grammar allows no token at this point: it cannot be
    satisfied (or the model gives every allowed token zero probability)."""


cdef inline str _with_last_error(str message):
    last = _log_state.last_error
    if last:
        return f"{message}: {last}"
    return message


cdef int check_decode(int32_t rc) except -1:
    """Map a llama_decode/llama_encode return code to an exception (0 passes)."""
    if rc == 0:
        return 0
    if rc == 1:
        raise NoKVSlotError("no KV cache slot for the batch (llama_decode returned 1)", rc)
    if rc == 2:
        raise DecodeAbortedError("decode aborted (llama_decode returned 2)", rc)
    raise DecodeError(_with_last_error(f"llama_decode failed with code {rc}"), rc)
