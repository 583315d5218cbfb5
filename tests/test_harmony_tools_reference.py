"""Tools in harmony against OpenAI's own implementation (``openai-harmony``).

Prompts with function definitions, earlier calls (with the reasoning passed back between
them) and tool results are rendered by ggufllm and by ``render_conversation_for_completion``
and compared token for token; calls in both recipient placements are parsed by our parser
and by ``StreamableParser`` and compared.
"""

from __future__ import annotations

import random

import openai_harmony as oh
import pytest

from ggufllm import GenerationConfig
from ggufllm.chunks import Answer, Chunk, ToolCall
from ggufllm.engine.output import HarmonyReader
from ggufllm.engine.prompt import PromptBuilder
from ggufllm.harmony import DEFAULT_INSTRUCTIONS, HarmonyParser, HarmonyTokens, Turn
from ggufllm.harmony.render import KNOWLEDGE_CUTOFF
from ggufllm.harmony.tools import tools_section
from ggufllm.structured.tools import FunctionTool

from . import test_harmony_reference as _reference

DATE = _reference.DATE
# the reference module's fixtures: openai-harmony's encoding (offline), the tiny vocabulary
encoding = _reference.encoding
vocab = _reference.vocab

WEATHER = FunctionTool(
    name="get_current_weather", description="Gets the current weather in the provided location.",
    parameters={"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
        "required": ["location"]})
LOCATION = FunctionTool(name="get_location", description="Gets the location of the user.")
# openai-harmony's own kitchen sink (test_render_functions_with_parameters), plus nesting
KITCHENSINK = FunctionTool(
    name="kitchensink", description="A function with various complex schemas.\nSecond line.",
    parameters={
        "description": "params object", "type": "object", "properties": {
            "string": {"type": "string", "title": "STRING", "description": "A string",
                       "examples": ["hello", "world"]},
            "string_nullable": {"type": "string", "nullable": True,
                                "description": "A nullable string", "default": "the default"},
            "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
            "oneof_string_or_number": {
                "oneOf": [{"type": "string", "default": "default_string_in_oneof"},
                          {"type": "number", "description": "numbers can happen too"}],
                "description": "a oneof", "default": 20},
            "nested": {"type": "object", "description": "an object in an object",
                       "properties": {"x": {"type": "integer"}, "y": {"type": ["number", "null"]},
                                      "tags": {"type": "array", "items": {"type": "string"}}},
                       "required": ["x"]},
            "free": {"type": "array"}, "anything": {}, "flag": {"type": "boolean",
                                                               "default": False},
            "unicode": {"type": "string", "description": "naïve 日本語 🇫🇷", "default": "é"}},
        "required": ["string_enum"]})
SEARCH = FunctionTool(name="search", description="Search the documents.", parameters={
    "type": "object", "properties": {"query": {"type": "string", "maxLength": 100},
                                     "top_k": {"type": "integer", "default": 3}},
    "required": ["query"]})


def _reference(enc, turns: list[Turn], tools: list[FunctionTool], instructions: str | None,
               effort: str = "low") -> list[int]:
    system = (oh.SystemContent.new()
              .with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
              .with_knowledge_cutoff(KNOWLEDGE_CUTOFF)
              .with_conversation_start_date(DATE.isoformat()))
    messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    developer = oh.DeveloperContent.new()
    if instructions:
        developer = developer.with_instructions(instructions)
    if tools:
        developer = developer.with_function_tools([
            oh.ToolDescription.new(t.name, t.description, t.parameters) for t in tools])
    if instructions or tools:
        messages.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    for t in turns:
        if t.role == "user":
            messages.append(oh.Message.from_role_and_content(oh.Role.USER, t.content))
        elif t.role == "tool":
            messages.append(oh.Message.from_author_and_content(
                oh.Author.new(oh.Role.TOOL, f"functions.{t.name}"), t.content)
                .with_recipient("assistant").with_channel("commentary"))
        elif t.role == "assistant":
            if t.reasoning:
                messages.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, t.reasoning)
                                .with_channel("analysis"))
            if not t.tool_calls:
                messages.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, t.content)
                                .with_channel("final"))
                continue
            if t.content:
                messages.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, t.content)
                                .with_channel("commentary"))
            for call in t.tool_calls:
                messages.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, call.arguments)
                                .with_channel("commentary")
                                .with_recipient(f"functions.{call.name}")
                                .with_content_type("<|constrain|>json"))
    convo = oh.Conversation.from_messages(messages)
    return list(enc.render_conversation_for_completion(convo, oh.Role.ASSISTANT))


def _call(name: str, args: str, i: int = 0) -> ToolCall:
    return ToolCall(f"call_{i}", name, args)


ASK = Turn("user", "What is the weather like in SF?")
CALLED = Turn("assistant", "", reasoning="Need to use function get_current_weather.",
              tool_calls=(_call("get_current_weather", '{"location":"San Francisco"}'),))
RESULT = Turn("tool", '{"sunny": true, "temperature": 20}', name="get_current_weather")
CONVERSATIONS = {
    "question": [ASK],
    "after a call": [ASK, CALLED, RESULT],
    "two calls, reasoning between": [
        ASK, CALLED, RESULT,
        Turn("assistant", "", reasoning="Also where the user is.",
             tool_calls=(_call("get_location", "{}", 1),)),
        Turn("tool", "Paris", name="get_location")],
    "preamble and two calls in one turn": [
        ASK, Turn("assistant", "Looking it up.", reasoning="Two lookups.",
                  tool_calls=(_call("get_current_weather", '{"location":"SF"}'),
                              _call("get_location", "{}", 1))),
        Turn("tool", "sunny", name="get_current_weather"),
        Turn("tool", "SF", name="get_location")],
    "answered, then asked again": [
        ASK, CALLED, RESULT, Turn("assistant", "It is sunny, 20°C.", reasoning="Sunny."),
        Turn("user", "And tomorrow?")],
    "a result with markup-like text": [
        ASK, CALLED, Turn("tool", 'naïve 日本語 {"a": [1, 2]}\n\tend', name="get_current_weather")],
}
TOOLSETS = {"weather": [WEATHER, LOCATION], "kitchensink": [KITCHENSINK, SEARCH, LOCATION],
            "none": []}


