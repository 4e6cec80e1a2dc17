# cython: language_level=3
"""Thin owning wrappers over llama.cpp, ggml and libmtmd.

Policy (scheduling, caching, sampling options, protocol) lives in the
pure-Python ``runner`` package; this module only owns C resources, converts
errors, and releases the GIL around the long calls (model load, decode,
tokenizing long text).

Each C resource has exactly one owning class with ``close()``, context-manager
support, a guard that raises :class:`ClosedError` on use after close, and a
``__dealloc__`` that frees exactly once.  None of the classes is thread-safe:
an object is used by one thread at a time (the engine's decode thread owns the
context, batch and samplers while a decode is in flight).
"""

cimport cython
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, strlen, strncmp
from posix.unistd cimport write

from c_ggml cimport *
from c_llama cimport *
from c_guard cimport *
cimport c_mtmd

import collections
import logging
import os
import re
import threading
import time

import numpy as np

include "errors.pxi"
include "log.pxi"
include "buffer.pxi"
include "backend.pxi"
include "model.pxi"
include "batch.pxi"
include "context.pxi"
include "sampler.pxi"
include "jsonschema.pxi"
include "lora.pxi"
include "mtmd.pxi"
include "rpc.pxi"
