"""``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI semantics plus the sparse extensions.

A request is checked and turned into engine requests (:mod:`.prepare`), run (:class:`.generation.GenerationRun`,
which reports each engine request's end to the request's :class:`.request_metrics.GenerationMetrics`), and
its outputs become one JSON response or one SSE stream (:mod:`.responses`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .context import ServerContext, get_context
from .generation import GenerationRun
from .prepare import Prepared, prepare
from .request_metrics import GenerationMetrics
from .responses import collect_body, stream_events
from .schemas import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from .sse import CLIENT_CLOSED, ClientDisconnected, EventStreamResponse, run_unless_disconnected

router = APIRouter()


async def _serve(ctx: ServerContext, prep: Prepared, request: Request, metrics: GenerationMetrics) -> Response:
    run = GenerationRun(ctx.engine, prep.requests, on_finished=metrics.engine_finished,
                        overload_status=ctx.settings.overload_status, registry=ctx.runs)
    run.start()
    if ctx.cutting:  # prepared while the shutdown deadline passed
        run.cut()

    async def disconnected() -> None:
        prep.log_fields["client_disconnected"] = True  # the access log says 499, not the 200 already sent
        await run.abort()

    try:
        if prep.stream:
            await run_unless_disconnected(request.receive, run.wait_started(), disconnected)
            return EventStreamResponse(stream_events(ctx, prep, run), on_disconnect=disconnected)
        body = await run_unless_disconnected(request.receive, collect_body(ctx, prep, run), disconnected)
        return JSONResponse(body)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        await asyncio.shield(run.abort())
        raise


async def _generate(body: CompletionRequest | ChatCompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    metrics: GenerationMetrics = request.state.generation_metrics
    prep = await prepare(ctx, body, request, metrics)
    return await _serve(ctx, prep, request, metrics)


def _generation_route(path: str, response: type, summary: str) -> Callable[[Any], Any]:
    return router.post(path, response_model=None, summary=summary, responses={
        200: {"model": response, "content": {"text/event-stream": {}}}, **ERROR_RESPONSES})


@_generation_route("/v1/completions", CompletionResponse,
                   "Create a completion (OpenAI-compatible, with sparse attention extensions)")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await _generate(body, request)


@_generation_route("/v1/chat/completions", ChatCompletionResponse,
                   "Create a chat completion (OpenAI-compatible, with sparse attention extensions)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await _generate(body, request)
