"""The non-generation endpoints: models, tokenize/detokenize (vLLM shapes), sparse patterns, health, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from attention_backends import describe_methods

from .context import ServerContext, get_context
from .errors import APIError, bad_request
from .prompts import chat_prompt, encode_text
from .schemas import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter()


def _model_card(ctx: ServerContext) -> dict[str, Any]:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "sparse-serve",
            "root": ctx.settings.model or ctx.model_name, "max_model_len": ctx.engine.max_model_len}


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> JSONResponse:
    ctx = get_context(request)
    return JSONResponse({"object": "list", "data": [_model_card(ctx)]})


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(model: str, request: Request) -> JSONResponse:
    ctx = get_context(request)
    ctx.check_model(model)
    return JSONResponse(_model_card(ctx))


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    """``{"prompt": str}`` or ``{"messages": [...], "add_generation_prompt": true}`` -> token ids."""
    ctx = get_context(request)
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt or messages", param="prompt" if body.prompt is None
                          else "messages")
    if body.messages is not None:
        if not body.messages:
            raise bad_request("messages must not be empty", param="messages")
        if body.add_special_tokens:
            raise bad_request("add_special_tokens is not supported with messages (the chat template adds them)",
                              param="add_special_tokens")
        ids = await chat_prompt(ctx, body.messages, body.add_generation_prompt)
    else:
        assert body.prompt is not None
        add = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await encode_text(ctx, body.prompt, add)
    out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": ctx.engine.max_model_len}
    if body.return_token_strs:
        out["token_strs"] = [ctx.token_str(t) for t in ids]
    return JSONResponse(out)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    ctx = get_context(request)
    ctx.check_model(body.model)
    ctx.check_token_ids(body.tokens, "tokens")
    try:
        text = ctx.engine.tokenizer.decode(body.tokens, skip_special_tokens=False)
    except Exception as e:  # noqa: BLE001 - an id the tokenizer cannot map
        raise bad_request(f"cannot detokenize these ids: {e}", param="tokens") from None
    return JSONResponse({"prompt": text})


@router.get("/v1/sparse/patterns")
async def sparse_patterns(request: Request) -> JSONResponse:
    """Every sparse method: phase, parameters, defaults and valid ranges, plus this server's default."""
    ctx = get_context(request)
    out = describe_methods()
    out["default"] = ctx.settings.default_sparse_pattern
    out["auto"] = {
        "usage": "sparse_pattern 'auto' or 'auto:<max_drop>': the pattern is chosen per prompt from its length by "
                 "the policy below (the cheapest candidate of the prompt's band whose predicted accuracy drop plus "
                 "margin is within max_drop; dense when none is)",
        "policy": ctx.settings.policy().describe(),
    }
    out["precedence"] = "body (sparse_pattern, compression_ratio) > vllm_xargs > headers " \
                        "(X-Sparse-Pattern, X-Compression-Ratio) > server default"
    return JSONResponse(out)


@router.get("/health", response_model=HealthResponse, responses={503: ERROR_RESPONSES[503]})
async def health(request: Request) -> JSONResponse:
    ctx = get_context(request)
    if ctx.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
    if not ctx.engine.ready():
        raise APIError(503, "the engine is not ready", code="engine_not_ready", headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok"})


router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)  # what load balancers probe


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    ctx = get_context(request)
    try:
        ctx.metrics.update_engine(ctx.engine.stats())
    except Exception:  # noqa: BLE001 - an engine that cannot report stats still gets its counters scraped
        pass
    return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)
