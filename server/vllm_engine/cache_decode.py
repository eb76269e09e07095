"""Quest decode rows, batched per layer over vLLM's own paged KV cache (the CUDA backend).

vLLM's FlashAttention cache keeps every KV head of a block together (``kv_cache [blocks, 2, block_size, h_kv, d]``),
a layout the paged kernels of ``attention_backends.kernels`` read directly, so Quest keeps no copy of a request's
cache on this path:

* per layer, the key min/max of every (block, KV head), ``[num_blocks, h_kv, d]`` each (:class:`CacheBounds`:
  allocated once, with the first Quest request, for all layers: 1/``block_size`` of the KV cache);
* per step, the metadata builder gathers the Quest rows into :class:`QuestRows` (their block tables, lengths and
  page budgets; the blocks whose bounds the step must write: each row's current block, and on a row's first
  decode step every block of its prompt);
* per layer, :func:`quest_rows_forward` writes those bounds from the cache (vLLM wrote the step's keys before the
  attention op runs), selects each (row, KV head)'s pages with Quest's kernel (one budget per row) and runs the
  paged attention over them, three Triton launches and no host sync for the whole batch;
* the rows' prompt and total tokens read add up on the device over the layers (``QuestRows.counts``); the step's
  end reads them once for the cost (:func:`step_reports`).

A request reads vLLM's cache this way when its decode method is Quest with pages of vLLM's block size; rows whose
budget is unbounded (``quest:1``) read every page, which is dense attention: vLLM's own kernel runs them. Other
decode methods (SnapKV, Ada-SnapKV: their read-sets are token lists) keep the per-row decode state of
:mod:`.backend`. No vLLM import here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attention_backends import DecodeCallReport, SparseSpec
from attention_backends.decode.quest import budget_pages


@dataclass(frozen=True)
class CacheLayout:
    """What the CUDA builder knows of this worker's KV cache (every attention layer's is alike)."""

    block_size: int
    num_blocks: int
    kv_heads: int  # of this rank
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def bounds(self, layers: int) -> CacheBounds:
        return CacheBounds(layers, self.num_blocks, self.kv_heads, self.head_dim, self.dtype, self.device)


def reads_cache(spec: SparseSpec, block_size: int | None) -> bool:
    """Whether a request of ``spec`` decodes over vLLM's cache (``block_size``: the cache's, None where the backend
    cannot read it)."""
    decode = spec.decode
    return block_size is not None and decode.method == "quest" and int(decode.params["page_size"]) == block_size


def request_budget(spec: SparseSpec, prompt_len: int) -> int | None:
    """Pages a Quest row reads per KV head each step; None: every page (vLLM's kernel attends for it)."""
    return budget_pages(prompt_len, spec.decode)


class CacheBounds:
    """Quest's page summaries over vLLM's blocks: per layer ``(key_min, key_max)`` ``[num_blocks, h_kv, d]``."""

    def __init__(self, layers: int, num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (layers, num_blocks, kv_heads, head_dim)
        self.key_min = torch.empty(shape, dtype=dtype, device=device)  # written before read (quest_rows_forward)
        self.key_max = torch.empty(shape, dtype=dtype, device=device)
        self._index: dict[str, int] = {}

    def of(self, layer: str) -> tuple[Tensor, Tensor]:
        """The bounds of ``layer`` (a layer is given the next free index the first time it asks)."""
        i = self._index.setdefault(layer, len(self._index))
        if i >= self.key_min.shape[0]:
            raise RuntimeError(f"more attention layers than the {self.key_min.shape[0]} Quest bounds were made for")
        return self.key_min[i], self.key_max[i]


@dataclass
class QuestRows:
    """The Quest rows of one step (built by the metadata builder, read by every layer)."""

    states: list[Any]  # each row's request (the backend's ``worker_state.RequestState``), in row order
    tokens: Tensor  # [n] int64: the rows' positions in the step's flattened batch
    tables: Tensor  # [n, P] int32: the rows' block tables, cut to the step's longest row
    lengths: Tensor  # [n, h_kv] int32: tokens in the cache, this step's included
    budgets: Tensor  # [n] int32: pages per KV head
    prompt_lens: Tensor  # [n, h_kv] int32: the prompt's tokens (they come first)
    touched: Tensor  # [m] int32: blocks whose bounds this step writes
    touched_fill: Tensor  # [m] int32: their tokens
    width: int  # the widest budget, a power of two
    block_size: int
    counts: Tensor  # [2, n] int64: prompt and total tokens read, summed over heads and layers (device)
    layers: int = 0  # layers that ran the rows
    element_bytes: int = 2  # of the cache (set by the layers)
    head_dim: int = 0  # (set by the layers)
    host: list[tuple[int, int, int]] = field(default_factory=list)  # per row (seq_len, prompt_len, budget)


def build_quest_rows(states: list[Any], rows: list[tuple[int, int, int, int, int, bool]], block_table: Tensor,
                     kv_heads: int, block_size: int) -> QuestRows:
    """``rows``: per Quest row ``(token, batch row, seq_len, prompt_len, budget, first)`` (``first``: its first
    decode step, so its prompt's blocks get their bounds); ``block_table [num_reqs, max_blocks]``: the step's
    (device). One host-to-device copy."""
    dev = block_table.device
    pages = max(-(-seq // block_size) for _, _, seq, _, _, _ in rows)
    host = torch.tensor([[tok, r, seq, plen, bud] for tok, r, seq, plen, bud, _ in rows], dtype=torch.int64)
    touched = []  # (row index, logical block, tokens)
    for i, (_, _, seq, _, _, first) in enumerate(rows):
        last = (seq - 1) // block_size
        for blk in range(0 if first else last, last + 1):
            touched.append((i, blk, min(block_size, seq - blk * block_size)))
    packed = torch.cat([host.flatten(), torch.tensor(touched, dtype=torch.int64).flatten()])
    if dev.type == "cuda":  # a pageable copy would wait for the stream (the previous step) to drain
        packed = packed.pin_memory()
    packed = packed.to(dev, non_blocking=True)
    n = len(rows)
    dev_rows = packed[: 5 * n].view(n, 5)
    tch = packed[5 * n :].view(-1, 3)
    tables = block_table[dev_rows[:, 1]][:, :pages].to(torch.int32)
    width = 1 << max(0, max(bud for *_, bud, _ in rows) - 1).bit_length()
    return QuestRows(
        states=states,
        tokens=dev_rows[:, 0],
        tables=tables,
        lengths=dev_rows[:, 2:3].expand(n, kv_heads).to(torch.int32).contiguous(),
        budgets=dev_rows[:, 4].to(torch.int32),
        prompt_lens=dev_rows[:, 3:4].expand(n, kv_heads).to(torch.int32).contiguous(),
        touched=tables[tch[:, 0], tch[:, 1]].contiguous(),
        touched_fill=tch[:, 2].to(torch.int32),
        width=min(width, 1 << max(0, pages - 1).bit_length()),
        block_size=block_size,
        counts=torch.zeros(2, n, dtype=torch.int64, device=dev),
        host=[(seq, plen, bud) for _, _, seq, plen, bud, _ in rows],
    )


def quest_rows_forward(rows: QuestRows, query: Tensor, kv_cache: Tensor, bounds: tuple[Tensor, Tensor],
                       out: Tensor) -> None:
    """One layer: write the step's page bounds, select, attend; ``out [tokens, h, d]`` gets the rows' outputs.
    ``kv_cache``: the layer's ``[num_blocks, 2, block_size, h_kv, d]``."""
    from attention_backends.kernels.paged_decode import paged_decode  # Triton: CUDA only
    from attention_backends.kernels.quest_select import cache_page_bounds, quest_select

    k_cache, v_cache = kv_cache.unbind(1)
    key_min, key_max = bounds
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or kv_cache.shape[0] > key_min.shape[0] \
            or kv_cache.shape[2] != rows.block_size:
        raise RuntimeError(f"vLLM's KV cache {tuple(kv_cache.shape)} is not the layout Quest's bounds were made for "
                           f"({key_min.shape[0]} blocks of {rows.block_size} tokens, [blocks, 2, block, heads, dim])")
    cache_page_bounds(k_cache, rows.touched, rows.touched_fill, key_min, key_max)
    q = query[rows.tokens]  # [n, h, d]
    n, h_kv = rows.lengths.shape
    table = rows.tables[:, None, :].expand(n, h_kv, rows.tables.shape[1])
    prompt_read = torch.empty(n, h_kv, dtype=torch.int32, device=q.device)
    sel, sel_len = quest_select(q, key_min, key_max, table, rows.lengths, rows.budgets, rows.block_size,
                                width=rows.width, prompt_kept=rows.prompt_lens, prompt_read=prompt_read,
                                read_counts=rows.counts)
    res = paged_decode(q, k_cache, v_cache, sel, sel_len, max_len=sel.shape[2] * rows.block_size)
    out[rows.tokens] = res.to(out.dtype)
    rows.layers += 1
    rows.element_bytes, rows.head_dim = kv_cache.element_size(), q.shape[-1]


def step_reports(rows: QuestRows) -> list[tuple[Any, DecodeCallReport, int]]:
    """``(request, report, generated tokens a dense step reads)`` per row for the whole step (every layer that ran
    it), from the device counts (read here: one wait for the device per step)."""
    if not rows.layers:
        return []
    counts = rows.counts.tolist()
    kv_heads, head_dim = rows.lengths.shape[1] * rows.layers, rows.head_dim
    reports = []
    for i, (seq, plen, bud) in enumerate(rows.host):
        prompt_read, total = counts[0][i], counts[1][i]
        pages = math.ceil(seq / rows.block_size)
        state = rows.states[i]
        reports.append((state, DecodeCallReport.of_step(
            state.spec.decode, prompt_read=prompt_read, generated_read=total - prompt_read, prompt_len=plen,
            generated=seq - plen, kv_heads=kv_heads, head_dim=head_dim, element_bytes=rows.element_bytes,
            metadata_elements=2 * head_dim * pages * kv_heads, cache_tokens=seq * kv_heads,
            details={"page_size": rows.block_size, "budget": bud * rows.block_size,
                     "pages_selected": min(bud, pages)}), (seq - plen) * kv_heads))
    return reports


def dense_step_report(spec: SparseSpec, seq_len: int, prompt_len: int, kv_heads: int, head_dim: int,
                      element_bytes: int) -> DecodeCallReport:
    """A step of a Quest row that reads every page (unbounded budget: vLLM's kernel attends), over ``kv_heads``
    (every layer's)."""
    return DecodeCallReport.of_step(
        spec.decode, prompt_read=prompt_len * kv_heads, generated_read=(seq_len - prompt_len) * kv_heads,
        prompt_len=prompt_len, generated=seq_len - prompt_len, kv_heads=kv_heads, head_dim=head_dim,
        element_bytes=element_bytes, cache_tokens=seq_len * kv_heads)
