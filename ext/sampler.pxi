# Sampler: one llama_sampler chain per request.


cdef inline int32_t _argmax(const float * x, int32_t n) noexcept nogil:
    """Index of the first largest of ``x[0:n]``; NaNs are skipped (index 0 if
    ``x[0]`` is one).  ext/vecscan.cpp: the maximum of each 256-float block
    is taken with vector max instructions (AVX2 where the CPU has it), and
    the index is searched for only from the block that raised the maximum
    last.  About 4 us over SmolLM2's 49,152 logits on this project's VM,
    against 12 for the same scheme in scalar code and 47 for a plain
    compare-and-branch loop."""
    return runner_argmax_f32(x, n)


def vecscan_isa():
    """The vector unit ext/vecscan.cpp chose for the argmax and the native
    chain's top-k scan: "avx2", "sse2", "neon" or "scalar"."""
    return runner_vecscan_isa().decode()


def argmax(const float[::1] x not None):
    """The greedy sampler's argmax over a float32 array: the first index of
    the largest value, NaNs skipped (0 when ``x[0]`` is NaN)."""
    if x.shape[0] == 0:
        raise ValueError("argmax of an empty array")
    cdef int32_t tok
    with nogil:
        tok = _argmax(&x[0], <int32_t> x.shape[0])
    return tok


def fast_sample_once(const float[::1] logits not None, *, float temperature=0.0, int32_t top_k=40,
                     float top_p=1.0, float min_p=0.0, uint64_t seed=0):
    """One draw of the native chain (no penalties) over a float32 array of
    logits, for tests: the token index, or -1 when no logit is a number."""
    if logits.shape[0] == 0:
        raise ValueError("no logits")
    cdef runner_fast_sampler * fs = runner_fast_new(<int32_t> logits.shape[0], temperature, top_k,
                                                    top_p, min_p, 0, 1.0, 0.0, 0.0, seed)
    if fs == NULL:
        raise ValueError("parameters outside the native sampler's range")
    cdef int32_t tok
    with nogil:
        tok = runner_fast_sample(fs, &logits[0])
    runner_fast_free(fs)
    return tok


