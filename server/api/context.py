"""What the routes share: the engine, the settings, the metrics and the server's lifecycle flags."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from attention_backends import SparseSpec
from server.engine.types import Engine
from server.metrics import ServerMetrics
from server.settings import ServerSettings

from .errors import APIError


@dataclass
class ServerContext:
    engine: Engine
    settings: ServerSettings
    metrics: ServerMetrics
    model_name: str
    default_spec: SparseSpec
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # set on SIGTERM: no new work, in-flight requests finish
    _token_strs: dict[int, str] = field(default_factory=dict, repr=False)

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
