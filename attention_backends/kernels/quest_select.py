"""Quest page selection in Triton, over the paged cache of :mod:`.paged_decode`.

Metadata layout: ``page_min``/``page_max [num_pages, d]`` (the cache dtype), indexed by the same page ids
as ``k_pages``: the element-wise min/max of the keys a page holds (a page belongs to one KV head); or, over a
cache whose pages hold every KV head (vLLM's, :mod:`.paged_decode`), ``[num_pages, h_kv, d]``.
:func:`cache_page_bounds` writes them from the cache.

Step (no host sync, three launches before the attention):

1. :func:`_quest_scores_kernel` -- ``score(b, j, p) = sum_g sum_d max(q_gd min_pd, q_gd max_pd)``. Because
   ``max(q lo, q hi) = relu(q) hi + min(q, 0) lo``, the sum over the group collapses to two ``d``-vectors
   per (b, j): ``(sum_g relu(q_g)) . max_p + (sum_g min(q_g, 0)) . min_p`` -- the bound reads ``2 d``
   elements per page, once per KV head, whatever ``g``.
2. :func:`_quest_select_kernel` -- exact top-``budget_pages`` per (b, j) with the current (last) page
   forced (:mod:`.topk`'s bisection), written straight as a page table of the selected pages (ascending,
   so the partial last page stays last) plus the token count ``(count - 1) * page + last_page_len``.
3. :func:`.paged_decode.paged_decode` over that table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import steps_by_one
from .paged_decode import num_sms, page_strides, paged_decode
from .topk import _INF_KEY, _bracket, _kth_largest_key, _narrow, _order_key, _probe


@triton.jit
def _row_pages(bh, h_kv, LEN, slen_b, PAGE: tl.constexpr):
    """Row ``bh = b * h_kv + kvh`` of the page tables: ``(b, kvh, tokens, pages)``."""
    b = bh // h_kv
    kvh = bh % h_kv
    length = tl.load(LEN + b * slen_b + kvh)
    return b, kvh, length, tl.cdiv(length, PAGE)


@triton.jit
def _row_budget(BUD, b, sbud, width, npages):
    """Pages the row selects: its budget, at most ``width`` and its page count (0: a row without budget)."""
    return tl.minimum(tl.minimum(tl.load(BUD + b * sbud), width), npages)


@triton.jit
def _quest_scores_kernel(
    Q, PMIN, PMAX, PT, LEN, BUD, S,
    sqb, sqh, smin_p, smin_h, smax_p, smax_h, spt_b, spt_h, slen_b, sbud, s_r,
    h_kv, group, width,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, PB: tl.constexpr, G: tl.constexpr,
):
    # a fixed number of programs per row, each looping over its share of the row's own page blocks: the grid never
    # follows the table's width (vLLM's: the model's whole context), and a row without budget costs one exit
    bh = tl.program_id(0)
    prog = tl.program_id(1)
    nprog = tl.num_programs(1)
    b, kvh, length, npages = _row_pages(bh, h_kv, LEN, slen_b, PAGE)
    kk = _row_budget(BUD, b, sbud, width, npages)
    if (kk > 0) & (prog * PB < npages):
        offs_d = tl.arange(0, HEAD_DIM)
        qpos = tl.zeros([HEAD_DIM], tl.float32)
        qneg = tl.zeros([HEAD_DIM], tl.float32)
        for gi in tl.static_range(G):
            gsafe = tl.minimum(gi, group - 1)
            qg = tl.load(Q + b * sqb + (kvh * group + gsafe) * sqh + offs_d).to(tl.float32)
            qg = tl.where(gi < group, qg, 0.0)  # (a group of 1 is a constexpr on CUDA: no tensor compare there)
            qpos += tl.maximum(qg, 0.0)
            qneg += tl.minimum(qg, 0.0)
        for p0 in range(prog * PB, npages, nprog * PB):
            p = p0 + tl.arange(0, PB)
            live = p < npages
            pid = tl.load(PT + b * spt_b + kvh * spt_h + p, mask=live, other=0).to(tl.int64)
            mn = tl.load(PMIN + kvh * smin_h + pid[:, None] * smin_p + offs_d[None, :], mask=live[:, None],
                         other=0.0).to(tl.float32)
            mx = tl.load(PMAX + kvh * smax_h + pid[:, None] * smax_p + offs_d[None, :], mask=live[:, None],
                         other=0.0).to(tl.float32)
            score = tl.sum(mx * qpos[None, :] + mn * qneg[None, :], 1)
            tl.store(S + bh * s_r + p, score, mask=live)  # the selection reads a row's first npages only


@triton.jit
def _row_keys(S_ROW, j, npages):
    """Order keys of a row's scores at positions ``j``, the current (last) page forced (+inf)."""
    valid = j < npages
    x = tl.load(S_ROW + j, mask=valid, other=0.0)
    return _order_key(tl.where(j == npages - 1, float("inf"), x)), valid


