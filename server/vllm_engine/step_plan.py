"""Which rows of a vLLM step this project's backend runs (the metadata builder's half of :mod:`.backend`), and the
metadata vLLM's own kernel gets for the rest. No vLLM import here (the CPU tests plan steps without vLLM).

Per step and KV-cache group, :func:`make_plan` asks :mod:`.worker_state` which rows belong to sparse requests:
the prefill chunks of sparse prefill methods (unless the dense-fallback rule runs the chunk dense), the decode
rows of sparse decode methods, kept in per-row decode states, and the Quest rows that read vLLM's cache
(:mod:`.cache_decode`), gathered into one batch. :func:`parent_metadata` cuts the rows this backend writes to one
key for vLLM's kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attention_backends import engine_impl
from attention_backends.prefill_cost import prefill_fallback
from attention_backends.reports import PrefillCallReport

from . import cache_decode, compat, graph_sizes, step_profile
from . import worker_state as ws
from .quest_slots import SlotStep


@dataclass
class SparseRow:
    row: int  # attention row of the step
    slot: int
    start: int  # first token of the row in the step's flattened batch
    end: int
    context: int  # tokens already in the cache before this step
    state: ws.RequestState
    fallback: PrefillCallReport | None = None  # a prefill chunk the dense-fallback rule runs dense: its report
    blocks: torch.Tensor | None = None  # the row's block table (a prefill row whose keep-sets read vLLM's cache)

    @property
    def owned(self) -> bool:
        """Whether this backend writes the row's output (its phase's method is sparse and, for a prefill chunk, the
        fallback rule lets it run; a Quest row over vLLM's cache that reads every page is dense attention): then the
        parent need not attend for it."""
        st = self.state
        if self.context < st.prompt_len:
            return not st.spec.prefill.is_dense and self.fallback is None
        return not st.spec.decode.is_dense and not st.reads_every_page


@dataclass
class SparsePlan:
    seq_lens: list[int]  # every row's sequence length (host upper bound) as vLLM scheduled it
    prefill: list[SparseRow] = field(default_factory=list)
    decode: list[SparseRow] = field(default_factory=list)  # rows of per-row decode states
    quest: cache_decode.QuestRows | None = None  # Quest rows over vLLM's cache, batched
    keep: cache_decode.KeepRows | None = None  # SnapKV / Ada-SnapKV rows over vLLM's cache, batched
    slots: SlotStep | None = None  # a uniform decode step over the full graph's buffers (:mod:`.quest_slots`)


def make_plan(common) -> SparsePlan | None:
    """Which rows of this step are sparse, and in which phase. ``None``: every row is dense and vLLM's kernel gets
    its metadata untouched. A uniform decode step (one token a row) where the CUDA backend keeps Quest's graph
    buffers (:data:`.worker_state.QUEST_GRAPH`) always gets a plan: vLLM's full decode graph reads those buffers,
    so they are written every such step, sparse rows or not (except at a dense step's own graph size:
    :mod:`.graph_sizes`). At a size whose graph holds only some kernels, a row whose kernel it lacks runs dense that
    step (the dispatcher picked the size from the same requests, so this is a guard, not a path)."""
    uniform_decode = int(common.max_query_len) == 1
    step_profile.step_built(uniform_decode)
    graph = ws.QUEST_GRAPH if ws.QUEST_GRAPH is not None and uniform_decode else None
    if graph is not None and not ws.step_kernels(int(common.num_reqs)):
        graph = None  # a dense step's own graph size (.graph_sizes): its graph holds no sparse kernel
    if not ws.SLOTS or ws.UNSUPPORTED is not None:
        if ws.UNSUPPORTED is not None:  # an attention layer the methods do not implement: nothing runs sparse
            for state in ws.SLOTS.values():
                state.disable(ws.UNSUPPORTED)
        return _slot_plan(common, SparsePlan(_seq_lens(common))) if graph is not None else None
    num_reqs = int(common.num_reqs)
    qsl = common.query_start_loc_cpu[: num_reqs + 1].tolist()
    seq_lens = _seq_lens(common)
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
            if state.cache_decode and context + (end - start) >= state.prompt_len:  # the prompt's blocks: keep-sets
                row.blocks = common.block_table_tensor[r]  # read its keys back, Quest writes their bounds
            plan.prefill.append(row)
        else:
            if end - start != 1:
                state.disable("more than one new token per decode step (speculative decoding)")
                continue
            plan.decode.append(row)
    if graph is not None and not plan.prefill and all(ws.in_full_graph(row.state) for row in plan.decode):
        return _slot_plan(common, plan)
    _gather_cache_rows(common, plan)
    if not plan.prefill and not plan.decode:
        return None
    return plan


def _seq_lens(common) -> list[int]:
    """Every row's sequence length (a host upper bound) as vLLM scheduled it."""
    seq = common.seq_lens_cpu_upper_bound
    return (seq if seq is not None else common.seq_lens.cpu())[: int(common.num_reqs)].tolist()


