# llama.cpp / ggml / mtmd log lines -> Python logging.
#
# Lines below the threshold are dropped in C without taking the GIL, so a
# chatty load or a debug line per token costs nothing (no flood).  Pieces of a
# line (GGML_LOG_LEVEL_CONT, or text without a trailing newline) are joined
# before they reach logging.  The last error line is kept for error messages.

_llama_logger = logging.getLogger("runner.llama")

cdef int _log_threshold = GGML_LOG_LEVEL_WARN
# A model load is recording llama.cpp's "load_tensors: layer N assigned to
# device D" debug lines (Model.placement), whatever the threshold.
cdef bint _capture_placement = False


class _LogState:
    """Partial-line buffer and the last error line (guarded by the GIL)."""

    def __init__(self):
        self.pending = ""          # text of the line being assembled
        self.pending_level = GGML_LOG_LEVEL_INFO  # ggml level of that line
        self.last_error = ""       # last complete line logged at WARN or ERROR
        self.n_errors = 0          # lines logged at WARN or ERROR so far
        self.recent_errors = collections.deque(maxlen=16)  # the last of those lines
        self.lines = 0             # complete lines forwarded to logging


_log_state = _LogState()

cdef dict _LEVELS = {
    GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    GGML_LOG_LEVEL_INFO: logging.INFO,
    GGML_LOG_LEVEL_WARN: logging.WARNING,
    GGML_LOG_LEVEL_ERROR: logging.ERROR,
}


cdef void _emit(int level, str line) noexcept:
    try:
        _log_state.lines += 1
        if level >= GGML_LOG_LEVEL_WARN:
            _log_state.last_error = line
            _log_state.n_errors += 1
            _log_state.recent_errors.append(line)
        _llama_logger.log(_LEVELS.get(level, logging.INFO), "%s", line)
    except BaseException:
        pass


cdef void _log_callback(ggml_log_level level, const char * text, void * user_data) noexcept nogil:
    if (_capture_placement and level == GGML_LOG_LEVEL_DEBUG
            and strncmp(text, b"load_tensors: layer", 19) == 0):
        with gil:
            _record_placement(text)
    if level != GGML_LOG_LEVEL_CONT and level < _log_threshold:
        return
    if level == GGML_LOG_LEVEL_CONT and _log_threshold > GGML_LOG_LEVEL_DEBUG:
        # A continuation belongs to the previous line; it is only kept if that
        # line was (it then sits in the pending buffer).
        with gil:
            if not _log_state.pending:
                return
            _log_piece(<int>_log_state.pending_level, text)
        return
    with gil:
        _log_piece(<int>level, text)


cdef void _log_piece(int level, const char * text) noexcept:
    try:
        piece = text.decode("utf-8", "replace")
        if level == GGML_LOG_LEVEL_CONT:
            level = _log_state.pending_level
        elif _log_state.pending and level != _log_state.pending_level:
            _emit(_log_state.pending_level, _log_state.pending)
            _log_state.pending = ""
        _log_state.pending_level = level
        text_all = _log_state.pending + piece
        *lines, rest = text_all.split("\n")
        for line in lines:
            if line.strip():
                _emit(level, line)
        _log_state.pending = rest
    except BaseException:
        pass


_placement_lines = []   # the load's "layer N assigned to device D" lines (under the GIL)


cdef void _record_placement(const char * text) noexcept:
    try:
        _placement_lines.append(text.decode("utf-8", "replace"))
    except BaseException:
        pass


def set_log_level(level):
    """Forward llama.cpp log lines at or above ``level`` (a logging level)."""
    global _log_threshold
    if level <= logging.DEBUG:
        _log_threshold = GGML_LOG_LEVEL_DEBUG
    elif level <= logging.INFO:
        _log_threshold = GGML_LOG_LEVEL_INFO
    elif level <= logging.WARNING:
        _log_threshold = GGML_LOG_LEVEL_WARN
    else:
        _log_threshold = GGML_LOG_LEVEL_ERROR


def last_error_line():
    """The last warning or error line llama.cpp logged ('' if none)."""
    return _log_state.last_error


def error_mark():
    """A mark for :func:`errors_since`."""
    return _log_state.n_errors


def errors_since(mark):
    """Warning and error lines logged after ``mark`` (at most the last 16),
    joined with '; ' — the reason a C call that returns NULL gives."""
    n = min(_log_state.n_errors - mark, len(_log_state.recent_errors))
    if n <= 0:
        return ""
    lines = list(_log_state.recent_errors)
    lines = lines[len(lines) - n:]
    return "; ".join([line.strip() for line in lines])


def _install_log_callback():
    llama_log_set(_log_callback, NULL)
    ggml_log_set(_log_callback, NULL)
    c_mtmd.mtmd_log_set(_log_callback, NULL)
    c_mtmd.mtmd_helper_log_set(_log_callback, NULL)
