"""JSON Schema -> GBNF through llama.cpp's converter (runner/engine/grammar.py over
the binding): what each grammar accepts, and the errors it gives.

Acceptance is checked with a small GBNF parser and matcher defined below (test
code only): it reads the grammar text back, so these tests also show that the
output parses and that every rule it mentions is defined.  The tables are the
cases our own converter was held to before the binding replaced it, plus the
keywords only llama.cpp's converter handles (pattern, integer bounds,
formats, prefixItems, additionalProperties beside properties, allOf); where
the two differ, the table follows llama.cpp (required properties come
first; trailing whitespace after a value; two newlines at most).
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.engine.grammar import JSON_GBNF, JSON_VALUE_GBNF, json_schema_to_gbnf

# -- a small GBNF reader and matcher ---------------------------------------------
#
# Nodes: ("lit", text) ("cls", negated, [(lo, hi)]) ("any",) ("ref", name)
#        ("seq", [nodes]) ("alt", [nodes]) ("rep", node, lo, hi|None)

_TOKEN = re.compile(r"""
    (?P<skip>\s+|\#[^\n]*)
  | (?P<define>::=)
  | (?P<name>[A-Za-z0-9-]+)
  | (?P<lit>"(?:\\.|[^"\\])*")
  | (?P<cls>\[(?:\\.|[^\]\\])*\])
  | (?P<rep>\{\d+(?:,\d*)?\})
  | (?P<op>[()|*+?.])
