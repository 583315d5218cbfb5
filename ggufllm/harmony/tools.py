"""Function tools in harmony: their definitions in the developer message, and the grammar of
a call.

The definitions are the ``# Tools`` section openai-harmony (0.0.8) writes for the ``functions``
namespace: each function's JSON Schema as a TypeScript-like type, comments for descriptions
and defaults, laid out exactly as ``HarmonyEncoding::json_schema_to_typescript`` and
``template_tools_section`` lay them out (tests/test_harmony_tools_reference.py renders both
and compares the tokens). A call is

    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>

or with the recipient in the role part (``<|start|>assistant to=functions.NAME<|channel|>...``);
:func:`calls_grammar` writes the grammar of both, the arguments following each function's
schema. With ``tool_choice="auto"`` it is lazy: llama.cpp's grammar sampler waits for one of
:func:`trigger_patterns` (the recipient being written) and constrains from there; with
``required`` or a named function the whole reply follows it: free analysis, then the call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..structured.schema import prefixed_rules, schema_to_gbnf
from ..structured.tools import FunctionTool
from .constrain import final_rule
from .parser import HarmonyTokens

__all__ = ["tools_section", "typescript_type", "calls_grammar", "answer_or_call_grammar",
           "trigger_patterns", "CALL_CHANNEL_LINE", "FUNCTIONS", "call_header_text"]

FUNCTIONS = "functions"
# added to the system message's channel line when the conversation offers functions
CALL_CHANNEL_LINE = "Calls to these tools must go to the commentary channel: 'functions'."


# -- definitions ---------------------------------------------------------------------------

def _json(value: Any) -> str:
    """serde_json's Display of a value: compact JSON, non-ASCII as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _get(schema: Any, key: str) -> Any:
    return schema.get(key) if isinstance(schema, dict) else None


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and bool(values)


def _default_comment(schema: dict[str, Any], *, quote_enum: bool) -> str:
    """``default: ...`` as openai-harmony writes it: a string default in quotes, unless the
    schema is an enum (then bare, or as JSON where ``quote_enum``)."""
    value = schema["default"]
    if isinstance(value, str) and not _is_enum(schema):
        return f'default: "{value}"'
    if isinstance(value, str) and not quote_enum:
        return f"default: {value}"
    return f"default: {_json(value)}"


def _nullable(variant: Any, text: str) -> str:
    if _get(variant, "nullable") is True and "null" not in text:
        return f"{text} | null"
    return text


def _one_of(variants: list[Any], indent: str) -> str:
    out = []
    for variant in variants:
        text = _nullable(variant, typescript_type(variant, indent + "   "))
        comments = []
        if isinstance(_get(variant, "description"), str):
            comments.append(variant["description"])
        if isinstance(variant, dict) and "default" in variant:
            comments.append(_default_comment(variant, quote_enum=True))
        out.append(f"\n{indent} | {text}" + (f" // {' '.join(comments)}" if comments else ""))
    return "".join(out)


def typescript_type(schema: Any, indent: str = "") -> str:
    """A JSON Schema as the TypeScript-like type openai-harmony shows the model."""
    if isinstance(_get(schema, "oneOf"), list):
        return _one_of(schema["oneOf"], indent)
    kind = _get(schema, "type")
    if isinstance(kind, list):
        names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
        if names:
            return " | ".join(names)
    if not isinstance(kind, str):
        return "any"
    if kind == "object":
        return _object(schema, indent)
    if kind == "string":
        values = [f'"{v}"' for v in schema.get("enum") or () if isinstance(v, str)] \
            if isinstance(schema.get("enum"), list) else []
        return " | ".join(values) if values else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        return f"{typescript_type(schema['items'], indent)}[]" if "items" in schema \
            else "Array<any>"
    return "any"


