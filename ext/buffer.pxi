# Zero-copy float32 views over llama.cpp-owned memory.

cdef char * _FLOAT_FORMAT = b"f"


@cython.final
cdef class FloatView:
    """A read-only buffer over ``n`` floats owned by a llama.cpp context.

    ``numpy.asarray(view)`` shares the memory without copying.  The data is
    valid until the owner's next decode (or its close); the view keeps the
    owner object alive but cannot stop the owner from overwriting the data.
    """
    cdef float * ptr          # first float (owned by llama.cpp)
    cdef Py_ssize_t n         # number of floats
    cdef Py_ssize_t shape[1]  # buffer-protocol shape
    cdef Py_ssize_t strides[1]
    cdef object owner         # keeps the context alive while the view exists

    @staticmethod
    cdef FloatView wrap(float * ptr, Py_ssize_t n, object owner):
        cdef FloatView v = FloatView.__new__(FloatView)
        v.ptr = ptr
        v.n = n
        v.owner = owner
        v.shape[0] = n
        v.strides[0] = sizeof(float)
        return v

    def __getbuffer__(self, Py_buffer * buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("llama.cpp output views are read-only")
        buffer.buf = <void *> self.ptr
        buffer.obj = self
        buffer.len = self.n * sizeof(float)
        buffer.readonly = 1
        buffer.itemsize = sizeof(float)
        if flags & PyBUF_FORMAT:
            buffer.format = _FLOAT_FORMAT
        else:
            buffer.format = NULL
        buffer.ndim = 1
        buffer.shape = self.shape
        buffer.strides = self.strides
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __releasebuffer__(self, Py_buffer * buffer):
        pass

    def __len__(self):
        return self.n


cdef object _float_array(float * ptr, Py_ssize_t n, object owner):
    return np.frombuffer(FloatView.wrap(ptr, n, owner), dtype=np.float32)
