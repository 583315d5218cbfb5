"""OpenAI's generation routes: ``/v1/chat/completions`` and ``/v1/completions``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..chunks import Chunk, ToolCall, ToolCallDelta, ToolCallFold
from ..harmony import Turn
from .errors import APIError, validate
from .generate import Generation, start_generation
from .schemas import ChatRequest, CompletionRequest
from .state import state_of
from .streaming import Fold, open_chat, open_completion, openai_finish

__all__ = ["router"]

router = APIRouter()


def _split(req: ChatRequest) -> tuple[list[Turn], str | None]:
    """system/developer messages become the instructions; user/assistant/tool the turns (a
    tool message names the function of the call it answers)."""
    instructions = [m.text() for m in req.messages if m.role in ("system", "developer")]
    turns = []
    called: dict[str, str] = {}  # call id -> function name
    for m in req.messages:
        if m.role == "assistant" and m.tool_calls:
            calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments)
                          for c in m.tool_calls)
            called.update((c.id, c.name) for c in calls)
            turns.append(Turn("assistant", m.text(), m.reasoning_content, calls))
        elif m.role == "assistant":
            turns.append(Turn("assistant", m.text(), m.reasoning_content))
        elif m.role == "tool":
            name = called.get(m.tool_call_id or "")
            if name is None:
                raise APIError(400, f"a tool message answers tool_call_id {m.tool_call_id!r}, "
                               "which no earlier assistant message called",
                               "invalid_request_error", param="messages")
            turns.append(Turn("tool", m.text(), name=name))
        elif m.role == "user":
            turns.append(Turn("user", m.text()))
    return turns, "\n\n".join(i for i in instructions if i) or None


def _tool_calls(calls: ToolCallFold) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls.calls()]


def _call_delta(call: ToolCallDelta) -> dict[str, Any]:
    """A piece of a call in OpenAI's chunk shape: the first names it, the next add arguments."""
    if call.id is not None:
        return {"index": call.index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}
    return {"index": call.index, "function": {"arguments": call.arguments}}


def _finish(gen: Generation, offered: bool) -> str:
    """OpenAI's finish reason: ``tool_calls`` when the reply called a function offered."""
    if offered and gen.calls and gen.fold.finish_reason in ("tool_call", "stop"):
        return "tool_calls"
    reason = gen.fold.finish_reason
    return openai_finish("stop" if reason == "tool_call" and not offered else reason)


class _Envelope:
    """The id, timestamp and model every payload of one response repeats."""

    def __init__(self, prefix: str, obj: str, model: str) -> None:
        self.base = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj,
                     "created": int(time.time()), "model": model}

    def __call__(self, **fields: Any) -> dict[str, Any]:
        return {**self.base, **fields}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions; gpt-oss reasoning goes to ``reasoning_content``."""
    req = validate(ChatRequest, await request.body())
    turns, instructions = _split(req)
    offered = req.calls_offered  # calls the request did not offer are never reported
    state = state_of(request)
    gen = await start_generation(request, req.model, lambda p: open_chat(
        state.service, turns, instructions, p, req.generation_params()))
    env = _Envelope("chatcmpl", "chat.completion.chunk", state.model_id)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        opened = [False]

        def render(chunk: Chunk, fold: Fold) -> Iterable[dict[str, Any]]:
            if not opened[0]:
                opened[0] = True
                yield env(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}])
            if chunk.text:
                key = "content" if chunk.channel == "final" else "reasoning_content"
                yield env(choices=[{"index": 0, "delta": {key: chunk.text},
                                    "finish_reason": None}])
            elif chunk.tool_call is not None and offered and (
                    chunk.tool_call.id is not None or chunk.tool_call.arguments):
                yield env(choices=[{"index": 0, "delta": {
                    "tool_calls": [_call_delta(chunk.tool_call)]}, "finish_reason": None}])

        def epilogue(fold: Fold) -> Iterable[dict[str, Any]]:
            yield env(choices=[{"index": 0, "delta": {},
                                "finish_reason": _finish(gen, offered)}])
            if include_usage:
                yield env(choices=[], usage=fold.usage())

        return gen.response(await gen.first(), render, epilogue)
    fold = await gen.collect(request)
    text = "".join(fold.text)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if fold.reasoning:
        message["reasoning_content"] = "".join(fold.reasoning)
    if offered and gen.calls:
        message["tool_calls"] = _tool_calls(gen.calls)
        message["content"] = text or None
    body = env(object="chat.completion", choices=[{
        "index": 0, "message": message, "logprobs": None,
        "finish_reason": _finish(gen, offered)}], usage=fold.usage())
    return JSONResponse(body)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """OpenAI (legacy) completions: the prompt is continued as raw text (no prompt format,
    only the request's stop strings), as OpenAI and llama-server do."""
    req = validate(CompletionRequest, await request.body())
    state = state_of(request)
    gen = await start_generation(request, req.model, lambda p: open_completion(
        state.service, req.text(), p, req.generation_params()))
    env = _Envelope("cmpl", "text_completion", state.model_id)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def render(chunk: Chunk, fold: Fold) -> Iterable[dict[str, Any]]:
            if chunk.text and chunk.channel == "final":
                yield env(choices=[{"index": 0, "text": chunk.text, "logprobs": None,
                                    "finish_reason": None}])

        def epilogue(fold: Fold) -> Iterable[dict[str, Any]]:
            yield env(choices=[{"index": 0, "text": "", "logprobs": None,
                                "finish_reason": openai_finish(fold.finish_reason)}])
            if include_usage:
                yield env(choices=[], usage=fold.usage())

        return gen.response(await gen.first(), render, epilogue)
    fold = await gen.collect(request)
    return JSONResponse(env(choices=[{
        "index": 0, "text": "".join(fold.text), "logprobs": None,
        "finish_reason": openai_finish(fold.finish_reason)}], usage=fold.usage()))
