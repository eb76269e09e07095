"""Row-wise exact top-k in Triton for rows that fit one program (up to a few thousand entries).

One program per row. The float32 scores are mapped to order-preserving int32 keys, the k-th largest key is
found by a bracketed root search on the key space (interpolation with the Illinois rule, halving when it
stalls; one compare-and-count over the row held in registers per step, stopping once exactly k keys lie above), and the
winners -- every entry above the threshold plus the first entries equal to it, in index order -- are written
as *ascending* indices through a prefix sum. No sort, no host sync, one launch.

Used by block_sparse (per query block: its causal key blocks, forced ones at +inf). Quest's selection
(:mod:`.quest_select`: per (sequence, KV head), its pages, the current page at +inf) runs the same search over a
row it reads chunk by chunk (:func:`_bracket`, :func:`_probe`, :func:`_narrow`), so its cost follows the row's pages,
not the width of vLLM's block table.
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


_INF_KEY = tl.constexpr(0x7F800000)  # the order key of +inf: the forced entries


@triton.jit
def _bracket(key_min, key_max_finite, n_valid, n_inf, kk):
    """The root search's start for the kk-th largest key of a row (1 <= kk <= n_valid): from the row's least key,
    its largest finite key (+inf keys, the forced entries, start above the bracket), its size and its +inf count ->
    ``(lo, hi, f_lo, f_hi)``; ``lo == hi`` when there is nothing to search (the forced entries alone fill kk, or kk
    takes the whole row)."""
    # the bracket's arithmetic is int64 (a span can exceed int32)
    lo = key_min.to(tl.int64)
    hi = tl.maximum(key_max_finite.to(tl.int64), lo)
    hi = tl.where(n_valid <= kk, lo, hi)  # every entry: the least key is the threshold
    lo = tl.where(n_inf >= kk, _INF_KEY, lo)  # the forced entries alone fill kk
    hi = tl.where(n_inf >= kk, _INF_KEY, hi)
    f_lo = (n_valid - kk).to(tl.float32) + 0.5  # #(key >= lo) - kk, > 0
    f_hi = (n_inf - kk).to(tl.float32) - 0.5  # #(key >= hi + 1) - kk, < 0
    return lo, hi, f_lo, f_hi


@triton.jit
def _probe(lo, hi, f_lo, f_hi, slow):
    """The next threshold to count: linear interpolation in the key (log-like in the value, so it copes with wide
    and heavy-tailed scores), halving the bracket after two steps that did not."""
    span = hi - lo
    guess = lo + (span.to(tl.float32) * (f_lo / (f_lo - f_hi))).to(tl.int64)
    return tl.where(slow >= 2, lo + (span + 1) // 2, tl.minimum(tl.maximum(guess, lo + 1), hi))


@triton.jit
def _narrow(lo, hi, f_lo, f_hi, side, slow, mid, cnt, kk):
    """The bracket after counting ``cnt = #(key >= mid)``, with the Illinois rule (the end kept twice in a row has
    its weight halved); ``side``: which end the last step moved (1 lo, -1 hi); ``slow``: consecutive steps that
    kept more than half the bracket. It stops (``lo == hi``) as soon as exactly kk keys are ``>= mid``."""
    span = hi - lo
    ge = cnt >= kk
    f_mid = (cnt - kk).to(tl.float32) + tl.where(ge, 0.5, -0.5)
    f_hi = tl.where(ge, tl.where(side == 1, f_hi * 0.5, f_hi), f_mid)
    f_lo = tl.where(ge, f_mid, tl.where(side == -1, f_lo * 0.5, f_lo))
    side = tl.where(ge, 1, -1)
    lo = tl.where(ge, mid, lo)
    hi = tl.where(cnt == kk, mid, tl.where(ge, hi, mid - 1))
    slow = tl.where(slow >= 2, 0, tl.where(2 * (hi - lo) > span, slow + 1, 0))
    return lo, hi, f_lo, f_hi, side, slow


@triton.jit
def _kth_largest_key(key, kk, valid):
    """Largest int32 t with #(key >= t) >= kk (1 <= kk <= #valid), as int64, or a t with exactly kk keys
    ``>= t`` (the same selection), for a row held in registers: a bracketed root search for #(key >= t) = kk on the
    key space (:func:`_bracket`, :func:`_probe`, :func:`_narrow`), one compare-and-count (a block-wide reduction)
    per step. It beats plain bisection (benchmarks/results/kernel-tuning-notes.md)."""
    # the row stays int32 (one register per entry: a 16K-entry row in 8 warps spills if held as int64)
    key_min = tl.min(tl.where(valid, key, 2147483647), 0)
    lo, hi, f_lo, f_hi = _bracket(key_min, tl.max(tl.where(valid & (key < _INF_KEY), key, key_min), 0),
                                  tl.sum(valid.to(tl.int32), 0), tl.sum((valid & (key >= _INF_KEY)).to(tl.int32), 0),
                                  kk)
    side = tl.full([], 0, tl.int32)
    slow = tl.full([], 0, tl.int32)
    while lo < hi:
        mid = _probe(lo, hi, f_lo, f_hi, slow)
        cnt = tl.sum((valid & (key >= mid.to(tl.int32))).to(tl.int32), 0)
        lo, hi, f_lo, f_hi, side, slow = _narrow(lo, hi, f_lo, f_hi, side, slow, mid, cnt, kk)
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
