"""Shared helpers for tests that drive the native engine directly."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from attention_backends import parse_pattern
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)
    final: GenerationOutput | None = None


async def collect(engine, request: GenerationRequest) -> Result:
    res = Result()
    async for out in engine.generate(request):
        res.token_ids += out.token_ids
        res.text += out.text
        res.logprobs += out.logprobs or []
        if out.finished:
            res.final = out
    return res


def make_request(rid: str, ids: list[int], pattern: str = "dense", **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(rid, list(ids), SamplingParams(**sampling), parse_pattern(pattern))


def run(coro):
    return asyncio.run(coro)
