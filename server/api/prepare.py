"""A completion or chat request validated completely and turned into engine requests.

Everything is checked (the server accepting work, model, unsupported fields, sparse spec, prompts, context
length) before anything reaches the engine. One HTTP request becomes one engine request per (prompt, choice),
in that order: choice ``k`` is prompt ``k // n``'s choice ``k % n``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request

from attention_backends import SparseSpec
from server.contract.engine import GenerationRequest, SamplingParams
from server.sparse_policy import AutoChoice, AutoRequest

from .context import ServerContext
from .errors import bad_request, unavailable
from .limits import check_choices
from .prompts import Prompt, chat_prompt, completion_prompts
from .request_metrics import GenerationMetrics
from .schemas import ChatCompletionRequest, CompletionRequest, unsupported_field
from .sparse_request import resolve_sparse_spec

GREEDY_EPS = 1e-5  # temperatures below this are greedy (as vLLM does)
_SEED_MOD = 2**63


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

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


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


async def prepare(ctx: ServerContext, body: CompletionRequest | ChatCompletionRequest, request: Request,
                  metrics: GenerationMetrics) -> Prepared:
    """The request checked and turned into engine requests; raises :class:`APIError` (400, 404, 503)."""
    _check_accepting(ctx)
    ctx.check_model(body.model)
    _check_unsupported(body)
    spec = resolve_sparse_spec(body_pattern=body.sparse_pattern, body_ratio=body.compression_ratio,
                               xargs=body.vllm_xargs, headers=request.headers,
                               default_pattern=ctx.settings.default_sparse_pattern)
    metrics.set_spec(spec)
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
        metrics.set_spec(spec)
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
    metrics.auto_chosen(auto)  # once the request is valid (a context-length 400 above counts nothing)
    if auto:
        fields.update(sparse_auto=auto[0].requested)
    return Prepared(kind, response_id, int(time.time()), spec, [ids for ids, _ in prompts], auto, echo_texts, n,
                    requests, body.stream, include_usage, logprobs, fields, prompt_logprobs)
