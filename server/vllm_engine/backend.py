"""The sparse attention backend: subclasses of vLLM's stock backends that add this project's read-side
sparse methods for the rows of sparse requests and leave everything else to the parent.

* The metadata builder (once per step and KV-cache group) asks :mod:`.worker_state` which rows belong to
  sparse requests and attaches a :class:`SparsePlan` to the parent's metadata (nothing when no row is
  sparse: the parent's metadata goes out untouched).
* The impl runs the parent kernel for the whole batch (it also writes the paged KV cache), then
  recomputes the rows of sparse requests from the fresh ``query``/``key``/``value`` of the step and
  overwrites them in ``output``:
  - prefill rows (the prompt's chunk): the prefill method (``attention_backends.sparse_prefill``) on the
    chunk's queries against every key so far; the fresh q/k/v are kept until prefill ends;
  - at the end of prefill: ``attention_backends.prepare_decode`` builds the decode state from the fresh
    prompt q/k/v (Quest page min/max, the SnapKV / Ada-SnapKV read-sets, fixed from then on);
  - decode rows: ``attention_backends.sparse_decode`` over that state, which appends the step's fresh key
    and value (Quest updates its last page's bounds from it).
  The paged cache is never read back (its layout is backend- and ISA-specific); the decode state holds its
  own copy of the tokens each KV head may read (all of them for Quest). See docs/vllm.md for the cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from attention_backends import engine_impl, prepare_decode, sparse_decode, sparse_prefill
from attention_backends.cost import causal_cells
from attention_backends.prefill.common import ChunkNotAligned
from attention_backends.prefill_cost import prefill_fallback
from attention_backends.reports import PrefillCallReport

from . import worker_state as ws

log = logging.getLogger("sparse_serve.vllm_engine")


@dataclass
class SparseRow:
    slot: int
    start: int  # first token of the row in the step's flattened batch
    end: int
    context: int  # tokens already in the cache before this step
    state: ws.RequestState


@dataclass
class SparsePlan:
    prefill: list[SparseRow] = field(default_factory=list)
    decode: list[SparseRow] = field(default_factory=list)


def make_plan(common) -> SparsePlan | None:
    """Which rows of this step are sparse, and in which phase. ``None``: every row is dense."""
    if not ws.SLOTS:
        return None
    num_reqs = int(common.num_reqs)
    qsl = common.query_start_loc_cpu[: num_reqs + 1].tolist()
    seq = common.seq_lens_cpu_upper_bound
    seq_lens = (seq if seq is not None else common.seq_lens.cpu())[:num_reqs].tolist()
    req_idx = getattr(common, "req_idx", None)
    plan = SparsePlan()
    for r in range(num_reqs):
        slot = int(req_idx[r]) if req_idx is not None else r
        state = ws.SLOTS.get(slot)
        if state is None or state.fallback is not None:
            continue
        start, end = qsl[r], qsl[r + 1]
        if end <= start:
            continue
        context = int(seq_lens[r]) - (end - start)
        row = SparseRow(slot, start, end, context, state)
        if context < state.prompt_len:
            if context != state.seen:
                state.disable(f"its prompt starts at token {context} (prefix-cache hit); the sparse "
                              "state needs the whole prompt fresh")
                continue
            plan.prefill.append(row)
        else:
            if end - start != 1:
                state.disable("more than one new token per decode step (speculative decoding)")
                continue
            plan.decode.append(row)
    if not plan.prefill and not plan.decode:
        return None
    return plan


class SparseBuilderMixin:
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)  # type: ignore[misc]
        plan = make_plan(common_attn_metadata)
        if plan is not None:
            metadata.sparse_plan = plan
        return metadata


class SparseImplMixin:
    """Overrides ``forward``; everything else (cache writes, validation, the dense kernel) is the parent's."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,  # type: ignore[misc]
                                 *args, **kwargs)
        plan = getattr(attn_metadata, "sparse_plan", None)
        if plan is None:
            return output
        unsupported = self._unsupported()
        if unsupported:
            for row in plan.prefill + plan.decode:
                row.state.disable(unsupported)
            return output
        name = getattr(layer, "layer_name", None) or str(id(layer))
        out = output.view(query.shape[0], self.num_heads, -1)  # type: ignore[attr-defined]
        with torch.inference_mode():
            for row in plan.prefill:
                self._prefill_row(name, row, query, key, value, out)
            for row in plan.decode:
                self._decode_row(name, row, query, key, value, out)
        return output

    def _unsupported(self) -> str | None:
        """The references implement plain causal softmax attention with scale 1/sqrt(d)."""
        head = getattr(self, "head_size", None)
        if head is not None and abs(float(self.scale) - head ** -0.5) > 1e-6:  # type: ignore[attr-defined]
            return f"attention scale {self.scale} is not 1/sqrt({head})"  # type: ignore[attr-defined]
        window = getattr(self, "sliding_window", None)
        if window not in (None, -1, (-1, -1)):
            return "sliding-window attention"
        if getattr(self, "alibi_slopes", None) is not None or getattr(self, "logits_soft_cap", 0):
            return "ALiBi or logit soft-capping"
        if getattr(self, "sinks", None) is not None:
            return "attention sinks (learned)"
        return None

    def _prefill_row(self, name, row: SparseRow, query, key, value, out) -> None:
        st = row.state
        if st.fallback is not None:
            return
        ls = st.layers.setdefault(name, ws.LayerState())
        q = query[row.start:row.end].transpose(0, 1)  # [h, n, d]: this chunk's queries, positions ctx .. ctx+n-1
        k = key[row.start:row.end].transpose(0, 1)
        v = value[row.start:row.end].transpose(0, 1)
        n, ctx = row.end - row.start, row.context
        h, d = q.shape[0], q.shape[2]
        phase, impl = st.spec.prefill, engine_impl(q.device)
        report = None
        if not phase.is_dense:
            # a chunk attends to the earlier chunks' keys too (kept fresh below); docs/methods.md, chunked prefill
            k_all, v_all = (ws.cat(ls.k + [k]), ws.cat(ls.v + [v])) if ctx else (k, v)
            # the dense-fallback rule, asked here so that the parent's dense output stands (sparse_prefill would
            # compute dense attention a second time); its report, or None when the method runs
            report = prefill_fallback(phase, (h, ctx + n, d), q.device, impl, ctx)
            if report is None:
                try:
                    res, report = sparse_prefill(q, k_all, v_all, st.spec, impl=impl, q_offset=ctx)
                    out[row.start:row.end] = res.transpose(0, 1).to(out.dtype)
                except ChunkNotAligned as e:  # vLLM chose where this chunk starts: it runs dense
                    log.warning("request %s: a prefill chunk of its %s runs dense: %s", st.key, phase.method, e)
        if report is None:  # dense (the parent's output stands)
            report = PrefillCallReport.dense(causal_cells(ctx + n, ctx) * h, d)
        st.cost.add_prefill(report)
        st.dirty = True
        st.seen = ctx + n  # per-request tokens; every layer sees the same chunk, so set, not add
        prefill_ends = ctx + n >= st.prompt_len
        if st.spec.decode.is_dense and (phase.is_dense or prefill_ends):
            st.layers.pop(name, None)
            return
        if not st.spec.decode.is_dense:
            ls.q.append(q.detach().clone())
        ls.k.append(k.detach().clone())
        ls.v.append(v.detach().clone())
        if prefill_ends and not st.spec.decode.is_dense:  # fix the read-sets / build the page summaries
            qa, ka, va = ws.cat(ls.q), ws.cat(ls.k), ws.cat(ls.v)
            ls.decode = prepare_decode(qa, ka, va, st.spec)
            ls.q, ls.k, ls.v = [], [], []

    def _decode_row(self, name, row: SparseRow, query, key, value, out) -> None:
        st = row.state
        if st.fallback is not None or st.spec.decode.is_dense:
            return
        ls = st.layers.get(name)
        if ls is None or ls.decode is None:
            st.disable("no decode state for this layer")
            return
        i = row.start
        res, report = sparse_decode(query[i], key[i], value[i], ls.decode)
        out[i] = res.to(out.dtype)
        st.add_decode(report, generated_dense=ls.decode.generated * ls.decode.num_kv_heads)


# ------------------------------------------------------------------------------------------------ CPU
class SparseCPUAttentionMetadataBuilder(SparseBuilderMixin, CPUAttentionMetadataBuilder):
    pass


class SparseCPUAttentionBackendImpl(SparseImplMixin, CPUAttentionBackendImpl):
    pass


class SparseCPUAttentionBackend(CPUAttentionBackend):
    """Registered over ``CPU_ATTN`` (vLLM always picks CPU_ATTN on the CPU)."""

    sparse_serve = True

    @staticmethod
    def get_impl_cls():
        return SparseCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls():
        return SparseCPUAttentionMetadataBuilder
