"""GPU index builders for the last-window methods (vertical_slash, flexprefill; the SnapKV family reuses
the window estimate) and for block_sparse.

Last-window estimate, without materialising the ``[h, W, n]`` probabilities (the references do):

1. :func:`_window_stats_kernel` -- per query head and window row, the softmax max and normaliser over all
   causal keys (split over the keys, merged in float32).
2. :func:`_window_colsum_kernel` -- one program per (key block, head) recomputes the scores of all W rows
   for its keys, normalises them, and reduces them per column (sum: vertical score; or max) and per diagonal:
   the ``[W_blk, BN]`` tile is skewed with ``tl.gather`` so that each diagonal becomes a column, summed, and
   added to the slash score of its offset with one vector atomic per row block.

Vertical-slash index (same keep order as the reference: forced entries first, then by descending score,
stable): a head keeps the first ``k_v`` columns and ``k_s`` offsets of its orders. The attention kernel
computes slashes as merged bands (:func:`.sparse_prefill.slash_chunks`) with an exact per-cell mask, so its
output is the reference's; its *computed* cells (the bands and uncovered verticals) are what it reports,
and the ratio search picks ``k`` on those cells (:func:`computed_cells`, closed form, vectorised, for a batch
of budgets at once). The search costs a few exact counts (:func:`corrected_search`): the band cells of *every*
budget come from one pass (:func:`band_curve`), the verticals' from a bound that the counts correct. (A grid of
16 budgets per round, 2-3 rounds, cost about 45 ms per 7B layer at 128K on an H200, more than the sparse
attention of a 16384-token chunk: benchmarks/results/e2e-NVIDIA-H200-2026-12-01-parts/session3.)

Block-sparse: mean pooling in float32, the block score matrix (float32 ``[h, nb, nb]``) and the causal
per-row top-k (:func:`.topk.causal_block_topk`).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..cost import causal_cells
from ..prefill.block_sparse import mean_pool
from ..prefill.vertical_slash_index import covered_cells
from .sparse_prefill import _NEG, LOG2E


@triton.jit
def _window_stats_kernel(
    Q, K, MP, LP, sqh, sqn, skh, skn,
    n, W, group, qk_scale, keys_per_split, num_splits,
    HEAD_DIM: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr,
):
    head = tl.program_id(0)
    wb = tl.program_id(1)
    s = tl.program_id(2)
    kvh = head // group
    w = wb * BW + tl.arange(0, BW)
    w_ok = w < W
    pos = n - W + w  # absolute query positions (Q points at the window's first row)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + head * sqh + w[:, None] * sqn + offs_d[None, :], mask=w_ok[:, None], other=0.0)
    m_i = tl.full([BW], _NEG, tl.float32)
    l_i = tl.zeros([BW], tl.float32)
    start = s * keys_per_split
    end = tl.minimum(start + keys_per_split, n - W + wb * BW + BW)  # no key beyond the block's last row
    lane = tl.arange(0, BN)
    for j0 in range(start, end, BN):
        key = j0 + lane
        k = tl.load(K + kvh * skh + key[:, None] * skn + offs_d[None, :], mask=(key < n)[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where((key[None, :] <= pos[:, None]) & (key[None, :] < end), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
        m_i = m_new
    row = (head * W + w) * num_splits + s
    tl.store(MP + row, m_i, mask=w_ok)
    tl.store(LP + row, l_i, mask=w_ok)


@triton.jit
def _window_colsum_kernel(
    Q, K, M, L, COLS, SLASH, sqh, sqn, skh, skn,
    n, W, group, qk_scale,
    HEAD_DIM: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr,
    COL_MAX: tl.constexpr, DIAG: tl.constexpr,
):
    kb = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // group
    j0 = kb * BN
    lane = tl.arange(0, BN)
    key = j0 + lane
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + kvh * skh + key[:, None] * skn + offs_d[None, :], mask=(key < n)[:, None], other=0.0)
    col = tl.zeros([BN], tl.float32)
    # first window row block that can see this key block: row pos n - W + w >= j0
    w_first = tl.maximum(j0 - (n - W), 0) // BW
    t = tl.arange(0, BW + BN)
    for wb in range(w_first, tl.cdiv(W, BW)):
        wl = tl.arange(0, BW)
        w = wb * BW + wl
        w_ok = w < W
        pos = n - W + w
        q = tl.load(Q + head * sqh + w[:, None] * sqn + offs_d[None, :], mask=w_ok[:, None], other=0.0)
        m = tl.load(M + head * W + w, mask=w_ok, other=0.0)
        inv_l = 1.0 / tl.load(L + head * W + w, mask=w_ok, other=1.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        ok = w_ok[:, None] & (key[None, :] <= pos[:, None]) & (key[None, :] < n)
        p = tl.where(ok, tl.math.exp2(qk - m[:, None]) * inv_l[:, None], 0.0)
        if COL_MAX:
            col = tl.maximum(col, tl.max(p, 0))
        else:
            col += tl.sum(p, 0)
        if DIAG:
            # G[w, t] = P[w, jl] with jl = wl + BN - 1 - t: each column t of G is one diagonal o = pos - key
            jl = wl[:, None] + (BN - 1) - t[None, :]
            inside = (jl >= 0) & (jl < BN)
            g = tl.gather(p, tl.where(inside, jl, 0), axis=1)
            dsum = tl.sum(tl.where(inside, g, 0.0), 0)
            o = (n - W + wb * BW - j0) + t - (BN - 1)
            tl.atomic_add(SLASH + head * n + o, dsum, mask=(o >= 0) & (o < n) & (t < BW + BN - 1), sem="relaxed")
    tl.store(COLS + head * n + key, col, mask=key < n)


def window_scores(q: Tensor, k: Tensor, window: int, *, col_reduce: str = "sum", diagonal: bool = True,
                  block: int = 64) -> tuple[Tensor, Tensor | None, int]:
    """Per query head, over the last ``W = min(window, m)`` of the ``m`` queries of ``q``, causal softmax over
    all ``n`` keys of ``k`` (float32): ``(columns [h, n], slash [h, n] or None, W)`` where ``columns`` is the
    sum (or max, ``col_reduce="max"``) over the window rows of each key column and ``slash[o]`` the sum over
    the rows of the cells at offset ``o = i - j``. ``q``'s rows are the positions ``[n - m, n)`` (a chunk, or
    the whole prompt)."""
    h, m, d = q.shape
    h_kv, n = k.shape[0], k.shape[1]
    group = h // h_kv
    W = min(window, m)
    q = q[:, m - W:]  # the kernels read the window rows only
    dev = q.device
    scale = LOG2E / math.sqrt(d)
    BW = BN = block
    n_wb = triton.cdiv(W, BW)
    target = 4 * (torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2)
    splits = max(1, min(triton.cdiv(n, 16 * BN), triton.cdiv(target, h * n_wb)))
    kps = triton.cdiv(triton.cdiv(n, splits), BN) * BN
    splits = triton.cdiv(n, kps)
    mp = torch.empty(h * W * splits, dtype=torch.float32, device=dev)
    lp = torch.empty_like(mp)
    stages = 3 if dev.type == "cuda" else 1
    _window_stats_kernel[(h, n_wb, splits)](
        q, k, mp, lp, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        n, W, group, scale, kps, splits, HEAD_DIM=d, BW=BW, BN=BN, num_warps=4, num_stages=stages)
    mp = mp.view(h, W, splits)
    lp = lp.view(h, W, splits)
    m = mp.amax(-1)
    l_ = (lp * torch.exp2(mp - m[..., None])).sum(-1)
    cols = torch.empty(h, n, dtype=torch.float32, device=dev)
    slash = torch.zeros(h, n, dtype=torch.float32, device=dev) if diagonal else cols
    _window_colsum_kernel[(triton.cdiv(n, BN), h)](
        q, k, m.contiguous(), l_.contiguous(), cols, slash, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        n, W, group, scale, HEAD_DIM=d, BW=BW, BN=BN, COL_MAX=col_reduce == "max", DIAG=diagonal,
        num_warps=8 if dev.type == "cuda" else 4, num_stages=stages)
    return cols, (slash if diagonal else None), W


# ---------------------------------------------------------------------------------------------------------
# Vertical-slash keep orders, the computed-cell count of a prefix budget, and the budget search
# ---------------------------------------------------------------------------------------------------------
def keep_ranks(scores: Tensor, forced: int) -> tuple[Tensor, Tensor]:
    """``(order, rank)`` ``[h, n]``: positions in keep order (the first ``forced`` first, then by descending
    score, stable) and its inverse -- the reference's order."""
    ranked = scores.clone()
    ranked[:, :forced] = float("inf")
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return order, rank


