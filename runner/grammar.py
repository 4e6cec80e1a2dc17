"""JSON Schema to GBNF, the grammar language of llama.cpp's grammar sampler.

:func:`json_schema_to_gbnf` turns the ``format`` of a request (a JSON Schema)
into a grammar whose ``root`` rule accepts the JSON texts that the schema
describes, in the forms listed below. :data:`JSON_GBNF` is the grammar for
Ollama's ``format: "json"`` (any JSON object); :data:`JSON_VALUE_GBNF`
accepts any JSON value.

Supported keywords:

* ``type``: ``object``, ``array``, ``string``, ``number``, ``integer``,
  ``boolean``, ``null``, or a list of them; without ``type`` the kind is
  inferred from ``properties`` / ``items``, else any value is accepted;
* objects: ``properties`` (emitted in declared order), ``required`` (those
  must appear; the others may be omitted), ``additionalProperties`` (absent or
  false: closed; with no ``properties``, true or a schema gives a map);
* arrays: ``items``, ``minItems``, ``maxItems``;
* strings: ``minLength``, ``maxLength``;
* ``enum``, ``const`` (the values in compact JSON form), ``anyOf`` and
  ``oneOf`` (both as alternatives: exclusivity is not enforced), ``allOf``
  with a single subschema, ``$ref`` to any local JSON pointer (``#/$defs/X``,
  ``#/definitions/X``, ``#``), recursive ones included.

Precedence when several apply: ``$ref``, ``const``, ``enum``,
``anyOf``/``oneOf``, ``allOf``, then ``type``; the others are ignored.
Keywords that cannot be expressed (``pattern``, ``patternProperties``,
``not``, ``if``, ``prefixItems``...) raise ValueError; value bounds that are
not enforced (``format``, ``minimum``, ``maximum``, ``multipleOf``,
``uniqueItems``, ``minProperties``...) are ignored.

Output shape: no whitespace before the value or after it; between tokens a
bounded ``ws`` (nothing, one space, or one newline and up to 20 spaces or
tabs) so a model cannot loop on whitespace. Numbers are bounded the same
way: at most 16 integer digits, 20 fraction digits (enough for any shortest
float repr) and a 1 to 3 digit exponent. Strings never contain a raw
control character or DEL (U+007F, which JSON would allow unescaped); the
usual escapes, ``\\uXXXX`` included, are accepted.
"""

from __future__ import annotations

import json
import re
from typing import Any

from runner import limits

__all__ = ["JSON_GBNF", "JSON_VALUE_GBNF", "json_schema_to_gbnf"]

# Primitive rules: name -> (body, rules the body refers to). Emitted after the
# schema's own rules, only when reachable, in this order.
_PRIMITIVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "value": ("object | array | string | number | boolean | null",
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" ws ( member ( "," ws member )* )? "}"', ("ws", "member")),
    "member": ('string ws ":" ws value ws', ("string", "ws", "value")),
    "array": ('"[" ws ( value ws ( "," ws value ws )* )? "]"', ("ws", "value")),
    "string": ('"\\"" char* "\\""', ("char",)),
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" ( ["\\\\/bfnrt] | "u" [0-9a-fA-F]{4} )', ()),
    "number": ('integer ( "." [0-9]{1,20} )? ( [eE] [-+]? [0-9]{1,3} )?', ("integer",)),
    "integer": ('"-"? ( "0" | [1-9] [0-9]{0,15} )', ()),
    "boolean": ('"true" | "false"', ()),
    "null": ('"null"', ()),
    "ws": ('| " " | "\\n" [ \\t]{0,20}', ()),
}

_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

_UNSUPPORTED = ("pattern", "patternProperties", "not", "if", "then", "else", "prefixItems",
                "contains", "dependentSchemas", "dependentRequired", "unevaluatedProperties",
                "unevaluatedItems", "propertyNames", "$dynamicRef", "$recursiveRef")

_NAME = re.compile(r"[A-Za-z0-9-]+")
_ALIASES = re.compile(r"[A-Za-z0-9-]+( \| [A-Za-z0-9-]+)*")