""", re.VERBOSE)

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-",
            "^": "^", "/": "/"}


def _unescape(body: str) -> list[str]:
    """Characters of a literal or class body; escapes decoded (kept as 1-char strings)."""
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        kind = body[i + 1]
        width = {"x": 2, "u": 4, "U": 8}.get(kind)
        if width:
            out.append(chr(int(body[i + 2:i + 2 + width], 16)))
            i += 2 + width
        else:
            out.append(_ESCAPES[kind])
            i += 2
    return out


def _char_class(text: str) -> tuple:
    body = text[1:-1]
    negated = body.startswith("^")
    if negated:
        body = body[1:]
    chars = _unescape(body)  # a "-" that was escaped is indistinguishable here; fine for tests
    ranges, i = [], 0
    while i < len(chars):
        if i + 2 < len(chars) and chars[i + 1] == "-":
            ranges.append((chars[i], chars[i + 2]))
            i += 3
        else:
            ranges.append((chars[i], chars[i]))
            i += 1
    return ("cls", negated, ranges)


def parse_gbnf(text: str) -> dict[str, tuple]:
    """Rule name -> node. Raises AssertionError on anything malformed."""
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f"cannot tokenize grammar at {text[pos:pos + 30]!r}"
        pos = m.end()
        if m.lastgroup != "skip":
            tokens.append((m.lastgroup, m.group()))
    tokens.append(("eof", ""))
    i = 0

    def at_rule_start(j: int) -> bool:
        return tokens[j][0] == "name" and tokens[j + 1][0] == "define"

    def alternatives() -> tuple:
        nonlocal i
        alts = [sequence()]
        while tokens[i] == ("op", "|"):
            i += 1
            alts.append(sequence())
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def sequence() -> tuple:
        nonlocal i
        items = []
        while tokens[i][0] != "eof" and tokens[i] not in (("op", "|"), ("op", ")")) \
                and not at_rule_start(i):
            kind, value = tokens[i]
            i += 1
            if kind == "name":
                node = ("ref", value)
            elif kind == "lit":
                node = ("lit", "".join(_unescape(value[1:-1])))
            elif kind == "cls":
                node = _char_class(value)
            elif value == ".":
                node = ("any",)
            elif value == "(":
                node = alternatives()
                assert tokens[i] == ("op", ")"), f"unclosed group before {tokens[i]}"
                i += 1
            else:
                raise AssertionError(f"unexpected {value!r}")
            while tokens[i][0] == "rep" or tokens[i] in (("op", "*"), ("op", "+"), ("op", "?")):
                kind, value = tokens[i]
                i += 1
                if kind == "rep":
                    lo, _, hi = value[1:-1].partition(",")
                    bounds = (int(lo), int(lo) if "," not in value else (int(hi) if hi else None))
                else:
                    bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[value]
                node = ("rep", node, *bounds)
            items.append(node)
        return items[0] if len(items) == 1 else ("seq", items)

    rules: dict[str, tuple] = {}
    while tokens[i][0] != "eof":
        assert at_rule_start(i), f"expected a rule definition at {tokens[i]}"
        name = tokens[i][1]
        assert name not in rules, f"rule {name} defined twice"
        i += 2
        rules[name] = alternatives()
        assert tokens[i] != ("op", ")"), "unbalanced ')'"
    return rules


def references(node: tuple) -> set[str]:
    kind = node[0]
    if kind == "ref":
        return {node[1]}
    if kind in ("seq", "alt"):
        return set().union(*(references(n) for n in node[1]))
    if kind == "rep":
        return references(node[1])
    return set()


class Matcher:
    """Set-of-positions matcher: which end offsets can each node reach from a start offset."""

    def __init__(self, rules: dict[str, tuple]) -> None:
        self.rules = rules

    def fullmatch(self, text: str, root: str = "root") -> bool:
        self.text, self.memo, self.active = text, {}, set()
        return len(text) in self.ends(("ref", root), 0)

    def ends(self, node: tuple, pos: int) -> frozenset[int]:
        kind, text = node[0], self.text
        if kind == "lit":
            return frozenset([pos + len(node[1])]) if text.startswith(node[1], pos) else frozenset()
        if kind in ("cls", "any"):
            if pos >= len(text):
                return frozenset()
            if kind == "any":
                return frozenset([pos + 1])
            inside = any(lo <= text[pos] <= hi for lo, hi in node[2])
            return frozenset([pos + 1]) if inside != node[1] else frozenset()
        if kind == "ref":
            key = (node[1], pos)
            if key not in self.memo:
                if key in self.active:  # left recursion: our converter must never produce it
                    raise AssertionError(f"left recursion through {node[1]}")
                self.active.add(key)
                self.memo[key] = self.ends(self.rules[node[1]], pos)
                self.active.discard(key)
            return self.memo[key]
        if kind == "alt":
            return frozenset().union(*(self.ends(n, pos) for n in node[1]))
        if kind == "seq":
            current = frozenset([pos])
            for item in node[1]:
                current = frozenset().union(*(self.ends(item, p) for p in current))
                if not current:
                    break
            return current
        _, item, lo, hi = node
        current = frozenset([pos])
        for _ in range(lo):
            current = frozenset().union(*(self.ends(item, p) for p in current))
        result, frontier, count = set(current), current, lo
        while frontier and (hi is None or count < hi):
            frontier = frozenset().union(*(self.ends(item, p) for p in frontier)) - result
            result |= frontier
            count += 1
        return frozenset(result)


def compile_grammar(grammar: str) -> Matcher:
    """Parse, check the rule graph, and return a matcher for the grammar."""
    rules = parse_gbnf(grammar)
    assert "root" in rules, "no root rule"
    for name, node in rules.items():
        missing = references(node) - rules.keys()
        assert not missing, f"rule {name} refers to undefined {sorted(missing)}"
    return Matcher(rules)


def accepts(schema_or_grammar, text: str) -> bool:
    grammar = schema_or_grammar if isinstance(schema_or_grammar, str) \
        else json_schema_to_gbnf(schema_or_grammar)
    return compile_grammar(grammar).fullmatch(text)


def test_matcher_self_check():
    m = compile_grammar('root ::= "a" b{2,3} ( "c" | [x-z] )?\nb ::= [^q]\n')
    assert m.fullmatch("abbc") and m.fullmatch("abbb") and m.fullmatch("abbbz")
    assert not m.fullmatch("ab") and not m.fullmatch("abq") and not m.fullmatch("abbbbc")


# -- grammar text ------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name"],
}


def test_grammar_comes_from_llama_cpp_converter(llama):
    # The same text the binding's converter gives (no other conversion on the way),
    # and the rule names llama.cpp's converter uses.
    import json as _json

    text = json_schema_to_gbnf(PERSON)
    assert text == llama.json_schema_to_grammar(_json.dumps(PERSON))
    rules = dict(line.split(" ::= ", 1) for line in text.splitlines())
    assert rules["root"].startswith('"{" space name-kv')
    assert rules["space"] == '| " " | "\\n"{1,2} [ \\t]{0,20}'


def test_binding_reports_the_converter_reason(llama):
    with pytest.raises(llama.GrammarError, match="cannot resolve"):
        llama.json_schema_to_grammar('{"$ref": "#/$defs/X"}')
    with pytest.raises(llama.GrammarError):
        llama.json_schema_to_grammar('{"type": ')  # not JSON
    with pytest.raises(llama.GrammarError, match="unbalanced"):
        llama.json_schema_to_grammar('{"type": "string", "pattern": "^(a$"}')


def test_json_grammars():
    for grammar in (JSON_GBNF, JSON_VALUE_GBNF):
        compile_grammar(grammar)


# -- acceptance tables ---------------------------------------------------------------

CASES = [
    ("person", PERSON,
     ['{"name":"Al"}', '{"name": "Al", "age": 3}', '{\n  "name": "Al",\n  "tags": ["a", "b"]\n}',
      '{"name":"x","age":-5,"tags":[]}', '{ "name" : "A\\"l\\u00e9" }'],
     ['{}', '{"age":3}', '{"age":3,"name":"Al"}', '{"name":"Al","tags":["a","b","c","d"]}',
      '{"name":"Al",}', '{"name": 1}', ' {"name":"Al"}', '{"name":"Al",  "age":1}']),
    ("all optional", {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"},
                                                       "c": {"type": "boolean"}}},
     ['{}', '{ }', '{"a":"x"}', '{"b":1}', '{"c":true}', '{"a":"x","c":true}', '{"b":1,"c":false}',
      '{"a":"x","b":2,"c":true}'],
     ['{"c":true,"a":"x"}', '{,}', '{"a":"x",}', '{"a":"x","a":"y"}', '{"d":1}']),
    ("optional around required", {"type": "object", "required": ["b"],
                                  "properties": {"a": {"type": "string"}, "b": {"type": "integer"},
                                                 "c": {"type": "boolean"}}},
     ['{"b":1}', '{"b":1,"a":"x"}', '{"b":1,"c":true}', '{"b":1,"a":"x","c":true}'],
     ['{}', '{"a":"x"}', '{"a":"x","c":true}', '{"a":"x","b":1}', '{"b":1,"c":true,"a":"x"}']),
    ("integers 2..3", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
     ['[1,2]', '[1, 2, 3]', '[\n  1,\n  2\n]'], ['[]', '[1]', '[1,2,3,4]', '[1.5,2]', '[1,2,]']),
    ("at least one", {"type": "array", "minItems": 1}, ['[1]', '[1,"a",null,[],{}]'], ['[]']),
    ("exactly one", {"type": "array", "items": {"type": "null"}, "minItems": 1, "maxItems": 1},
     ['[null]'], ['[]', '[null,null]']),
    ("empty array only", {"type": "array", "maxItems": 0}, ['[]', '[ ]'], ['[1]']),
    ("string 2..3", {"type": "string", "minLength": 2, "maxLength": 3},
     ['"ab"', '"abc"', '"\\n1"', '"é你"'], ['"a"', '"abcd"', '"a\nb"']),
    ("empty string only", {"type": "string", "maxLength": 0}, ['""'], ['"a"']),
    ("enum", {"enum": ["red", "green", 1, None]}, ['"red"', '"green"', '1', 'null'],
     ['"blue"', '"Red"', 'red', '2']),
    ("typed enum", {"type": "string", "enum": ["a b", "c"]}, ['"a b"', '"c"'], ['"a"']),
    ("const object", {"const": {"a": [1, 2]}}, ['{"a":[1,2]}'], ['{"a": [1,2]}', '{"a":[1]}']),
    ("number", {"type": "number"},
     ['0', '-1', '3.14', '1e10', '-2.5E-3', '12345678901234.5'],
     ['01', '+1', '1.', '.5', 'NaN', '1e', '"1"', '12345678901234567']),
    ("integer", {"type": "integer"}, ['0', '-7', '123'], ['1.0', '1e3', '-', '00']),
    ("boolean", {"type": "boolean"}, ['true', 'false'], ['True', '1']),
    ("null", {"type": "null"}, ['null'], ['None', '']),
    ("nullable string", {"type": ["string", "null"]}, ['"x"', 'null'], ['1']),
    ("anyOf", {"anyOf": [{"type": "string"}, {"type": "integer"}]}, ['"x"', '3'], ['true', '3.5']),
    ("oneOf objects", {"oneOf": [{"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
                                 {"type": "object", "properties": {"y": {"type": "string"}}, "required": ["y"]}]},
     ['{"x":1}', '{"y":"a"}'], ['{"x":"a"}', '{}']),
    ("allOf of objects", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                                    {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     ['{"a":1,"b":"x"}'], ['{"a":1}', '{"b":"x"}', '{"b":"x","a":1}']),
    ("recursive ref", {"$defs": {"Node": {"type": "object", "required": ["v", "kids"],
                                          "properties": {"v": {"type": "integer"},
                                                         "kids": {"type": "array",
                                                                  "items": {"$ref": "#/$defs/Node"}}}}},
                       "anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]},
     ['null', '{"v":1,"kids":[]}', '{"v":1,"kids":[{"v":2,"kids":[{"v":3,"kids":[]}]},{"v":4,"kids":[]}]}'],
     ['{"v":1}', '{"v":1,"kids":[{"v":2}]}']),
    ("definitions ref", {"definitions": {"Id": {"type": "integer"}}, "type": "object",
                         "properties": {"id": {"$ref": "#/definitions/Id"}}, "required": ["id"]},
     ['{"id":5}'], ['{"id":"5"}']),
    ("map", {"type": "object", "additionalProperties": {"type": "integer"}},
     ['{}', '{"x":1,"y":2}'], ['{"x":"a"}', '{"x":1,}']),
    ("closed empty object", {"type": "object", "additionalProperties": False}, ['{}', '{ }'], ['{"a":1}']),
    ("nested object", {"type": "object", "required": ["p"],
                       "properties": {"p": {"type": "object", "required": ["q"],
                                            "properties": {"q": {"type": "array", "items": {"type": "number"}}}}}},
     ['{"p":{"q":[1,2.5]}}', '{\n  "p": {\n    "q": [\n      1\n    ]\n  }\n}'], ['{"p":{}}', '{"p":{"q":["a"]}}']),
    ("non-ASCII key", {"type": "object", "properties": {"名前": {"type": "string"}}, "required": ["名前"]},
     ['{"名前":"太郎"}'], ['{"name":"太郎"}']),
    ("key needing escapes", {"type": "object", "properties": {'a"b\\c\n': {"type": "null"}},
                             "required": ['a"b\\c\n']},
     ['{"a\\"b\\\\c\\n":null}'], ['{"a\\"b\\\\c":null}']),
    ("any value", {}, ['1', '"s"', '[1,{"a":[null,true]}]', '{"k":{"k":{}}}'], ['', '{', "'s'", '[1,]']),
    # Keywords only llama.cpp's converter handles.
    ("pattern", {"type": "string", "pattern": "^[A-Z][a-z]{1,3}-[0-9]+$"},
     ['"Ab-1"', '"Abcd-0042"'], ['"ab-1"', '"A-1"', '"Abcde-1"', '"Ab-"', '"Ab1"']),
    ("pattern alternatives", {"type": "string", "pattern": "^(cat|dog)s?$"},
     ['"cat"', '"dogs"'], ['"cow"', '"cats!"', '""']),
    ("integer bounds", {"type": "integer", "minimum": -5, "maximum": 120},
     ['-5', '0', '7', '99', '120'], ['-6', '121', '1000', '-10', '1.5']),
    ("exclusive bounds", {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
     ['1', '9'], ['0', '10', '-1']),
    ("minimum only", {"type": "integer", "minimum": 10}, ['10', '11', '999999'], ['9', '0', '-10']),
    ("date", {"type": "string", "format": "date"}, ['"2024-02-29"', '"1999-12-31"'],
     ['"2024-13-01"', '"2024-2-1"', '"yesterday"']),
    ("uuid", {"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'],
     ['"123e4567e89b12d3a456426614174000"', '"x"']),
    ("tuple", {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
     ['[1,"a"]', '[1, "a"]'], ['["a",1]', '[1]']),
    ("properties and extra", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                              "additionalProperties": {"type": "boolean"}},
     ['{"a":1}', '{"a":1,"x":true}', '{"a":1,"x":true,"y":false}'], ['{"a":1,"x":2}', '{"x":true}']),
    ("closed object", {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
     ['{}', '{"a":1}'], ['{"a":1,"b":2}', '{"b":2}']),
    ("closed when not said", {"type": "object", "properties": {"a": {"type": "integer"}}},
     ['{}', '{"a":1}'], ['{"a":1,"b":[2]}', '{"b":"x"}', '{"a":"x"}']),
]


@pytest.mark.parametrize("schema,good,bad", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_schema_acceptance(schema, good, bad):
    matcher = compile_grammar(json_schema_to_gbnf(schema))
    for text in good:
        json.loads(text)  # the table itself only lists JSON as "good"
        assert matcher.fullmatch(text), f"rejected valid {text!r}"
    for text in bad:
        assert not matcher.fullmatch(text), f"accepted invalid {text!r}"


def test_date_format_is_a_shape_not_a_calendar():
    # llama.cpp's date rule takes day 01-31 in any month: a known limit of its
    # converter (docs/protocol.md); the conformance suite leaves date out.
    m = compile_grammar(json_schema_to_gbnf({"type": "string", "format": "date"}))
    assert m.fullmatch('"2024-02-30"') and m.fullmatch('"2023-04-31"')
    assert not m.fullmatch('"2024-02-32"') and not m.fullmatch('"2024-00-10"')


def test_whitespace_is_bounded():
    m = compile_grammar(JSON_VALUE_GBNF)
    assert m.fullmatch('[\n' + ' ' * 20 + '1]') and m.fullmatch('[\n\n1]')
    assert not m.fullmatch('[\n' + ' ' * 21 + '1]')
    assert not m.fullmatch('[\n\n\n1]')


def test_json_gbnf_is_any_object():
    m = compile_grammar(JSON_GBNF)
    assert m.fullmatch('{"a":[1,2,{"b":null}],"c":"d"}') and m.fullmatch('{}')
    assert not m.fullmatch('[1]') and not m.fullmatch('"s"') and not m.fullmatch('1')


# -- properties ----------------------------------------------------------------------

_NO_DEL = st.characters(exclude_characters="\x7f")  # the grammar never emits a raw DEL
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**15, 10**15)
    # llama.cpp's number rule takes at most 16 fraction digits (Python's repr
    # may need 17) and an exponent without leading zeros (Python writes
    # 1e-06): 12 significant digits, in the range Python writes without one.
    | st.floats(allow_nan=False, allow_infinity=False).map(lambda x: float(f"{x:.12g}"))
      .filter(lambda x: x == 0 or 1e-4 <= abs(x) < 1e15)
    | st.text(_NO_DEL, max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(_NO_DEL, max_size=5), inner, max_size=4),
    max_leaves=8)

_VALUE_MATCHER = compile_grammar(JSON_VALUE_GBNF)


@settings(max_examples=60, deadline=None)
@given(value=JSON_VALUES, indent=st.sampled_from([None, 2]), ascii_only=st.booleans())
def test_property_any_json_value_accepted(value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    assert _VALUE_MATCHER.fullmatch(text), text


_OPTIONAL = {"type": "object", "properties": {k: {"type": "integer"} for k in "abcde"}}
_OPTIONAL_MATCHER = compile_grammar(json_schema_to_gbnf(_OPTIONAL))


@settings(max_examples=60, deadline=None)
@given(present=st.lists(st.booleans(), min_size=5, max_size=5), shuffle=st.randoms())
def test_property_optional_members_any_subset_in_order(present, shuffle):
    keys = [k for k, p in zip("abcde", present) if p]
    assert _OPTIONAL_MATCHER.fullmatch(json.dumps({k: 1 for k in keys}))
    shuffled = list(keys)
    shuffle.shuffle(shuffled)
    assert _OPTIONAL_MATCHER.fullmatch(json.dumps({k: 1 for k in shuffled})) == (shuffled == keys)


# -- errors ------------------------------------------------------------------------

ERRORS = [
    ({"type": "strin"}, "unrecognized type strin"),
    ({"type": []}, "type must not be empty"),
    ([1, 2], "schema must be an object"),
    (False, "schema must be an object"),
    ({"$ref": "http://example.com/s.json"}, "only references into the same document"),
    ({"$ref": "#/$defs/Missing"}, "cannot resolve $ref #/$defs/Missing"),
    ({"type": "object", "properties": []}, "properties must be an object"),
    ({"enum": []}, "enum must be a non-empty array"),
    ({"anyOf": []}, "must not be empty"),
    ({"type": "string", "maxLength": -1}, "maxLength must be a non-negative integer"),
    ({"type": "string", "minLength": 1.5}, "minLength must be a non-negative integer"),
    ({"type": "string", "pattern": "^(a$"}, "unbalanced parentheses"),
    ({"type": "array", "items": False}, "#/items"),
    ({"enum": [float("nan")]}, "not JSON"),
    ({"$ref": "#"}, "unsupported $ref #"),
    ({"type": "object", "properties": {"a": {"type": "bogus"}}}, "#/properties/a"),
    ({"enum": list(range(1001))}, "1001 alternatives exceed the limit"),
    ({"$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(300)}, "$ref": "#/$defs/d0"},
     "more than 256 $ref"),
]


@pytest.mark.parametrize("schema,message", ERRORS, ids=[m for _, m in ERRORS])
def test_bad_schema_raises(schema, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        json_schema_to_gbnf(schema)
