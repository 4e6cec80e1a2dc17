# dladdr from <dlfcn.h> (glibc, macOS; not POSIX, so Cython's posix.dlfcn
# lacks it): which shared object holds an address.  glibc declares it under
# _GNU_SOURCE, which Python.h defines.


cdef extern from "<dlfcn.h>" nogil:
    ctypedef struct Dl_info:
        const char * dli_fname   # path of the shared object holding the address
        void * dli_fbase         # where that object is loaded
        const char * dli_sname   # nearest symbol at or below the address, or NULL
        void * dli_saddr         # that symbol's address

    int dladdr(const void * addr, Dl_info * info)
