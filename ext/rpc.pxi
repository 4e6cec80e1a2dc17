# ggml's RPC backend: serve this host's devices over TCP, add a remote
# host's devices to those this process sees.  Policy (which endpoints, the
# loopback rule, probing a server before ggml connects) is runner/model/rpc.py.
#
# ggml's RPC client aborts the process when it cannot connect (the runner
# probes an endpoint first, runner/model/rpc.py); set_plain_aborts() makes such an
# abort one line on stderr.  A connection lost later no longer aborts
# (patches/0003): its operations fail, and Context.decode raises
# DeviceLostError once rpc_lost() names the server.

from libc.stdio cimport fflush, fprintf, stderr

cdef dict _rpc_added = {}   # endpoint -> names of the devices it added (under _backend_lock)
# Set once a server is added: decodes then synchronize and ask rpc_lost()
# (read without the GIL inside Context.decode).
cdef bint _rpc_watch = False
cdef ggml_backend_rpc_server_lost_t _rpc_server_lost = NULL  # patches/0003's query


cdef ggml_backend_reg_t _rpc_registry() except NULL:
    backend_init()
    cdef ggml_backend_reg_t reg = ggml_backend_reg_by_name(b"RPC")
    if reg == NULL:
        raise LlamaError("this build has no RPC backend (ggml was built without GGML_RPC)")
    return reg


def rpc_protocol_version():
    """The RPC protocol this build speaks: (major, minor, patch).  A server
    must have the same major version and at most this minor version."""
    return (RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION)


def rpc_max_servers():
    """How many RPC servers one process may use (GGML_RPC_MAX_SERVERS)."""
    return GGML_RPC_MAX_SERVERS


def rpc_add_server(str endpoint):
    """Add the devices of the RPC server at ``endpoint`` ("HOST:PORT") to the
    devices ggml sees; returns their names ("RPC0", "RPC1", ...).

    ggml connects at once and **aborts the process** when the server cannot
    be reached or speaks another protocol version: check it first
    (runner.model.rpc.probe).  Adding an endpoint again returns the same devices.
    """
    cdef ggml_backend_reg_t rpc = _rpc_registry()
    cdef ggml_backend_rpc_add_server_t add_server = <ggml_backend_rpc_add_server_t> \
        ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server")
    if add_server == NULL:
        raise LlamaError("the RPC backend has no ggml_backend_rpc_add_server")
    cdef bytes bendpoint = endpoint.encode()
    cdef const char * cendpoint = bendpoint
    cdef ggml_backend_rpc_server_lost_t server_lost = <ggml_backend_rpc_server_lost_t> \
        ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_server_lost")
    if server_lost == NULL:
        raise LlamaError("the RPC backend has no ggml_backend_rpc_server_lost (patches/0003)")
    cdef ggml_backend_reg_t reg = NULL
    cdef size_t i
    cdef list names
    global _rpc_watch, _rpc_server_lost
    with _backend_lock:
        if endpoint in _rpc_added:
            return list(_rpc_added[endpoint])
        if len(_rpc_added) >= GGML_RPC_MAX_SERVERS:
            raise LlamaError(f"at most {GGML_RPC_MAX_SERVERS} RPC servers per process")
        mark = error_mark()
        with nogil:
            reg = add_server(cendpoint)
        if reg == NULL:
            reason = errors_since(mark)
            raise LlamaError(f"the RPC server at {endpoint} offers no device"
                             + (f": {reason}" if reason else ""))
        ggml_backend_register(reg)
        names = []
        for i in range(ggml_backend_reg_dev_count(reg)):
            names.append(_str(ggml_backend_dev_name(ggml_backend_reg_dev_get(reg, i))))
        _rpc_added[endpoint] = tuple(names)
        _rpc_server_lost = server_lost
        _rpc_watch = True
        return names


def rpc_servers():
    """Endpoints added with rpc_add_server, each with its device names."""
    with _backend_lock:
        return {endpoint: list(names) for endpoint, names in _rpc_added.items()}


def rpc_lost():
    """Endpoints added with rpc_add_server whose connection was lost (the
    server stopped or became unreachable after ggml connected), in the order
    they were added.  Their devices fail every later operation: a context
    with layers there cannot compute any more."""
    if _rpc_server_lost == NULL:
        return []
    lost = []
    cdef bytes bendpoint
    for endpoint in list(_rpc_added):  # a copy: another thread may add one
        bendpoint = endpoint.encode()
        if _rpc_server_lost(bendpoint):
            lost.append(endpoint)
    return lost


cdef int _check_rpc_lost(int32_t rc) except -1:
    """Raise DeviceLostError when an RPC connection is lost: the decode
    that returned ``rc`` either failed on it (-3) or returned 0 with outputs
    ggml-rpc zeroed."""
    lost = rpc_lost()
    if lost:
        raise DeviceLostError(f"lost the connection to the RPC server {', '.join(lost)} "
                              f"(llama_decode returned {rc})", rc, lost)
    return 0


def rpc_start_server(str endpoint, devices, *, int n_threads=1, str cache_dir=None):
    """Serve ``devices`` (names from devices()) at ``endpoint`` ("IPV4:PORT").

    Blocks for as long as the server runs, serving one client at a time;
    returns only when it could not start (the reason is on stderr, where
    ggml prints it), which raises LlamaError.  ``cache_dir`` keeps large
    tensors a client sent by their hash, so that a reload skips sending
    them.  The GIL is released throughout.
    """
    cdef ggml_backend_reg_t rpc = _rpc_registry()
    cdef ggml_backend_rpc_start_server_t start_server = <ggml_backend_rpc_start_server_t> \
        ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_start_server")
    if start_server == NULL:
        raise LlamaError("the RPC backend has no ggml_backend_rpc_start_server")
    if n_threads < 1:
        raise ValueError(f"n_threads must be at least 1, not {n_threads}")
    names = [str(name) for name in devices]
    if not names:
        raise ValueError("no device to serve")
    cdef ggml_backend_dev_t * devs = <ggml_backend_dev_t *> malloc(len(names) * sizeof(ggml_backend_dev_t))
    if devs == NULL:
        raise MemoryError()
    cdef bytes bendpoint = endpoint.encode()
    cdef const char * cendpoint = bendpoint
    cdef bytes bcache = None if cache_dir is None else os.fsencode(cache_dir)
    cdef const char * ccache = NULL if bcache is None else <const char *> bcache
    cdef size_t n = len(names)
    cdef size_t threads = n_threads
    try:
        for i, name in enumerate(names):
            devs[i] = ggml_backend_dev_by_name(name.encode())
            if devs[i] == NULL:
                known = [d["name"] for d in globals()["devices"]()]
                raise ValueError(f"unknown device {name!r}; known devices: {known}")
            if _str(ggml_backend_reg_name(ggml_backend_dev_backend_reg(devs[i]))) == "RPC":
                raise ValueError(f"{name} is itself a remote device; serve it on its own host")
        with nogil:
            start_server(cendpoint, ccache, threads, n, devs)
    finally:
        free(devs)
    raise LlamaError(f"the RPC server at {endpoint} could not start (see the lines above)")


cdef void _plain_abort(const char * message) noexcept nogil:
    fprintf(stderr, b"llama-runner: fatal: ggml aborted: %s\n", message)
    fflush(stderr)


def set_plain_aborts():
    """Make a ggml abort print its message as one line on stderr, without the
    debugger backtrace ggml otherwise forks gdb for (seconds, and lines that
    bury the reason a parent process reports).  The process still aborts."""
    ggml_set_abort_callback(_plain_abort)
