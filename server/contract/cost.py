"""A request's cost: the one account both engines feed while a request runs, and what the response's ``sparse``
object and the cost metrics report.

Every number is a sum (over layers, decode steps and, for a response with several prompts or choices, over
engine requests), so costs add exactly (:meth:`RequestCost.combine`); each ratio is derived from the sums in
one place (:func:`achieved_ratio`), never stored. The JSON names of the fields belong to the API layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from attention_backends import DecodeCallReport, PrefillCallReport, SparseSpec
from attention_backends.cost import ModelShape, decode_token_flops, prefill_flops


def achieved_ratio(dense_units: float, actual_units: float) -> float:
    """The one definition of an achieved compression ratio: the work dense attention does over the work done
    (1 when nothing was done). Units: causal cells computed (prefill), prompt KV tokens read (decode)."""
    return dense_units / actual_units if actual_units > 0 else 1.0


@dataclass
class PhaseCost:
    """One phase's cost, summed over layers (and, for decode, over steps)."""

    method: str = "dense"
    target_compression_ratio: float = 1.0
    # What the achieved ratio compares (see achieved_ratio). Generated tokens, which every decode method reads
    # in full, are not part of the decode units: they would dilute the ratio of the prompt's compression.
    dense_units: float = 0.0
    actual_units: float = 0.0
    # prefill
    attention_flops: float = 0.0
    dense_attention_flops: float = 0.0
    indexing_flops: float = 0.0
    # decode (K and V of the prompt's and the generated tokens)
    kv_bytes_read: float = 0.0
    dense_kv_bytes_read: float = 0.0
    metadata_bytes_read: float = 0.0
    kv_cache_tokens: int = 0  # resident at the end, summed over layers and KV heads
    # the whole model's FLOPs in this phase (attention, projections, MLP, logits)
    model_flops: float = 0.0
    dense_model_flops: float = 0.0
    # prefill: "dense" when the method would not have paid at the prompt's length and dense attention ran
    # (attention_backends.prefill_cost); for several engine requests, only when every one of them fell back
    fallback: str | None = None

    @property
    def achieved_compression_ratio(self) -> float:
        return achieved_ratio(self.dense_units, self.actual_units)

    def add(self, other: PhaseCost) -> None:
        """Add ``other``'s sums to these (method, target and fallback stay this phase's)."""
        for f in fields(self):
            if f.name not in ("method", "target_compression_ratio", "fallback"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class RequestCost:
    prefill: PhaseCost = field(default_factory=PhaseCost)
    decode: PhaseCost = field(default_factory=PhaseCost)

    @classmethod
    def for_spec(cls, spec: SparseSpec) -> RequestCost:
        """An empty account for a request that runs ``spec``."""
        p, d = spec.prefill, spec.decode
        return cls(PhaseCost(p.method, p.compression_ratio), PhaseCost(d.method, d.compression_ratio))

    @property
    def model_flops(self) -> float:
        return self.prefill.model_flops + self.decode.model_flops

    @property
    def dense_model_flops(self) -> float:
        return self.prefill.dense_model_flops + self.decode.dense_model_flops

    def __post_init__(self) -> None:
        self._pending: list[PrefillCallReport] = []  # reports with device scalars, read at settle()

    # -- feeding, prefill --------------------------------------------------------------------------------
    def add_prefill(self, report: PrefillCallReport) -> None:
        """One layer's prefill attention. A report with device scalars (``report.pending``) waits, unread, for
        :meth:`settle`: reading it here would make every layer wait for the device. Reports after it wait too, so
        they are added in their order (the last chunk's ``fallback`` is the request's)."""
        if report.pending or self._pending:
            self._pending.append(report)
            return
        p = self.prefill
        p.fallback = report.fallback  # the same in every layer of a chunk: the last chunk's stands
        p.dense_units += report.dense_cells
        p.actual_units += report.computed_cells
        p.attention_flops += report.attention_flops
        p.dense_attention_flops += report.dense_attention_flops
        p.indexing_flops += report.indexing_flops

    def settle(self) -> None:
        """Read the pending reports' device scalars (one wait for the device) and add them. The engines call it
        when a prefill ends and before a cost leaves them."""
        pending, self._pending = self._pending, []
        for report in pending:
            self.add_prefill(report.resolved())

    def end_prefill(self, shape: ModelShape, prompt_len: int) -> None:
        """The whole model's prefill FLOPs, once every layer's attention is in."""
        self.settle()
        flops = prefill_flops(shape, prompt_len, computed_cells=self.prefill.actual_units,
                              indexing_flops=self.prefill.indexing_flops)
        self.prefill.model_flops, self.prefill.dense_model_flops = flops.total_actual, flops.total_dense

    # -- feeding, decode ---------------------------------------------------------------------------------
    def add_decode(self, prompt_tokens_read: float, dense_prompt_tokens_read: float, kv_bytes_read: float,
                   dense_kv_bytes_read: float, metadata_bytes_read: float = 0.0) -> None:
        """What decode read in one layer or one whole step: prompt KV tokens (summed over KV heads) for the
        ratio, and the bytes of everything read (prompt and generated tokens, method metadata)."""
        d = self.decode
        d.actual_units += prompt_tokens_read
        d.dense_units += dense_prompt_tokens_read
        d.kv_bytes_read += kv_bytes_read
        d.dense_kv_bytes_read += dense_kv_bytes_read
        d.metadata_bytes_read += metadata_bytes_read

    def add_decode_report(self, report: DecodeCallReport) -> None:
        """One layer's decode step as an ``attention_backends`` decode state reports it."""
        self.add_decode(report.kv_tokens_read, report.dense_kv_tokens_read, report.kv_bytes_read,
                        report.dense_kv_bytes_read, report.metadata_bytes_read)

    def end_decode_step(self, shape: ModelShape, tokens_read: float, dense_tokens_read: float) -> None:
        """The whole model's FLOPs of one decode step that read ``tokens_read`` KV tokens (prompt and generated,
        summed over layers and KV heads) where dense attention reads ``dense_tokens_read``."""
        flops = decode_token_flops(shape, tokens_read, dense_tokens_read)
        self.decode.model_flops += flops.total_actual
        self.decode.dense_model_flops += flops.total_dense

    # -- combining ---------------------------------------------------------------------------------------
    @classmethod
    def combine(cls, costs: Sequence[RequestCost]) -> RequestCost:
        """One cost for several engine requests of one HTTP request: sums added, methods and targets taken
        from the first (one spec per HTTP request); ratios follow from the sums."""
        if len(costs) == 1:
            return costs[0]
        if not costs:
            return cls()
        first = costs[0]
        total = cls(PhaseCost(first.prefill.method, first.prefill.target_compression_ratio),
                    PhaseCost(first.decode.method, first.decode.target_compression_ratio))
        for c in costs:
            total.prefill.add(c.prefill)
            total.decode.add(c.decode)
        if all(c.prefill.fallback == "dense" for c in costs):
            total.prefill.fallback = "dense"
        return total