def json_schema_to_gbnf(schema: dict[str, Any] | bool) -> str:
    """Return a GBNF grammar (``root`` rule first) accepting instances of ``schema``.

    Raises ValueError naming the offending location for a malformed or
    unsupported schema, or one over :mod:`runner.limits` (MAX_SCHEMA_BYTES,
    MAX_SCHEMA_ALTERNATIVES, and MAX_GRAMMAR_BYTES for the grammar it makes).
    """
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the schema is not JSON: {exc}") from None
    limits.utf8("the schema as compact JSON", text, limits.MAX_SCHEMA_BYTES, ValueError)
    grammar = _Builder(schema).build()
    limits.utf8("the grammar made from it", grammar, limits.MAX_GRAMMAR_BYTES, ValueError)
    return grammar


def _literal(text: str) -> str:
    """A GBNF string literal matching exactly ``text``."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _json_literal(value: Any, where: str) -> str:
    """A GBNF literal for the compact JSON text of ``value``."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {value!r} is not a JSON value") from exc
    return _literal(text)


def _repeat(lo: int, hi: int | None) -> str:
    """GBNF repetition suffix for ``lo`` to ``hi`` (None: unbounded) occurrences."""
    if hi is None:
        return {0: "*", 1: "+"}.get(lo, f"{{{lo},}}")
    if lo == hi:
        return f"{{{lo}}}"
    if (lo, hi) == (0, 1):
        return "?"
    return f"{{{lo},{hi}}}"


def _sub(hint: str, part: str) -> str:
    """Name hint for a part of the schema named ``hint``."""
    return f"{hint}-{part}" if hint else part