def _object(schema: dict[str, Any], indent: str) -> str:
    out = [f"{indent}// {schema['description']}\n"] if isinstance(schema.get("description"),
                                                                   str) else []
    out.append("{\n")
    props = schema.get("properties")
    if isinstance(props, dict):
        req = schema.get("required")
        required = {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()
        for key, value in props.items():
            out.append(_property(key, value, key in required, indent))
    out.append(f"{indent}}}")
    return "".join(out)


def _property(key: str, value: Any, required: bool, indent: str) -> str:
    out = []
    mark = "" if required else "?"
    if isinstance(_get(value, "title"), str):
        out.append(f"{indent}// {value['title']}\n{indent}//\n")
    has_one_of = isinstance(value, dict) and "oneOf" in value
    if not has_one_of and isinstance(_get(value, "description"), str):
        out.append(f"{indent}// {value['description']}\n")
    examples = _get(value, "examples")
    if isinstance(examples, list) and examples:
        out.append(f"{indent}// Examples:\n")
        out += [f'{indent}// - "{e}"\n' for e in examples if isinstance(e, str)]
    if has_one_of and isinstance(value["oneOf"], list):
        return "".join(out) + _one_of_property(key, value, mark, indent)
    text = _nullable(value, typescript_type(value, indent + "    "))
    out.append(f"{indent}{key}{mark}: {text},")
    if not has_one_of and isinstance(value, dict) and "default" in value:
        out.append(f" // {_default_comment(value, quote_enum=False)}")
    out.append("\n")
    return "".join(out)


def _one_of_property(key: str, value: dict[str, Any], mark: str, indent: str) -> str:
    variants = value["oneOf"]
    desc = value.get("description") if isinstance(value.get("description"), str) else None
    first_desc = _get(variants[0], "description") if variants else None
    above = desc is not None and not (isinstance(first_desc, str) and first_desc == desc)
    out = [f"{indent}// {desc}\n"] if above else []
    if "default" in value:
        out.append(f"{indent}// {_default_comment(value, quote_enum=False)}\n")
    out.append(f"{indent}{key}{mark}:\n")
    for i, variant in enumerate(variants):
        text = _nullable(variant, typescript_type(variant, indent + "   "))
        comments = []
        vdesc = _get(variant, "description")
        if not (i == 0 and above) and isinstance(vdesc, str) and vdesc != desc:
            comments.append(vdesc)
        if isinstance(variant, dict) and "default" in variant:
            comments.append(_default_comment(variant, quote_enum=False))
        out.append(f"{indent} | {text}" + (f" // {' '.join(comments)}" if comments else "") + "\n")
    out.append(f"{indent},\n")
    return "".join(out)


def _lines(text: str) -> list[str]:
    """Rust's ``str::lines``: split at ``\\n``, a trailing ``\\r`` dropped, no last empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def tools_section(tools: Sequence[FunctionTool]) -> str:
    """The developer message's ``# Tools`` section for ``tools`` (the ``functions``
    namespace), as openai-harmony renders it."""
    parts = [f"## {FUNCTIONS}\n", f"namespace {FUNCTIONS} {{\n"]
    for tool in tools:
        parts += [f"// {line}" for line in _lines(tool.description)]
        if tool.parameters is not None:
            parts.append(f"type {tool.name} = (_: {typescript_type(tool.parameters)}) => any;\n")
        else:
            parts.append(f"type {tool.name} = () => any;\n")
    parts.append(f"}} // namespace {FUNCTIONS}")
    return "# Tools\n\n" + "\n".join(parts)


# -- the grammar of a call ----------------------------------------------------------------

def call_header_text(name: str | None) -> tuple[str, ...]:
    """What forcing a call writes from the end of a message, as harmony writes it: a new
    assistant message on the commentary channel to ``functions.NAME`` (only up to
    ``functions.`` when the grammar chooses among several)."""
    recipient = f" to={FUNCTIONS}." + (name or "")
    rest = (" ", "<|constrain|>", "json", "<|message|>") if name else ()
    return ("<|end|>", "<|start|>", "assistant", "<|channel|>", "commentary", recipient) + rest


def trigger_patterns() -> tuple[str, ...]:
    """Where a lazy call grammar starts: a recipient in the role part (at the start of the
    reply or after ``<|start|>assistant``), or after the channel name. The first group is
    where the grammar's text begins (llama.cpp's lazy grammar replays it from there)."""
    start = r"(?:^|<\|start\|>assistant)"
    return (start + rf"( to={FUNCTIONS}\.)",
            start + rf"(<\|channel\|>(?:commentary|analysis) to={FUNCTIONS}\.)")


def calls_grammar(tools: Sequence[FunctionTool], tokens: HarmonyTokens, *,
                  forced: bool) -> tuple[str, str]:
    """The grammar of a call to one of ``tools``, arguments following its schema.

    Args:
        tools: the functions the call may go to.
        tokens: the harmony control token ids (matched by id, never by text).
        forced: the whole reply: free analysis messages, then the call (``required``, a
            named function); else only the call, from where a trigger pattern starts it.

    Returns:
        The grammar and its start symbol.
    """
    t = tokens
    rules = []
    calls = []
    for i, tool in enumerate(tools):
        prefix = f"tool{i}-"
        rules.append(prefixed_rules(schema_to_gbnf(tool.checked_parameters(i)), prefix).rstrip())
        to = _literal(f" to={FUNCTIONS}.{tool.name}")
        rules.append(
            f"call{i} ::= ( {to} <[{t.channel}]> call-channel | <[{t.channel}]> call-channel "
            f"{to} ) call-type? <[{t.message}]> {prefix}root")
        calls.append(f"call{i}")
    rules += [
        'call-channel ::= "commentary" | "analysis"',
        f'call-type ::= " " <[{t.constrain}]> "json"',
        f"call ::= {' | '.join(calls)}",
    ]
    if not forced:
        return "\n".join(rules) + "\n", "call"
    rules += [
        f'call-analysis ::= <[{t.channel}]> "analysis" <[{t.message}]> call-text* '
        f'<[{t.end}]> <[{t.start}]> "assistant"',
        "call-text ::= [^<]",
        "call-reply ::= call-analysis* call",
    ]
    return "\n".join(rules) + "\n", "call-reply"


def answer_or_call_grammar(json_gbnf: str, tools: Sequence[FunctionTool],
                           tokens: HarmonyTokens) -> tuple[str, str]:
    """The grammar of a reply that either answers on the final channel with JSON that follows
    ``json_gbnf`` (start symbol ``root``) or calls one of ``tools``: free analysis first, then
    one or the other (``tools`` with ``tool_choice="auto"`` and a ``response_format``).

    Returns:
        The grammar and its start symbol.
    """
    calls, _ = calls_grammar(tools, tokens, forced=True)  # its call-analysis and call rules
    answer = prefixed_rules(json_gbnf, "answer-")       # no rule of it can clash with these
    rules = [answer.rstrip(), calls.rstrip(),
             f"reply-final ::= {final_rule(tokens, 'answer-root')}",
             "reply-answer-or-call ::= call-analysis* ( reply-final | call )"]
    return "\n".join(rules) + "\n", "reply-answer-or-call"


def _literal(text: str) -> str:
    return json.dumps(text)
