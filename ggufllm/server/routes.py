"""The other routes: health, models, metrics, the page and the seed's ``/answer``."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..chunks import Chunk
from .errors import RETRY_AFTER_S, validate
from .generate import start_generation
from .metrics import CONTENT_TYPE
from .schemas import AnswerRequest
from .state import state_of
from .streaming import Fold, open_answer

__all__ = ["router"]

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """503 while the model loads, 200 once it is ready, 500 with the reason if loading failed
    or the engine failed, 503 ``draining`` after SIGTERM."""
    state = state_of(request)
    status = state.status
    if status == "error":
        return JSONResponse({"status": "error", "error": state.error}, status_code=500)
    if state.draining or state.shutdown.is_set():
        return JSONResponse({"status": "draining"}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})
    if status == "ok":
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    """The one model this server serves (an empty list until it is loaded)."""
    state = state_of(request)
    data = []
    if state.status == "ok":
        info = state.service.get_model_info()
        data.append({"id": state.model_id, "object": "model", "created": 0,
                     "owned_by": "ggufllm", "meta": {
                         k: info.get(k) for k in ("architecture", "quantization", "n_ctx",
                                                  "n_params", "prompt_format")}})
    return JSONResponse({"object": "list", "data": data})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/")
async def page() -> HTMLResponse:
    """The page to try the model: context, question, the answer streaming."""
    html = resources.files(__package__).joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


@router.post("/answer")
async def answer(request: Request) -> Response:
    """The seed service's RAG call: ``{question, context, ...}`` -> ``{answer, reasoning,
    finish_reason, usage}``; with ``stream`` an SSE of ``{"answer": text}`` /
    ``{"reasoning": text}`` events, then ``{"finish_reason", "usage", "timings"}``."""
    req = validate(AnswerRequest, await request.body())
    state = state_of(request)
    gen = await start_generation(request, None, lambda p: open_answer(
        state.service, req.question, req.context, p, req.generation_params()))
    if req.stream:
        def render(chunk: Chunk, fold: Fold) -> Iterable[dict[str, Any]]:
            if chunk.text:
                yield {"answer" if chunk.channel == "final" else "reasoning": chunk.text}

        def epilogue(fold: Fold) -> Iterable[dict[str, Any]]:
            yield {"finish_reason": fold.finish_reason, "usage": fold.usage(),
                   "timings": _timings(fold)}

        return gen.response(await gen.first(), render, epilogue)
    fold = await gen.collect(request)
    return JSONResponse({"answer": "".join(fold.text), "reasoning": "".join(fold.reasoning),
                         "finish_reason": fold.finish_reason, "usage": fold.usage(),
                         "timings": _timings(fold)})


def _timings(fold: Fold) -> dict[str, float] | None:
    t = fold.timings
    if t is None:
        return None
    return {"prompt_s": round(t.prompt_s, 4), "decode_s": round(t.decode_s, 4),
            "decode_tokens_per_s": round(t.decode_tokens_per_s, 2)}
