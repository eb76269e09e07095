"""The sparse attention backend: subclasses of vLLM's stock backends that add this project's read-side
sparse methods for the rows of sparse requests and leave everything else to the parent.

* The metadata builder (once per step and KV-cache group) asks :mod:`.worker_state` which rows belong to
  sparse requests and attaches a :class:`SparsePlan` to the parent's metadata (nothing when no row is
  sparse: the parent's metadata goes out untouched). It also asks the dense-fallback rule of each prefill chunk
  (``attention_backends.prefill_cost``): a chunk the rule runs dense is the parent's, at its kernel's speed.
  The rows whose output this backend writes (a chunk of a sparse prefill method that the rule lets run, a step
  of a sparse decode method) reach the parent with their sequence length cut to one token
  (:func:`parent_metadata`): the parent still writes their keys and values into the paged cache, but its causal
  kernel finds (almost) no key for their queries and skips their attention.
* The impl runs the parent kernel for the whole batch, then computes the rows of sparse requests from the
  fresh ``query``/``key``/``value`` of the step and writes them into ``output``:
  - prefill rows (the prompt's chunk): the prefill method (``attention_backends.sparse_prefill``) on the
    chunk's queries against every key so far, or dense attention over them where the method falls back; the
    fresh q/k/v are kept until prefill ends;
  - at the end of prefill: ``attention_backends.prepare_decode`` builds the decode state from the fresh
    prompt q/k/v (Quest page min/max, the SnapKV / Ada-SnapKV read-sets, fixed from then on);
  - decode rows: ``attention_backends.sparse_decode`` over that state, which appends the step's fresh key
    and value (Quest updates its last page's bounds from it). Like the prefill methods, the state is
    ``engine_impl``'s: the paged Triton state on CUDA (Quest's page selection a kernel), the reference elsewhere.
  The paged cache is never read back (its layout is backend- and ISA-specific); the decode state holds its
  own copy of the tokens each KV head may read (all of them for Quest). See docs/vllm.md for the cost.
"""

from __future__ import annotations

import logging
import os
import time
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
from attention_backends.prefill.dense import sdpa
from attention_backends.prefill_cost import prefill_fallback
from attention_backends.reports import PrefillCallReport

from . import compat
from . import worker_state as ws

log = logging.getLogger("sparse_serve.vllm_engine")


@dataclass
class SparseRow:
    row: int  # attention row of the step
    slot: int
    start: int  # first token of the row in the step's flattened batch
    end: int
    context: int  # tokens already in the cache before this step
    state: ws.RequestState
    fallback: PrefillCallReport | None = None  # a prefill chunk the dense-fallback rule runs dense: its report

    @property
    def owned(self) -> bool:
        """Whether this backend writes the row's output (its phase's method is sparse and, for a prefill chunk, the
        fallback rule lets it run): then the parent need not attend for it."""
        spec = self.state.spec
        if self.context < self.state.prompt_len:
            return not spec.prefill.is_dense and self.fallback is None
        return not spec.decode.is_dense


@dataclass
class SparsePlan:
    seq_lens: list[int]  # every row's sequence length (host upper bound) as vLLM scheduled it
    prefill: list[SparseRow] = field(default_factory=list)
    decode: list[SparseRow] = field(default_factory=list)


def make_plan(common) -> SparsePlan | None:
    """Which rows of this step are sparse, and in which phase. ``None``: every row is dense."""
    if not ws.SLOTS:
        return None
    if ws.UNSUPPORTED is not None:  # an attention layer the methods do not implement: nothing runs sparse
        for state in ws.SLOTS.values():
            state.disable(ws.UNSUPPORTED)
        return None
    num_reqs = int(common.num_reqs)
    qsl = common.query_start_loc_cpu[: num_reqs + 1].tolist()
    seq = common.seq_lens_cpu_upper_bound
    seq_lens = (seq if seq is not None else common.seq_lens.cpu())[:num_reqs].tolist()
    req_idx = getattr(common, "req_idx", None)
    plan = SparsePlan(seq_lens)
    for r in range(num_reqs):
        slot = int(req_idx[r]) if req_idx is not None else r
        state = ws.SLOTS.get(slot)
        if state is None or state.fallback is not None:
            continue
        start, end = qsl[r], qsl[r + 1]
        if end <= start:
            continue
        context = int(seq_lens[r]) - (end - start)
        row = SparseRow(r, slot, start, end, context, state)
        if context < state.prompt_len:
            if context != state.seen:
                state.disable(f"its prompt starts at token {context} (prefix-cache hit); the sparse "
                              "state needs the whole prompt fresh")
                continue
            if ws.HEADS is not None:  # the rule asks about this chunk: queries [context, seq_len) over all keys
                heads, head_dim = ws.HEADS
                row.fallback = prefill_fallback(state.spec.prefill, (heads, int(seq_lens[r]), head_dim),
                                                common.seq_lens.device, engine_impl(common.seq_lens.device), context)
            plan.prefill.append(row)
        else:
            if end - start != 1:
                state.disable("more than one new token per decode step (speculative decoding)")
                continue
            plan.decode.append(row)
    if not plan.prefill and not plan.decode:
        return None
    return plan