@triton.jit
def _kth_largest_chunked(s_row, npages, kk, CHUNK: tl.constexpr):
    """:func:`.topk._kth_largest_key` over a row of ``npages`` scores read CHUNK at a time (L1/L2 after the first
    pass): the same root search, one pass over the row per step."""
    offs = tl.arange(0, CHUNK)
    lo_v = tl.full([CHUNK], 2147483647, tl.int32)
    hi_v = tl.full([CHUNK], -2147483648, tl.int32)
    inf_v = tl.zeros([CHUNK], tl.int32)
    for c in range(0, npages, CHUNK):
        key, valid = _row_keys(s_row, c + offs, npages)
        lo_v = tl.where(valid, tl.minimum(lo_v, key), lo_v)
        hi_v = tl.where(valid & (key < _INF_KEY), tl.maximum(hi_v, key), hi_v)
        inf_v += (valid & (key >= _INF_KEY)).to(tl.int32)
    lo, hi, f_lo, f_hi = _bracket(tl.min(lo_v, 0), tl.max(hi_v, 0), npages, tl.sum(inf_v, 0), kk)
    side = tl.full([], 0, tl.int32)
    slow = tl.full([], 0, tl.int32)
    while lo < hi:
        mid = _probe(lo, hi, f_lo, f_hi, slow)
        cnt_v = tl.zeros([CHUNK], tl.int32)
        for c in range(0, npages, CHUNK):
            key, valid = _row_keys(s_row, c + offs, npages)
            cnt_v += (valid & (key >= mid.to(tl.int32))).to(tl.int32)
        lo, hi, f_lo, f_hi, side, slow = _narrow(lo, hi, f_lo, f_hi, side, slow, mid, tl.sum(cnt_v, 0), kk)
    return lo


