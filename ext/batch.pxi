# Batch: the reusable input of llama_decode, allocated once.

_NO_POSITIONS = np.zeros((1, 0), dtype=np.int32)  # add_embeddings' view when positions are pos0 + k


cdef class Batch:
    """A llama_batch allocated once and refilled for every decode.

    Holds either token ids (``embd == 0``) or embedding rows of width
    ``embd`` — never both.  Each entry has a position, up to ``n_seq_max``
    sequence ids, and an output flag (logits/embeddings wanted).

    An embedding batch for an M-RoPE model (``n_pos == 4``) gives each entry
    ``n_pos`` positions, stored section-major as llama_decode reads them:
    ``pos[j * n_tokens + i]`` is section ``j`` of entry ``i``.  The sections
    are moved whenever ``n_tokens`` changes (append, truncate).
    """
    cdef llama_batch batch      # owned arrays, sized for `capacity` entries
    cdef readonly int32_t capacity  # entries the arrays hold
    cdef readonly int32_t embd      # embedding width, or 0 for a token batch
    cdef readonly int32_t n_seq_max # sequence ids one entry may carry
    cdef readonly int32_t n_pos     # positions per entry (4 for M-RoPE embeddings)
    cdef bint allocated         # arrays are live (close() clears it)

    def __cinit__(self, int32_t capacity, int32_t embd=0, int32_t n_seq_max=1, int32_t n_pos=1):
        if capacity <= 0:
            raise ValueError(f"batch capacity must be positive, not {capacity}")
        if embd < 0 or n_seq_max <= 0:
            raise ValueError("embd must be >= 0 and n_seq_max > 0")
        if n_pos < 1 or n_pos > 4 or (n_pos > 1 and not embd):
            raise ValueError("n_pos must be 1, or up to 4 for an embedding batch")
        self.batch = llama_batch_init(capacity, embd, n_seq_max)
        self.allocated = True
        if n_pos > 1:
            # llama_batch_free() frees pos with free(): a realloc'ed block is fine.
            pos = <llama_pos *> realloc(self.batch.pos, capacity * n_pos * sizeof(llama_pos))
            if pos == NULL:
                llama_batch_free(self.batch)
                self.allocated = False
                raise MemoryError()
            self.batch.pos = pos
        self.n_pos = n_pos
        self.capacity = capacity
        self.embd = embd
        self.n_seq_max = n_seq_max
        self.batch.n_tokens = 0

    def __dealloc__(self):
        if self.allocated:
            llama_batch_free(self.batch)
            self.allocated = False

    def close(self):
        if self.allocated:
            llama_batch_free(self.batch)
            self.allocated = False

    @property
    def closed(self):
        return not self.allocated

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef inline int _check(self) except -1:
        if not self.allocated:
            raise ClosedError("batch is closed")
        return 0

    def __len__(self):
        return self.batch.n_tokens

    @property
    def n_tokens(self):
        return self.batch.n_tokens

    def clear(self):
        self._check()
        self.batch.n_tokens = 0

    cdef inline int _push(self, llama_pos pos, llama_seq_id seq_id, bint output) except -1:
        cdef int32_t i = self.batch.n_tokens
        if i >= self.capacity:
            raise IndexError(f"batch is full ({self.capacity} entries)")
        self.batch.pos[i] = pos
        self.batch.n_seq_id[i] = 1
        self.batch.seq_id[i][0] = seq_id
        self.batch.logits[i] = output
        self.batch.n_tokens = i + 1
        return i

    cpdef int add(self, llama_token token, llama_pos pos, llama_seq_id seq_id, bint output=False) except -1:
        """Append one token; returns its index in the batch."""
        self._check()
        if self.embd:
            raise TypeError("this batch holds embeddings, not tokens")
        cdef int i = self._push(pos, seq_id, output)
        self.batch.token[i] = token
        return i

    def add_tokens(self, tokens, llama_pos pos0, llama_seq_id seq_id, bint output_last=False):
        """Append ``tokens`` at positions pos0, pos0+1, ... of one sequence;
        only the last gets an output flag when ``output_last``.  Returns the
        index of the last entry (or -1 for an empty list)."""
        self._check()
        if self.embd:
            raise TypeError("this batch holds embeddings, not tokens")
        cdef Py_ssize_t n = len(tokens)
        if self.batch.n_tokens + n > self.capacity:
            raise IndexError(f"{n} tokens do not fit: {self.batch.n_tokens} of {self.capacity} entries used")
        cdef int i = -1
        cdef Py_ssize_t k = 0
        for t in tokens:
            i = self._push(pos0 + <llama_pos> k, seq_id, output_last and k == n - 1)
            self.batch.token[i] = t
            k += 1
        return i

    def add_seqs(self, llama_token token, llama_pos pos, seq_ids, bint output=False):
        """Append one token shared by several sequences."""
        self._check()
        cdef Py_ssize_t n = len(seq_ids)
        if n == 0 or n > self.n_seq_max:
            raise ValueError(f"1..{self.n_seq_max} sequence ids per entry, got {n}")
        cdef int i = self._push(pos, seq_ids[0], output)
        self.batch.token[i] = token
        for k in range(n):
            self.batch.seq_id[i][k] = seq_ids[k]
        self.batch.n_seq_id[i] = <int32_t> n
        return i

    def add_embedding(self, row, llama_pos pos, llama_seq_id seq_id, bint output=False):
        """Append one embedding row (anything exposing ``embd`` float32s)."""
        self._check()
        if not self.embd:
            raise TypeError("this batch holds tokens, not embeddings")
        if self.n_pos > 1:
            raise TypeError("this batch takes rows with their positions: use add_embeddings")
        cdef const float[::1] view = np.ascontiguousarray(row, dtype=np.float32).reshape(-1)
        if view.shape[0] != self.embd:
            raise ValueError(f"embedding row has {view.shape[0]} floats, batch expects {self.embd}")
        cdef int i = self._push(pos, seq_id, output)
        memcpy(&self.batch.embd[i * self.embd], &view[0], self.embd * sizeof(float))
        return i

    def add_embeddings(self, rows, llama_pos pos0, llama_seq_id seq_id, bint output_last=False,
                       positions=None):
        """Append the rows of a 2-D float32 array to one sequence; returns the
        index of the last entry (-1 if none).

        Positions are pos0, pos0+1, ... — or, in a batch with ``n_pos > 1``,
        ``positions``: an int array of shape (n_pos, len(rows)), section by
        section (see :meth:`MediaChunk.mrope_positions`).
        """
        self._check()
        if not self.embd:
            raise TypeError("this batch holds tokens, not embeddings")
        cdef const float[:, ::1] view = np.ascontiguousarray(rows, dtype=np.float32)
        cdef Py_ssize_t n = view.shape[0], k, j
        cdef const int32_t[:, ::1] pview
        if view.shape[1] != self.embd:
            raise ValueError(f"embedding rows have {view.shape[1]} floats, batch expects {self.embd}")
        if self.batch.n_tokens + n > self.capacity:
            raise IndexError(f"{n} rows do not fit: {self.batch.n_tokens} of {self.capacity} entries used")
        if self.n_pos > 1:
            if positions is None:
                raise ValueError(f"this batch needs {self.n_pos} positions per row")
            pview = np.ascontiguousarray(positions, dtype=np.int32)
            if pview.shape[0] != self.n_pos or pview.shape[1] != n:
                raise ValueError(f"positions must have shape ({self.n_pos}, {n}), "
                                 f"not {tuple(np.shape(positions))}")
        elif positions is not None:
            raise ValueError("this batch has one position per row: use pos0")
        else:
            pview = _NO_POSITIONS
        if n == 0:
            return -1
        cdef int i0 = self.batch.n_tokens, i = -1
        cdef int32_t n_new = i0 + <int32_t> n
        if self.n_pos > 1:
            # Make room at the end of every section, last section first.
            for j in range(self.n_pos - 1, 0, -1):
                memmove(&self.batch.pos[j * n_new], &self.batch.pos[j * i0], i0 * sizeof(llama_pos))
        if self.n_pos == 1:
            for k in range(n):
                i = self._push(pos0 + <llama_pos> k, seq_id, output_last and k == n - 1)
        else:
            for k in range(n):
                i = self._push(pview[0, k], seq_id, output_last and k == n - 1)
            for j in range(1, self.n_pos):
                for k in range(n):
                    self.batch.pos[j * n_new + i0 + k] = pview[j, k]
        memcpy(&self.batch.embd[i0 * self.embd], &view[0, 0], n * self.embd * sizeof(float))
        return i

    def set_output(self, int32_t i, bint output):
        self._check()
        if i < 0 or i >= self.batch.n_tokens:
            raise IndexError(f"batch index {i} out of range")
        self.batch.logits[i] = output

    def positions(self):
        """A copy of the entries' positions, shape (n_pos, n_tokens)."""
        self._check()
        cdef int32_t n = self.batch.n_tokens
        out = np.empty((self.n_pos, n), dtype=np.int32)
        cdef int32_t[:, ::1] view = out
        if n:
            memcpy(&view[0, 0], self.batch.pos, self.n_pos * n * sizeof(llama_pos))
        return out

    def token_at(self, int32_t i):
        self._check()
        if i < 0 or i >= self.batch.n_tokens or self.embd:
            raise IndexError(f"batch index {i} out of range")
        return self.batch.token[i]

    def truncate(self, int32_t n):
        """Keep only the first ``n`` entries (used to retry with a smaller batch)."""
        self._check()
        if n < 0 or n > self.batch.n_tokens:
            raise ValueError(f"cannot truncate a batch of {self.batch.n_tokens} to {n}")
        cdef int32_t n_old = self.batch.n_tokens, j
        for j in range(1, self.n_pos):  # sections move down, first section first
            memmove(&self.batch.pos[j * n], &self.batch.pos[j * n_old], n * sizeof(llama_pos))
        self.batch.n_tokens = n
