// See jsonschema.h.  Only the converter and the files it needs from
// vendor/llama.cpp/common are compiled (CMakeLists.txt, runner_jsonschema);
// common.cpp is not, so the three string helpers it would supply to the
// converter are defined here, with the meaning common.h gives them.
#include "jsonschema.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "common.h"
#include "json-schema-to-grammar.h"
#include "json.h"

std::string string_join(const std::vector<std::string> & values, const std::string & separator) {
    std::string out;
    for (size_t i = 0; i < values.size(); ++i) {
        if (i > 0) {
            out += separator;
        }
        out += values[i];
    }
    return out;
}

std::vector<std::string> string_split(const std::string & str, const std::string & delimiter) {
    // Every piece between delimiters, empty ones included; the whole string
    // when the delimiter does not occur (or is empty).
    std::vector<std::string> parts;
    if (delimiter.empty()) {
        parts.push_back(str);
        return parts;
    }
    size_t from = 0;
    for (size_t at = str.find(delimiter); at != std::string::npos; at = str.find(delimiter, from)) {
        parts.push_back(str.substr(from, at - from));
        from = at + delimiter.size();
    }
    parts.push_back(str.substr(from));
    return parts;
}

std::string string_repeat(const std::string & str, size_t n) {
    std::string out;
    out.reserve(str.size() * n);
    while (n-- > 0) {
        out += str;
    }
    return out;
}

extern "C" char * runner_json_schema_to_grammar(const char * schema, size_t len, char * err,
                                                size_t err_len) {
    try {
        common_json parsed = common_json::parse(std::string(schema, len));
        std::string grammar = json_schema_to_grammar(parsed, /* force_gbnf = */ true);
        char * out = static_cast<char *>(std::malloc(grammar.size() + 1));
        if (out == nullptr) {
            std::snprintf(err, err_len, "out of memory");
            return nullptr;
        }
        std::memcpy(out, grammar.c_str(), grammar.size() + 1);
        return out;
    } catch (const std::exception & e) {
        std::snprintf(err, err_len, "%s", e.what());
    } catch (...) {
        std::snprintf(err, err_len, "unknown C++ exception");
    }
    return nullptr;
}
