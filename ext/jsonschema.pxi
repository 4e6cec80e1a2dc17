# json_schema_to_grammar: llama.cpp's converter (ext/jsonschema.h).


def json_schema_to_grammar(schema not None):
    """The GBNF grammar that llama.cpp's converter (the one llama-server uses
    for ``json_schema``) makes for a JSON schema given as JSON text (str or
    UTF-8 bytes).  Raises :class:`GrammarError` with the converter's reason
    for invalid JSON or a schema it cannot convert.  Releases the GIL.

    A ``pattern`` the converter cannot express (lookarounds, backreferences)
    is loosened to any string, as in llama-server, with a warning on stderr."""
    cdef bytes data = schema.encode("utf-8") if isinstance(schema, str) else bytes(schema)
    cdef const char * src = data
    cdef size_t n = len(data)
    cdef char err[2048]
    cdef char * out
    err[0] = 0
    with nogil:
        out = runner_json_schema_to_grammar(src, n, err, sizeof(err))
    if out == NULL:
        raise GrammarError(err.decode("utf-8", "replace").strip() or "the conversion failed")
    try:
        return out.decode("utf-8", "replace")
    finally:
        free(out)