def _host_report(st, prompt_read: int | None, seq: int) -> None:
    """A decode step whose reads are known on the host: SnapKV / Ada-SnapKV (``prompt_read``: its kept tokens), or a
    Quest row that reads every page (None: the whole prompt in every layer's KV heads)."""
    layout = ws.CACHE
    heads = layout.kv_heads * ws.layers()  # a step's reports count every layer's KV heads
    if prompt_read is None:
        prompt_read = st.prompt_len * heads
    st.add_decode(cache_decode.host_step_report(st.spec, prompt_read, seq, st.prompt_len, heads, layout.head_dim,
                                                layout.dtype.itemsize), (seq - st.prompt_len) * heads)


def _slot_plan(common, plan: SparsePlan) -> SparsePlan:
    """A uniform decode step whose sparse rows all run inside its full decode graph: Quest rows over vLLM's cache
    (:mod:`.quest_slots`) and, where the graph holds them, SnapKV / Ada-SnapKV rows (:mod:`.keep_slots`, their
    reports written here). Their per-row values go into the graph's buffers; a row whose kernel this step's graph
    lacks (:func:`.worker_state.step_kernels`) keeps its length, so vLLM's kernel attends densely for it."""
    graph, layout = ws.QUEST_GRAPH, ws.CACHE
    n = int(common.num_reqs)
    step = SlotStep(graph, n, common.block_table_tensor[:n], layers=ws.layers(), head_dim=layout.head_dim,
                    element_bytes=layout.dtype.itemsize, block_size=layout.block_size, kernels=ws.step_kernels(n))
    rows, keep = [], []
    for row in plan.decode:
        st, seq = row.state, row.context + 1
        if st.spec.decode.is_dense:  # (a sparse prefill's decode: vLLM's kernel)
            continue
        kernel = graph_sizes.KEEP if st.keeps_over_cache else graph_sizes.QUEST
        if st.reads_every_page or kernel not in step.kernels:  # dense attention, vLLM's kernel
            _host_report(st, None, seq)
            continue
        if st.keeps_over_cache:
            stack = cache_decode.stacked_keep(st, ws.layer_names())
            keep.append((row.row, stack, seq, st.prompt_len))
            step.keep.append(row.row)
            _host_report(st, stack.total, seq)
            continue
        rows.append((row.row, st.prompt_len, st.budget))
        step.states.append(st)
        step.index.append(row.row)
        step.host.append((seq, st.prompt_len, st.budget))
    graph.fill(common.seq_lens[:n], step.block_table, rows, cut=step.keep)
    if ws.KEEP_GRAPH is not None and graph_sizes.KEEP in step.kernels:
        ws.KEEP_GRAPH.fill(n, keep)
    if step.index:
        ws.PENDING.append(step)
    plan.slots = step
    return plan


