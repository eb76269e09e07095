"""A request inside the native engine: its cache, sampler, detokenizer, cost totals and timings."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from attention_backends import DecodeReport, PrefillReport, SparseSpec

from .detokenizer import IncrementalDetokenizer
from .sampler import SamplerState
from .sequence_kv import SequenceKV
from .types import (
    GenerationOutput,
    GenerationRequest,
    PhaseCost,
    RequestCost,
    RequestTimings,
    TokenLogprob,
    achieved_ratio,
)


@dataclass
class CostTotals:
    """Running sums of a request's per-layer, per-step reports (turned into a RequestCost at the end)."""

    computed_cells: int = 0
    dense_cells: int = 0
    prefill_attention_flops: float = 0.0
    prefill_dense_attention_flops: float = 0.0
    prefill_indexing_flops: float = 0.0
    prompt_tokens_read: int = 0
    dense_prompt_tokens_read: int = 0
    generated_tokens_read: int = 0
    dense_generated_tokens_read: int = 0
    metadata_elements: int = 0
    decode_indexing_flops: float = 0.0
    decode_steps: int = 0

    def add_prefill(self, r: PrefillReport) -> None:
        self.computed_cells += r.computed_cells
        self.dense_cells += r.dense_cells
        self.prefill_attention_flops += r.attention_flops
        self.prefill_dense_attention_flops += r.dense_attention_flops
        self.prefill_indexing_flops += r.indexing_flops

    def phase_costs(self, spec: SparseSpec, token_bytes: int, metadata_bytes: float, kv_cache_tokens: int
                    ) -> tuple[PhaseCost, PhaseCost]:
        """The request's per-phase cost; ``token_bytes`` is K plus V of one token of one KV head."""
        prefill = PhaseCost(
            method=spec.prefill.method,
            target_compression_ratio=spec.prefill.compression_ratio,
            achieved_compression_ratio=achieved_ratio(self.dense_cells, self.computed_cells),
            dense_units=self.dense_cells,
            actual_units=self.computed_cells,
            attention_flops=self.prefill_attention_flops,
            dense_attention_flops=self.prefill_dense_attention_flops,
            indexing_flops=self.prefill_indexing_flops,
        )
        decode = PhaseCost(
            method=spec.decode.method,
            target_compression_ratio=spec.decode.compression_ratio,
            achieved_compression_ratio=achieved_ratio(self.dense_prompt_tokens_read, self.prompt_tokens_read),
            dense_units=self.dense_prompt_tokens_read,
            actual_units=self.prompt_tokens_read,
            kv_bytes_read=float((self.prompt_tokens_read + self.generated_tokens_read) * token_bytes),
            dense_kv_bytes_read=float((self.dense_prompt_tokens_read + self.dense_generated_tokens_read)
                                      * token_bytes),
            metadata_bytes_read=metadata_bytes,
            kv_cache_tokens=kv_cache_tokens,
        )
        return prefill, decode

    def add_decode(self, r: DecodeReport) -> None:
        self.prompt_tokens_read += r.kv_tokens_read
        self.dense_prompt_tokens_read += r.dense_kv_tokens_read
        self.generated_tokens_read += r.generated_tokens_read


@dataclass
class EngineRequest:
    request: GenerationRequest
    emit: Callable[[GenerationOutput], None]
    sampler: SamplerState
    detok: IncrementalDetokenizer
    kv: SequenceKV | None = None
    output_ids: list[int] = field(default_factory=list)
    totals: CostTotals = field(default_factory=CostTotals)
    timings: RequestTimings = field(default_factory=lambda: RequestTimings(arrival=time.monotonic()))
    cost: RequestCost = field(default_factory=RequestCost)
    aborted: bool = False
    arrival: int = 0  # arrival order, set by the scheduler (preemption takes the youngest)
    prefilled: bool = False  # the cache holds the prompt (set after each prefill, cleared by preemption)
    cached_outputs: int = 0  # generated tokens whose keys/values are in the cache
    _cost_at_preemption: tuple[CostTotals, RequestCost] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # set by the first prefill when requested

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def next_input(self) -> int:
        """The token the next decode step feeds: the last sampled one, or one being recomputed after a resume."""
        return self.output_ids[self.cached_outputs]

    @property
    def next_position(self) -> int:
        return self.prompt_len + self.cached_outputs

    @property
    def samples_next(self) -> bool:
        """Whether the next decode step's logits give a new token (not a token recomputed after a resume)."""
        return self.cached_outputs == len(self.output_ids) - 1

    def preempt(self) -> None:
        """Give the cache back to the pool; the request resumes by recomputing it (prefill of the prompt with its
        own methods and eviction, then its generated tokens through decode steps, as they first ran, so the
        resumed request continues exactly as it would have). Its cost report keeps describing one uninterrupted
        run: the recomputation is the engine's overhead, not the request's."""
        if self.kv is not None:
            self.kv.release()
            self.kv = None
        self.prefilled = False
        self.cached_outputs = 0
        if self.output_ids and self._cost_at_preemption is None:
            self._cost_at_preemption = copy.deepcopy((self.totals, self.cost))

    def catch_up(self) -> None:
        """After a prefill or decode step: once a resumed request's cache is whole again, restore its cost."""
        if self._cost_at_preemption is not None and self.samples_next:
            self.totals, self.cost = self._cost_at_preemption
            self._cost_at_preemption = None

    def phase_costs(self, element_bytes: int, head_dim: int) -> tuple[PhaseCost, PhaseCost]:
        kv_tokens = int(self.kv.lengths.sum()) if self.kv is not None else 0
        return self.totals.phase_costs(self.request.spec, 2 * head_dim * element_bytes,
                                       float(self.totals.metadata_elements * element_bytes), kv_tokens)