BATCH_ELEMENTS = 1 << 25  # per group of indexes evaluated at once: [G, h, n] temporaries of ~0.5 GiB at most


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """``x[..., idx]`` per row, the leading dims of ``x`` and ``idx`` broadcast (``[K, h, N]`` with ``[h, k]``)."""
    lead = torch.broadcast_shapes(x.shape[:-1], idx.shape[:-1])
    return x.expand(*lead, x.shape[-1]).gather(-1, idx.expand(*lead, idx.shape[-1]))


def computed_cells(sel_slash: Tensor, sel_vert: Tensor | None, block_m: int = 64,
                   vert_pos: Tensor | None = None, vert_live: Tensor | None = None, q_offset: int = 0) -> Tensor:
    """Cells :func:`~.sparse_prefill.sparse_prefill_attention` computes for a vertical/slash index with
    ``block_m``-row query blocks: the merged slash bands plus the verticals outside them. ``sel_*`` are
    ``[..., h, n]`` bool (or give the verticals as positions ``vert_pos [h, k]`` with ``vert_live [..., h, k]``
    bool, cheaper for small k); returns ``[..., h]`` int64 (closed form, no kernel launch per query block). The
    leading dims (``...``) evaluate several indexes of the same heads at once (the budget searches).

    With ``x = qs - key``, the bands of a head cover ``X = U_o [o - block_m + 1, o]``; row ``i`` (block start
    ``qs``, ``r = i - qs``) computes the band keys with ``x in [-r, qs]``, and a vertical ``v`` is computed as
    a column in query block ``qb`` iff ``qs - v`` is not in ``X``.

    ``q_offset`` (a multiple of ``block_m``): only the query blocks of rows ``[q_offset, n)`` (a chunk). Rows
    below ``q_offset`` see only offsets and columns below it, and ``X(x)`` depends only on the offsets in
    ``[x, x + block_m)``, so the chunk's cells are those of all rows minus those of the prefix's index.
    """
    if q_offset:
        assert q_offset % block_m == 0, "chunks start at a query block boundary"
        prefix = computed_cells(
            sel_slash[..., :q_offset], None if sel_vert is None else sel_vert[..., :q_offset], block_m,
            None if vert_pos is None else vert_pos.clamp(max=q_offset - 1),
            None if vert_live is None else vert_live & (vert_pos < q_offset))
        return computed_cells(sel_slash, sel_vert, block_m, vert_pos, vert_live) - prefix
    lead, n = sel_slash.shape[:-1], sel_slash.shape[-1]
    BM = block_m
    dev = sel_slash.device
    nqb = triton.cdiv(n, BM)
    last_rows = n - (nqb - 1) * BM
    i32 = torch.int32  # counts below n + block_m: int32 halves the memory of a batch of indexes; sums in int64
    # Xa[y] = X(y - BM), y in [0, n + BM): X(x) = any selected offset in [x, x + BM - 1]
    cs = torch.nn.functional.pad(torch.cumsum(sel_slash, -1, dtype=i32), (1, 0))  # cs[t] = #selected offsets < t
    y = torch.arange(n + BM, device=dev)
    x = y - BM
    lo = x.clamp(0, n)
    hi = (x + BM).clamp(0, n)
    Xa = (cs[..., hi] - cs[..., lo]) > 0  # [..., h, n + BM]
    del cs
    CX = torch.cumsum(Xa, -1, dtype=i32)  # CX[y] = #X <= y - BM
    # band: sum_qb rows(qb) CX(qs) - sum_qb sum_{r < rows} CX(-r - 1)
    qs = torch.arange(nqb, device=dev) * BM
    rows = torch.full((nqb,), BM, dtype=torch.int64, device=dev)
    rows[-1] = last_rows
    band = (CX[..., qs + BM].long() * rows).sum(-1)
    r = torch.arange(BM, device=dev)
    neg = CX[..., BM - r - 1].long()  # CX(-r - 1)
    band -= (nqb - 1) * neg.sum(-1) + neg[..., :last_rows].sum(-1)
    del CX
    # verticals
    if vert_pos is None:
        v = torch.arange(n, device=dev).expand(sel_vert.shape[-2], n)
        weight = sel_vert.to(torch.int64)
    else:
        v = vert_pos.long()
        weight = vert_live.to(torch.int64)
    qb0 = v // BM
    qs0 = qb0 * BM
    diag_rows = torch.minimum(qs0 + BM, torch.full_like(qs0, n)) - v
    uncovered_diag = ~_take(Xa, qs0 - v + BM)
    after_rows = n - torch.minimum(qs0 + BM, torch.full_like(qs0, n))  # rows of the blocks after v's block
    # S(v) = sum_{qb = qb0+1}^{nqb-1} X(BM qb - v): stride-BM prefix sums of Xa by phase
    T = triton.cdiv(n + BM, BM) + 1
    Xp = torch.zeros(*lead, T * BM, dtype=i32, device=dev)
    Xp[..., : n + BM] = Xa
    PR = torch.nn.functional.pad(torch.cumsum(Xp.view(*lead, T, BM), -2, dtype=i32), (0, 0, 1, 0))  # PR[t, p]:
    del Xp  # sum over t' < t
    y_lo = BM * (qb0 + 2) - v  # y of qb = qb0 + 1
    y_hi = BM * nqb - v  # y of qb = nqb - 1
    p = y_lo % BM
    has_after = qb0 < nqb - 1
    t_lo = y_lo // BM
    t_hi = torch.where(has_after, y_hi // BM, t_lo - 1)
    flat = PR.reshape(*lead, -1)
    S = (_take(flat, (t_hi + 1) * BM + p) - _take(flat, t_lo * BM + p)).long()
    x_last = _take(Xa, y_hi.clamp(0, n + BM - 1)) & has_after
    covered_after = BM * S - (BM - last_rows) * x_last.to(torch.int64)
    vert_cells = diag_rows * uncovered_diag + after_rows - covered_after
    vert = (vert_cells * weight).sum(-1)
    return band + vert


def first_cover(rank: Tensor, block_m: int, never: int) -> Tensor:
    """``first[h, y]``, ``y in [0, n + block_m)``: the smallest rank among the offsets ``[y - block_m, y)`` of each
    head (``never`` where the window holds none), i.e. the budget below which ``x = y - block_m`` is in no band:
    :func:`computed_cells`' ``Xa[y]`` is ``first[y] < k`` for a slash budget ``k``. Sliding minimum by doubling."""
    h, n = rank.shape
    padded = rank.new_full((h, n + 2 * block_m), never)
    padded[:, block_m:block_m + n] = rank  # padded[i] = rank[i - block_m]; the window of y is padded[y : y + block_m]
    width = 1
    while width < block_m:  # after each step padded[i] = min over [i, i + 2 width)
        padded = torch.minimum(padded[:, :-width], padded[:, width:])
        width *= 2
    return padded[:, :n + block_m]


@functools.lru_cache(maxsize=64)
def _band_weights(n: int, block_m: int, device: torch.device) -> Tensor:
    """``w[y]`` with :func:`computed_cells`' band term ``= sum_y w[y] Xa[y]`` (its two sums of ``CX``, regrouped
    per ``y``): ``[n + block_m]`` int64. Cached: every layer of a chunk asks for the same ``n`` (read only)."""
    BM = block_m
    nqb = triton.cdiv(n, BM)
    last_rows = n - (nqb - 1) * BM
    rows = torch.full((nqb,), BM, dtype=torch.int64, device=device)
    rows[-1] = last_rows
    at = torch.zeros(n + 2 * BM, dtype=torch.int64, device=device)
    at.index_add_(0, torch.arange(nqb, device=device) * BM + BM, rows)
    y = torch.arange(n + BM, device=device)
    later_rows = at.flip(0).cumsum(0).flip(0)[:n + BM]  # sum of rows(qb) over qs + BM >= y
    below = (BM - y).clamp(min=0)  # #{r < BM : y <= BM - 1 - r}
    return later_rows - (nqb - 1) * below.clamp(max=BM) - below.clamp(max=last_rows)


def band_curve(slash_rank: Tensor, block_m: int, q_offset: int = 0, first: Tensor | None = None) -> Tensor:
    """``[h, n + 1]`` int64: for every slash budget ``k`` (the first ``k`` offsets of each head's keep order) the
    band cells :func:`computed_cells` counts, rows ``[q_offset, n)``, all budgets in one pass (exact). ``first``:
    :func:`first_cover` of ``slash_rank``, when the caller has it."""
    h, n = slash_rank.shape

    def curve(rank: Tensor, first: Tensor | None) -> Tensor:
        m = rank.shape[-1]
        first = first_cover(rank, block_m, n) if first is None else first
        per_rank = torch.zeros(h, n + 1, dtype=torch.int64, device=rank.device)
        per_rank.scatter_add_(1, first, _band_weights(m, block_m, rank.device).expand(h, -1).contiguous())
        return torch.nn.functional.pad(per_rank[:, :n].cumsum(-1), (1, 0))

    if q_offset:  # the chunk's rows: all rows minus the prefix's (as computed_cells does)
        return curve(slash_rank, first) - curve(slash_rank[:, :q_offset], None)
    return curve(slash_rank, first)


@triton.jit
def _vertical_cells_kernel(OUT, FIRST, s_fh, ORDER, s_oh, KV, KS, h, n, qb0, nqb, qb_per,
                           BM: tl.constexpr, CH: tl.constexpr, TILES: tl.constexpr):
    """Program (index x head, tile phase, query-block range): the cells of the index's verticals (the first
    ``KV`` of the head's keep order) that no band covers, over its query blocks; tiles ``phase, phase + TILES,
    ...`` of ``CH`` verticals. A vertical ``v`` is computed in block ``qs`` iff ``FIRST[qs - v + BM] >= KS``
    (no selected offset within the band's reach: :func:`first_cover`)."""
    kh = tl.program_id(0)
    head = kh % h
    kv = tl.load(KV + kh)
    ks = tl.load(KS + kh)
    q_lo = qb0 + tl.program_id(2) * qb_per
    q_hi = tl.minimum(q_lo + qb_per, nqb)
    total = tl.zeros([CH], tl.int64)
    for t0 in range(tl.program_id(1) * CH, kv, TILES * CH):
        idx = t0 + tl.arange(0, CH)
        live = idx < kv
        v = tl.load(ORDER + head * s_oh + idx, mask=live, other=0).to(tl.int64)
        for qb in range(q_lo, q_hi):
            qs = qb * BM
            act = live & (qs + BM > v)  # the block has rows at or after v
            f = tl.load(FIRST + head * s_fh + (qs - v + BM), mask=act, other=0)
            rows = tl.minimum(qs + BM, n) - tl.maximum(qs, v)
            total += tl.where(act & (f >= ks), rows, 0)
    tl.store(OUT + (kh * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2),
             tl.sum(total, 0))


def vertical_cells(first: Tensor, vertical_order: Tensor, kv: Tensor, ks: Tensor, n: int, block_m: int,
                   q_offset: int = 0, tiles: int = 8, blocks_per_program: int = 64) -> Tensor:
    """``[K, h]`` int64 (device, no sync): the cells of each index's verticals that its bands leave to the column
    pass (:func:`computed_cells`' vertical term), rows ``[q_offset, n)``, by direct count over the query blocks.
    ``first [h, n + block_m]`` is :func:`first_cover` of the slash ranks; budgets ``kv``/``ks`` are ``[K, h]``."""
    K, h = kv.shape
    qb0, nqb = q_offset // block_m, triton.cdiv(n, block_m)
    splits = triton.cdiv(nqb - qb0, blocks_per_program)
    out = torch.empty(K * h, tiles, splits, dtype=torch.int64, device=first.device)
    _vertical_cells_kernel[(K * h, tiles, splits)](
        out, first, first.stride(0), vertical_order, vertical_order.stride(0),
        kv.contiguous(), ks.contiguous(), h, n, qb0, nqb, blocks_per_program,
        BM=block_m, CH=128, TILES=tiles, num_warps=4)
    return out.view(K, h, -1).sum(-1)


def vertical_bound_curve(vertical_order: Tensor, n: int, q_offset: int = 0) -> Tensor:
    """``[h, n + 1]`` int64: for every vertical budget ``k`` the cells of the first ``k`` columns of each head's
    keep order, rows ``[q_offset, n)``, as if no band covered them: an upper bound of their computed cells."""
    rows = n - vertical_order.clamp(min=q_offset)
    return torch.nn.functional.pad(rows.cumsum(-1), (1, 0))


def corrected_search(solve, measure, target: float, rel_tol: float = 0.01, rounds: int = 3,
                     stop_early: bool | None = None):
    """A budget whose computed fraction is close to ``target`` in a few exact counts, without reading the device.

    The band cells of every budget are known exactly at once (:func:`band_curve`), the verticals' only as the
    bound :func:`vertical_bound_curve` (bands cover some of their cells). ``solve(rho)`` answers the budget whose
    estimate ``band + rho * bound`` is closest to the target; ``measure(x)`` gives ``(fraction, band, bound, cells)``
    of budget ``x`` (fractions of the dense cells; the first and the computed ``cells`` exact). Starting at
    ``rho = 1`` (no overlap), each round measures the verticals' real share of their bound at the last budget and
    solves again. Budgets and measures are tensors (0-dim), so on a GPU the search runs ``rounds`` rounds without
    a host sync; where they live on the host (``stop_early``'s default) it stops as soon as one lands within
    ``rel_tol`` of the target. Returns
    ``(budget, cells)`` of the measured budget closest to the target (ties: the smaller)."""
    x = torch.as_tensor(solve(1.0))
    best_x = best_err = best_cells = None
    for _ in range(rounds):
        fraction, band, bound, cells = (torch.as_tensor(t) for t in measure(x))
        err = (fraction - target).abs()
        if best_x is None:
            best_x, best_err, best_cells = x, err, cells
        else:
            take = (err < best_err) | ((err == best_err) & (x < best_x))
            best_x, best_err = torch.where(take, x, best_x), torch.where(take, err, best_err)
            best_cells = torch.where(take, cells, best_cells)
        if (not err.is_cuda if stop_early is None else stop_early) and float(err) <= rel_tol * target:
            break
        rho = torch.where(bound > 0, (fraction - band) / bound.clamp(min=1e-30), torch.ones_like(bound))
        x = torch.as_tensor(solve(rho.clamp(0.0, 1.0)))
    return best_x, best_cells


def exact_cells(sel_slash: Tensor, sel_vert: Tensor, q_offset: int = 0) -> Tensor:
    """Causal cells of the exact union of the selected columns and diagonals (the reference's count), [h]."""
    return covered_cells(sel_vert, sel_slash, q_offset)


class VSCandidates:
    """Ranked vertical/slash candidates of one call (GPU twin of the reference's ``Candidates``)."""

    def __init__(self, vertical: Tensor, slash: Tensor, window: int, sink_tokens: int, local_window: int,
                 block_m: int = 64, q_offset: int = 0):
        self.vertical_scores, self.slash_scores, self.window = vertical, slash, window
        self.h, self.n = vertical.shape
        self.forced_vertical = min(sink_tokens, self.n)
        self.forced_slash = min(local_window, self.n)
        self.vertical_order, self.vertical_rank = keep_ranks(vertical, self.forced_vertical)
        self.slash_order, self.slash_rank = keep_ranks(slash, self.forced_slash)
        self.block_m = block_m
        self.q_offset = q_offset  # the query rows served are [q_offset, n) (a chunk)
        self.dense = self.h * causal_cells(self.n, q_offset)
        self.first: Tensor | None = None  # first_cover of the slash ranks, with the curves
        self._curves: tuple[Tensor, Tensor] | None = None

    def curves(self) -> tuple[Tensor, Tensor]:
        """``(band, vertical bound)``, each ``[h, n + 1]``: the cells of every slash / vertical budget of each head
        (:func:`band_curve`, exact; :func:`vertical_bound_curve`, an upper bound). Computed once per call."""
        if self._curves is None:
            self.first = first_cover(self.slash_rank, self.block_m, self.n)
            self._curves = (band_curve(self.slash_rank, self.block_m, self.q_offset, self.first),
                            vertical_bound_curve(self.vertical_order, self.n, self.q_offset))
        return self._curves

    def estimate_parts(self, num_vertical: Tensor, num_slash: Tensor) -> tuple[Tensor, Tensor]:
        """``(band, vertical bound)`` fractions ``[K]`` (float64, device) of K indexes (budgets ``[K]`` or ``[K, h]``,
        raised to the forced counts): summed over heads, over the dense cells."""
        band, bound = self.curves()
        ks = self.counts_batch(num_slash, self.forced_slash)
        kv = self.counts_batch(num_vertical, self.forced_vertical)
        return (band.gather(-1, ks.T).sum(0).double() / self.dense,
                bound.gather(-1, kv.T).sum(0).double() / self.dense)

    def counts_batch(self, count: Tensor, forced: int) -> Tensor:
        """Budgets ``[K]`` (every head) or ``[K, h]`` as ``[K, h]``, raised to ``forced`` and capped at ``n``."""
        count = torch.as_tensor(count, device=self.vertical_rank.device)
        count = count[:, None] if count.dim() == 1 else count
        return count.expand(count.shape[0], self.h).clamp(min=forced, max=self.n)

    def measure(self, num_vertical: Tensor, num_slash: Tensor, kv_max: int | None = None) -> Tensor:
        """``[K, 4]`` float64 (device, no sync): ``(fraction, band, vertical bound, cells)`` of K indexes (budgets as
        :meth:`computed_batch`): the exact computed fraction, the curves' two parts (what :func:`corrected_search`
        needs) and the exact computed cells."""
        cells = self.computed_batch(num_vertical, num_slash, kv_max)
        band, bound = self.estimate_parts(num_vertical, num_slash)
        return torch.stack([cells.double() / self.dense, band, bound, cells.double()], -1)

    def counts(self, count: Tensor | int, forced: int) -> Tensor:
        count = torch.as_tensor(count, device=self.vertical_rank.device).expand(self.h)
        return count.clamp(min=forced, max=self.n)

    def select(self, num_vertical: Tensor | int, num_slash: Tensor | int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        kv = self.counts(num_vertical, self.forced_vertical)
        ks = self.counts(num_slash, self.forced_slash)
        return self.slash_rank < ks[:, None], self.vertical_rank < kv[:, None], kv, ks

    def computed(self, num_vertical: Tensor | int, num_slash: Tensor | int) -> Tensor:
        """Computed cells (device scalar) of the index with these budgets."""
        kv_max = int(num_vertical) if isinstance(num_vertical, int) else None
        return self.computed_batch(torch.as_tensor(num_vertical, device=self.vertical_rank.device)[None],
                                   torch.as_tensor(num_slash, device=self.vertical_rank.device)[None], kv_max)[0]

    def computed_batch(self, num_vertical: Tensor, num_slash: Tensor, kv_max: int | None = None,
                       direct: bool | None = None) -> Tensor:
        """Computed cells ``[K]`` (device, no sync) of K indexes at once: budgets ``[K]`` (every head) or ``[K, h]``.

        ``direct`` (the default on CUDA): the band cells from :meth:`curves` plus :func:`vertical_cells`, a few
        launches whatever K. Otherwise the closed form :func:`computed_cells` (the interpreter would run the
        kernel's loops in Python), in groups whose temporaries stay within about half a GiB; ``kv_max`` (known on
        the host, >= every vertical budget) lets it read the verticals as positions (cheaper when few)."""
        dev = self.vertical_rank.device
        kv = self.counts_batch(num_vertical, self.forced_vertical)
        ks = self.counts_batch(num_slash, self.forced_slash)
        if direct is None:
            direct = dev.type == "cuda"
        if direct:
            band = self.curves()[0].gather(-1, ks.T).sum(0)
            return band + vertical_cells(self.first, self.vertical_order, kv, ks, self.n, self.block_m,
                                         self.q_offset).sum(-1)
        K = kv.shape[0]
        group = max(1, BATCH_ELEMENTS // (self.h * (self.n + self.block_m)))
        out = []
        for g0 in range(0, K, group):
            kv_g, ks_g = kv[g0:g0 + group], ks[g0:g0 + group]
            sel_s = self.slash_rank < ks_g[..., None]  # [G, h, n]
            if kv_max is not None and kv_max < self.n // 4:  # only the selected columns, not all n positions
                width = min(max(kv_max, self.forced_vertical), self.n)
                pos = self.vertical_order[:, :width]
                live = torch.arange(width, device=dev) < kv_g[..., None]
                cells = computed_cells(sel_s, None, self.block_m, pos, live, self.q_offset)
            else:
                cells = computed_cells(sel_s, self.vertical_rank < kv_g[..., None], self.block_m,
                                       q_offset=self.q_offset)
            out.append(cells.sum(-1))
        return torch.cat(out)


def grid_search(fractions, target: float, lo: float, hi: float, grid, rel_tol: float = 0.01,
                max_rounds: int = 8):
    """The point of ``[lo, hi]`` whose non-decreasing fraction is closest to ``target`` (ties: the smaller), found
    in rounds: ``grid(a, b)`` gives the points to try across the bracket ``[a, b]`` (both ends included),
    ``fractions(points)`` evaluates the ones not tried yet all at once (one host sync a round), and the bracket
    narrows to the neighbours around the target, until the closest is within ``rel_tol`` of it or no new point is
    left to try."""
    seen: dict = {}
    a, b = lo, hi
    for _ in range(max_rounds):
        new = [x for x in grid(a, b) if x not in seen]
        if not new:
            break
        seen.update(zip(new, fractions(new), strict=True))
        below = [x for x, f in seen.items() if f < target]
        above = [x for x, f in seen.items() if f >= target]
        a, b = max(below, default=lo), min(above, default=hi)
        best = min(seen, key=lambda x: (abs(seen[x] - target), x))
        if abs(seen[best] - target) <= rel_tol * target or not below or not above:
            break
    return min(seen, key=lambda x: (abs(seen[x] - target), x))


# ---------------------------------------------------------------------------------------------------------
# Block-sparse: pooled block scores and the causal top-k
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _mean_pool_kernel(X, OUT, n, s_xh, s_oh, BLOCK: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    rows = b * BLOCK + tl.arange(0, BLOCK)
    dd = tl.arange(0, D)
    x = tl.load(X + head * s_xh + rows[:, None] * D + dd[None, :], mask=(rows < n)[:, None], other=0.0)
    real = tl.minimum(n - b * BLOCK, BLOCK)
    tl.store(OUT + head * s_oh + b * D + dd, tl.sum(x.to(tl.float32), 0) / real)


def triton_mean_pool(x: Tensor, block: int) -> Tensor:
    """``[heads, n, d] -> [heads, ceil(n / block), d]`` float32 means over each block's real tokens, in one
    pass over x (no float32 or padded copy of x; faster than a torch reduction:
    benchmarks/results/kernel-tuning-notes.md)."""
    heads, n, d = x.shape
    nb = triton.cdiv(n, block)
    if triton.next_power_of_2(block) != block or triton.next_power_of_2(d) != d:
        return mean_pool(x, block)  # shapes the kernel's power-of-two tiles can't take
    if x.stride(-1) != 1 or x.stride(-2) != d:
        x = x.contiguous()
    out = torch.empty(heads, nb, d, dtype=torch.float32, device=x.device)
    _mean_pool_kernel[(nb, heads)](x, out, n, x.stride(0), out.stride(0), BLOCK=block, D=d,
                                   num_warps=4 if block * d >= 4096 else 1)
    return out


@triton.jit
def _block_scores_kernel(PQ, PK, S, nqb, nb, row0, group, s_qh, s_kh, s_sh, s_sr,
                         D: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr, PREC: tl.constexpr):
    """S[h, r, c] = pooled_q[h, r] . pooled_k[h // g, c] (float32) for the causal tiles only (query block r is
    the absolute block row0 + r)."""
    tm = tl.program_id(0)
    tn = tl.program_id(1)
    head = tl.program_id(2)
    if tn * TN > row0 + tm * TM + TM - 1:
        return
    r = tm * TM + tl.arange(0, TM)
    c = tn * TN + tl.arange(0, TN)
    dd = tl.arange(0, D)
    a = tl.load(PQ + head * s_qh + r[:, None] * D + dd[None, :], mask=(r < nqb)[:, None], other=0.0)
    b = tl.load(PK + (head // group) * s_kh + c[:, None] * D + dd[None, :], mask=(c < nb)[:, None], other=0.0)
    s = tl.dot(a, tl.trans(b), input_precision=PREC)
    tl.store(S + head * s_sh + r[:, None] * s_sr + c[None, :], s, mask=(r < nqb)[:, None] & (c < nb)[None, :])


def block_scores(q: Tensor, k: Tensor, block: int, q_offset: int = 0) -> Tensor:
    """Pooled block scores ``[h, nqb, nb]`` float32 of ``q``'s query blocks (the first is the absolute block
    ``q_offset / block``) against every key block of ``k``; only the causal part (key block ``<=`` query
    block) is written."""
    h, _, d = q.shape
    pq = triton_mean_pool(q, block).contiguous()
    pk = triton_mean_pool(k, block).contiguous()
    nqb, nb = pq.shape[1], pk.shape[1]
    s = torch.empty(h, nqb, nb, dtype=torch.float32, device=q.device)
    TM = TN = 64 if nb >= 64 else 16
    prec = "ieee" if q.device.type != "cuda" else "tf32x3"
    _block_scores_kernel[(triton.cdiv(nqb, TM), triton.cdiv(nb, TN), h)](
        pq, pk, s, nqb, nb, q_offset // block, h // k.shape[0], pq.stride(0), pk.stride(0), s.stride(0),
        s.stride(1), D=d, TM=TM, TN=TN, PREC=prec, num_warps=4)
    return s
