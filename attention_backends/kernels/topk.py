"""Row-wise exact top-k in Triton for rows that fit one program (up to a few thousand entries).

One program per row. The float32 scores are mapped to order-preserving int32 keys, the k-th largest key is
found by a bracketed root search on the key space (interpolation with the Illinois rule, halving when it
stalls; one compare-and-count over the row held in registers per step, stopping once exactly k keys lie above), and the
winners -- every entry above the threshold plus the first entries equal to it, in index order -- are written
as *ascending* indices through a prefix sum. No sort, no host sync, one launch.

Used by block_sparse (per query block: its causal key blocks, forced ones at +inf) and Quest (per
(sequence, KV head): its pages, the current page at +inf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import steps_by_one


@triton.jit
def _order_key(x):
    x = tl.where(x == 0, 0.0, x)  # -0.0 ties with +0.0, as in torch.topk
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _kth_largest_key(key, kk, valid):
    """Largest int32 t with #(key >= t) >= kk (1 <= kk <= #valid), as int64, or a t with exactly kk keys
    ``>= t`` (the same selection). A bracketed root search for #(key >= t) = kk on the key space, between the
    row's min and its largest finite key (+inf keys, the forced entries, start above the bracket): each step
    interpolates linearly in the key (log-like in the value, so it copes with wide and heavy-tailed scores)
    with the Illinois rule (the end kept twice in a row has its weight halved), and halves the bracket after
    two steps that did not. One compare-and-count (a block-wide reduction) per step, stopping as soon as
    exactly kk keys are ``>= t``. It beats plain bisection (benchmarks/results/kernel-tuning-notes.md)."""
    # the row stays int32 (one register per entry: a 16K-entry row in 8 warps spills if held as int64); the
    # bracket's arithmetic is int64 (a span can exceed int32)
    INF_KEY: tl.constexpr = 0x7F800000
    n_inf = tl.sum((valid & (key >= INF_KEY)).to(tl.int32), 0)
    n_valid = tl.sum(valid.to(tl.int32), 0)
    lo = tl.min(tl.where(valid, key, 2147483647), 0).to(tl.int64)
    hi = tl.max(tl.where(valid & (key < INF_KEY), key, lo.to(tl.int32)), 0).to(tl.int64)
    lo = tl.where(n_inf >= kk, INF_KEY, lo)  # the forced entries alone fill kk
    hi = tl.where(n_inf >= kk, INF_KEY, hi)
    f_lo = (n_valid - kk).to(tl.float32) + 0.5  # #(key >= lo) - kk, > 0
    f_hi = (n_inf - kk).to(tl.float32) - 0.5  # #(key >= hi + 1) - kk, < 0
    side = tl.full([], 0, tl.int32)  # which end the last step moved: 1 lo, -1 hi
    slow = tl.full([], 0, tl.int32)  # consecutive steps that kept more than half the bracket
    while lo < hi:
        span = hi - lo
        guess = lo + (span.to(tl.float32) * (f_lo / (f_lo - f_hi))).to(tl.int64)
        mid = tl.where(slow >= 2, lo + (span + 1) // 2, tl.minimum(tl.maximum(guess, lo + 1), hi))
        cnt = tl.sum((valid & (key >= mid.to(tl.int32))).to(tl.int32), 0)
        ge = cnt >= kk
        f_mid = (cnt - kk).to(tl.float32) + tl.where(ge, 0.5, -0.5)
        f_hi = tl.where(ge, tl.where(side == 1, f_hi * 0.5, f_hi), f_mid)
        f_lo = tl.where(ge, f_mid, tl.where(side == -1, f_lo * 0.5, f_lo))
        side = tl.where(ge, 1, -1)
        lo = tl.where(ge, mid, lo)
        hi = tl.where(cnt == kk, mid, tl.where(ge, hi, mid - 1))
        slow = tl.where(slow >= 2, 0, tl.where(2 * (hi - lo) > span, slow + 1, 0))
    return lo


@triton.jit
def _select_write(key, idx, valid, kk, thr, OUT_ROW):
    above = valid & (key > thr.to(tl.int32))
    n_above = tl.sum(above.to(tl.int32), 0)
    tie = valid & (key == thr.to(tl.int32))
    tie_rank = tl.cumsum(tie.to(tl.int32), 0)
    sel = above | (tie & (tie_rank <= kk - n_above))
    pos = tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(OUT_ROW + pos, idx, mask=sel)
    return sel


@triton.jit
def _causal_block_topk_kernel(
    S, OUT, CNT, s_h, s_r, o_h, o_r, c_h, nb, row0, k_req,
    BLOCK: tl.constexpr, FORCE_PREV: tl.constexpr,
):
    """Row r of head h (absolute query block a = row0 + r): entries j <= a of S[h, r, :]; 0, a (and a - 1)
    forced. Writes min(k, a + 1) ids."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    a = row0 + r
    j = tl.arange(0, BLOCK)
    valid = j <= a
    x = tl.load(S + h * s_h + r * s_r + j, mask=valid, other=0.0)
    forced = (j == 0) | (j == a)
    if FORCE_PREV:
        forced = forced | (j == a - 1)
    x = tl.where(forced, float("inf"), x)
    key = _order_key(x)
    kk = tl.minimum(k_req, a + 1)
    thr = _kth_largest_key(key, kk, valid)
    _select_write(key, j, valid, kk, thr, OUT + h * o_h + r * o_r)
    tl.store(CNT + h * c_h + r, kk)


