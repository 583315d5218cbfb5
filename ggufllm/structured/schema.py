"""JSON Schema -> GBNF, through llama-cpp-python's port of llama.cpp's json-schema-to-grammar.

The converter (``llama_cpp.llama_grammar.SchemaConverter``) ships with our dependency; it is
bound here rather than ported, with four changes made through a subclass:

- a ``date`` is a calendar date (llama.cpp's rule takes September 31st and February 30th);
- a string character is never a raw control character (its ``char`` rule lets ``\\n``
  through, which no JSON parser accepts) and never a ``\\u`` escape, so that one character
  costs at most 4 tokens (its UTF-8 bytes) and an answer's length can be bounded;
- ``maxLength`` / ``maxItems`` become GBNF's ``{m,n}`` repetition (its nested optionals
  grow one parenthesis deep per item, which llama.cpp's recursive parser cannot take for
  long strings);
- the schema is checked first: every keyword the converter would ignore or relax is refused
  with :class:`~ggufllm.errors.UnsupportedSchemaError` naming it, and ``"type": [..]`` lists
  become ``anyOf`` (the converter drops the other keywords of such a schema).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from ..errors import InvalidParameterError, UnsupportedSchemaError

__all__ = ["check_schema", "schema_to_gbnf", "max_answer_tokens", "JSON_OBJECT_SCHEMA",
           "prefixed_rules"]

# {"type": "json_object"}: any JSON object
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}

# keywords that only describe: they constrain nothing, so dropping them loses nothing
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "$defs", "definitions",
})
_STRING = frozenset({"minLength", "maxLength", "pattern", "format"})
_OBJECT = frozenset({"properties", "required", "additionalProperties"})
_ARRAY = frozenset({"items", "prefixItems", "minItems", "maxItems"})
_SUPPORTED = frozenset({"type", "enum", "const", "anyOf", "$ref"}) | _STRING | _OBJECT | _ARRAY
_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
# formats llama.cpp's converter writes a grammar for (others would be plain strings)
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4",
                      "uuid5"})
# why the common unsupported keywords are refused (others: "unknown keyword")
_REFUSED = {
    "oneOf": "use anyOf (the grammar cannot enforce that exactly one alternative matches)",
    "allOf": "merge the subschemas into one",
    "not": "", "if": "", "then": "", "else": "",
    "minimum": "numeric bounds are not expressed by the grammar",
    "maximum": "numeric bounds are not expressed by the grammar",
    "exclusiveMinimum": "numeric bounds are not expressed by the grammar",
    "exclusiveMaximum": "numeric bounds are not expressed by the grammar",
    "multipleOf": "", "uniqueItems": "", "contains": "", "minContains": "", "maxContains": "",
    "minProperties": "", "maxProperties": "", "patternProperties": "", "propertyNames": "",
    "dependentRequired": "", "dependentSchemas": "", "dependencies": "",
    "unevaluatedProperties": "", "unevaluatedItems": "",
}

# A JSON string character: no quote, backslash or control character; escapes without \u.
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" ["\\/bfnrt]'
# A calendar date (RFC 3339 full-date, as Python's date.fromisoformat reads it): llama.cpp's
# rule takes any day 01-31 in any month and the year 0000; this one knows the days of each
# month and February 29th of leap years only.
_DATE = (
    '( [0-9] [0-9] [0-9] [1-9] | [0-9] [0-9] [1-9] "0" | [0-9] [1-9] "00" | [1-9] "000" ) "-" '
    '( ( "01" | "03" | "05" | "07" | "08" | "10" | "12" ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] )'
    ' | ( "04" | "06" | "09" | "11" ) "-" ( "0" [1-9] | [12] [0-9] | "30" )'
    ' | "02-" ( "0" [1-9] | "1" [0-9] | "2" [0-8] ) )'
    ' | ( [0-9] [0-9] ( "0" [48] | [2468] [048] | [13579] [26] )'
    ' | ( "0" [48] | [2468] [048] | [13579] [26] ) "00" ) "-02-29"'
)


def _refuse(keyword: str, path: str, reason: str = "") -> UnsupportedSchemaError:
    return UnsupportedSchemaError(keyword, path, reason)


def check_schema(schema: Any) -> dict[str, Any]:
    """Checks ``schema`` and returns the copy the converter gets (annotations dropped,
    type lists as ``anyOf``).

    Raises:
        UnsupportedSchemaError: a keyword (or a combination) the grammar cannot express.
        InvalidParameterError: ``schema`` is not a JSON Schema object.
    """
    if not isinstance(schema, dict):
        raise InvalidParameterError("response_format: the JSON Schema must be an object",
                                    "response_format")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"response_format: the schema is not JSON ({exc})",
                                    "response_format") from None
    cleaned = _clean(schema, "", schema)
    for key in ("$defs", "definitions"):
        defs = schema.get(key)
        if defs is None:
            continue
        if not isinstance(defs, dict):
            raise _refuse(key, "", "must be an object of schemas")
        cleaned[key] = {name: _clean(sub, f"/{key}/{name}", schema) for name, sub in defs.items()}
    return cleaned


def _clean(schema: Any, path: str, root: dict[str, Any]) -> dict[str, Any]:
    if schema is True:
        return {}
    if not isinstance(schema, dict):
        raise _refuse("schema", path, "a subschema must be an object (or true)")
    for key in schema:
        if key in _ANNOTATIONS or key.startswith("x-"):
            continue
        if key in _REFUSED:
            raise _refuse(key, path, _REFUSED[key])
        if key not in _SUPPORTED:
            raise _refuse(key, path, "unknown keyword")
    out = {k: v for k, v in schema.items() if k in _SUPPORTED}
    kind = out.get("type")
    if isinstance(kind, list):
        return _type_list(out, path, root)
    if kind is not None and kind not in _TYPES:
        raise _refuse("type", path, f"unknown type {kind!r}")
    if "$ref" in out:
        return _ref(out, path, root)
    if "anyOf" in out:
        return _any_of(out, path, root)
    if "enum" in out or "const" in out:
        return _constant(out, path)
    _check_kind(out, path)
    if "properties" in out or "additionalProperties" in out or "required" in out:
        return _object(out, path, root)
    if "items" in out or "prefixItems" in out:
        return _array(out, path, root)
    return out


def _check_kind(out: dict[str, Any], path: str) -> None:
    """Keywords that apply to one type only must come with that type."""
    kind = out.get("type")
    for keys, want in ((_STRING, "string"), (_ARRAY, "array"), (_OBJECT, "object")):
        for key in keys & out.keys():
            if kind not in (want, None) or (kind is None and want == "string"):
                raise _refuse(key, path, f"it needs \"type\": \"{want}\"")
    if kind == "string":
        _check_string(out, path)


def _check_string(out: dict[str, Any], path: str) -> None:
    lo, hi = out.get("minLength", 0), out.get("maxLength")
    _check_range("minLength", "maxLength", lo, hi, path)
    fmt = out.get("format")
    if fmt is not None and fmt not in _FORMATS:
        raise _refuse("format", path, f"format {fmt!r} (supported: {', '.join(sorted(_FORMATS))})")
    if "pattern" in out:
        pattern = out["pattern"]
        if not isinstance(pattern, str) or not (pattern.startswith("^") and pattern.endswith("$")):
            raise _refuse("pattern", path, "a pattern must be anchored with ^ and $")
        if "(?" in pattern or "\\b" in pattern or any(f"\\{d}" in pattern for d in "123456789"):
            raise _refuse("pattern", path, "lookarounds, backreferences and \\b are not supported")
    constrained = [k for k in ("pattern", "format", "minLength", "maxLength") if k in out]
    if ("pattern" in out or "format" in out) and len(constrained) > 1:
        raise _refuse(constrained[1], path, f"it cannot be combined with {constrained[0]}")


def _check_range(lo_name: str, hi_name: str, lo: Any, hi: Any, path: str) -> None:
    if not isinstance(lo, int) or isinstance(lo, bool) or lo < 0:
        raise _refuse(lo_name, path, "must be a non-negative integer")
    if hi is not None and (not isinstance(hi, int) or isinstance(hi, bool) or hi < lo):
        raise _refuse(hi_name, path, f"must be an integer >= {lo_name} ({lo})")


def _type_list(out: dict[str, Any], path: str, root: dict[str, Any]) -> dict[str, Any]:
    kinds = out.pop("type")
    if not kinds or not all(isinstance(k, str) and k in _TYPES for k in kinds):
        raise _refuse("type", path, f"unknown type in {kinds!r}")
    if any(k in out for k in ("anyOf", "$ref", "enum", "const")):
        return _clean({**out, "type": kinds[0]} if len(kinds) == 1 else out, path, root)
    per_type = {"string": _STRING, "array": _ARRAY, "object": _OBJECT}
    alternatives = [{"type": k, **{key: v for key, v in out.items()
                                   if key in per_type.get(k, frozenset())}} for k in kinds]
    return _clean({"anyOf": alternatives}, path, root)


def _only(out: dict[str, Any], path: str, allowed: frozenset[str], what: str) -> None:
    for key in out.keys() - allowed:
        raise _refuse(key, path, f"it cannot be combined with {what}")


def _ref(out: dict[str, Any], path: str, root: dict[str, Any]) -> dict[str, Any]:
    _only(out, path, frozenset({"$ref"}), "$ref")
    ref = out["$ref"]
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise _refuse("$ref", path, "only local references (#/$defs/NAME) are supported")
    target: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            raise _refuse("$ref", path, f"{ref} does not resolve")
        target = target[part]
    return out


def _any_of(out: dict[str, Any], path: str, root: dict[str, Any]) -> dict[str, Any]:
    _only(out, path, frozenset({"anyOf"}), "anyOf")
    alts = out["anyOf"]
    if not isinstance(alts, list) or not alts:
        raise _refuse("anyOf", path, "must be a non-empty list of schemas")
    return {"anyOf": [_clean(a, f"{path}/anyOf/{i}", root) for i, a in enumerate(alts)]}


def _constant(out: dict[str, Any], path: str) -> dict[str, Any]:
    key = "enum" if "enum" in out else "const"
    _only(out, path, frozenset({key, "type"}), key)
    if key == "enum" and (not isinstance(out["enum"], list) or not out["enum"]):
        raise _refuse("enum", path, "must be a non-empty list")
    return {key: out[key]}


def _object(out: dict[str, Any], path: str, root: dict[str, Any]) -> dict[str, Any]:
    props = out.get("properties", {})
    if not isinstance(props, dict):
        raise _refuse("properties", path, "must be an object of schemas")
    required = out.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _refuse("required", path, "must be a list of property names")
    missing = [r for r in required if r not in props]
    if missing:
        raise _refuse("required", path, f"{missing[0]!r} is required but not in properties")
    result: dict[str, Any] = {"type": "object", "properties": {
        name: _clean(sub, f"{path}/properties/{name}", root) for name, sub in props.items()}}
    if required:
        result["required"] = list(required)
    extra = out.get("additionalProperties", False)
    if extra is True or isinstance(extra, dict) and not extra:
        result["additionalProperties"] = True
    elif isinstance(extra, dict):
        result["additionalProperties"] = _clean(extra, f"{path}/additionalProperties", root)
    elif extra is not False:
        raise _refuse("additionalProperties", path, "must be a boolean or a schema")
    if not props and result.get("additionalProperties") is True:
        return {"type": "object"}  # any object
    if not props and "additionalProperties" not in result:
        result["additionalProperties"] = False
    return result


def _array(out: dict[str, Any], path: str, root: dict[str, Any]) -> dict[str, Any]:
    items = out.get("items")
    if "prefixItems" in out or isinstance(items, list):
        key = "prefixItems" if "prefixItems" in out else "items"
        tuple_items = out[key]
        for other in ("minItems", "maxItems") + (("items",) if key == "prefixItems" else ()):
            if other in out:
                raise _refuse(other, path, f"it cannot be combined with a tuple ({key})")
        if not isinstance(tuple_items, list) or not tuple_items:
            raise _refuse(key, path, "must be a non-empty list of schemas")
        return {"type": "array", "prefixItems": [_clean(s, f"{path}/{key}/{i}", root)
                                                 for i, s in enumerate(tuple_items)]}
    lo, hi = out.get("minItems", 0), out.get("maxItems")
    _check_range("minItems", "maxItems", lo, hi, path)
    result: dict[str, Any] = {"type": "array", "items": _clean(items, f"{path}/items", root)}
    if lo:
        result["minItems"] = lo
    if hi is not None:
        result["maxItems"] = hi
    return result


@functools.lru_cache(maxsize=64)
def _gbnf_of(canonical: str) -> str:
    from llama_cpp.llama_grammar import PRIMITIVE_RULES, BuiltinRule, SchemaConverter

    class Converter(SchemaConverter):  # type: ignore[misc]
        def _add_primitive(self, name: str, rule: Any) -> str:
            if name == "char":
                rule = BuiltinRule(_JSON_CHAR, [])
            elif name == "date":
                rule = BuiltinRule(f"( {_DATE} )", [])
            return str(super()._add_primitive(name, rule))

        def visit(self, schema: dict[str, Any], name: str) -> str:
            kind = schema.get("type")
            if kind == "string" and ("minLength" in schema or "maxLength" in schema):
                char = self._add_primitive("char", PRIMITIVE_RULES["char"])
                body = _repeat(char, schema.get("minLength", 0), schema.get("maxLength"))
                return str(self._add_rule(_rule_name(name), f'"\\"" {body} "\\"" space'))
            if kind == "array" and isinstance(schema.get("items"), dict):
                item = self.visit(schema["items"], f"{name}{'-' if name else ''}item")
                lo, hi = schema.get("minItems", 0), schema.get("maxItems")
                return str(self._add_rule(_rule_name(name),
                                          f'"[" space {_list(item, lo, hi)} "]" space'))
            return str(super().visit(schema, name))

    schema = json.loads(canonical)
    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        converter.visit(converter.resolve_refs(schema, ""), "")
    except (AssertionError, ValueError, KeyError, RecursionError) as exc:
        raise _refuse("schema", "", f"the grammar converter refused it ({exc})") from None
    return str(converter.format_grammar())


def _rule_name(name: str) -> str:
    from llama_cpp.llama_grammar import RESERVED_NAMES

    return name + "-" if name in RESERVED_NAMES else name or "root"


def _repeat(item: str, lo: int, hi: int | None) -> str:
    return f"{item}{{{lo},{'' if hi is None else hi}}}"


def _list(item: str, lo: int, hi: int | None) -> str:
    """``lo`` to ``hi`` items separated by commas (GBNF's bounded repetition, not nesting)."""
    if hi == 0:
        return ""
    rest = _repeat(f'("," space {item})', max(lo - 1, 0), None if hi is None else hi - 1)
    return f"{item} {rest}" if lo >= 1 else f"({item} {rest})?"


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """The GBNF grammar (start symbol ``root``) of the JSON values ``schema`` accepts.

    Converted once per distinct schema (an LRU cache of 64).

    Raises:
        UnsupportedSchemaError, InvalidParameterError: as :func:`check_schema`.
    """
    cleaned = check_schema(schema)
    return _gbnf_of(json.dumps(cleaned))


def prefixed_rules(gbnf: str, prefix: str) -> str:
    """``gbnf`` with every rule name (definitions and references) prefixed, so that several
    grammars can live in one (``root`` becomes ``{prefix}root``).

    Rule names are GBNF's ``[a-zA-Z0-9-]+`` words outside quoted strings, character classes,
    token references (``<[...]>``) and repetition counts (``{m,n}``)."""
    out: list[str] = []
    for line in gbnf.splitlines():
        name, sep, body = line.partition("::=")
        if not sep:
            out.append(line)
            continue
        out.append(f"{prefix}{name.strip()} ::={_prefix_body(body, prefix)}")
    return "\n".join(out) + "\n"


_CLOSERS = {'"': '"', "[": "]", "{": "}", "<": ">"}


def _prefix_body(body: str, prefix: str) -> str:
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c in _CLOSERS:
            close = _CLOSERS[c]
            j = i + 1
            while j < n and body[j] != close:
                j += 2 if body[j] == "\\" else 1
            out.append(body[i:j + 1])
            i = j + 1
        elif c.isascii() and (c.isalnum() or c == "-"):
            j = i
            while j < n and body[j].isascii() and (body[j].isalnum() or body[j] == "-"):
                j += 1
            out.append(prefix + body[i:j])
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


# The most tokens a value can take, by the grammar's own rules: a token is at least one byte
# (llama.cpp's grammar refuses tokens with no text), structure is ASCII, and a string
# character is at most 4 bytes of UTF-8 (escapes are 2).
_SCALAR_TOKENS = {"null": 5, "boolean": 6, "integer": 18, "number": 53}
_FORMAT_TOKENS = {"date": 13, "time": 21, "date-time": 35}


def max_answer_tokens(schema: dict[str, Any]) -> int | None:
    """An upper bound on the tokens of any JSON value the grammar of ``schema`` accepts, or
    None when it is unbounded (a string without ``maxLength``, an array without ``maxItems``,
    a pattern, a free object, a recursive reference)."""
    cleaned = check_schema(schema)
    try:
        return _bound(cleaned, cleaned, frozenset())
    except _Unbounded:
        return None


class _Unbounded(Exception):
    pass


def _bound(s: dict[str, Any], root: dict[str, Any], seen: frozenset[str]) -> int:
    if "$ref" in s:
        ref = s["$ref"]
        if ref in seen:
            raise _Unbounded
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        return _bound(target, root, seen | {ref})
    if "anyOf" in s:
        return max(_bound(a, root, seen) for a in s["anyOf"])
    if "enum" in s or "const" in s:
        values = s["enum"] if "enum" in s else [s["const"]]
        return max(len(json.dumps(v).encode()) for v in values)
    kind = s.get("type")
    if kind in _SCALAR_TOKENS:
        return _SCALAR_TOKENS[kind]
    if kind == "string":
        return _string_bound(s)
    if kind == "array" and "prefixItems" in s:
        return 3 + sum(_bound(i, root, seen) + 2 for i in s["prefixItems"])
    if kind == "array" and s.get("maxItems") is not None:
        return 4 + s["maxItems"] * (_bound(s["items"], root, seen) + 2)
    if kind == "object" and "properties" in s and s.get("additionalProperties") in (None, False):
        return 4 + sum(len(json.dumps(k).encode()) + 4 + _bound(v, root, seen)
                       for k, v in s["properties"].items())
    raise _Unbounded


def _string_bound(s: dict[str, Any]) -> int:
    fmt = s.get("format")
    if fmt in _FORMAT_TOKENS:
        return _FORMAT_TOKENS[fmt]
    if fmt is not None and fmt.startswith("uuid"):
        return 39
    if "pattern" in s or s.get("maxLength") is None:
        raise _Unbounded
    return 3 + 4 * int(s["maxLength"])