def _json_type(value: Any) -> str:
    """The JSON Schema type names ``value`` belongs to, most specific first."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _Builder:
    """One conversion: walks the schema once, collecting named rules.

    Rule bodies are complete GBNF expressions; anything used inside another
    rule is first given a name, so bodies never need extra parentheses.
    """

    def __init__(self, schema: Any) -> None:
        self.root = schema  # the whole schema, for resolving $ref
        self.rules: dict[str, str | None] = {}  # name -> body; None while a $ref is being built
        self.by_body: dict[str, str] = {}  # body -> name, to share identical rules
        self.refs: dict[str, str] = {}  # $ref string -> rule name
        self.prims: set[str] = set()  # primitive rules referred to

    def build(self) -> str:
        root = self._expr(self.root, "", "#")
        for name in list(self.prims):
            self._need(name)
        self._check_left_recursion(root)
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items()]
        lines += [f"{name} ::= {_PRIMITIVES[name][0]}" for name in _PRIMITIVES if name in self.prims]
        return "\n".join(lines) + "\n"

    # -- naming ----------------------------------------------------------

    def _need(self, name: str) -> str:
        """Refer to a primitive rule (and, transitively, its dependencies)."""
        if name not in self.prims:
            self.prims.add(name)
            for dep in _PRIMITIVES[name][1]:
                self._need(dep)
        return name

    def _fresh(self, hint: str) -> str:
        base = "-".join(_NAME.findall(hint)) or "rule"
        name, n = base, 1
        while name in self.rules or name in _PRIMITIVES or name == "root":
            n += 1
            name = f"{base}-{n}"
        return name

    def _define(self, hint: str, body: str) -> str:
        """Name ``body``: an existing rule with the same body, or a new one."""
        if _NAME.fullmatch(body):
            return body
        name = self.by_body.get(body)
        if name is None:
            name = self._fresh(hint)
            self.rules[name] = body
            self.by_body[body] = name
        return name

    def _rule(self, schema: Any, hint: str, where: str) -> str:
        """A rule name accepting ``schema``'s instances."""
        return self._define(hint, self._expr(schema, hint, where))

    # -- schemas ---------------------------------------------------------

    def _expr(self, schema: Any, hint: str, where: str) -> str:
        """A GBNF expression (a whole rule body) accepting ``schema``'s instances."""
        if schema is True:
            return self._need("value")
        if schema is False:
            raise ValueError(f"{where}: schema false accepts nothing")
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: a schema must be an object or a boolean, "
                             f"got {type(schema).__name__}")
        for key in _UNSUPPORTED:
            if key in schema:
                raise ValueError(f"{where}: keyword {key!r} is not supported")
        if "$ref" in schema:
            return self._ref(schema["$ref"], where)
        types = self._types(schema, where)
        if "const" in schema:
            self._check_values([schema["const"]], types, f"{where}/const")
            return _json_literal(schema["const"], f"{where}/const")
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}/enum: must be a non-empty array")
            self._check_alternatives(len(values), f"{where}/enum")
            self._check_values(values, types, f"{where}/enum")
            alts = dict.fromkeys(_json_literal(v, f"{where}/enum") for v in values)
            return " | ".join(alts)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                subs = schema[key]
                if not isinstance(subs, list) or not subs:
                    raise ValueError(f"{where}/{key}: must be a non-empty array")
                self._check_alternatives(len(subs), f"{where}/{key}")
                alts = dict.fromkeys(self._rule(s, _sub(hint, str(i) if hint else f"alt-{i}"),
                                                f"{where}/{key}/{i}")
                                     for i, s in enumerate(subs))
                return " | ".join(alts)
        if "allOf" in schema:
            subs = schema["allOf"]
            if not isinstance(subs, list) or len(subs) != 1:
                raise ValueError(f"{where}/allOf: only a single subschema is supported")
            return self._expr(subs[0], hint, f"{where}/allOf/0")
        if types is None:
            if "properties" in schema or "additionalProperties" in schema:
                types = ["object"]
            elif "items" in schema:
                types = ["array"]
            else:
                return self._need("value")
        if len(types) == 1:
            return self._typed(types[0], schema, hint, where)
        alts = dict.fromkeys(self._define(_sub(hint, t), self._typed(t, schema, _sub(hint, t), where))
                             for t in types)
        return " | ".join(alts)

    def _types(self, schema: dict, where: str) -> list[str] | None:
        """The ``type`` keyword as a list of known type names (None if absent)."""
        if "type" not in schema:
            return None
        raw = schema["type"]
        types = raw if isinstance(raw, list) else [raw]
        if not types:
            raise ValueError(f"{where}/type: must not be empty")
        for t in types:
            if t not in _TYPES:
                raise ValueError(f"{where}/type: unknown type {t!r}; expected one of {', '.join(_TYPES)}")
        return list(dict.fromkeys(types))

    @staticmethod
    def _check_alternatives(n: int, where: str) -> None:
        if n > limits.MAX_SCHEMA_ALTERNATIVES:
            raise ValueError(f"{where}: {n} alternatives exceed the limit of "
                             f"{limits.MAX_SCHEMA_ALTERNATIVES}")

    def _check_values(self, values: list, types: list[str] | None, where: str) -> None:
        if types is None:
            return
        for v in values:
            t = _json_type(v)
            if t not in types and not (t == "integer" and "number" in types):
                raise ValueError(f"{where}: {v!r} does not match type {'/'.join(types)}")

    def _typed(self, t: str, schema: dict, hint: str, where: str) -> str:
        if t == "object":
            return self._object(schema, hint, where)
        if t == "array":
            return self._array(schema, hint, where)
        if t == "string":
            return self._string(schema, where)
        return self._need(t)

    def _ref(self, ref: Any, where: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"{where}/$ref: only local references ('#/...') are supported, got {ref!r}")
        name = self.refs.get(ref)
        if name is not None:
            return name
        target: Any = self.root
        if ref != "#":
            if not ref.startswith("#/"):
                raise ValueError(f"{where}/$ref: {ref!r} is not a JSON pointer")
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    raise ValueError(f"{where}/$ref: {ref!r} does not resolve")
        name = self._fresh(ref.rsplit("/", 1)[-1] if ref != "#" else "root-ref")
        self.refs[ref] = name
        self.rules[name] = None  # reserved: the body may refer back to it
        body = self._expr(target, name, ref)
        self.rules[name] = body
        self.by_body.setdefault(body, name)
        return name

    def _object(self, schema: dict, hint: str, where: str) -> str:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise ValueError(f"{where}/properties: must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"{where}/required: must be an array of strings")
        for r in required:
            if r not in props:
                raise ValueError(f"{where}/required: {r!r} is not in properties")
        extra = schema.get("additionalProperties")
        self._need("ws")
        if not props:
            if extra is False:
                return '"{" ws "}"'
            if extra is None or extra is True:
                return self._need("object")
            value = self._rule(extra, _sub(hint, "value"), f"{where}/additionalProperties")
            member = self._define(_sub(hint, "kv"), f'{self._need("string")} ws ":" ws {value} ws')
            return f'"{{" ws ( {member} ( "," ws {member} )* )? "}}"'
        if extra not in (None, False):
            raise ValueError(f"{where}/additionalProperties: only false is supported "
                             "alongside properties")
        members = []
        for key, sub in props.items():
            sub_hint = _sub(hint, key)
            value = self._rule(sub, sub_hint, f"{where}/properties/{key}")
            members.append(self._define(f"{sub_hint}-kv",
                                        f'{_json_literal(key, where)} ws ":" ws {value} ws'))
        flags = [key in required for key in props]
        if any(flags):
            first = flags.index(True)
            parts = [f'( {m} "," ws )?' for m in members[:first]]
            parts.append(members[first])
            for m, req in zip(members[first + 1:], flags[first + 1:]):
                parts.append(f'"," ws {m}' if req else f'( "," ws {m} )?')
            return f'"{{" ws {" ".join(parts)} "}}"'
        # All optional: choose the first present member, then any of those after it.
        # after[i] accepts what may follow member i: each later member, or not.
        keys = list(props)
        after = [""] * len(members)
        for i in range(len(members) - 2, -1, -1):
            body = f'( "," ws {members[i + 1]} )? {after[i + 1]}'.rstrip()
            after[i] = self._define(_sub(hint, f"after-{keys[i]}"), body)
        alts = [f"{m} {a}".rstrip() for m, a in zip(members, after)]
        return f'"{{" ws ( {" | ".join(alts)} )? "}}"'

    def _array(self, schema: dict, hint: str, where: str) -> str:
        items = schema.get("items", True)
        if isinstance(items, list):
            raise ValueError(f"{where}/items: tuple form (an array of schemas) is not supported")
        lo = self._count(schema, "minItems", where) or 0
        hi = self._count(schema, "maxItems", where)
        if hi is not None and hi < lo:
            raise ValueError(f"{where}: maxItems {hi} is less than minItems {lo}")
        self._need("ws")
        if hi == 0:
            return '"[" ws "]"'
        item = self._rule(items, _sub(hint, "item"), f"{where}/items")
        rest = _repeat(max(lo - 1, 0), None if hi is None else hi - 1)
        more = "" if rest == "{0}" else f' ( "," ws {item} ws ){rest}'
        if lo == 0:
            return f'"[" ws ( {item} ws{more} )? "]"'
        return f'"[" ws {item} ws{more} "]"'

    def _string(self, schema: dict, where: str) -> str:
        lo = self._count(schema, "minLength", where) or 0
        hi = self._count(schema, "maxLength", where)
        if hi is not None and hi < lo:
            raise ValueError(f"{where}: maxLength {hi} is less than minLength {lo}")
        if lo == 0 and hi is None:
            return self._need("string")
        if hi == 0:
            return '"\\"" "\\""'
        self._need("char")
        return f'"\\"" char{_repeat(lo, hi)} "\\""'

    @staticmethod
    def _count(schema: dict, key: str, where: str) -> int | None:
        value = schema.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}/{key}: must be a non-negative integer, got {value!r}")
        return value

    # -- checks ----------------------------------------------------------

    def _check_left_recursion(self, root: str) -> None:
        """Reject rules that reach themselves without consuming input ($ref/anyOf cycles).

        Only alias and alternative-of-names bodies start with a rule name, so
        those are the only edges that can close such a loop.
        """
        bodies = dict(self.rules, root=root)
        edges = {name: body.split(" | ") for name, body in bodies.items()
                 if body is not None and _ALIASES.fullmatch(body)}
        done: set[str] = set()

        def visit(name: str, path: list[str]) -> None:
            if name in path:
                cycle = " -> ".join(path[path.index(name):] + [name])
                raise ValueError(f"schema refers to itself without consuming input: {cycle}")
            if name in done:
                return
            for nxt in edges.get(name, ()):
                visit(nxt, path + [name])
            done.add(name)

        for name in edges:
            visit(name, [])


JSON_GBNF = json_schema_to_gbnf({"type": "object"})
"""Any JSON object: the grammar for Ollama's ``format: "json"``."""

JSON_VALUE_GBNF = json_schema_to_gbnf({})
"""Any JSON value."""
