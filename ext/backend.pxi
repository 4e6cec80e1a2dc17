# Backend initialisation, device enumeration and build information.

from c_dlfcn cimport Dl_info, dladdr

cdef bint _backend_ready = False
_backend_lock = threading.Lock()

cdef dict _DEV_TYPES = {
    GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
}


cdef inline str _str(const char * s):
    return "" if s == NULL else s.decode("utf-8", "replace")


def backend_init(str library_dir=None):
    """Initialise llama.cpp once per process.

    In builds with dynamically loaded backends (GGML_BACKEND_DL, the wheels)
    no backend is compiled in, so the backends in ``library_dir`` (the
    package folder) are loaded; ggml would otherwise look next to the Python
    interpreter.  Safe to call many times.
    """
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        _install_log_callback()
        llama_backend_init()
        if ggml_backend_reg_count() == 0:
            directory = library_dir or os.path.dirname(os.path.abspath(__file__))
            ggml_backend_load_all_from_path(os.fsencode(directory))
        _backend_ready = True


def devices():
    """Devices ggml sees: list of dicts with index, name, description, type
    ('cpu', 'gpu', 'igpu', 'accel'), backend, device_id, free and total bytes."""
    backend_init()
    cdef size_t i
    cdef size_t n = ggml_backend_dev_count()
    cdef ggml_backend_dev_t dev
    cdef ggml_backend_dev_props * props = <ggml_backend_dev_props *> malloc(
        max(n, 1) * sizeof(ggml_backend_dev_props))
    if props == NULL:
        raise MemoryError()
    out = []
    try:
        # Without the GIL: a remote device's memory is an exchange with its
        # server, waited for on its connection's thread, which may log.
        with nogil:
            for i in range(n):
                ggml_backend_dev_get_props(ggml_backend_dev_get(i), &props[i])
        for i in range(n):
            dev = ggml_backend_dev_get(i)
            out.append({
                "index": i,
                "name": _str(props[i].name),
                "description": _str(props[i].description),
                "type": _DEV_TYPES.get(props[i].type, "unknown"),
                "backend": _str(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev))),
                "device_id": _str(props[i].device_id) or None,
                "free": props[i].memory_free,
                "total": props[i].memory_total,
            })
    finally:
        free(props)
    return out


cdef list _reg_features(ggml_backend_reg_t reg):
    cdef ggml_backend_get_features_t get_features = <ggml_backend_get_features_t> \
        ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    cdef ggml_backend_feature * feat
    out = []
    if get_features == NULL:
        return out
    feat = get_features(reg)
    while feat != NULL and feat.name != NULL:
        out.append((_str(feat.name), _str(feat.value)))
        feat += 1
    return out


cdef str _reg_library(ggml_backend_reg_t reg):
    """Path of the shared library that holds a backend's registry (with
    dynamically loaded backends, the variant ggml picked: libggml-cpu-zen4.so)."""
    cdef Dl_info info
    if dladdr(<const void *> reg, &info) == 0 or info.dli_fname == NULL:
        return ""
    return os.fsdecode(<bytes> info.dli_fname)


def build_info():
    """llama.cpp/ggml versions, backends (with their features and the library
    each was loaded from) and llama.cpp's capabilities."""
    backend_init()
    cdef size_t i
    cdef ggml_backend_reg_t reg
    backends = []
    for i in range(ggml_backend_reg_count()):
        reg = ggml_backend_reg_get(i)
        backends.append({
            "name": _str(ggml_backend_reg_name(reg)),
            "devices": ggml_backend_reg_dev_count(reg),
            "features": dict(_reg_features(reg)),
            "library": _reg_library(reg),
        })
    return {
        "llama_version": _str(llama_version()),
        "ggml_version": _str(ggml_version()),
        "ggml_commit": _str(ggml_commit()),
        "system_info": _str(llama_print_system_info()),
        "backends": backends,
        "supports_mmap": bool(llama_supports_mmap()),
        "supports_mlock": bool(llama_supports_mlock()),
        "supports_gpu_offload": bool(llama_supports_gpu_offload()),
        "max_devices": llama_max_devices(),
        "max_parallel_sequences": llama_max_parallel_sequences(),
    }


def time_us():
    """llama.cpp's monotonic clock in microseconds."""
    return llama_time_us()

