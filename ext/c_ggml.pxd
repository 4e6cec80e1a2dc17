# Declarations of the ggml C API that llama-runner uses (ggml.h, ggml-backend.h,
# ggml-cpu.h), grouped like the headers.  Nothing here is implemented in Cython.
from libc.stdint cimport int32_t, int64_t
from libc.stddef cimport size_t


cdef extern from "ggml.h" nogil:
    enum ggml_type:
        GGML_TYPE_F32
        GGML_TYPE_F16
        GGML_TYPE_Q4_0
        GGML_TYPE_Q4_1
        GGML_TYPE_Q5_0
        GGML_TYPE_Q5_1
        GGML_TYPE_Q8_0
        GGML_TYPE_BF16
        GGML_TYPE_COUNT

    enum ggml_log_level:
        GGML_LOG_LEVEL_NONE
        GGML_LOG_LEVEL_DEBUG
        GGML_LOG_LEVEL_INFO
        GGML_LOG_LEVEL_WARN
        GGML_LOG_LEVEL_ERROR
        GGML_LOG_LEVEL_CONT

    ctypedef void (*ggml_log_callback)(ggml_log_level level, const char * text, void * user_data) noexcept
    ctypedef bint (*ggml_abort_callback)(void * data) noexcept

    ctypedef void (*ggml_abort_callback_t)(const char * error_message) noexcept

    void ggml_log_set(ggml_log_callback log_callback, void * user_data)
    ggml_abort_callback_t ggml_set_abort_callback(ggml_abort_callback_t callback)
    const char * ggml_type_name(ggml_type type)
    size_t ggml_row_size(ggml_type type, int64_t ne)
    const char * ggml_version()
    const char * ggml_commit()


cdef extern from "ggml-backend.h" nogil:
    cdef struct ggml_backend_device
    ctypedef ggml_backend_device * ggml_backend_dev_t
    cdef struct ggml_backend_reg
    ctypedef ggml_backend_reg * ggml_backend_reg_t
    cdef struct ggml_backend_buffer_type
    ctypedef ggml_backend_buffer_type * ggml_backend_buffer_type_t

    enum ggml_backend_dev_type:
        GGML_BACKEND_DEVICE_TYPE_CPU
        GGML_BACKEND_DEVICE_TYPE_GPU
        GGML_BACKEND_DEVICE_TYPE_IGPU
        GGML_BACKEND_DEVICE_TYPE_ACCEL

    struct ggml_backend_dev_caps:
        bint async "async"
        bint host_buffer
        bint buffer_from_host_ptr
        bint events
        bint mmap_support

    struct ggml_backend_dev_props:
        const char * name
        const char * description
        size_t memory_free
        size_t memory_total
        ggml_backend_dev_type type
        const char * device_id
        ggml_backend_dev_caps caps

    struct ggml_backend_feature:
        const char * name
        const char * value
    ctypedef ggml_backend_feature * (*ggml_backend_get_features_t)(ggml_backend_reg_t reg)

    const char * ggml_backend_dev_name(ggml_backend_dev_t device)
    const char * ggml_backend_dev_description(ggml_backend_dev_t device)
    void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total)
    ggml_backend_dev_type ggml_backend_dev_get_type "ggml_backend_dev_type"(ggml_backend_dev_t device)
    void ggml_backend_dev_get_props(ggml_backend_dev_t device, ggml_backend_dev_props * props)
    ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device)

    const char * ggml_backend_reg_name(ggml_backend_reg_t reg)
    size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg)
    ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index)
    void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name)

    void ggml_backend_register(ggml_backend_reg_t reg)
    size_t ggml_backend_reg_count()
    ggml_backend_reg_t ggml_backend_reg_get(size_t index)
    ggml_backend_reg_t ggml_backend_reg_by_name(const char * name)
    size_t ggml_backend_dev_count()
    ggml_backend_dev_t ggml_backend_dev_get(size_t index)
    ggml_backend_dev_t ggml_backend_dev_by_name(const char * name)

    ggml_backend_reg_t ggml_backend_load(const char * path)
    void ggml_backend_load_all()
    void ggml_backend_load_all_from_path(const char * dir_path)


cdef extern from "ggml-rpc.h" nogil:
    # The functions themselves are reached through the RPC registry's
    # ggml_backend_reg_get_proc_address: with GGML_BACKEND_DL the backend is a
    # module loaded at run time, so nothing may link against its symbols.
    int RPC_PROTO_MAJOR_VERSION
    int RPC_PROTO_MINOR_VERSION
    int RPC_PROTO_PATCH_VERSION
    int GGML_RPC_MAX_SERVERS

# ggml_backend_rpc_add_server, ggml_backend_rpc_start_server and
# ggml_backend_rpc_server_lost, as pointers.
ctypedef ggml_backend_reg_t (*ggml_backend_rpc_add_server_t)(const char * endpoint) noexcept nogil
ctypedef void (*ggml_backend_rpc_start_server_t)(const char * endpoint, const char * cache_dir,
                                                  size_t n_threads, size_t n_devices,
                                                  ggml_backend_dev_t * devices) noexcept nogil
# patches/0003: 1 when the connection to the server at endpoint was lost.
ctypedef int (*ggml_backend_rpc_server_lost_t)(const char * endpoint) noexcept nogil