@pytest.mark.parametrize("instructions", [None, "Always respond in riddles"])
@pytest.mark.parametrize("toolset", list(TOOLSETS))
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_tool_prompt_equals_openai_harmony_token_for_token(encoding, vocab, name, toolset,
                                                           instructions):
    turns, tools = CONVERSATIONS[name], TOOLSETS[toolset]
    cfg = GenerationConfig(tools=tuple(tools))
    ours = PromptBuilder(vocab, "gpt-oss").build(turns, cfg, instructions, date=DATE).tokens
    if instructions is None:
        instructions = DEFAULT_INSTRUCTIONS
    assert encoding.decode(ours) == encoding.decode(_reference(encoding, turns, tools,
                                                               instructions))
    assert ours == _reference(encoding, turns, tools, instructions)


@pytest.mark.parametrize("effort", ["low", "high"])
def test_tools_section_renders_like_openai_harmony(encoding, vocab, effort):
    tools = TOOLSETS["kitchensink"]
    ours = PromptBuilder(vocab, "gpt-oss").build(
        [ASK], GenerationConfig(tools=tuple(tools), reasoning_effort=effort), "x", date=DATE)
    assert ours.tokens == _reference(encoding, [ASK], tools, "x", effort)
    text = encoding.decode(ours.tokens)
    assert tools_section(tools) in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text


def test_tool_choice_none_shows_no_tools(encoding, vocab):
    cfg = GenerationConfig(tools=(WEATHER,), tool_choice="none")
    ours = PromptBuilder(vocab, "gpt-oss").build([ASK], cfg, "x", date=DATE).tokens
    assert ours == _reference(encoding, [ASK], [], "x")


# -- parsing calls against StreamableParser -------------------------------------------

def _call_stream(rng: random.Random, in_role: bool) -> str:
    args = rng.choice(['{"location":"San Francisco"}', "{}", '{"q": "naïve 日本語", "n": [1, 2]}'])
    reasoning = rng.choice(["Need the weather.", "User asks; call it.", " ", "日本語"])
    name = rng.choice(["get_current_weather", "get_location", "search"])
    constrain = rng.choice([" <|constrain|>json", ""])
    call = (f"<|start|>assistant to=functions.{name}<|channel|>commentary{constrain}"
            if in_role else f"<|start|>assistant<|channel|>commentary to=functions.{name}"
                            f"{constrain}")
    return (f"<|channel|>analysis<|message|>{reasoning}<|end|>{call}<|message|>{args}<|call|>")


@pytest.mark.parametrize("in_role", [False, True], ids=["after channel", "in role"])
@pytest.mark.parametrize("seed", range(6))
def test_calls_parse_like_streamable_parser(encoding, vocab, seed, in_role):
    tokens = list(encoding.encode(_call_stream(random.Random(seed), in_role),
                                  allowed_special="all"))
    theirs = oh.StreamableParser(encoding, oh.Role.ASSISTANT)
    harmony = HarmonyTokens.from_lookup(vocab.special_token_id)
    reader = HarmonyReader(vocab, harmony)
    chunks: list[Chunk] = []
    for token in tokens:
        theirs.process(token)
        got, finish = reader.feed(token)
        chunks += got
        # argument text streams as it is written, never as text of a channel
        delta = theirs.last_content_delta or ""
        if theirs.current_recipient:
            assert "".join(c.tool_call.arguments for c in got if c.tool_call) == delta
            assert not any(c.text for c in got)
    assert finish == "tool_call"
    answer = Answer.from_chunks(chunks)
    last = theirs.messages[-1]
    assert len(answer.tool_calls) == 1
    call = answer.tool_calls[0]
    assert f"functions.{call.name}" == last.recipient
    assert call.arguments == last.content[0].text
    assert call.id.startswith("call_")
    assert answer.reasoning == theirs.messages[0].content[0].text
    assert answer.text == ""


def test_a_call_reads_as_text_when_calls_are_off(vocab, encoding):
    """Without tools (or with tool_choice none) a message to a function is the model's
    reasoning, never a call nobody offered."""
    tokens = list(encoding.encode(_call_stream(random.Random(0), False), allowed_special="all"))
    reader = HarmonyReader(vocab, HarmonyTokens.from_lookup(vocab.special_token_id), calls=False)
    chunks = [c for t in tokens for c in reader.feed(t)[0]]
    answer = Answer.from_chunks(chunks)
    assert answer.tool_calls == ()
    assert answer.reasoning.endswith("}")  # the arguments, as reasoning text


def test_parser_keeps_the_recipient_on_its_deltas(vocab, encoding):
    text = ("<|channel|>commentary to=functions.search <|constrain|>json<|message|>"
            '{"query": "x"}<|call|>')
    parser = HarmonyParser(HarmonyTokens.from_lookup(vocab.special_token_id), vocab.piece)
    deltas = [d for t in encoding.encode(text, allowed_special="all") for d in parser.feed(t)]
    assert deltas[0].opens and deltas[0].recipient == "functions.search" and not deltas[0].text
    assert all(d.recipient == "functions.search" and not d.opens for d in deltas[1:])
    assert "".join(d.text for d in deltas) == '{"query": "x"}'