def block_maxima(const float[::1] x not None):
    """The largest non-NaN entry (-inf if none) of each whole block of
    RUNNER_MAXIMA_BLOCK (64) entries of a float32 array, as the native
    chain's top-k reads them first; for tests."""
    cdef int32_t n_blocks = <int32_t> (x.shape[0] // RUNNER_MAXIMA_BLOCK)
    out = np.empty(n_blocks, dtype=np.float32)
    cdef float[::1] ov = out
    if n_blocks > 0:
        with nogil:
            runner_block_maxima(&x[0], n_blocks, &ov[0])
    return out


def fast_distribution_once(const float[::1] logits not None, window=(), bias=None, *,
                           float temperature=0.8, int32_t top_k=40, float top_p=1.0, float min_p=0.0,
                           float repeat_penalty=1.0, float frequency_penalty=0.0,
                           float presence_penalty=0.0, str scan="auto"):
    """The native chain's final distribution over a float32 array of
    logits, after the tokens of ``window`` were accepted (penalty window of
    their length) and with ``bias`` ({token: bias}): (token ids,
    probabilities), for tests.  ``scan``: how top-k finds its candidates,
    "auto" (a new sampler's first row: one pass), "one-pass" or "blocks"
    (block maxima first; ext/fastsample.h)."""
    cdef int mode = {"auto": RUNNER_FAST_SCAN_AUTO, "one-pass": RUNNER_FAST_SCAN_ONE_PASS,
                     "blocks": RUNNER_FAST_SCAN_BLOCKS}[scan]
    window = [int(t) for t in window]
    cdef int32_t n = <int32_t> logits.shape[0]
    if n == 0:
        raise ValueError("no logits")
    cdef runner_fast_sampler * fs = runner_fast_new(n, temperature, top_k, top_p, min_p,
                                                    max(len(window), 1), repeat_penalty,
                                                    frequency_penalty, presence_penalty, 0)
    if fs == NULL:
        raise ValueError("parameters outside the native sampler's range")
    runner_fast_set_scan(fs, mode)
    cdef int32_t[::1] bt
    cdef float[::1] bv
    cdef int32_t got
    try:
        for t in window:
            if not 0 <= t < n:
                raise ValueError(f"token {t} outside the logits")
            runner_fast_accept(fs, <int32_t> t)
        if bias:
            bt = np.array(list(bias), dtype=np.int32)
            bv = np.array(list(bias.values()), dtype=np.float32)
            if runner_fast_set_bias(fs, &bt[0], &bv[0], <int32_t> len(bias)) != 0:
                raise ValueError("a bias outside the logits, or NaN")
        tokens = np.empty(max(top_k, 1), dtype=np.int32)
        probs = np.empty(max(top_k, 1), dtype=np.float32)
        bt = tokens
        bv = probs
        with nogil:
            got = runner_fast_distribution(fs, &logits[0], &bt[0], &bv[0], max(top_k, 1))
        return tokens[:got], probs[:got]
    finally:
        runner_fast_free(fs)


cdef enum:
    _ERR_LEN = 512  # bytes of a Sampler's error message buffer


class _DeferredPick:
    """What :meth:`Sampler.sample` returns, with ``defer=True``, for a pick
    left to :meth:`Sampler.resolve`; :data:`DEFERRED` is its one instance."""
    __slots__ = ()

    def __repr__(self):
        return "DEFERRED"


DEFERRED = _DeferredPick()


cdef class Sampler:
    """A sampler chain built from per-request options.

    Order: logit bias, penalties, top_k, typical_p, top_p, min_p,
    temperature, then dist (seeded) — or greedy when ``temperature <= 0``.

    A grammar is kept out of the chain, as llama.cpp's common sampler keeps
    it: :meth:`sample` lets the chain pick from the whole vocabulary, checks
    that one token against the grammar, and only when the grammar rejects it
    applies the grammar to every token and runs the chain again (the chosen
    token then follows the chain's distribution restricted to what the
    grammar allows, except that a first pick the grammar accepts is kept).
    Prompt tokens fed through :meth:`accept` reach the penalties, never the
    grammar, which constrains generated text only.  Every call that can throw
    inside llama.cpp goes through ext/guard.cpp: a grammar that allows no
    token raises :class:`NoTokenError`, anything else :class:`SamplerError`;
    the process never aborts.

    ``stages`` replaces the keyword options above with an explicit chain:
    a sequence of tuples, each a llama.cpp sampler and its parameters, in
    the order they run, the last one picking the token::

        ("logit_bias", [(token, bias), ...])    # bias may be -inf
        ("penalties", last_n, repeat, frequency, presence)
        ("dry", multiplier, base, allowed_length, penalty_last_n, [breaker, ...])
        ("top_n_sigma", n)      ("top_k", k)      ("typical", p, min_keep)
        ("top_p", p, min_keep)  ("min_p", p, min_keep)
        ("xtc", probability, threshold, min_keep)
        ("temp", t, dynatemp_range, dynatemp_exponent)     ("infill",)
        picking: ("dist",) ("greedy",) ("mirostat", tau, eta, m)
                 ("mirostat_v2", tau, eta) ("adaptive_p", target, decay)

    Every stage that draws (xtc, dist, mirostat, adaptive_p) uses ``seed``.
    The chain never runs natively then; which stages a request gets, and in
    what order, is decided in runner/engine/sampling.py.

    Without logit bias or typical-p, and with ``top_k`` in
    1..1024 (or greedy), the chain runs natively (ext/fastsample.cpp) with
    the same stages and the same distribution, but in one pass over the
    logits instead of a sort of n_vocab candidates: the default options
    (penalties, top-k 40) cost about what greedy costs.  Its draw uses its
    own seeded generator, so a seed gives other tokens than llama.cpp's dist
    stage would.  ``native=False`` forces llama.cpp's chain.
    """
    cdef llama_sampler * chain     # owned; NULL after close
    cdef llama_sampler * grammar   # owned; NULL when the request has no grammar
    cdef llama_token_data * cur    # scratch candidates, n_vocab entries (allocated on first use)
    cdef readonly Model model      # the vocabulary the chain was built for
    cdef readonly uint32_t seed    # seed of the dist stage (0 for greedy)
    cdef readonly bint greedy      # temperature <= 0
    cdef bint argmax_only          # greedy with no stateful stage: sample() is a plain argmax
    cdef runner_fast_sampler * fast  # owned; the native chain, or NULL when llama.cpp's runs
    cdef char err[_ERR_LEN]        # message of the last guarded call that failed
    cdef float * kept              # the row of a deferred pick, n_vocab floats (allocated on first use)
    cdef bint deferred             # a pick awaits resolve(); sample() refuses until then
    # resolve() is running with the GIL released; close() then only sets
    # close_pending, and resolve() frees everything when it returns.  Both
    # flags change with the GIL held.
    cdef bint busy
    cdef bint close_pending
    # Sampling in the decode graph (attach): the context that holds the
    # chain for sequence graph_seq (None when not attached), and whether the
    # chain was ever handed over (llama.cpp initialises it for the graph
    # once; it cannot sample on the CPU alone afterwards).
    cdef Context graph_ctx
    cdef llama_seq_id graph_seq
    cdef bint graph_used

    def __cinit__(self, Model model not None, *, float temperature=0.8, int32_t top_k=40,
                  float top_p=0.9, float min_p=0.0, float typical_p=1.0,
                  int32_t repeat_last_n=64, float repeat_penalty=1.0,
                  float frequency_penalty=0.0, float presence_penalty=0.0,
                  seed=None, grammar=None, str grammar_root="root", logit_bias=None,
                  bint native=True, stages=None):
        model._check()
        self.model = model
        self.err[0] = 0
        cdef bytes bgrammar, broot
        cdef const char * cgrammar
        cdef const char * croot
        if grammar:
            bgrammar = grammar.encode() if isinstance(grammar, str) else bytes(grammar)
            broot = grammar_root.encode()
            if b"\0" in bgrammar:
                raise GrammarError("invalid GBNF grammar: it contains a NUL character")
            mark = error_mark()
            cgrammar = bgrammar
            croot = broot
            with nogil:  # a large grammar takes a while to parse
                self.grammar = runner_grammar_init(model.vocab, cgrammar, croot, self.err, sizeof(self.err))
            if self.grammar == NULL:
                raise GrammarError("invalid GBNF grammar: " + self._grammar_failure(mark))
        self.chain = llama_sampler_chain_init(llama_sampler_chain_default_params())
        if stages is not None:
            self._build(list(stages), seed)
            return
        if logit_bias:
            llama_sampler_chain_add(self.chain, self._logit_bias(dict(logit_bias).items()))
        if repeat_last_n != 0 and (repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0):
            if repeat_penalty <= 0:
                raise ValueError("repeat_penalty must be > 0")
            llama_sampler_chain_add(self.chain, llama_sampler_init_penalties(
                model.n_vocab, repeat_last_n, repeat_penalty, frequency_penalty, presence_penalty))
        # The native chain serves a grammar's requests too (the grammar checks
        # its pick: runner_fast_grammar_sample).
        cdef bint plain = native and not (0.0 < typical_p < 1.0)
        if temperature <= 0:
            self.greedy = True
            self.seed = 0
            # Nothing before the greedy stage changes the logits or keeps
            # state: sample() can skip building the n_vocab candidate array.
            self.argmax_only = llama_sampler_chain_n(self.chain) == 0 and self.grammar == NULL
            llama_sampler_chain_add(self.chain, llama_sampler_init_greedy())
            if plain and not self.argmax_only:
                self.fast = runner_fast_new(model.n_vocab, 0.0, 0, 1.0, 0.0, repeat_last_n,
                                            repeat_penalty, frequency_penalty, presence_penalty, 0)
                self._fast_bias(logit_bias)
            return
        if top_k > 0:
            # Beyond the vocabulary top-k keeps every token; the CPU stage
            # clamps k itself, the graph's stage would abort (ggml_top_k).
            llama_sampler_chain_add(self.chain, llama_sampler_init_top_k(min(top_k, model.n_vocab)))
        if 0.0 < typical_p < 1.0:
            llama_sampler_chain_add(self.chain, llama_sampler_init_typical(typical_p, 1))
        if 0.0 < top_p < 1.0:
            llama_sampler_chain_add(self.chain, llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            llama_sampler_chain_add(self.chain, llama_sampler_init_min_p(min_p, 1))
        llama_sampler_chain_add(self.chain, llama_sampler_init_temp(temperature))
        if seed is None or seed < 0:
            seed = int.from_bytes(os.urandom(4), "little")
        self.seed = <uint32_t> (seed & 0xFFFFFFFF)
        llama_sampler_chain_add(self.chain, llama_sampler_init_dist(self.seed))
        if plain:  # NULL (llama.cpp's chain) when top_k is out of its range
            self.fast = runner_fast_new(model.n_vocab, temperature, top_k, top_p, min_p, repeat_last_n,
                                        repeat_penalty, frequency_penalty, presence_penalty, self.seed)
            self._fast_bias(logit_bias)

    cdef int _fast_bias(self, logit_bias) except -1:
        """Give the native chain the logit biases (the chain's stage holds
        them too, for reset and for llama.cpp's chain)."""
        if self.fast == NULL or not logit_bias:
            return 0
        pairs = list(dict(logit_bias).items())
        cdef Py_ssize_t i, n = len(pairs)
        cdef int32_t * toks = <int32_t *> malloc(n * sizeof(int32_t))
        cdef float * biases = <float *> malloc(n * sizeof(float))
        try:
            if toks == NULL or biases == NULL:
                raise MemoryError()
            for i in range(n):
                toks[i] = pairs[i][0]
                biases[i] = pairs[i][1]
            if runner_fast_set_bias(self.fast, toks, biases, <int32_t> n) != 0:
                raise ValueError("logit_bias: a token outside the vocabulary or a NaN bias")
        finally:
            free(toks)
            free(biases)
        return 0

    cdef llama_sampler * _logit_bias(self, pairs) except NULL:
        """A logit-bias stage from (token, bias) pairs."""
        pairs = list(pairs)
        cdef Py_ssize_t i, nb = len(pairs)
        cdef llama_logit_bias * biases = <llama_logit_bias *> malloc(max(nb, 1) * sizeof(llama_logit_bias))
        if biases == NULL:
            raise MemoryError()
        try:
            for i, (tok, bias) in enumerate(pairs):
                self.model._check_token(tok)
                biases[i].token = tok
                biases[i].bias = bias
            return llama_sampler_init_logit_bias(self.model.n_vocab, <int32_t> nb, biases)
        finally:
            free(biases)

    cdef llama_sampler * _dry(self, float multiplier, float base, int32_t allowed_length,
                              int32_t penalty_last_n, breakers) except NULL:
        encoded = [b.encode("utf-8") if isinstance(b, str) else bytes(b) for b in breakers]
        cdef Py_ssize_t i, n = len(encoded)
        cdef const char ** cb = <const char **> malloc(max(n, 1) * sizeof(char *))
        cdef llama_sampler * smpl
        if cb == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                if b"\0" in encoded[i]:
                    raise ValueError("a DRY sequence breaker contains a NUL character")
                cb[i] = encoded[i]
            with nogil:  # searches the vocabulary once per breaker
                smpl = runner_dry_init(self.model.vocab, multiplier, base, allowed_length,
                                       penalty_last_n, cb, <size_t> n, self.err, sizeof(self.err))
            if smpl == NULL:
                raise SamplerError(f"DRY sampler: {self._last_err()}")
            return smpl
        finally:
            free(cb)

    cdef llama_sampler * _stage(self, tuple stage) except NULL:
        """The llama.cpp sampler for one stage tuple (see the class docstring)."""
        name, args = stage[0], stage[1:]
        cdef int32_t n_vocab = self.model.n_vocab
        if name in ("infill", "dist", "greedy") and args:
            raise TypeError(f"takes no parameters, got {len(args)}")
        if name == "logit_bias":
            (pairs,) = args
            return self._logit_bias(pairs)
        if name == "penalties":
            last_n, repeat, freq, present = args
            if not repeat > 0:
                raise ValueError("the repeat penalty must be > 0")
            return llama_sampler_init_penalties(n_vocab, last_n, repeat, freq, present)
        if name == "dry":
            multiplier, base, allowed_length, last_n, breakers = args
            return self._dry(multiplier, base, allowed_length, last_n, breakers)
        if name == "top_n_sigma":
            (n,) = args
            return llama_sampler_init_top_n_sigma(n)
        if name == "top_k":
            (k,) = args
            return llama_sampler_init_top_k(min(k, self.model.n_vocab))  # as the keyword chain
        if name == "typical":
            p, min_keep = args
            return llama_sampler_init_typical(p, min_keep)
        if name == "top_p":
            p, min_keep = args
            return llama_sampler_init_top_p(p, min_keep)
        if name == "min_p":
            p, min_keep = args
            return llama_sampler_init_min_p(p, min_keep)
        if name == "xtc":
            p, t, min_keep = args
            return llama_sampler_init_xtc(p, t, min_keep, self.seed)
        if name == "temp":
            t, delta, exponent = args
            return llama_sampler_init_temp_ext(t, delta, exponent)
        if name == "infill":
            return llama_sampler_init_infill(self.model.vocab)
        if name == "dist":
            return llama_sampler_init_dist(self.seed)
        if name == "greedy":
            return llama_sampler_init_greedy()
        if name == "mirostat":
            tau, eta, m = args
            if not m > 0:
                raise ValueError("mirostat's m must be > 0")
            return llama_sampler_init_mirostat(n_vocab, self.seed, tau, eta, m)
        if name == "mirostat_v2":
            tau, eta = args
            return llama_sampler_init_mirostat_v2(self.seed, tau, eta)
        if name == "adaptive_p":
            target, decay = args
            return llama_sampler_init_adaptive_p(target, decay, self.seed)
        raise ValueError(f"unknown sampler stage {name!r}")

    cdef int _build(self, list stages, seed) except -1:
        """Fill the chain from ``stages`` (the explicit form; see the class docstring)."""
        picking = ("dist", "greedy", "mirostat", "mirostat_v2", "adaptive_p")
        cdef Py_ssize_t n = len(stages)
        if n == 0 or stages[n - 1][0] not in picking:
            raise ValueError(f"the last stage must pick the token (one of {', '.join(picking)})")
        for stage in stages[:n - 1]:
            if stage[0] in picking:
                raise ValueError(f"stage {stage[0]!r} picks the token: it must come last")
        if seed is None or seed < 0:
            seed = int.from_bytes(os.urandom(4), "little")
        self.seed = <uint32_t> (seed & 0xFFFFFFFF)
        self.greedy = stages[n - 1][0] == "greedy"
        for stage in stages:
            try:
                llama_sampler_chain_add(self.chain, self._stage(tuple(stage)))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"sampler stage {stage[0]!r}: {exc}") from None
        return 0

    cdef void _free(self) noexcept:
        self._detach()
        if self.chain != NULL:
            llama_sampler_free(self.chain)
            self.chain = NULL
        if self.grammar != NULL:
            llama_sampler_free(self.grammar)
            self.grammar = NULL
        if self.cur != NULL:
            free(self.cur)
            self.cur = NULL
        if self.fast != NULL:
            runner_fast_free(self.fast)
            self.fast = NULL
        if self.kept != NULL:
            free(self.kept)
            self.kept = NULL
        self.deferred = False

    def __dealloc__(self):
        self._free()

    def close(self):
        """Free the chain.  During :meth:`resolve` on another thread the
        sampler is closed at once to its users, and freed when that call
        returns."""
        if self.busy:
            self.close_pending = True
            return
        self._free()

    @property
    def closed(self):
        return self.chain == NULL or self.close_pending

    @property
    def has_grammar(self):
        return self.grammar != NULL

    cdef void _detach(self) noexcept:
        """Take the chain back from the context it is attached to (before
        the chain is freed: the context holds a pointer to it)."""
        cdef Context ctx = self.graph_ctx
        if ctx is None:
            return
        self.graph_ctx = None
        held = ctx._graph_samplers  # None when the collector has cleared a dying context
        if held is not None and held.get(self.graph_seq) is self:
            del held[self.graph_seq]
        if ctx.ptr != NULL:  # a closed context holds nothing any more
            runner_graph_attach(ctx.ptr, self.graph_seq, NULL, self.err, sizeof(self.err))

    def attach(self, Context ctx not None, int seq_id):
        """Sample sequence ``seq_id``'s rows of ``ctx`` inside the decode
        graph from now on (llama.cpp's experimental backend sampling): the
        stages run after the model's last layer on the device that computes
        it, the row's logits are neither copied out nor read here, and
        :meth:`sample` (or :func:`sample_batch`, :func:`decode_steps`) takes
        the token the graph drew and accepts it.  Stages the device cannot
        run finish on the CPU on what the graph left.  The next decode
        rebuilds the graph's buffers (so does :meth:`close`).

        Needs a context made with ``graph_sampling=True``, a sampler
        without a grammar or native chain (``native=False``), never attached
        before, and a sequence no other sampler holds; the sequence may then
        have one output per decode.  The raw logits of its rows are not
        available (no log-probabilities), and its draws differ from the CPU
        chain's for the same seed.  Until :meth:`close` the sampler holds
        the context and the context the chain.

        Returns True; False when llama.cpp would not take the chain (it then
        samples on the CPU as before).  Raises :class:`SamplerError` when
        llama.cpp threw: the chain may be half prepared for the graph, and
        the sampler must not sample any more."""
        self._check()
        ctx._check()
        if not ctx.graph_sampling:
            raise ValueError("the context was not made for sampling in the graph (graph_sampling)")
        if ctx.model is not self.model:
            raise ValueError("sampler and context belong to different models")
        if self.grammar != NULL or self.fast != NULL:
            raise ValueError("only a sampler with llama.cpp's chain and no grammar samples in the graph")
        if self.graph_used:
            raise ValueError("the sampler was attached before (a chain is handed to a graph once)")
        if not 0 <= seq_id < <long> llama_n_seq_max(ctx.ptr):
            raise ValueError(f"sequence id {seq_id} outside 0..{llama_n_seq_max(ctx.ptr) - 1}")
        if seq_id in ctx._graph_samplers:
            raise ValueError(f"sequence {seq_id} has a sampler attached already")
        cdef int rc = runner_graph_attach(ctx.ptr, seq_id, self.chain, self.err, sizeof(self.err))
        if rc == 0:
            return False
        self.graph_used = True
        if rc < 0:
            raise SamplerError(f"attaching the sampler failed: {self._last_err()}")
        self.graph_ctx = ctx
        self.graph_seq = seq_id
        ctx._graph_samplers[seq_id] = self
        return True

    @property
    def attached(self):
        """Whether the sampler samples in a decode graph (:meth:`attach`)."""
        return self.graph_ctx is not None

    cdef inline bint _graph(self) noexcept:
        return self.graph_ctx is not None

    cdef int _graph_sample(self, Context ctx, int32_t idx, llama_token * tok) except -1 nogil:
        """The graph's pick for row ``idx``, accepted (GIL released; raises with it)."""
        cdef int rc = runner_graph_sample(self.chain, ctx.ptr, idx, self.cur, self.model.n_vocab, tok,
                                          self.err, _ERR_LEN)
        if rc != RUNNER_SAMPLE_OK:
            with gil:
                raise SamplerError(f"sampling in the graph failed: {self._last_err()}")
        return 0

    cdef inline bint _native_chain(self) noexcept:
        return (self.fast != NULL or self.argmax_only) and self.graph_ctx is None

    cdef inline bint _native(self) noexcept:
        return self._native_chain() and self.grammar == NULL

    @property
    def native(self):
        """Whether every pick is made in native code with nothing else to
        consult (ext/fastsample.cpp, or a plain argmax): such samplers are
        sampled together across threads.  A grammar's samplers are not, even
        when the native chain draws."""
        return self._native()

    @property
    def native_chain(self):
        """Whether the native chain draws (with or without a grammar): such
        samplers may run in decode_steps."""
        return self._native_chain()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef inline int _check(self) except -1:
        if self.chain == NULL or self.close_pending:
            raise ClosedError("sampler is closed")
        return 0

    cdef str _grammar_failure(self, mark):
        """Why llama.cpp refused the grammar: the exception the shim caught,
        or the parser's reason among the error lines logged since ``mark``
        (patches/0002 routes it to the log)."""
        reason = self.err.decode("utf-8", "replace")
        if reason:
            return reason
        logged = errors_since(mark)
        _, found, parsed = logged.partition("error parsing grammar:")
        if found:
            return parsed.split("; ")[0].strip()
        return logged or "refused by llama.cpp"

    cdef inline str _last_err(self):
        return self.err.decode("utf-8", "replace") or "unknown error"

    def sample(self, Context ctx not None, int32_t idx=-1, bint defer=False):
        """Sample a token from the logits of batch entry ``idx`` and accept it
        into the chain's state (penalties, grammar).  Releases the GIL.
        Raises NoTokenError when the grammar allows no token, SamplerError
        when llama.cpp fails otherwise; the sampler is still usable.

        With ``defer``, when the grammar rejects the chain's first pick the
        row is copied and :data:`DEFERRED` returned instead of applying the
        grammar to the whole vocabulary now; :meth:`resolve` does that later
        (on any thread) and returns the token.  Until then the sampler
        samples nothing else."""
        self._check()
        ctx._check()
        if self.deferred:
            raise ValueError("the sampler's last pick was deferred and is not resolved")
        if ctx.model is not self.model:
            raise ValueError("sampler and context belong to different models")
        ctx._sync()
        cdef llama_token tok = -1
        if self.graph_used and self.graph_ctx is None:
            raise SamplerError("the sampler's chain was handed to a decode graph and cannot sample "
                               "on its own")
        if self.graph_ctx is not None:
            if ctx is not self.graph_ctx:
                raise ValueError("the sampler is attached to another context")
            if self._scratch() < 0:
                raise MemoryError()
            with nogil:
                self._graph_sample(ctx, idx, &tok)
            return tok
        if llama_get_logits_ith(ctx.ptr, idx) == NULL:
            raise IndexError(f"no logits for batch index {idx}")
        cdef float * logits
        cdef int rc
        if self.argmax_only:
            logits = llama_get_logits_ith(ctx.ptr, idx)
            with nogil:
                tok = _argmax(logits, self.model.n_vocab)
            return tok
        if self.fast != NULL and self.grammar == NULL:
            logits = llama_get_logits_ith(ctx.ptr, idx)
            with nogil:
                tok = runner_fast_sample(self.fast, logits)
            if tok < 0:
                raise SamplerError("sampling failed: no logit is a number")
            return tok
        if self._scratch() < 0:
            raise MemoryError()
        cdef float * keep = NULL
        if self.grammar != NULL:
            self._grammar_buffers()
            if defer or self.fast != NULL:
                keep = self.kept
        if self.fast != NULL:  # with a grammar
            logits = llama_get_logits_ith(ctx.ptr, idx)
            with nogil:
                rc = runner_fast_grammar_sample(self.fast, self.grammar, logits, self.model.n_vocab,
                                                self.cur, keep, defer, &tok, self.err, sizeof(self.err))
            if rc == RUNNER_SAMPLE_DEFERRED:
                self.deferred = True
                return DEFERRED
            return self._sampled(rc, tok)
        with nogil:
            rc = runner_sample(self.chain, self.grammar, ctx.ptr, idx, self.model.n_vocab,
                               self.cur, &tok, keep, self.err, sizeof(self.err))
        if rc == RUNNER_SAMPLE_DEFERRED:
            self.deferred = True
            return DEFERRED
        return self._sampled(rc, tok)

    cdef int _scratch(self) noexcept:
        """Allocate ``cur`` (n_vocab candidates) on first use; -1 when out of memory."""
        if self.cur == NULL:
            self.cur = <llama_token_data *> malloc(self.model.n_vocab * sizeof(llama_token_data))
            if self.cur == NULL:
                return -1
        return 0

    cdef object _sampled(self, int rc, llama_token tok):
        if rc == RUNNER_SAMPLE_NO_TOKEN:
            raise NoTokenError("the grammar allows no token here (it cannot be satisfied)")
        if rc != RUNNER_SAMPLE_OK:
            raise SamplerError(f"sampling failed: {self._last_err()}")
        return tok

    def resolve(self):
        """Finish the pick that :meth:`sample` deferred: the grammar applied
        to every token of the kept row, the chain run again, the token
        accepted and returned (errors as :meth:`sample` raises them).  May
        run on any thread, the GIL released, while nothing but
        :meth:`close` touches this sampler."""
        self._check()
        if not self.deferred:
            raise ValueError("no deferred pick to resolve")
        cdef llama_token tok = -1
        cdef int rc
        self.busy = True
        try:
            with nogil:
                if self.fast != NULL:
                    rc = runner_fast_grammar_constrained(self.fast, self.grammar, self.kept,
                                                         self.model.n_vocab, self.cur, &tok, self.err,
                                                         sizeof(self.err))
                else:
                    rc = runner_sample_constrained(self.chain, self.grammar, self.kept, self.model.n_vocab,
                                                   self.cur, &tok, self.err, sizeof(self.err))
        finally:
            self.busy = False
            self.deferred = False
        if self.close_pending:
            self._free()
            raise ClosedError("sampler was closed while resolving")
        return self._sampled(rc, tok)

    cdef int _grammar_buffers(self) except -1:
        """The scratch rows a grammar's sampling needs, allocated once."""
        if self.cur == NULL:
            self.cur = <llama_token_data *> malloc(self.model.n_vocab * sizeof(llama_token_data))
        if self.kept == NULL:
            self.kept = <float *> malloc(self.model.n_vocab * sizeof(float))
        if self.cur == NULL or self.kept == NULL:
            raise MemoryError()
        return 0

    cdef object _grammar_outcome(self, int rc):
        """What sample() gives for a grammar's return code other than OK in
        a native run: DEFERRED (the pick awaits resolve()), or the error."""
        if rc == RUNNER_SAMPLE_DEFERRED:
            self.deferred = True
            return DEFERRED
        try:
            self._sampled(rc, -1)
        except LlamaError as exc:
            return exc
        return SamplerError("sampling failed: unexpected return code")

    @property
    def pending(self):
        """Whether a deferred pick awaits :meth:`resolve`."""
        return self.deferred

    def accept(self, llama_token token):
        """Feed a token into the chain's state without sampling (e.g. prompt
        tokens for repeat penalties).  The grammar never sees it."""
        self._check()
        self.model._check_token(token)
        if self.fast != NULL:
            runner_fast_accept(self.fast, token)
            return
        if runner_sampler_accept(self.chain, token, self.err, sizeof(self.err)) != 0:
            raise SamplerError(f"accepting token {token} failed: {self._last_err()}")

    def allows(self, llama_token token):
        """Whether the grammar allows ``token`` next (always True without one)."""
        self._check()
        self.model._check_token(token)
        if self.grammar == NULL:
            return True
        cdef int rc = runner_grammar_allows(self.grammar, token, self.err, sizeof(self.err))
        if rc < 0:
            raise SamplerError(f"grammar check failed: {self._last_err()}")
        return rc == 1

    def grammar_check_seconds(self, double limit=1e9):
        """How long one check of the whole vocabulary against the grammar
        takes in its present state (0.0 without a grammar).  That check runs
        on the engine's loop whenever the chain's pick breaks the grammar,
        and every stream waits for it.

        The vocabulary is checked in chunks of 4,096 tokens, and the time
        is returned as soon as it passes ``limit``, so a grammar far too slow
        costs about ``limit`` here, plus the chunk in progress.  (A sample of
        the vocabulary cannot stand for it: the cost is in the few tokens
        that go deep into the grammar, such as "aaaa" under many optional
        "a"s.)  The GIL is released while checking."""
        self._check()
        if self.grammar == NULL:
            return 0.0
        cdef int32_t n_vocab = self.model.n_vocab
        cdef int32_t first, n, rc = 0
        cdef llama_token_data * chunk = <llama_token_data *> malloc(4096 * sizeof(llama_token_data))
        if chunk == NULL:
            raise MemoryError()
        took = 0.0
        try:
            for first in range(0, n_vocab, 4096):
                n = min(4096, n_vocab - first)
                t0 = time.perf_counter()
                with nogil:
                    rc = runner_grammar_probe(self.grammar, first, 1, n, chunk, self.err, sizeof(self.err))
                took += time.perf_counter() - t0
                if rc != 0:
                    raise SamplerError(f"grammar check failed: {self._last_err()}")
                if took > limit:
                    break
        finally:
            free(chunk)
        return took

    def distribution(self, Context ctx not None, int32_t idx=-1, int32_t cap=RUNNER_FAST_MAX_TOP_K):
        """What the native chain would draw from for batch entry ``idx``:
        (token ids, probabilities) in descending order, after every stage.
        Nothing is drawn or accepted.  Only for a native sampler."""
        self._check()
        ctx._check()
        if self.fast == NULL or self.grammar != NULL:
            raise ValueError("only a native sampler without a grammar exposes its distribution")
        ctx._sync()
        cdef float * logits = llama_get_logits_ith(ctx.ptr, idx)
        if logits == NULL:
            raise IndexError(f"no logits for batch index {idx}")
        tokens = np.empty(max(cap, 1), dtype=np.int32)
        probs = np.empty(max(cap, 1), dtype=np.float32)
        cdef int32_t[::1] tv = tokens
        cdef float[::1] pv = probs
        cdef int32_t n
        with nogil:
            n = runner_fast_distribution(self.fast, logits, &tv[0], &pv[0], cap)
        return tokens[:n], probs[:n]

    def reset(self):
        """Forget the penalty window and the grammar's progress (a deferred
        pick too); refused while :meth:`resolve` runs."""
        self._check()
        if self.busy:
            raise ValueError("the sampler is resolving a deferred pick")
        self.deferred = False
        if self.fast != NULL:
            runner_fast_reset(self.fast)
        llama_sampler_reset(self.chain)
        if self.grammar != NULL:
            llama_sampler_reset(self.grammar)

    def __len__(self):
        """Stages in the chain (the grammar, kept apart, counts as one)."""
        self._check()
        return llama_sampler_chain_n(self.chain) + (1 if self.grammar != NULL else 0)


def sample_batch(Context ctx not None, list samplers not None, list rows not None, int n_threads=1,
                 bint defer=False):
    """Sample one token for each (sampler, batch row) pair: a list holding,
    per pair, the token or the exception that sampler raised.

    Native samplers (plain argmax or the one-pass chain) are all served in one
    call without the GIL, so a step pays one GIL release for its whole batch
    instead of one per sequence (each release lets another Python thread in),
    and their rows are spread over up to ``n_threads`` threads (each row is
    independent; ext/samplerows.cpp).  The others go through
    :meth:`Sampler.sample` one by one, with ``defer`` (a grammar's pick may
    come back as :data:`DEFERRED`).  A sampler listed twice is refused."""
    ctx._check()
    cdef Py_ssize_t n = len(samplers), i, m = 0
    if len(rows) != n:
        raise ValueError("samplers and rows differ in length")
    out = [None] * n
    if n == 0:
        return out
    if len({id(x) for x in samplers}) != n:  # one sampler's state on two threads would race
        raise ValueError("a sampler is listed twice")
    ctx._sync()
    cdef runner_fast_sampler ** fasts = <runner_fast_sampler **> malloc(n * sizeof(void *))
    cdef const float ** logits = <const float **> malloc(n * sizeof(void *))
    cdef int32_t * toks = <int32_t *> malloc(n * sizeof(int32_t))
    cdef Py_ssize_t * where = <Py_ssize_t *> malloc(n * sizeof(Py_ssize_t))
    cdef int32_t n_vocab = ctx.model.n_vocab
    cdef Sampler s
    cdef const float * row
    if fasts == NULL or logits == NULL or toks == NULL or where == NULL:
        free(fasts); free(logits); free(toks); free(where)
        raise MemoryError()
    try:
        for i in range(n):
            s = <Sampler?> samplers[i]
            if s.chain == NULL:
                out[i] = ClosedError("sampler is closed")
                continue
            if s.model is not ctx.model:
                out[i] = ValueError("sampler and context belong to different models")
                continue
            if s._graph():  # the graph drew its token; taken below, after the CPU rows
                continue
            if not s._native():
                try:
                    out[i] = s.sample(ctx, rows[i], defer)
                except Exception as exc:
                    out[i] = exc
                continue
            row = llama_get_logits_ith(ctx.ptr, <int32_t> rows[i])
            if row == NULL:
                out[i] = IndexError(f"no logits for batch index {rows[i]}")
                continue
            fasts[m] = s.fast  # NULL: plain argmax
            logits[m] = row
            where[m] = i
            m += 1
        with nogil:
            runner_sample_rows(fasts, logits, toks, <int32_t> m, n_vocab, runner_argmax_f32, n_threads)
        for i in range(m):
            out[where[i]] = toks[i] if toks[i] >= 0 else SamplerError("sampling failed: no logit is a number")
        for i in range(n):
            s = <Sampler> samplers[i]
            if out[i] is None and s._graph():
                try:
                    out[i] = s.sample(ctx, rows[i])
                except Exception as exc:
                    out[i] = exc
    finally:
        free(fasts); free(logits); free(toks); free(where)
    return out


cdef inline int32_t runner_sample_rows_one(runner_fast_sampler * fast, const float * row,
                                           int32_t n_vocab) noexcept nogil:
    """One row as runner_sample_rows samples it."""
    return runner_fast_sample(fast, row) if fast != NULL else _argmax(row, n_vocab)


cdef class StepInterrupt:
    """A flag that ends :func:`decode_steps` after the step in progress; set
    from any thread (the engine sets it whenever it is woken: a request
    arrived, was cancelled, hit a stop string ...), cleared by the loop."""
    cdef volatile int flag

    def set(self):
        self.flag = 1

    def clear(self):
        self.flag = 0

    def is_set(self):
        return self.flag != 0


# What decode_steps needs of a sampler with a grammar, for its nogil loop.
cdef struct _GrammarRow:
    runner_fast_sampler * fast
    llama_sampler * grammar
    llama_token_data * cur
    float * kept
    char * err

# decode_steps writes a grammar's return code rc (other than OK) in the
# token's place as _GRAMMAR_CODE + rc: below -1, which means "no number".
cdef enum:
    _GRAMMAR_CODE = -100


cdef inline int32_t _grammar_row(_GrammarRow * g, const float * row, int32_t n_vocab) noexcept nogil:
    """One row of a grammar's sampler in a native run: the token, or
    _GRAMMAR_CODE + the return code (a rejected pick is deferred)."""
    cdef llama_token tok = -1
    cdef int rc = runner_fast_grammar_sample(g.fast, g.grammar, row, n_vocab, g.cur, g.kept, 1, &tok,
                                             g.err, _ERR_LEN)
    return tok if rc == RUNNER_SAMPLE_OK else _GRAMMAR_CODE + rc


# What decode_steps needs of a sampler attached to the graph.
cdef struct _GraphRow:
    llama_sampler * chain
    llama_token_data * cur
    char * err


cdef inline int32_t _graph_row(_GraphRow * g, llama_context * ctx, int32_t idx,
                               int32_t n_vocab) noexcept nogil:
    """One row of a graph-attached sampler in a native run: the token, or
    _GRAMMAR_CODE + the return code."""
    cdef llama_token tok = -1
    cdef int rc = runner_graph_sample(g.chain, ctx, idx, g.cur, n_vocab, &tok, g.err, _ERR_LEN)
    return tok if rc == RUNNER_SAMPLE_OK else _GRAMMAR_CODE + rc


def decode_steps(Context ctx not None, Batch batch not None, list samplers not None,
                 list seq_ids not None, list positions not None, list tokens not None,
                 list budgets not None, list stop_on_eog not None, int max_steps,
                 StepInterrupt interrupt=None, int doorbell=-1, int n_threads=1):
    """Up to ``max_steps`` generation steps of the sequences ``seq_ids``
    without coming back to Python, the GIL released throughout.

    Each step decodes one token per sequence -- first ``tokens[i]`` at
    ``positions[i]``, then the token sampled for it at the next position --
    and samples every row with its sequence's native sampler (plain argmax
    or the one-pass chain, which records the token for its penalties), as
    :func:`sample_batch` would.  A sampler with a grammar draws natively
    too, and its grammar checks the pick (runner_fast_grammar_sample); a
    pick it rejects is deferred (:meth:`Sampler.resolve`), and
    :data:`DEFERRED` takes the token's place, or the exception the check
    raised.  The run stops after a step in which a token ends a sequence
    (an end-of-generation token where ``stop_on_eog[i]``, the
    ``budgets[i]``-th token of the run, -1 for a row with no number among
    its logits, a deferred pick or an error), before a step once
    ``interrupt`` is set, or at a decode that fails.  ``doorbell`` is written to before the first decode
    (see :meth:`Context.decode`).

    Returns ``(sampled, rc)``: ``sampled[i]`` lists the tokens sampled for
    sequence ``i``, all lists of one length (the steps completed, the first
    decode of a failed step excluded); ``rc`` is the failed decode's return
    code, or 0.  After a failed decode nothing of that step is in the KV
    memory (llama_decode's contract), so the caller may decode it again by
    the ordinary path to report the error."""
    ctx._check()
    cdef Py_ssize_t n = len(seq_ids), i
    if not (len(samplers) == len(positions) == len(tokens) == len(budgets) == len(stop_on_eog) == n):
        raise ValueError("decode_steps: the per-sequence lists differ in length")
    if n == 0 or n > batch.capacity:
        raise ValueError(f"decode_steps: {n} sequences for a batch of {batch.capacity}")
    if max_steps < 1:
        raise ValueError("decode_steps: max_steps must be at least 1")
    if not batch.allocated or batch.embd != 0:
        raise ValueError("decode_steps needs an open token batch")
    if _rpc_watch:
        raise ValueError("decode_steps does not run with RPC devices (each decode must be checked)")
    if len({id(x) for x in samplers}) != n:
        raise ValueError("a sampler is listed twice")
    cdef int32_t n_vocab = ctx.model.n_vocab
    cdef uint32_t n_seq = llama_n_seq_max(ctx.ptr)
    cdef Sampler s
    for i in range(n):
        s = <Sampler?> samplers[i]
        if s.chain == NULL:
            raise ClosedError("sampler is closed")
        if s.model is not ctx.model:
            raise ValueError("sampler and context belong to different models")
        if not (s._native_chain() or s._graph()):
            raise ValueError("decode_steps needs samplers the native chain serves (Sampler.native_chain) "
                             "or samplers attached to the context's graph")
        if s._graph() and s.graph_ctx is not ctx:
            raise ValueError("the sampler is attached to another context")
        if s._graph() and s._scratch() < 0:
            raise MemoryError()
        if s.deferred:
            raise ValueError("a sampler's last pick was deferred and is not resolved")
        if s.grammar != NULL:
            s._grammar_buffers()
        if not 0 <= <long> seq_ids[i] < n_seq:
            raise ValueError(f"sequence id {seq_ids[i]} outside 0..{n_seq - 1}")
        if not 0 <= <long> tokens[i] < n_vocab:
            raise ValueError(f"token {tokens[i]} outside the vocabulary")
        if <long> positions[i] < 0 or <long> budgets[i] < 1:
            raise ValueError("positions must be >= 0 and budgets >= 1")
    cdef runner_fast_sampler ** fasts = <runner_fast_sampler **> malloc(n * sizeof(void *))
    cdef const float ** rows = <const float **> malloc(n * sizeof(void *))
    cdef int32_t * cur = <int32_t *> malloc(n * sizeof(int32_t))
    cdef int32_t * toks = <int32_t *> malloc(n * sizeof(int32_t))
    cdef int32_t * pos = <int32_t *> malloc(n * sizeof(int32_t))
    cdef int32_t * sid = <int32_t *> malloc(n * sizeof(int32_t))
    cdef int64_t * left = <int64_t *> malloc(n * sizeof(int64_t))
    cdef uint8_t * eog = <uint8_t *> malloc(n * sizeof(uint8_t))
    cdef int32_t * out = <int32_t *> malloc(n * max_steps * sizeof(int32_t))
    # Rows whose sampler has a grammar: their index, and the rest's.
    cdef Py_ssize_t * gram = <Py_ssize_t *> malloc(n * sizeof(Py_ssize_t))
    cdef Py_ssize_t * plain = <Py_ssize_t *> malloc(n * sizeof(Py_ssize_t))
    cdef runner_fast_sampler ** pfasts = <runner_fast_sampler **> malloc(n * sizeof(void *))
    cdef const float ** prows = <const float **> malloc(n * sizeof(void *))
    cdef int32_t * ptoks = <int32_t *> malloc(n * sizeof(int32_t))
    cdef _GrammarRow * grows = <_GrammarRow *> malloc(n * sizeof(_GrammarRow))
    # Rows whose sampler is attached to the graph: their index and chain.
    cdef Py_ssize_t * graph = <Py_ssize_t *> malloc(n * sizeof(Py_ssize_t))
    cdef _GraphRow * hrows = <_GraphRow *> malloc(n * sizeof(_GraphRow))
    if (fasts == NULL or rows == NULL or cur == NULL or toks == NULL or pos == NULL or sid == NULL
            or left == NULL or eog == NULL or out == NULL or gram == NULL or plain == NULL
            or pfasts == NULL or prows == NULL or ptoks == NULL or grows == NULL or graph == NULL
            or hrows == NULL):
        free(fasts); free(rows); free(cur); free(toks); free(pos); free(sid); free(left); free(eog); free(out)
        free(gram); free(plain); free(pfasts); free(prows); free(ptoks); free(grows); free(graph); free(hrows)
        raise MemoryError()
    cdef Py_ssize_t n_gram = 0, n_plain = 0, n_graph = 0, j
    cdef int32_t rc = 0, steps = 0, step, m
    cdef bint ended
    cdef uint64_t one = 1
    cdef volatile int * flag = NULL
    if interrupt is not None:
        flag = &interrupt.flag
    cdef const llama_vocab * vocab = ctx.model.vocab
    cdef llama_batch * b = &batch.batch
    try:
        for i in range(n):
            s = <Sampler> samplers[i]
            fasts[i] = s.fast  # NULL: plain argmax
            if s._graph():
                graph[n_graph] = i
                hrows[n_graph].chain = s.chain
                hrows[n_graph].cur = s.cur
                hrows[n_graph].err = s.err
                n_graph += 1
            elif s.grammar != NULL:
                gram[n_gram] = i
                grows[n_gram].fast = s.fast
                grows[n_gram].grammar = s.grammar
                grows[n_gram].cur = s.cur
                grows[n_gram].kept = s.kept
                grows[n_gram].err = s.err
                n_gram += 1
            else:
                plain[n_plain] = i
                pfasts[n_plain] = s.fast
                n_plain += 1
            cur[i] = <int32_t> tokens[i]
            pos[i] = <int32_t> positions[i]
            sid[i] = <int32_t> seq_ids[i]
            left[i] = <int64_t> budgets[i]
            eog[i] = 1 if stop_on_eog[i] else 0
        ctx.abort_flag = 0
        with nogil:
            for step in range(max_steps):
                if step > 0 and flag != NULL and flag[0] != 0:
                    break
                b.n_tokens = <int32_t> n
                for i in range(n):
                    b.token[i] = cur[i]
                    b.pos[i] = pos[i]
                    b.n_seq_id[i] = 1
                    b.seq_id[i][0] = sid[i]
                    b.logits[i] = 1
                if step == 0 and doorbell >= 0:
                    write(doorbell, &one, 8)
                rc = llama_decode(ctx.ptr, b[0])
                if rc != 0:
                    break
                m = 0
                for j in range(n_plain):
                    i = plain[j]
                    rows[i] = llama_get_logits_ith(ctx.ptr, <int32_t> i)
                    if rows[i] == NULL:
                        m += 1
                for j in range(n_gram):
                    i = gram[j]
                    rows[i] = llama_get_logits_ith(ctx.ptr, <int32_t> i)
                    if rows[i] == NULL:
                        m += 1
                for j in range(n_graph):  # the graph's picks, on this thread (no row is read)
                    i = graph[j]
                    toks[i] = _graph_row(&hrows[j], ctx.ptr, <int32_t> i, n_vocab)
                if m == 0:
                    for j in range(n_plain):
                        prows[j] = rows[plain[j]]
                    if n_plain > 0:
                        runner_sample_rows(pfasts, prows, ptoks, <int32_t> n_plain, n_vocab,
                                           runner_argmax_f32, n_threads)
                    for j in range(n_plain):
                        toks[plain[j]] = ptoks[j]
                    for j in range(n_gram):  # a grammar's check on this thread, one row at a time
                        toks[gram[j]] = _grammar_row(&grows[j], rows[gram[j]], n_vocab)
                else:  # never seen: a row without logits ends its sequence as unsampleable
                    for j in range(n_plain):
                        i = plain[j]
                        toks[i] = -1 if rows[i] == NULL else runner_sample_rows_one(fasts[i], rows[i], n_vocab)
                    for j in range(n_gram):
                        i = gram[j]
                        toks[i] = -1 if rows[i] == NULL else _grammar_row(&grows[j], rows[i], n_vocab)
                ended = False
                for i in range(n):
                    out[step * n + i] = toks[i]
                    left[i] -= 1
                    if toks[i] < 0 or left[i] <= 0 or (eog[i] and llama_vocab_is_eog(vocab, toks[i])):
                        ended = True
                    cur[i] = toks[i]
                    pos[i] += 1
                steps = step + 1
                if ended:
                    break
        sampled = [[out[step * n + i] for step in range(steps)] for i in range(n)]
        for j in range(n_gram):  # a grammar's outcome other than a token: what sample() gives
            run = sampled[gram[j]]
            if steps > 0 and run[steps - 1] < -1:
                run[steps - 1] = (<Sampler> samplers[gram[j]])._grammar_outcome(run[steps - 1] - _GRAMMAR_CODE)
        for j in range(n_graph):  # a failed pick in the graph: the error sample() raises
            run = sampled[graph[j]]
            if steps > 0 and run[steps - 1] < -1:
                run[steps - 1] = SamplerError(
                    f"sampling in the graph failed: {(<Sampler> samplers[graph[j]])._last_err()}")
    finally:
        free(fasts); free(rows); free(cur); free(toks); free(pos); free(sid); free(left); free(eog); free(out)
        free(gram); free(plain); free(pfasts); free(prows); free(ptoks); free(grows); free(graph); free(hrows)
    return sampled, rc
