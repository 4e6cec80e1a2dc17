"""JSON Schema to GBNF, the grammar language of llama.cpp's grammar sampler.

:func:`json_schema_to_gbnf` turns a request's ``json_schema`` into a grammar
whose ``root`` rule accepts the JSON texts that the schema describes.  The
conversion is llama.cpp's own (``common/json-schema-to-grammar.cpp``, the one
llama-server applies to ``json_schema``), compiled into the extension: a
schema constrains the output here exactly as it does there.  What it covers:

* ``type`` (one or a list), ``enum``, ``const``, ``anyOf`` / ``oneOf`` (as
  alternatives), ``allOf`` (object schemas, merged), local ``$ref``
  (``#/$defs/X``, ``#/definitions/X``; recursive ones too);
* objects: ``properties`` (the required ones first, then the others, each
  group in declared order), ``required``, ``additionalProperties`` (false,
  true or a schema; absent: none beside ``properties``, any without them);
* arrays: ``items``, ``prefixItems`` (tuples), ``minItems``, ``maxItems``;
* strings: ``minLength``, ``maxLength``, ``pattern`` (a regular expression
  anchored with ``^...$``), ``format`` (``date``, ``time``, ``date-time``,
  ``uuid``);
* integers: ``minimum``, ``maximum``, ``exclusiveMinimum``,
  ``exclusiveMaximum``.

Other keywords are ignored.  A ``pattern`` the converter cannot express
(lookarounds, backreferences, one not anchored) is loosened to any string, as
in llama-server, with a warning on stderr; the output then need not match it.
A malformed schema (an unresolved ``$ref``, an unknown ``type``, an invalid
regular expression) raises ValueError with the converter's reason.

:data:`JSON_GBNF` is the grammar for Ollama's ``format: "json"`` (any JSON
object); :data:`JSON_VALUE_GBNF` accepts any JSON value.
"""

from __future__ import annotations

import json
from typing import Any

from runner import _llama
from runner.engine import limits

__all__ = ["JSON_GBNF", "JSON_VALUE_GBNF", "json_schema_to_gbnf"]


def json_schema_to_gbnf(schema: dict[str, Any] | bool) -> str:
    """Return a GBNF grammar (rules in name order, ``root`` among them)
    accepting instances of ``schema``.

    Raises ValueError for a schema that is not JSON, one llama.cpp's
    converter refuses, or one over :mod:`runner.engine.limits` (MAX_SCHEMA_BYTES,
    MAX_SCHEMA_ALTERNATIVES, MAX_SCHEMA_REFS, and MAX_GRAMMAR_BYTES for the
    grammar it makes).
    """
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"the schema is not JSON: {exc}") from None
    limits.utf8("the schema as compact JSON", text, limits.MAX_SCHEMA_BYTES, ValueError)
    _check_size(schema)
    try:
        grammar = _llama.json_schema_to_grammar(text)
    except _llama.GrammarError as exc:
        reason = str(exc).removeprefix("JSON schema conversion failed:").strip()
        raise ValueError("; ".join(line.strip() for line in reason.splitlines() if line.strip())) from None
    limits.utf8("the grammar made from it", grammar, limits.MAX_GRAMMAR_BYTES, ValueError)
    return grammar


def _check_size(schema: Any) -> None:
    """Bound the alternatives (``enum``, ``anyOf``, ``oneOf``) and the
    ``$ref``s of a schema, walked without recursion.  The converter follows
    a ``$ref`` by recursing into its target, so a long chain of them would
    run the thread out of stack."""
    refs = 0
    stack = [(schema, "#")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            for key in ("enum", "anyOf", "oneOf"):
                alts = node.get(key)
                if isinstance(alts, list) and len(alts) > limits.MAX_SCHEMA_ALTERNATIVES:
                    raise ValueError(f"{where}/{key}: {len(alts)} alternatives exceed the limit of "
                                     f"{limits.MAX_SCHEMA_ALTERNATIVES}")
            if "$ref" in node:
                refs += 1
                if refs > limits.MAX_SCHEMA_REFS:
                    raise ValueError(f"more than {limits.MAX_SCHEMA_REFS} $ref entries")
            stack.extend((v, f"{where}/{k}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{where}/{i}") for i, v in enumerate(node))


JSON_GBNF = json_schema_to_gbnf({"type": "object"})
"""Any JSON object: the grammar for Ollama's ``format: "json"``."""

JSON_VALUE_GBNF = json_schema_to_gbnf({})
"""Any JSON value."""
