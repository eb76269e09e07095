"""Row-wise exact top-k in Triton for rows that fit one program (up to a few thousand entries).

One program per row. The float32 scores are mapped to order-preserving int32 keys, the k-th largest key is
found by bisection on the key space between the row's min and max (one compare-and-count over the row held
in registers per step, stopping once exactly k keys lie above), and the winners -- every entry above the
threshold plus the first entries equal to it, in index order -- are written as *ascending* indices through a
prefix sum. No sort, no host sync, one launch.

Used by block_sparse (per query block: its causal key blocks, forced ones at +inf) and Quest (per
(sequence, KV head): its pages, the current page at +inf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _order_key(x):
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _kth_largest_key(key, kk, valid):
    """Largest int32 t with #(key >= t) >= kk (1 <= kk <= #valid), as int64: bisection on the key space
    between the row's min and max valid key, stopping early as soon as exactly kk keys are >= mid
    (usually ~15 compare-and-count steps instead of 32)."""
    k64 = key.to(tl.int64)
    lo = tl.min(tl.where(valid, k64, 2147483647), 0)
    hi = tl.max(tl.where(valid, k64, -2147483648), 0)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        cnt = tl.sum((valid & (k64 >= mid)).to(tl.int32), 0)
        exact = cnt == kk
        lo = tl.where(cnt >= kk, mid, lo)
        hi = tl.where(exact, mid, tl.where(cnt >= kk, hi, mid - 1))
    return lo


@triton.jit
def _select_write(key, idx, valid, kk, thr, OUT_ROW):
    above = valid & (key.to(tl.int64) > thr)
    n_above = tl.sum(above.to(tl.int32), 0)
    tie = valid & (key.to(tl.int64) == thr)
    tie_rank = tl.cumsum(tie.to(tl.int32), 0)
    sel = above | (tie & (tie_rank <= kk - n_above))
    pos = tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(OUT_ROW + pos, idx, mask=sel)


@triton.jit
def _causal_block_topk_kernel(
    S, OUT, CNT, s_h, s_r, o_h, o_r, c_h, nb, k_req,
    BLOCK: tl.constexpr, FORCE_PREV: tl.constexpr,
):
    """Row r of head h: entries j <= r of S[h, r, :]; 0, r (and r - 1) forced. Writes min(k, r + 1) ids."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.arange(0, BLOCK)
    valid = j <= r
    x = tl.load(S + h * s_h + r * s_r + j, mask=valid, other=0.0)
    forced = (j == 0) | (j == r)
    if FORCE_PREV:
        forced = forced | (j == r - 1)
    x = tl.where(forced, float("inf"), x)
    key = _order_key(x)
    kk = tl.minimum(k_req, r + 1)
    thr = _kth_largest_key(key, kk, valid)
    _select_write(key, j, valid, kk, thr, OUT + h * o_h + r * o_r)
    tl.store(CNT + h * c_h + r, kk)


def causal_block_topk(scores: Tensor, k: int, force_prev: bool = True) -> tuple[Tensor, Tensor]:
    """``scores [h, nb, nb]`` float32 (row = query block, column = key block; only ``j <= row`` read) ->
    ``(ids [h, nb, k] int32 ascending, counts [h, nb] int32)`` keeping block 0, the diagonal and (if
    ``force_prev``) the block before it, then the highest scores; a row keeps ``min(k, row + 1)`` blocks."""
    h, nb, nb2 = scores.shape
    assert nb == nb2 and scores.stride(-1) == 1 and scores.dtype == torch.float32
    k = int(min(k, nb))
    ids = torch.zeros(h, nb, k, dtype=torch.int32, device=scores.device)
    cnt = torch.empty(h, nb, dtype=torch.int32, device=scores.device)
    block = max(16, triton.next_power_of_2(nb))
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _causal_block_topk_kernel[(nb, h)](
        scores, ids, cnt, scores.stride(0), scores.stride(1), ids.stride(0), ids.stride(1), cnt.stride(0),
        nb, k, BLOCK=block, FORCE_PREV=force_prev, num_warps=warps,
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
    assert scores.stride(-1) == 1 and scores.dtype == torch.float32
    out = torch.zeros(R, k, dtype=torch.int32, device=scores.device)
    block = max(16, triton.next_power_of_2(N))
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _row_topk_kernel[(R,)](scores, out, lengths, scores.stride(0), out.stride(0), k,
                           BLOCK=block, FORCE_LAST=force_last, num_warps=warps)
    return out
