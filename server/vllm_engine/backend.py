"""The sparse attention backend: subclasses of vLLM's stock backends that add this project's read-side
sparse methods for the rows of sparse requests and leave everything else to the parent.

* The metadata builder (once per step and KV-cache group) asks :mod:`.worker_state` which rows belong to
  sparse requests (:mod:`.step_plan`) and attaches a ``SparsePlan`` to the parent's metadata (nothing when no row is
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
    ``engine_impl``'s: the paged Triton state on CUDA, the reference elsewhere. The state holds its own copy of
    the tokens each KV head may read (all of them for Quest). See docs/vllm.md for the cost.
  - except on CUDA (:mod:`.cache_decode`): Quest, SnapKV and Ada-SnapKV rows run batched per layer over vLLM's own
    cache (FlashAttention layout), with no copy and no per-row decode state (SnapKV's keep-sets are fixed at the end
    of prefill from the prompt's last queries and the keys read back from the cache); the builder gathers them
    (``SparsePlan.quest`` / ``.keep``) and, unless vLLM runs eager, each layer replays a CUDA graph of their kernels.
    Unless vLLM runs eager, a uniform decode step whose sparse rows are all Quest rows runs them inside vLLM's full
    decode graph instead, over persistent per-row buffers (``SparsePlan.slots``, :mod:`.quest_slots`).
    The CPU backend's cache layout is ISA-specific, so on the CPU every decode row keeps its state.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch.profiler import record_function
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from attention_backends import engine_impl, prepare_decode, sparse_decode, sparse_prefill
from attention_backends.cost import causal_cells
from attention_backends.prefill.common import ChunkNotAligned
from attention_backends.prefill.dense import sdpa
from attention_backends.reports import PrefillCallReport

from . import cache_decode, graph_sizes
from . import worker_state as ws
from .step_plan import SparseRow, make_plan, parent_metadata

log = logging.getLogger("sparse_serve.vllm_engine")


class SparseBuilderMixin:
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        with record_function("sparse_serve::plan"):  # (named in a step profile: step_profile.py)
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
        ws.layer_names(name)
        parent_ms = timer.lap() if timer else 0.0
        out = output.view(query.shape[0], self.num_heads, -1)  # type: ignore[attr-defined]
        with torch.inference_mode(), record_function("sparse_serve::rows"):
            if plan.slots is not None:  # (captured into vLLM's full decode graph: launched rows or not)
                bounds = ws.cache_bounds()
                n, kernels = plan.slots.n, plan.slots.kernels
                if bounds is not None and graph_sizes.QUEST in kernels:
                    ws.QUEST_GRAPH.forward(plan.slots, query[:n], kv_cache, bounds.of(name), out[:n])
                if ws.KEEP_GRAPH is not None and graph_sizes.KEEP in kernels:
                    ws.KEEP_GRAPH.forward(ws.layer_index(name), n, query[:n], kv_cache, plan.slots.block_table,
                                          out[:n])
            for row in plan.prefill:
                self._prefill_row(name, row, query, key, value, kv_cache, out)
            if plan.quest is not None:
                cache_decode.quest_rows_forward(plan.quest, name, query, kv_cache, ws.cache_bounds().of(name), out,
                                                ws.GRAPHS)
            if plan.keep is not None:
                cache_decode.keep_rows_forward(plan.keep, name, query, kv_cache, out, ws.GRAPHS)
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

    def _prefill_row(self, name, row: SparseRow, query, key, value, kv_cache, out) -> None:
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
        if prefill_ends and st.counted_on_device:  # Quest over the cache: its prompt's key bounds, once
            bounds = ws.cache_bounds()
            if bounds is not None:
                cache_decode.prompt_bounds(kv_cache, row.blocks, st.prompt_len, bounds.of(name))
                st.bounds_ready = True
        if st.keeps_over_cache:  # the last `window` queries; at the end, the keep-sets over the cache's keys
            ls.window = cache_decode.keep_window(ls.window, q, int(st.spec.decode.params["window"]))
            if prefill_ends:
                st.keep[name] = cache_decode.fix_keep_set(ls.window, kv_cache, row.blocks, st.spec, st.prompt_len,
                                                          impl)
                ls.window = None
        keeps_state = not st.spec.decode.is_dense and not st.cache_decode  # (cache_decode: reads vLLM's cache)
        if not keeps_state and (phase.is_dense or prefill_ends):
            if ls.window is None:
                st.layers.pop(name, None)
            return
        if keeps_state:
            ls.q.append(q.detach().clone())
        ls.k.append(k.detach().clone())  # (a sparse prefill's later chunks attend to them)
        ls.v.append(v.detach().clone())
        if prefill_ends and keeps_state:  # fix the read-sets / build the page summaries
            qa, ka, va = ws.cat(ls.q), ws.cat(ls.k), ws.cat(ls.v)
            ls.decode = prepare_decode(qa, ka, va, st.spec, impl=impl)  # on CUDA the paged Triton state
            ls.q, ls.k, ls.v = [], [], []

    def _decode_row(self, name, row: SparseRow, query, key, value, out) -> None:
        st = row.state
        if st.fallback is not None or not row.owned or st.cache_decode:  # the parent's output / plan.quest's
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
