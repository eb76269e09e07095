"""``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI semantics plus the sparse extensions.

A request is validated completely (model, unsupported fields, sparse spec, prompt, context length) before
anything reaches the engine. It becomes one engine request per (prompt, choice); their outputs are merged
into one JSON response or one SSE stream, and the ``sparse`` cost report comes back with ``usage``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from attention_backends import SparseSpec
from server.contract.cost import RequestCost
from server.contract.engine import GenerationOutput, GenerationRequest, SamplingParams, TokenLogprob
from server.sparse_policy import AutoChoice, AutoRequest

from .context import ServerContext, get_context
from .cost_report import cost_report
from .errors import APIError, bad_request, unavailable
from .generation import ChoiceState, GenerationRun
from .limits import check_choices
from .prompts import Prompt, chat_prompt, completion_prompts
from .schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    unsupported_field,
)
from .sparse_request import resolve_sparse_spec, spec_labels
from .sse import CLIENT_CLOSED, DONE, ClientDisconnected, EventStreamResponse, encode_event, run_unless_disconnected

logger = logging.getLogger("sparse_serve.api")

router = APIRouter()

GREEDY_EPS = 1e-5  # temperatures below this are greedy (as vLLM does)
_SEED_MOD = 2**63

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)
}


@dataclass
class Prepared:
    kind: Literal["completion", "chat"]
    response_id: str
    created: int
    spec: SparseSpec
    prompts: list[list[int]]
    auto: list[AutoChoice]  # per prompt, when the request asked for `auto`; else empty
    echo_texts: list[str]
    n: int
    requests: list[GenerationRequest]
    stream: bool
    include_usage: bool
    logprobs: int | None
    log_fields: dict[str, Any] = field(default_factory=dict)
    prompt_logprobs: int | None = None  # echo with logprobs: the prompt tokens' logprobs lead each choice's

    def prompt_of(self, choice: int) -> int:
        return choice // self.n

    def choice_index(self, choice: int) -> int:
        return choice


# -- validation helpers --------------------------------------------------------------------------------


def _check_accepting(ctx: ServerContext) -> None:
    if ctx.draining:
        raise unavailable("the server is shutting down", retry_after=5)
    if not ctx.engine.ready():
        raise unavailable("the engine is not ready", retry_after=5)


def _check_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    name = unsupported_field(body)
    if name is not None:
        raise bad_request(f"{name} is not supported by this server", param=name, code="unsupported_parameter")


def _check_prompt_logprobs_len(ctx: ServerContext, prompts: list[list[int]]) -> None:
    """Prompt logprobs hold logits for every prompt token (vLLM in one block); their length is capped."""
    limit = ctx.settings.max_prompt_logprobs_tokens
    for i, ids in enumerate(prompts):
        if len(ids) > limit:
            raise bad_request(
                f"echo with logprobs scores at most {limit} prompt tokens on this server (the logits memory grows "
                f"with the prompt; see --max-prompt-logprobs-tokens); this prompt has {len(ids)} tokens",
                param="prompt" if len(prompts) == 1 else f"prompt[{i}]", code="prompt_logprobs_too_long")


def _resolve_max_tokens(ctx: ServerContext, prompt_len: int, max_tokens: int | None, prompt_param: str,
                        max_tokens_param: str = "max_tokens") -> int:
    limit = ctx.engine.max_model_len
    if max_tokens is None:
        if prompt_len >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {prompt_len} "
                "tokens, leaving no room for a completion. Please reduce the length of the prompt.",
                param=prompt_param, code="context_length_exceeded")
        return limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
            "Please reduce the length of the prompt or max_tokens.",
            param=prompt_param if prompt_len >= limit else max_tokens_param, code="context_length_exceeded")
    return max_tokens


def _sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int, choice: int,
              logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    if temperature < GREEDY_EPS:
        temperature = 0.0
    seed = None if body.seed is None else (body.seed + choice) % _SEED_MOD
    top_k = body.top_k or 0
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else float(body.top_p),
        top_k=max(0, top_k),
        seed=seed,
        stop=[s for s in stop if s],
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _spec(ctx: ServerContext, body: CompletionRequest | ChatCompletionRequest,
          request: Request) -> SparseSpec | AutoRequest:
    return resolve_sparse_spec(
        body_pattern=body.sparse_pattern,
        body_ratio=body.compression_ratio,
        xargs=body.vllm_xargs,
        headers=request.headers,
        default_pattern=ctx.settings.default_sparse_pattern,
    )


async def _prepare(ctx: ServerContext, body: CompletionRequest | ChatCompletionRequest,
                   request: Request) -> Prepared:
    _check_accepting(ctx)
    ctx.check_model(body.model)
    _check_unsupported(body)
    spec = _spec(ctx, body, request)
    request.state.sparse_labels = spec_labels(spec)
    is_chat = isinstance(body, ChatCompletionRequest)
    logprobs: int | None
    prompt_logprobs: int | None = None
    if is_chat:
        assert isinstance(body, ChatCompletionRequest)
        if body.echo:
            raise bad_request("echo is not supported on chat completions", param="echo",
                              code="unsupported_parameter")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        check_choices(1, body.n, ctx.settings.max_choices)
        ids = await chat_prompt(ctx, body.messages, body.add_generation_prompt)
        max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        prompts: list[Prompt] = [(ids, None)]
        prompt_param = "messages"
    else:
        assert isinstance(body, CompletionRequest)
        logprobs = body.logprobs
        if body.max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens 0 needs echo (it returns the prompt only)", param="max_tokens")
        prompts = await completion_prompts(ctx, body.prompt, body.n, body.add_special_tokens)
        if body.echo and logprobs is not None:
            prompt_logprobs = logprobs
            _check_prompt_logprobs_len(ctx, [ids for ids, _ in prompts])
        wanted, max_tokens_param, prompt_param = body.max_tokens, "max_tokens", "prompt"
    n = body.n
    kind: Literal["completion", "chat"] = "chat" if is_chat else "completion"
    auto = [ctx.settings.policy().choose(len(ids), spec) for ids, _ in prompts] if isinstance(spec, AutoRequest) \
        else []
    if auto:
        spec = auto[0].spec  # metrics and the access log carry the first prompt's choice
    request.state.sparse_labels = spec_labels(spec)
    response_id = ("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex
    requests: list[GenerationRequest] = []
    echo_texts: list[str] = []
    for p, (ids, text) in enumerate(prompts):
        param = prompt_param if len(prompts) == 1 else f"{prompt_param}[{p}]"
        max_tokens = _resolve_max_tokens(ctx, len(ids), wanted, param, max_tokens_param)
        echo = getattr(body, "echo", False)
        echo_texts.append((text if text is not None else ctx.engine.tokenizer.decode(ids)) if echo else "")
        for j in range(n):
            k = p * n + j
            sampling = _sampling(body, max_tokens, j, logprobs, prompt_logprobs)
            requests.append(GenerationRequest(f"{response_id}-{k}", ids, sampling, auto[p].spec if auto else spec))
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    fields: dict[str, Any] = request.state.log_fields  # the access-log line of this request
    fields.update(kind=kind, sparse_pattern=spec.to_string(), n=n, prompts=len(prompts), stream=body.stream,
                  response_id=response_id)
    for a in auto:  # counted once the request is valid (a context-length 400 above counts nothing)
        ctx.metrics.record_auto_choice(a.spec.prefill.method, a.spec.decode.method)
    if auto:
        fields.update(sparse_auto=auto[0].requested)
    return Prepared(kind, response_id, int(time.time()), spec, [ids for ids, _ in prompts], auto, echo_texts, n,
                    requests, body.stream, include_usage, logprobs, fields, prompt_logprobs)


# -- metrics -------------------------------------------------------------------------------------------


def _recorder(ctx: ServerContext, request: Request, spec: SparseSpec):
    pm, dm = spec_labels(spec)

    def record(st: ChoiceState, status: str) -> None:
        now = time.monotonic()
        out = st.final
        t = out.timings if out is not None else None
        if t is not None and t.arrival:
            first, end = t.first_token, t.finished or now
            ttft = first - t.arrival if first is not None else None
            e2e = end - t.arrival
            queue = t.scheduled - t.arrival if t.scheduled is not None else None
        else:
            first, end = st.first_token_at, now
            ttft = first - st.started_at if first is not None else None
            e2e = end - st.started_at
            queue = None
        tpot = (end - first) / (st.completion_tokens - 1) if first is not None and st.completion_tokens > 1 else None
        ctx.metrics.record_finished(pm, dm, status, st.prompt_tokens, st.completion_tokens, ttft, tpot, e2e, queue,
                                    out.cost if out is not None else None)
        request.state.engine_recorded = True

    return record


# -- response building ---------------------------------------------------------------------------------


_PromptLogprobs = tuple[list[int], list[TokenLogprob | None]]  # prompt token ids and their logprobs


class _CompletionLogprobs:
    def __init__(self, ctx: ServerContext, offset: int):
        self.ctx = ctx
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, lps: list[TokenLogprob], prompt: _PromptLogprobs | None = None) -> dict[str, Any]:
        """Append tokens (a prompt's first); returns the logprobs object of just these (for a stream chunk)."""
        start = len(self.tokens)
        if prompt is not None:
            for token_id, lp in zip(*prompt, strict=True):
                self._append(token_id, lp)
        for lp in lps:
            self._append(lp.token_id, lp)
        return self._slice(start)

    def _append(self, token_id: int, lp: TokenLogprob | None) -> None:
        s = self.ctx.token_str(token_id)
        top = None
        if lp is not None:  # None: a prompt's first token, which nothing predicts (null, as OpenAI and vLLM send)
            top = {self.ctx.token_str(t): v for t, v in lp.top}
            top.setdefault(s, lp.logprob)
        self.tokens.append(s)
        self.token_logprobs.append(None if lp is None else lp.logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(s)

    def _slice(self, start: int) -> dict[str, Any]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}

    def to_dict(self) -> dict[str, Any]:
        return self._slice(0)


class _ChatLogprobs:
    def __init__(self, ctx: ServerContext):
        self.ctx = ctx
        self.content: list[dict[str, Any]] = []

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        s = self.ctx.token_str(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8", errors="replace"))}

    def add(self, lps: list[TokenLogprob], prompt: _PromptLogprobs | None = None) -> dict[str, Any]:
        new = []  # chat has no echo, so never prompt logprobs
        for lp in lps:
            e = self._entry(lp.token_id, lp.logprob)
            e["top_logprobs"] = [self._entry(t, v) for t, v in lp.top]
            new.append(e)
        self.content.extend(new)
        return {"content": new}

    def to_dict(self) -> dict[str, Any]:
        return {"content": self.content}


def _usage(prep: Prepared, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prep.prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finish_reason(out: GenerationOutput) -> str:
    if out.finish_reason == "abort":
        raise unavailable("the request was aborted (the server is shutting down)")
    return out.finish_reason or "stop"


def _new_logprobs(ctx: ServerContext, prep: Prepared, choice: int):
    if prep.logprobs is None:
        return None
    if prep.kind == "chat":
        return _ChatLogprobs(ctx)
    # with prompt logprobs the echoed prompt's own tokens come first, from offset 0
    offset = 0 if prep.prompt_logprobs is not None else len(prep.echo_texts[prep.prompt_of(choice)])
    return _CompletionLogprobs(ctx, offset)


def _add_logprobs(lps, prep: Prepared, choice: int, out: GenerationOutput) -> dict[str, Any] | None:
    """Append a delta's logprobs to its choice's (the prompt's before the first token's); returns just those."""
    if lps is None or not (out.logprobs or out.prompt_logprobs):
        return None
    prompt = None if out.prompt_logprobs is None else (prep.prompts[prep.prompt_of(choice)], out.prompt_logprobs)
    return lps.add(out.logprobs or [], prompt)


def _sparse_report(prep: Prepared, cost: RequestCost, choice: int | None = None) -> dict[str, Any]:
    """The cost report; plus what `auto` chose and why when the request asked for it (the choice's own prompt
    for a per-choice report, the first prompt's for the whole request)."""
    report = cost_report(cost)
    if prep.prompt_logprobs is not None:  # says that the prompt logprobs are this (maybe sparse) prefill's
        report["prefill"]["prompt_logprobs"] = True
    if prep.auto:
        report["auto"] = prep.auto[prep.prompt_of(choice) if choice is not None else 0].to_dict()
    return report


async def _collect(ctx: ServerContext, prep: Prepared, run: GenerationRun) -> dict[str, Any]:
    k = len(prep.requests)
    texts = [""] * k
    finals: list[GenerationOutput | None] = [None] * k
    lps = [_new_logprobs(ctx, prep, i) for i in range(k)]
    async for idx, out in run.events():
        texts[idx] += out.text
        _add_logprobs(lps[idx], prep, idx, out)
        if out.finished:
            finals[idx] = out
    choices = []
    completion_tokens = 0
    costs: list[RequestCost] = []
    for i in range(k):
        out = finals[i]
        assert out is not None
        reason = _finish_reason(out)
        completion_tokens += out.completion_tokens
        costs.append(out.cost or RequestCost())
        lp = lps[i].to_dict() if lps[i] is not None else None  # type: ignore[union-attr]
        if prep.kind == "chat":
            choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": lp,
                            "finish_reason": reason})
        else:
            choices.append({"index": i, "text": prep.echo_texts[prep.prompt_of(i)] + texts[i], "logprobs": lp,
                            "finish_reason": reason})
    if k > 1:
        for i, c in enumerate(choices):
            c["sparse"] = _sparse_report(prep, costs[i], i)
    usage = _usage(prep, completion_tokens)
    prep.log_fields.update(prompt_tokens=usage["prompt_tokens"], completion_tokens=completion_tokens,
                           finish_reasons=sorted({c["finish_reason"] for c in choices}))
    return {
        "id": prep.response_id,
        "object": "chat.completion" if prep.kind == "chat" else "text_completion",
        "created": prep.created,
        "model": ctx.model_name,
        "choices": choices,
        "usage": usage,
        "sparse": _sparse_report(prep, RequestCost.combine(costs)),
    }


async def _stream_events(ctx: ServerContext, prep: Prepared, run: GenerationRun) -> AsyncIterator[bytes]:
    chat = prep.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    k = len(prep.requests)
    lps = [_new_logprobs(ctx, prep, i) for i in range(k)]
    completion_tokens = [0] * k
    costs: list[RequestCost | None] = [None] * k

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        payload: dict[str, Any] = {"id": prep.response_id, "object": obj, "created": prep.created,
                                   "model": ctx.model_name, "choices": choices}
        if prep.include_usage:
            payload["usage"] = None
        payload.update(extra)
        return encode_event(payload)

    def choice(i: int, text: str, lp: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
        if chat:
            delta = {"content": text} if text or reason is None else {}
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}

    try:
        if chat:
            for i in range(k):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        else:
            for i in range(k):
                echo = prep.echo_texts[prep.prompt_of(i)]
                if echo and prep.prompt_logprobs is None:  # else it goes out with its logprobs, after the prefill
                    yield chunk([choice(i, echo, None, None)])
        async for idx, out in run.events():
            completion_tokens[idx] = max(completion_tokens[idx], out.completion_tokens)
            lp = _add_logprobs(lps[idx], prep, idx, out)
            text = out.text if out.prompt_logprobs is None else prep.echo_texts[prep.prompt_of(idx)] + out.text
            if out.finished:
                reason = _finish_reason(out)
                costs[idx] = out.cost or RequestCost()
                yield chunk([choice(idx, text, lp, reason)], sparse=_sparse_report(prep, costs[idx], idx))
            elif text or lp is not None:
                yield chunk([choice(idx, text, lp, None)])
        total = sum(completion_tokens)
        prep.log_fields.update(prompt_tokens=sum(len(p) for p in prep.prompts), completion_tokens=total)
        if prep.include_usage:
            agg = RequestCost.combine([c or RequestCost() for c in costs])
            yield chunk([], usage=_usage(prep, total), sparse=_sparse_report(prep, agg))
        yield DONE
    except APIError as e:
        prep.log_fields.update(stream_error=e.message, stream_error_status=e.status)
        yield encode_event(e.body())
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as e:  # noqa: BLE001 - a fault after the stream started: report it in-band
        logger.exception("stream %s failed", prep.response_id)
        err = APIError(500, f"internal server error: {type(e).__name__}", code="internal_error")
        prep.log_fields.update(stream_error=err.message, stream_error_status=500)
        yield encode_event(err.body())
        yield DONE
    finally:
        await asyncio.shield(run.abort())


async def _serve(ctx: ServerContext, prep: Prepared, request: Request) -> Response:
    run = GenerationRun(ctx.engine, prep.requests, on_finished=_recorder(ctx, request, prep.spec),
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
            return EventStreamResponse(_stream_events(ctx, prep, run), on_disconnect=disconnected)
        body = await run_unless_disconnected(request.receive, _collect(ctx, prep, run), disconnected)
        return JSONResponse(body)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    except APIError as e:
        await asyncio.shield(run.abort())
        if e.status >= 500 and e.status != 503:
            request.state.engine_recorded = True  # the failing engine request was recorded as an error
        raise
    except BaseException:
        await asyncio.shield(run.abort())
        raise


@router.post(
    "/v1/completions",
    response_model=None,
    responses={200: {"model": CompletionResponse, "content": {"text/event-stream": {}}}, **_ERRORS},
    summary="Create a completion (OpenAI-compatible, with sparse attention extensions)",
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    prep = await _prepare(ctx, body, request)
    return await _serve(ctx, prep, request)


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletionResponse, "content": {"text/event-stream": {}}}, **_ERRORS},
    summary="Create a chat completion (OpenAI-compatible, with sparse attention extensions)",
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    prep = await _prepare(ctx, body, request)
    return await _serve(ctx, prep, request)
