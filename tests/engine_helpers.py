"""Shared helpers for tests that drive the native engine directly."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from attention_backends import parse_pattern
from server.contract.engine import GenerationOutput, GenerationRequest, SamplingParams
from server.engine.engine import EngineOptions, NativeEngine
from server.engine.llama import LlamaModel
from server.engine.model_config import ModelConfig
from server.engine.page_pool import page_bytes


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    final: GenerationOutput | None = None


async def collect(engine, request: GenerationRequest) -> Result:
    res = Result()
    async for out in engine.generate(request):
        res.token_ids += out.token_ids
        res.text += out.text
        res.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            assert res.prompt_logprobs is None, "prompt logprobs come once"
            res.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            res.final = out
    return res


def make_request(rid: str, ids: list[int], pattern: str = "dense", **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(rid, list(ids), SamplingParams(**sampling), parse_pattern(pattern))


def run(coro):
    return asyncio.run(coro)


async def with_engine(engine, body):
    """Start ``engine``, run ``await body(engine)``, and shut the engine down whatever happens."""
    await engine.start()
    try:
        return await body(engine)
    finally:
        await engine.shutdown(timeout=5)


class ByteTokenizer:
    """Token i is the character chr(32 + i % 90): enough for the engine's detokenizer and stop checks."""

    eos_token_id = None
    stop_token_ids: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i % 90) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return "".join(m["content"] for m in messages)


TINY_CONFIG = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64, intermediate_size=128,
                   vocab_size=96, max_position_embeddings=512, name="tiny")


def tiny_model(**config) -> LlamaModel:
    """A 2-layer random Llama (fast on the CPU; its greedy tokens vary and depend on every cached key)."""
    model = LlamaModel(ModelConfig(**{**TINY_CONFIG, **config}), device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.2 * torch.randn(p.shape, generator=g))
    return model


def tiny_engine(model: LlamaModel, pages: int | None = None, **options) -> NativeEngine:
    """A native engine on ``model`` with a ByteTokenizer; ``pages``: the KV pool's exact size in pages."""
    if pages is not None:
        options["kv_cache_memory"] = pages * page_bytes(options.get("page_size", 16), model.config.head_dim,
                                                        torch.float32)
    return NativeEngine(model, ByteTokenizer(), EngineOptions(device="cpu", dtype="float32", **options), "tiny")
