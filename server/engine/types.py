"""The engine interface shared by the native engine, the vLLM adapter and the HTTP layer.

An engine takes a :class:`GenerationRequest` (token ids, sampling parameters, a validated ``SparseSpec``)
and yields :class:`GenerationOutput` deltas until one has ``finished=True``; the final delta carries the
request's :class:`RequestCost`, the source of the response's ``sparse`` field and of the cost metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sized
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from attention_backends import DENSE, SparseSpec

FinishReason = Literal["stop", "length", "abort", "error"]


class EngineOverloaded(Exception):
    """The waiting queue is full; the server answers 429/503 with ``Retry-After``."""

    def __init__(self, message: str = "the server is overloaded; retry later", retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class RequestRejected(ValueError):
    """A request the engine cannot serve at all (e.g. prompt + max_tokens over the context length)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class SamplingParams:
    max_tokens: int = 16  # 0 (with prompt_logprobs) = score the prompt only, generate nothing
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings; the matched string is not returned
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives per token (0..5); None = no logprobs
    # the same for each prompt token (echo with logprobs); computed by the request's own (sparse) prefill
    prompt_logprobs: int | None = None


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    spec: SparseSpec = DENSE


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


def achieved_ratio(dense_units: float, actual_units: float) -> float:
    """The one definition of an achieved compression ratio: the work dense attention does over the work done
    (1 when nothing was done). Units: causal cells computed (prefill), prompt KV tokens read (decode)."""
    return dense_units / actual_units if actual_units > 0 else 1.0


@dataclass
class PhaseCost:
    """A phase's cost summed over layers (and, for decode, over steps)."""

    method: str = "dense"
    target_compression_ratio: float = 1.0
    achieved_compression_ratio: float = 1.0  # achieved_ratio(dense_units, actual_units)
    # What the achieved ratio compares (see achieved_ratio); additive, so several requests combine exactly.
    # Not part of the response's ``sparse`` object.
    dense_units: float = 0.0
    actual_units: float = 0.0
    # prefill
    attention_flops: float = 0.0
    dense_attention_flops: float = 0.0
    indexing_flops: float = 0.0
    # decode
    kv_bytes_read: float = 0.0
    dense_kv_bytes_read: float = 0.0
    metadata_bytes_read: float = 0.0
    kv_cache_tokens: int = 0


@dataclass
class RequestCost:
    prefill: PhaseCost = field(default_factory=PhaseCost)
    decode: PhaseCost = field(default_factory=PhaseCost)
    model_flops: float = 0.0
    dense_model_flops: float = 0.0
    # The same model FLOPs split by phase (prefill + decode == the totals above); the Prometheus
    # ``model_flops_total{phase}`` counter reads these. The response's ``sparse`` object keeps only the totals.
    prefill_model_flops: float = 0.0
    dense_prefill_model_flops: float = 0.0
    decode_model_flops: float = 0.0
    dense_decode_model_flops: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The response's ``sparse`` object, exactly as ``docs/api.md`` names its fields."""
        p, d = self.prefill, self.decode
        return {
            "prefill": {
                "method": p.method,
                "target_compression_ratio": p.target_compression_ratio,
                "achieved_compression_ratio": p.achieved_compression_ratio,
                "attention_flops": p.attention_flops,
                "dense_attention_flops": p.dense_attention_flops,
                "indexing_flops": p.indexing_flops,
            },
            "decode": {
                "method": d.method,
                "target_compression_ratio": d.target_compression_ratio,
                "achieved_compression_ratio": d.achieved_compression_ratio,
                "kv_bytes_read": d.kv_bytes_read,
                "dense_kv_bytes_read": d.dense_kv_bytes_read,
                "metadata_bytes_read": d.metadata_bytes_read,
                "kv_cache_tokens": d.kv_cache_tokens,
            },
            "model_flops": self.model_flops,
            "dense_model_flops": self.dense_model_flops,
        }


@dataclass
class RequestTimings:
    arrival: float = 0.0  # time.monotonic() when the engine received it
    scheduled: float | None = None  # admitted (left the waiting queue)
    first_token: float | None = None
    finished: float | None = None


@dataclass
class GenerationOutput:
    """One delta of a request's generation. ``text`` is the new text only (stop strings removed)."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    cost: RequestCost | None = None  # set on the final delta
    timings: RequestTimings | None = None  # set on the final delta
    error: str | None = None  # set when finish_reason == "error"
    # on the first delta when SamplingParams.prompt_logprobs is set: one entry per prompt token, the first None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV pages in use, 0..1
    free_pages: int
    total_pages: int


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str: ...


async def wait_drained(requests: Sized, timeout: float) -> None:
    """Graceful shutdown's first half, for either engine: wait until ``requests`` (the in-flight table) is
    empty or ``timeout`` seconds have passed; the caller then aborts what is left."""
    deadline = time.monotonic() + timeout
    while len(requests) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


class Engine(Protocol):
    """What the HTTP layer needs from an engine (native or vLLM)."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer

    async def start(self) -> None: ...
    async def shutdown(self, timeout: float = 30.0) -> None: ...
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]: ...
    async def abort(self, request_id: str) -> None: ...
    def stats(self) -> EngineStats: ...
    def ready(self) -> bool: ...