def causal_block_topk(scores: Tensor, k: int, force_prev: bool = True, *, num_warps: int | None = None,
                      row0: int = 0) -> tuple[Tensor, Tensor]:
    """``scores [h, nqb, nb]`` float32 (row = query block, the absolute block ``row0 + row``; column = key
    block; only ``j <= row0 + row`` read) -> ``(ids [h, nqb, k] int32 ascending, counts [h, nqb] int32)``
    keeping block 0, the diagonal and (if ``force_prev``) the block before it, then the highest scores; a row
    keeps ``min(k, row0 + row + 1)`` blocks."""
    h, nqb, nb = scores.shape
    assert row0 + nqb == nb and scores.stride(-1) == 1 and scores.dtype == torch.float32
    k = int(min(k, nb))
    ids = torch.zeros(h, nqb, k, dtype=torch.int32, device=scores.device)
    cnt = torch.empty(h, nqb, dtype=torch.int32, device=scores.device)
    block = max(16, triton.next_power_of_2(nb))
    # H100, block-sparse index: 512 columns (32K) 1 warp 0.074 ms vs 4 warps 0.120; 2048 columns (128K)
    # 4 warps 1.17 ms vs 1 / 2 / 8 warps 2.13 / 1.52 / 1.49 (1024 columns: 2 warps, in between, not measured)
    warps = num_warps or (1 if block <= 512 else 2 if block <= 1024 else 4 if block <= 2048 else
                          8 if block <= 8192 else 16)
    _causal_block_topk_kernel[(nqb, h)](
        scores, ids, cnt, scores.stride(0), scores.stride(1), ids.stride(0), ids.stride(1), cnt.stride(0),
        nb, row0, k, BLOCK=block, FORCE_PREV=force_prev, num_warps=warps,
    )
    return ids, cnt


@triton.jit
def _row_topk_kernel(S, OUT, LEN, s_r, o_r, k_req, BLOCK: tl.constexpr, FORCE_LAST: tl.constexpr):
    """Row r: entries j < LEN[r]; (optionally) the last one forced. Writes min(k, LEN[r]) ascending ids."""
    r = tl.program_id(0)
    length = tl.load(LEN + r)
    j = tl.arange(0, BLOCK)
    valid = j < length
    x = tl.load(S + r * s_r + j, mask=valid, other=0.0)
    if FORCE_LAST:
        x = tl.where(j == length - 1, float("inf"), x)
    key = _order_key(x)
    kk = tl.minimum(k_req, length)
    thr = _kth_largest_key(key, tl.maximum(kk, 1), valid)
    _select_write(key, j, valid, kk, thr, OUT + r * o_r)


def row_topk(scores: Tensor, lengths: Tensor, k: int, force_last: bool = False) -> Tensor:
    """``scores [R, N]`` float32, ``lengths [R]`` int32 -> ``[R, k]`` int32 ascending ids of each row's
    ``min(k, length)`` largest among its first ``length`` entries (ties: lower index first)."""
    R, N = scores.shape
    assert steps_by_one(scores, lengths) and scores.dtype == torch.float32
    out = torch.zeros(R, k, dtype=torch.int32, device=scores.device)
    block = max(16, triton.next_power_of_2(N))
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _row_topk_kernel[(R,)](scores, out, lengths, scores.stride(0), out.stride(0), k,
                           BLOCK=block, FORCE_LAST=force_last, num_warps=warps)
    return out
