"""The engine's outputs of one request as the OpenAI response: one JSON body, or one SSE stream.

Choices carry their text, logprobs (completion or chat shape) and finish reason; ``usage`` and the ``sparse``
cost report come with the body, or with the stream's last event (and each choice's finishing chunk).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from server.contract.cost import RequestCost
from server.contract.engine import GenerationOutput, TokenLogprob

from .context import ServerContext
from .cost_report import cost_report
from .errors import APIError, unavailable
from .generation import GenerationRun
from .prepare import Prepared
from .sse import DONE, encode_event

logger = logging.getLogger("sparse_serve.api")

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
    return {"prompt_tokens": prep.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prep.prompt_tokens + completion_tokens}


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


async def collect_body(ctx: ServerContext, prep: Prepared, run: GenerationRun) -> dict[str, Any]:
    """The JSON response, once every choice finished."""
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


async def stream_events(ctx: ServerContext, prep: Prepared, run: GenerationRun) -> AsyncIterator[bytes]:
    """The SSE events, as the engine produces them; a failure after the stream started is an error event."""
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
        prep.log_fields.update(prompt_tokens=prep.prompt_tokens, completion_tokens=total)
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

