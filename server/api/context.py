"""What the routes share: the engine, the settings, the metrics, the server's lifecycle flags, the worker pool
that tokenizes off the event loop, and the generation requests in flight (which a shutdown may have to cut)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request

from server.contract.engine import Engine
from server.metrics import ServerMetrics
from server.settings import ServerSettings

from .errors import APIError

if TYPE_CHECKING:
    from .generation import GenerationRun

T = TypeVar("T")

# Threads that render chat templates and tokenize. Two: the tokenizers release the GIL, so more threads would
# only compete with the engine for this machine's cores; the pool bounds how much of them one burst can take.
WORKERS = 2
# Characters one token covers at most when the tokenizer has no vocabulary to measure (generous on purpose:
# the bound only rejects prompts that cannot fit the context whatever they tokenize to).
FALLBACK_TOKEN_CHARS = 128


@dataclass
class ServerContext:
    engine: Engine
    settings: ServerSettings
    metrics: ServerMetrics
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # set on SIGTERM: no new work, in-flight requests finish
    open_generations: int = 0  # generation HTTP requests not yet answered in full (streams included)
    runs: set[GenerationRun] = field(default_factory=set, repr=False)  # their engine work
    cutting: bool = False  # set at the shutdown deadline: engine work still starting is cut at once
    _token_strs: dict[int, str] = field(default_factory=dict, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the bounded worker pool, so the event loop keeps serving meanwhile."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="sparse-serve-tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """Characters a prompt that fits the context has at most: each token covers at most as many characters as
        the longest vocabulary entry (byte-level markers such as ``Ġ`` stand for one byte, so this bounds)."""
        tok = self.engine.tokenizer
        get_vocab = getattr(getattr(tok, "hf_tokenizer", tok), "get_vocab", None)
        longest = FALLBACK_TOKEN_CHARS
        if callable(get_vocab):
            try:
                longest = max(map(len, get_vocab()), default=FALLBACK_TOKEN_CHARS)
            except Exception:  # noqa: BLE001 - an unusual tokenizer: keep the generous bound
                pass
        return self.engine.max_model_len * max(1, longest)

    @property
    def vocab_size(self) -> int | None:
        """Token ids must be below this: the model's vocabulary, else the tokenizer's."""
        shape = getattr(self.engine, "shape", None)
        size = getattr(shape, "vocab_size", None)
        if size is None:
            tok = self.engine.tokenizer
            size = getattr(tok, "vocab_size", None)
            if hasattr(tok, "__len__"):
                size = max(size or 0, len(tok))  # type: ignore[arg-type]
        return int(size) if size else None

    def check_model(self, model: str | None) -> None:
        """404 for a model name this server does not serve (None means the served one)."""
        if model is None or model == self.model_name:
            return
        raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                       param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        if ids and set(map(type, ids)) == {int} and min(ids) >= 0 and (vocab is None or max(ids) < vocab):
            return  # all fine, found by loops in C (a body can hold a million ids); else find the culprit:
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab is not None and t >= vocab):
                bound = f"[0, {vocab})" if vocab is not None else "non-negative"
                raise APIError(400, f"token ids must be integers in {bound}, got {t!r}", param=param,
                               code="invalid_token_id")

    def token_str(self, token_id: int) -> str:
        """One token as text (for logprobs), cached."""
        s = self._token_strs.get(token_id)
        if s is None:
            s = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_strs) < 200_000:
                self._token_strs[token_id] = s
        return s


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx
