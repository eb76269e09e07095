"""What one attention call cost: the per-call reports the engine sums into a request's ``sparse`` field.
(The client's ``PrefillReport``/``DecodeReport`` are the summed, per-request response objects.)

All counts are for one attention layer of one sequence. ``*_cells`` count query-key products summed over
query heads; ``*_tokens_read`` count KV tokens summed over KV heads (a token read by a KV head serves all
query heads of its GQA group). FLOPs use the convention of :mod:`attention_backends.cost`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .cost import flops_per_cell


def ratio(dense: float, actual: float) -> float:
    """dense / actual, with 1.0 for an empty call (nothing dense either) and inf guarded."""
    if actual <= 0:
        return 1.0 if dense <= 0 else float("inf")
    return dense / actual


def _read(x: Any) -> Any:
    """A device scalar (0-dim tensor) as its Python number; anything else as it is."""
    return x.item() if isinstance(x, torch.Tensor) else x


@dataclass
class PrefillCallReport:
    """One layer's prefill. A sync-free fast path leaves ``computed_cells``, ``attention_flops`` and some
    ``details`` as device scalars (``pending``): the consumer reads them once, when it needs the numbers
    (:meth:`resolved`), so a prefill never waits on the device per layer."""

    method: str
    target_compression_ratio: float
    computed_cells: int  # causal cells the method really computed, summed over query heads
    dense_cells: int  # causal cells of dense attention, summed over query heads
    attention_flops: float
    dense_attention_flops: float
    indexing_flops: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)  # method parameters actually used (k, top_k, ...)
    fallback: str | None = None  # "dense": the method would not pay at this length, dense attention ran instead

    @classmethod
    def dense(cls, cells: int, head_dim: int, method: str = "dense", target_compression_ratio: float = 1.0,
              fallback: str | None = None) -> PrefillCallReport:
        """Dense attention over ``cells`` causal cells (summed over query heads): every cell computed. ``method``
        and ``target_compression_ratio`` are the request's when its method fell back to dense."""
        flops = float(cells * flops_per_cell(head_dim))
        return cls(method, target_compression_ratio, cells, cells, flops, flops, fallback=fallback)

    @property
    def pending(self) -> bool:
        """Whether some numbers are still device scalars (see :meth:`resolved`)."""
        return any(isinstance(x, torch.Tensor)
                   for x in (self.computed_cells, self.attention_flops, *self.details.values()))

    def resolved(self) -> PrefillCallReport:
        """This report with its device scalars read into Python numbers (waits for the device if any)."""
        return replace(self, computed_cells=int(_read(self.computed_cells)),
                       attention_flops=float(_read(self.attention_flops)),
                       details={key: _read(value) for key, value in self.details.items()})

    @property
    def achieved_compression_ratio(self) -> float:
        return ratio(self.dense_cells, self.computed_cells)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "achieved_compression_ratio": self.achieved_compression_ratio}


@dataclass
class DecodeCallReport:
    method: str
    target_compression_ratio: float
    kv_tokens_read: int  # prompt KV tokens read this step, summed over KV heads
    dense_kv_tokens_read: int  # prompt KV tokens a dense step reads, summed over KV heads
    generated_tokens_read: int  # generated tokens read (never evicted; not part of the ratio)
    kv_bytes_read: float  # K and V bytes really read (prompt part + generated part)
    dense_kv_bytes_read: float  # K and V bytes a dense step reads
    metadata_bytes_read: float = 0.0  # method metadata (Quest page min/max)
    kv_cache_tokens: int = 0  # tokens resident in the cache, summed over KV heads
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_step(cls, phase: Any, *, prompt_read: int, generated_read: int, prompt_len: int, generated: int,
                kv_heads: int, head_dim: int, element_bytes: int, metadata_elements: int = 0, cache_tokens: int = 0,
                details: dict[str, Any] | None = None) -> DecodeCallReport:
        """The report of a decode step of ``phase`` (a ``PhaseSpec``) that read ``prompt_read`` prompt and
        ``generated_read`` generated tokens, summed over ``kv_heads`` KV heads (one layer's, or every layer's: the
        counts scale alike), where dense attention reads each head's ``prompt_len`` prompt and ``generated``
        generated tokens (this step's included)."""
        token_bytes = 2 * head_dim * element_bytes  # K and V of one token of one KV head
        return cls(
            method=phase.method,
            target_compression_ratio=phase.compression_ratio,
            kv_tokens_read=prompt_read,
            dense_kv_tokens_read=prompt_len * kv_heads,
            generated_tokens_read=generated_read,
            kv_bytes_read=float((prompt_read + generated_read) * token_bytes),
            dense_kv_bytes_read=float((prompt_len + generated) * kv_heads * token_bytes),
            metadata_bytes_read=float(metadata_elements * element_bytes),
            kv_cache_tokens=cache_tokens,
            details=dict(details or {}),
        )

    @property
    def achieved_compression_ratio(self) -> float:
        return ratio(self.dense_kv_tokens_read, self.kv_tokens_read)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "achieved_compression_ratio": self.achieved_compression_ratio}