@triton.jit
def _quest_select_kernel(
    S, PT, LEN, BUD, KEPT, OPT, OLEN, OPROMPT, ACC, s_r, spt_b, spt_h, slen_b, sbud, skept_b, so_r, s_acc, h_kv, width,
    PAGE: tl.constexpr, CHUNK: tl.constexpr, COUNT_PROMPT: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    # One program per (row, KV head): the exact top-kk of the row's own pages, so the cost follows the row's pages,
    # not the table's width: a row of up to CHUNK pages is held in registers, a longer one read CHUNK at a time.
    bh = tl.program_id(0)
    b, kvh, length, npages = _row_pages(bh, h_kv, LEN, slen_b, PAGE)
    kk = _row_budget(BUD, b, sbud, width, npages)
    s_row = S + bh * s_r
    offs = tl.arange(0, CHUNK)
    if kk > 0:  # (an empty row returns at once: a full decode graph runs every batch row, most of them not Quest's)
        if npages <= CHUNK:  # the row fits one chunk: held in registers through the search
            key, valid = _row_keys(s_row, offs, npages)
            thr = _kth_largest_key(key, kk, valid).to(tl.int32)
        else:
            thr = _kth_largest_chunked(s_row, npages, kk, CHUNK).to(tl.int32)
        above_v = tl.zeros([CHUNK], tl.int32)
        for c in range(0, npages, CHUNK):
            key, valid = _row_keys(s_row, c + offs, npages)
            above_v += (valid & (key > thr)).to(tl.int32)
        ties_left = kk - tl.sum(above_v, 0)  # entries equal to the threshold that win: the first ones
        written = tl.full([], 0, tl.int32)
        prompt_v = tl.zeros([CHUNK], tl.int32)
        kept = 0
        if COUNT_PROMPT:
            kept = tl.load(KEPT + b * skept_b + kvh)
        for c in range(0, npages, CHUNK):  # the winners' page ids, in position order
            j = c + offs
            key, valid = _row_keys(s_row, j, npages)
            tie = valid & (key == thr)
            tie_rank = tl.cumsum(tie.to(tl.int32), 0)
            sel = (valid & (key > thr)) | (tie & (tie_rank <= ties_left))
            ties_left -= tl.sum(tie.to(tl.int32), 0)
            page_id = tl.load(PT + b * spt_b + kvh * spt_h + j, mask=sel, other=0)
            tl.store(OPT + bh * so_r + written + tl.cumsum(sel.to(tl.int32), 0) - 1, page_id, mask=sel)
            written += tl.sum(sel.to(tl.int32), 0)
            if COUNT_PROMPT:  # prompt tokens among the selected: the head's first KEPT tokens are its prompt's
                prompt_v += tl.where(sel, tl.minimum(tl.maximum(kept - j * PAGE, 0), PAGE), 0)
        last_len = length - (npages - 1) * PAGE
        tokens = (kk - 1) * PAGE + last_len
        tl.store(OLEN + bh, tokens)
        if COUNT_PROMPT:
            prompt_tokens = tl.sum(prompt_v, 0)
            tl.store(OPROMPT + bh, prompt_tokens)
            if ACCUMULATE:  # the row's running (prompt, total) tokens read, summed over heads (and layers)
                tl.atomic_add(ACC + b, prompt_tokens.to(tl.int64))
                tl.atomic_add(ACC + s_acc + b, tokens.to(tl.int64))
    else:
        tl.store(OLEN + bh, 0)
        if COUNT_PROMPT:
            tl.store(OPROMPT + bh, 0)


def _bound_strides(bounds: Tensor, h_kv: int) -> tuple[int, int]:
    """``(page, KV head)`` strides of page bounds ``[P, d]`` (head stride 0) or ``[P, h_kv, d]``."""
    if bounds.dim() == 2:
        return bounds.stride(0), 0
    assert bounds.dim() == 3 and bounds.shape[1] == h_kv and bounds.stride(-1) == 1
    return bounds.stride(0), bounds.stride(1)


@triton.jit
def _cache_page_bounds_kernel(KP, PID, FILL, PMIN, PMAX, skp, skt, skh, smin_p, smin_h, smax_p, smax_h,
                              HEAD_DIM: tl.constexpr, PAGE: tl.constexpr):
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    page = tl.load(PID + i).to(tl.int64)
    fill = tl.load(FILL + i)
    t = tl.arange(0, PAGE)
    offs_d = tl.arange(0, HEAD_DIM)
    live = (t < fill)[:, None]
    k = tl.load(KP + page * skp + kvh * skh + t[:, None] * skt + offs_d[None, :], mask=live, other=0.0)
    lo = tl.min(tl.where(live, k, float("inf")), 0)
    hi = tl.max(tl.where(live, k, float("-inf")), 0)
    write = offs_d < tl.where(fill > 0, HEAD_DIM, 0)  # (a fill of 0 is a padding entry: nothing to write)
    tl.store(PMIN + page * smin_p + kvh * smin_h + offs_d, lo.to(PMIN.dtype.element_ty), mask=write)
    tl.store(PMAX + page * smax_p + kvh * smax_h + offs_d, hi.to(PMAX.dtype.element_ty), mask=write)


def cache_page_bounds(k_pages: Tensor, page_ids: Tensor, fill: Tensor, page_min: Tensor, page_max: Tensor) -> None:
    """Set the bounds of pages ``page_ids [n]`` to the element-wise min/max of their first ``fill [n]`` tokens,
    for every KV head, read from the cache (either layout of :mod:`.paged_decode`; the bounds' layout matches it). An
    entry of fill 0 writes nothing (padding). One launch, no host sync: the vLLM path calls it every step for each
    Quest row's current page (and once for a prompt's pages), after vLLM wrote the step's keys."""
    n = page_ids.numel()
    if n == 0:
        return
    assert page_ids.dim() == 1 and steps_by_one(page_ids, fill)
    h_kv = 1 if k_pages.dim() == 3 else k_pages.shape[2]
    _cache_page_bounds_kernel[(n, h_kv)](
        k_pages, page_ids, fill, page_min, page_max, *page_strides(k_pages, h_kv),
        *_bound_strides(page_min, h_kv), *_bound_strides(page_max, h_kv),
        HEAD_DIM=k_pages.shape[-1], PAGE=k_pages.shape[1])


def _budget_rows(budget_pages: int | Tensor, B: int, device: torch.device) -> Tensor:
    if isinstance(budget_pages, Tensor):
        return budget_pages
    return torch.full((B,), int(budget_pages), dtype=torch.int32, device=device)


def _score_programs(rows: int, max_pages: int, block_pages: int, device: torch.device) -> int:
    """Programs per row of the scores grid: enough to fill the card about four times over at this batch, at most one
    per page block of the widest row the table holds."""
    return max(1, min(triton.cdiv(max_pages, block_pages), triton.cdiv(4 * num_sms(device), rows)))


def quest_page_scores(q: Tensor, page_min: Tensor, page_max: Tensor, page_table: Tensor, lengths: Tensor,
                      page_size: int, *, budget_pages: int | Tensor | None = None, width: int | None = None,
                      block_pages: int = 64, num_warps: int = 4, programs: int | None = None) -> Tensor:
    """``[B * h_kv, max_pages]`` float32 Quest scores (entries past a head's page count are unspecified). With
    ``budget_pages`` (one, or ``[B]`` as in :func:`quest_select`; ``width`` bounds it), a row that selects nothing
    is not scored. ``block_pages`` (pages per step), ``num_warps`` and ``programs`` (per row; default
    :func:`_score_programs`): launch settings, for ``benchmarks/kernel_variants.py``."""
    B, h, d = q.shape
    h_kv, max_pages = page_table.shape[1], page_table.shape[2]
    group = h // h_kv
    budgets = _budget_rows(max_pages if budget_pages is None else budget_pages, B, q.device)
    scores = torch.empty(B * h_kv, max_pages, dtype=torch.float32, device=q.device)
    programs = programs or _score_programs(B * h_kv, max_pages, block_pages, q.device)
    _quest_scores_kernel[(B * h_kv, programs)](
        q, page_min, page_max, page_table, lengths, budgets, scores,
        q.stride(0), q.stride(1), *_bound_strides(page_min, h_kv), *_bound_strides(page_max, h_kv),
        page_table.stride(0), page_table.stride(1), lengths.stride(0), budgets.stride(0), scores.stride(0),
        h_kv, group, max_pages if width is None else width, HEAD_DIM=d, PAGE=page_size, PB=block_pages,
        G=triton.next_power_of_2(group), num_warps=num_warps)
    return scores


# Scores the selection reads per pass: 2048 pages (32K tokens of 16) is one pass; a row of the table's whole width
# (vLLM's: 8320 pages at 133K) four.
SELECT_CHUNK = 2048


def quest_select(q: Tensor, page_min: Tensor, page_max: Tensor, page_table: Tensor, lengths: Tensor,
                 budget_pages: int | Tensor, page_size: int, *, width: int | None = None,
                 prompt_kept: Tensor | None = None, prompt_read: Tensor | None = None,
                 read_counts: Tensor | None = None, scores: Tensor | None = None, num_warps: int | None = None,
                 chunk: int = SELECT_CHUNK) -> tuple[Tensor, Tensor]:
    """Top ``budget_pages`` pages per (sequence, KV head), the last page forced -> ``(table [B, h_kv, width]
    int32 page ids ascending in position, lengths [B, h_kv] int32 tokens to read)``.

    ``budget_pages``: one budget, or one per sequence (``[B]`` int32 on the device; 0 selects nothing, length
    0); ``width`` (default: the budget, which must then be an int) bounds every budget. With ``prompt_kept
    [B, h_kv]`` (each head's prompt tokens, which come first), ``prompt_read [B, h_kv]`` int32 receives the
    prompt tokens among the selected pages, and ``read_counts [2, B]`` int64 (optional, with them) gets each
    row's prompt and total tokens read added. No host sync. ``chunk`` (a power of two) and ``num_warps``: the
    selection's scores per pass and warps (tests and ``benchmarks/kernel_variants.py``)."""
    B, h, d = q.shape
    h_kv, max_pages = page_table.shape[1], page_table.shape[2]
    if width is None:
        width = int(budget_pages)
    budget_pages = _budget_rows(budget_pages, B, q.device)
    k = int(min(width, max_pages))
    if scores is None:  # (given: precomputed page scores, e.g. to time the selection alone)
        scores = quest_page_scores(q, page_min, page_max, page_table, lengths, page_size, budget_pages=budget_pages,
                                   width=k)
    sel = torch.zeros(B, h_kv, k, dtype=torch.int32, device=q.device)
    sel_len = torch.empty(B, h_kv, dtype=torch.int32, device=q.device)
    # the kernels step along a row's pages and heads by 1; rows, and the budgets, go through their strides
    assert steps_by_one(page_table, lengths)
    count_prompt = prompt_kept is not None
    if count_prompt:
        assert prompt_read is not None and prompt_read.is_contiguous() and steps_by_one(prompt_kept)
    accumulate = read_counts is not None
    if accumulate:
        assert count_prompt and read_counts.dtype == torch.int64 and steps_by_one(read_counts)
    chunk = min(chunk, max(16, triton.next_power_of_2(max_pages)))
    warps = num_warps or (4 if chunk <= 1024 else 8)
    _quest_select_kernel[(B * h_kv,)](
        scores, page_table, lengths, budget_pages, prompt_kept if count_prompt else lengths, sel, sel_len,
        prompt_read if count_prompt else sel_len, read_counts if accumulate else sel_len, scores.stride(0),
        page_table.stride(0), page_table.stride(1), lengths.stride(0), budget_pages.stride(0),
        prompt_kept.stride(0) if count_prompt else 0,
        sel.stride(1), read_counts.stride(0) if accumulate else 0, h_kv, k,
        PAGE=page_size, CHUNK=chunk, COUNT_PROMPT=count_prompt, ACCUMULATE=accumulate, num_warps=warps)
    return sel, sel_len


def quest_decode(q: Tensor, k_pages: Tensor, v_pages: Tensor, page_min: Tensor, page_max: Tensor,
                 page_table: Tensor, lengths: Tensor, budget_pages: int, *, out: Tensor | None = None,
                 num_splits: int | None = None) -> Tensor:
    """One Quest decode step over the paged cache (either layout): select, then :func:`paged_decode` -> ``[B, h,
    d]``."""
    page = k_pages.shape[1]
    sel, sel_len = quest_select(q, page_min, page_max, page_table, lengths, budget_pages, page)
    return paged_decode(q, k_pages, v_pages, sel, sel_len, max_len=sel.shape[2] * page, out=out,
                        num_splits=num_splits)


def pool_page_bounds(k_pages: Tensor, page_ids: Tensor, fill: Tensor) -> tuple[Tensor, Tensor]:
    """Min/max of the first ``fill[i]`` tokens of pages ``page_ids[i]`` -> two ``[len(page_ids), d]`` tensors
    (vectorised; for building ``page_min``/``page_max`` when pages fill)."""
    page = k_pages.shape[1]
    keys = k_pages[page_ids.long()]  # [P, page, d]
    live = (torch.arange(page, device=keys.device)[None, :] < fill[:, None])[..., None]
    big = torch.finfo(keys.dtype).max
    return (torch.where(live, keys, keys.new_full((), big)).amin(1),
            torch.where(live, keys, keys.new_full((), -big)).amax(1))