def _gather_cache_rows(common, plan: SparsePlan) -> None:
    """Move the decode rows that read vLLM's cache out of ``plan.decode``: the SnapKV / Ada-SnapKV rows become
    ``plan.keep``; of the Quest rows, those the parent runs (every page read: their report is known here) stay and
    the others become ``plan.quest``. Without room for Quest's bounds its rows run dense."""
    cache_rows = [row for row in plan.decode if row.state.cache_decode]
    if not cache_rows:
        return
    plan.decode = [row for row in plan.decode if not row.state.cache_decode]
    layout = ws.CACHE
    assert layout is not None  # (cache_decode is set only where the CUDA builder told the layout)

    keep = [row for row in cache_rows if row.state.keeps_over_cache]
    if keep:
        plan.keep = cache_decode.build_keep_rows(
            [row.state for row in keep], [(row.start, row.row, row.context + 1, row.state.prompt_len) for row in keep],
            common.block_table_tensor, ws.layer_names(), layout.block_size, _bucket(len(keep)))
        for row in keep:
            _host_report(row.state, row.state.keep_stack.total, row.context + 1)
        plan.decode += keep  # (owned: parent_metadata cuts them; _decode_row leaves them to plan.keep)
    cache_rows = [row for row in cache_rows if not row.state.keeps_over_cache]
    if not cache_rows:
        return
    if ws.cache_bounds() is None:
        for row in cache_rows:
            row.state.disable("no room for Quest's page bounds beside vLLM's KV cache")
        return
    quest = []
    for row in cache_rows:
        if row.state.reads_every_page:  # dense attention, vLLM's kernel (row.owned is False)
            _host_report(row.state, None, row.context + 1)
            continue
        if not row.state.bounds_ready:  # (written when its prefill ended: backend.py; never expected here)
            row.state.disable("its prompt's page bounds were not written when its prefill ended")
            continue
        quest.append(row)
    if quest:
        plan.quest = cache_decode.build_quest_rows(
            [row.state for row in quest],
            [(row.start, row.row, row.context + 1, row.state.prompt_len, row.state.budget) for row in quest],
            common.block_table_tensor, layout.kv_heads, layout.block_size, _bucket(len(quest)))
        plan.decode += quest  # (for parent_metadata: they are owned; _decode_row leaves them to plan.quest)
        ws.PENDING.append(plan.quest)


def parent_metadata(common, plan: SparsePlan):
    """``common`` with the rows this backend writes (:attr:`SparseRow.owned`) cut to one key: vLLM's kernels align
    the causal mask of a row bottom-right (query ``i`` of ``m`` sees the first ``i + 1 + seq_len - m`` keys), so such
    a row's queries see at most its first key and the kernel skips their tiles (slot_mapping, hence the cache write,
    is untouched). Cut to their query length instead, a whole 128K prompt kept its whole causal square: the parent's
    dense pass stayed (H200, 2026-12-01: 214 ms per layer beside the method's 37)."""
    if plan.slots is not None:  # the graph's buffer: vLLM's full graph reads the lengths from there
        return _slot_metadata(common, plan)
    owned = [row for row in plan.prefill + plan.decode if row.owned]
    if not owned:
        return common
    lens = list(plan.seq_lens)
    for row in owned:
        lens[row.row] = 1
    rows = [row.row for row in owned]
    seq_lens = common.seq_lens.clone()
    seq_lens.index_fill_(0, cache_decode.to_device(torch.tensor(rows), seq_lens.device), 1)
    return compat.with_seq_lens(common, seq_lens, _cut_upper(common, rows), max(lens))


def _cut_upper(common, rows: list[int]):
    """vLLM's host upper bound of the sequence lengths with ``rows`` cut to one key (a copy; None stays None)."""
    upper = common.seq_lens_cpu_upper_bound
    if upper is None or not rows:
        return upper
    upper = upper.clone()
    upper[rows] = 1
    return upper


def _slot_metadata(common, plan: SparsePlan):
    """``common`` with ``seq_cut`` (:class:`.quest_slots.QuestSlots`) as its sequence lengths, and vLLM's longest
    sequence kept (a full graph was captured for ``max_model_len``; the kernel's schedule is built from the real
    lengths)."""
    step = plan.slots
    return compat.with_seq_lens(common, ws.QUEST_GRAPH.seq_cut[: step.n], _cut_upper(common, step.cut),
                                int(common.max_seq_len))


def _bucket(rows: int) -> int | None:
    """Rows in all, padding included, under the CUDA backend's row graphs (None: no graphs, no padding)."""
    return None if ws.GRAPHS is None else ws.GRAPHS.bucket(rows)