def parent_metadata(common, plan: SparsePlan):
    """``common`` with the rows this backend writes (:attr:`SparseRow.owned`) cut to one key: vLLM's kernels align
    the causal mask of a row bottom-right (query ``i`` of ``m`` sees the first ``i + 1 + seq_len - m`` keys), so such
    a row's queries see at most its first key and the kernel skips their tiles (slot_mapping, hence the cache write,
    is untouched). Cut to their query length instead, a whole 128K prompt kept its whole causal square: the parent's
    dense pass stayed (H200, 2026-12-01: 214 ms per layer beside the method's 37)."""
    owned = [row for row in plan.prefill + plan.decode if row.owned]
    if not owned:
        return common
    lens = list(plan.seq_lens)
    for row in owned:
        lens[row.row] = 1
    rows = torch.tensor([row.row for row in owned])
    cut = torch.ones(len(owned), dtype=common.seq_lens.dtype)
    seq_lens = common.seq_lens.clone()
    seq_lens[rows.to(seq_lens.device)] = cut.to(seq_lens.device)
    upper = common.seq_lens_cpu_upper_bound
    if upper is not None:
        upper = upper.clone()
        upper[rows] = cut.to(upper.dtype)
    return compat.with_seq_lens(common, seq_lens, upper, max(lens))


class SparseBuilderMixin:
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        plan = make_plan(common_attn_metadata)
        if plan is not None:
            common_attn_metadata = parent_metadata(common_attn_metadata, plan)
            common_prefix_len = 0  # cascade attention splits every row at the shared prefix, cut rows included
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)  # type: ignore[misc]
        if plan is not None:
            metadata.sparse_plan = plan
        return metadata


TIMING = os.environ.get("SPARSE_SERVE_VLLM_TIMING") == "1"  # log each sparse step's split (synchronises: slow)


class _StepTimer:
    """Wall time between laps, the device synchronised at each (a diagnostic: SPARSE_SERVE_VLLM_TIMING=1)."""

    def __init__(self):
        self._sync()
        self.t = time.perf_counter()

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def lap(self) -> float:
        self._sync()
        t, self.t = self.t, time.perf_counter()
        return (self.t - t) * 1e3


class SparseImplMixin:
    """Overrides ``forward``; everything else (cache writes, validation, the dense kernel) is the parent's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        reason = self._unsupported()
        if reason is not None:  # known before any step is planned, so no row is ever cut for this model
            ws.UNSUPPORTED = reason
        ws.HEADS = (self.num_heads, self.head_size)  # type: ignore[attr-defined]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        plan = getattr(attn_metadata, "sparse_plan", None)
        timer = _StepTimer() if plan is not None and TIMING else None
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,  # type: ignore[misc]
                                 *args, **kwargs)
        if plan is None:
            return output
        name = getattr(layer, "layer_name", None) or str(id(layer))
        parent_ms = timer.lap() if timer else 0.0
        out = output.view(query.shape[0], self.num_heads, -1)  # type: ignore[attr-defined]
        with torch.inference_mode():
            for row in plan.prefill:
                self._prefill_row(name, row, query, key, value, out)
            for row in plan.decode:
                self._decode_row(name, row, query, key, value, out)
        if timer:
            log.warning("%s: parent kernel %.2f ms (max_seq_len %s), sparse rows %.2f ms (%d prefill, %d decode)",
                        name, parent_ms, getattr(attn_metadata, "max_seq_len", "?"), timer.lap(),
                        len(plan.prefill), len(plan.decode))
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
        report = row.fallback  # the rule ran this chunk dense: the parent's output stands
        if row.owned:  # a sparse prefill phase: the parent did not attend for this row (parent_metadata)
            # a chunk attends to the earlier chunks' keys too (kept fresh below); docs/methods.md, chunked prefill
            k_all, v_all = (ws.cat(ls.k + [k]), ws.cat(ls.v + [v])) if ctx else (k, v)
            try:  # the method (the rule, asked again with these shapes, agrees with the plan's)
                res, report = sparse_prefill(q, k_all, v_all, st.spec, impl=impl, q_offset=ctx, defer=True)
            except ChunkNotAligned as e:  # vLLM chose where this chunk starts: it runs dense
                log.warning("request %s: a prefill chunk of its %s runs dense: %s", st.key, phase.method, e)
                res = sdpa(q, k_all, v_all, ctx)
            out[row.start:row.end] = res.transpose(0, 1).to(out.dtype)
        if report is None:  # dense (a dense prefill phase: the parent's output stands)
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
            ls.decode = prepare_decode(qa, ka, va, st.spec, impl=impl)  # on CUDA the paged Triton state
            ls.q, ls.k, ls.v = [], [], []

    def _decode_row(self, name, row: SparseRow, query, key, value, out) -> None:
        st = row.state
        if st.fallback is not None or not row.owned:  # a dense decode phase: the parent's output stands
            return
        ls = st.layers.get(name)
        if ls is None or ls.decode is None:  # the parent did not attend for this row: no output to fall back on
            raise RuntimeError(f"sparse request {st.key}: no decode state for layer {name} after its prefill")
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
