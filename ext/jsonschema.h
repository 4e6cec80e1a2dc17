/* llama.cpp's JSON-schema-to-GBNF converter (vendor common/json-schema-to-grammar.cpp,
 * the one llama-server uses for `json_schema`) behind a C entry point that
 * keeps its exceptions inside the request.  Implemented in jsonschema.cpp;
 * declared to Cython in c_guard.pxd. */
#ifndef RUNNER_JSONSCHEMA_H
#define RUNNER_JSONSCHEMA_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The GBNF grammar for the JSON schema in `schema` (`len` bytes of JSON
 * text): a malloc'd NUL-terminated string the caller frees, or NULL with
 * err set (invalid JSON, an unsupported or malformed schema, no memory). */
char * runner_json_schema_to_grammar(const char * schema, size_t len, char * err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif
