"""OpenAI's generation routes: ``/v1/chat/completions`` and ``/v1/completions``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..chunks import Chunk
from ..harmony import Turn
from .errors import validate
from .generate import start_generation
from .schemas import ChatRequest, CompletionRequest
from .state import state_of
from .streaming import Fold, open_chat, open_completion, openai_finish

__all__ = ["router"]

router = APIRouter()


def _split(req: ChatRequest) -> tuple[list[Turn], str | None]:
    """system/developer messages become the instructions; user/assistant the turns."""
    instructions = [m.text() for m in req.messages if m.role in ("system", "developer")]
    turns = [Turn(m.role, m.text()) for m in req.messages if m.role in ("user", "assistant")]
    return turns, "\n\n".join(i for i in instructions if i) or None


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

        def epilogue(fold: Fold) -> Iterable[dict[str, Any]]:
            yield env(choices=[{"index": 0, "delta": {},
                                "finish_reason": openai_finish(fold.finish_reason)}])
            if include_usage:
                yield env(choices=[], usage=fold.usage())

        return gen.response(await gen.first(), render, epilogue)
    fold = await gen.collect(request)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(fold.text)}
    if fold.reasoning:
        message["reasoning_content"] = "".join(fold.reasoning)
    body = env(object="chat.completion", choices=[{
        "index": 0, "message": message, "logprobs": None,
        "finish_reason": openai_finish(fold.finish_reason)}], usage=fold.usage())
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
