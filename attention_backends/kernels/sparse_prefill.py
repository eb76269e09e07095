"""Sparse causal prefill attention in Triton over per-query-block key sets.

Layout (one sequence, one layer)::

    q [h, n, d], k / v [h_kv, n, d]      (last dim contiguous; query head i reads KV head i // g)

A program owns one query block of ``block_m`` rows of one query head and streams key tiles of ``block_n``
keys through an online softmax (float32 statistics and accumulator; bf16/fp16 operands on the tensor cores).
K/V are never repeated for GQA: a program indexes its KV head directly, and the g programs of one KV head that
run side by side share the K/V lines through L2. The key set of a query block (the same for every row of the
block, always intersected with the causal mask ``j <= i``) is the union of up to three sources:

* ``rel`` -- *relative chunks* (vertical_slash / flexprefill slashes). Per head a list of ``(rel, width)``:
  query block ``[qs, qs + block_m)`` reads keys ``[qs - rel, qs - rel + width)``. A slash at offset ``o``
  seen from a query block covers the band ``[qs - o, qs + block_m - 1 - o]``; bands of nearby offsets merge
  into intervals that are cut into ``block_n`` chunks once per head (:func:`slash_chunks`), so one small
  list serves every query block of the head. The list is sorted by ``rel``, so the chunks a query block can
  reach (keys >= 0) are a prefix (:func:`rel_block_counts`). With ``exact`` the kernel keeps only the cells
  on a selected diagonal or column: the head's offsets are bit-packed, each row of a tile folds its 64-bit
  window of them with its causal verticals into one word, and a cell tests its column's bit (no per-cell memory
  access).
* ``blocks`` -- *block lists* (block_sparse). ``[h, n_sub, k]`` key-block ids of size ``sb`` per query
  sub-block of ``sb`` rows, counts ``[h, n_sub]``, ascending and causal (ids ``<=`` the sub-block's own), as
  :func:`.topk.causal_block_topk` writes them. With ``sb == block_m`` a key tile is one block and only the
  last entry of a list can reach the causal boundary, so the others run unmasked; with
  ``sb < block_m`` (block 16) a key tile packs the t-th block of each of the ``block_m // sb`` sub-blocks and
  a block-diagonal mask keeps each sub-block to its own blocks (``1 / (block_m // sb)`` of the tile is useful).
* ``cols`` -- *gathered columns* (verticals). Per head sorted key positions ``[h, k_v]``, the count of those
  ``<= qs + block_m - 1`` per query block ``[h, n_qb]``, and a per-head ``cover`` bitmap over ``x = qs - v``
  so that a column already inside a relative chunk is not computed twice.

With both ``rel`` and ``cols`` the work runs as two single-loop launches (bands, writing a float32 output and
its log-sum-exp; then columns, continuing that softmax): one loop per kernel keeps 4 warps free of register
spills. Launch configs come from the sm_90 register reports and H100 sweeps (see ``config`` below); packed
sub-block tiles run without software pipelining, which miscomputed them on Triton 3.6 (H100).

Every row must reach at least one key (the methods always keep the diagonal); a row that reaches none is
written as zeros. Outputs are written for every row ``< n``.

Chunked prefill: with ``q_offset = c0`` the ``m`` rows of ``q`` are the absolute positions ``[c0, c0 + m)`` and
``k``/``v`` hold all ``n = c0 + m`` keys. Query blocks, relative chunks, block lists, column counts and the
causal mask all use absolute positions (query block ``qb`` of the call starts at ``c0 + qb * block_m``); only
the loads of q and the stores of the output are local.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: keeps alpha = exp2(m_old - m_new) NaN-free
LOG2E = 1.4426950408889634


@triton.jit
def _attend(acc, m_i, l_i, q, k, v, ok, qk_scale, USE_MASK: tl.constexpr):
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if USE_MASK:
        qk = tl.where(ok, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _fresh_columns(col_row, cover_row, idx, ccnt, qs, BLOCK_M: tl.constexpr):
    """Entries ``idx`` of a query block's column list: ``(key, fresh)``, fresh where the entry exists and no
    slash band of the block already covers that key (the kernel and the cell count must agree on this)."""
    live = idx < ccnt
    key = tl.load(col_row + idx, mask=live, other=0)
    cov = tl.load(cover_row + (qs - key + BLOCK_M), mask=live, other=1)
    return key, live & (cov == 0)


@triton.jit
def _kv_major_block(pid, n_qb, group):
    """(query head, query block) of program ``pid`` in a 1-D grid ordered KV-head-major: the ``group`` query
    heads of one KV head run side by side on one query block, latest (heaviest) blocks first; faster than
    head-major (benchmarks/results/kernel-tuning-notes.md)."""
    per_kv = n_qb * group
    r = pid % per_kv
    return (pid // per_kv) * group + r % group, n_qb - 1 - r // group


@triton.jit
def _sparse_prefill_kernel(
    Q, K, V, Out,
    sqh, skh, svh, soh, sqn, skn, svn, son,
    REL, REL_W, srel_h, REL_QCNT, srq_h,
    BLK, sblk_h, sblk_q, BLK_CNT, sbc_h,
    COL, scol_h, COL_CNT, scc_h, COVER, scov_h,
    SBITS, ssb_h, VON, svon_h,
    PRE, spre_h, LSE,
    n, n_qb, q_off, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_BLK: tl.constexpr, SUB: tl.constexpr, HAS_COL: tl.constexpr,
    EXACT: tl.constexpr, PAD_WORDS: tl.constexpr, WRITE_LSE: tl.constexpr, MERGE: tl.constexpr,
):
    # rows are contiguous (row stride == HEAD_DIM, a compile-time constant): per-element addresses fold
    # into constants plus one offset per row, which keeps the gathered K/V tiles cheap in registers
    head, qb = _kv_major_block(tl.program_id(0), n_qb, group)
    kvh = head // group
    qs = q_off + qb * BLOCK_M  # absolute position of the block's first row
    offs_m = qs + tl.arange(0, BLOCK_M)
    local_m = offs_m - q_off  # rows of q, out, PRE and LSE
    n_q = n - q_off
    offs_d = tl.arange(0, HEAD_DIM)
    lane = tl.arange(0, BLOCK_N)
    row_ok = offs_m < n
    q = tl.load(Q + head * sqh + local_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    K_h = K + kvh * skh
    V_h = V + kvh * svh
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if MERGE:
        # continue from a previous pass over other keys: its normalised output (float32) and log2-sum-exp
        # are an equivalent online-softmax state (m = lse, l = 1, acc = out)
        lse_prev = tl.load(LSE + head * n_q + local_m, mask=row_ok, other=_NEG)
        acc = tl.load(PRE + head * spre_h + local_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None],
                      other=0.0)
        m_i = lse_prev
        l_i = tl.where(lse_prev > -1.0e29, 1.0, 0.0)
    row_last = qs + BLOCK_M - 1

    if HAS_REL:
        # relative chunks sorted by rel: the first REL_QCNT[h, qb] of them reach keys >= 0 for this block
        cnt = tl.load(REL_QCNT + head * srq_h + qb)
        for c in range(cnt):
            rel = tl.load(REL + head * srel_h + c)
            width = tl.load(REL_W + head * srel_h + c)
            start = qs - rel
            key = start + lane
            key_ok = (key >= 0) & (key < n) & (lane < width)
            k = tl.load(K_h + key[:, None] * skn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(V_h + key[:, None] * svn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
            ok = key_ok[None, :] & (key[None, :] <= offs_m[:, None])
            if EXACT:
                # keep only cells on a selected diagonal or column (the reference's exact union). Cell (r, c)
                # lies on offset rel + r - c: bit t = r - c + 63 of the 128-bit window of the head's packed
                # offset bitmap starting at rel - 63; row r reads bits [r, r + 63] as one 64-bit word.
                p0 = rel - (BLOCK_N - 1)
                widx = (p0 >> 6) + PAD_WORDS
                sh = (p0 & 63).to(tl.uint64)
                u0 = tl.load(SBITS + head * ssb_h + widx).to(tl.uint64, bitcast=True)
                u1 = tl.load(SBITS + head * ssb_h + widx + 1).to(tl.uint64, bitcast=True)
                u2 = tl.load(SBITS + head * ssb_h + widx + 2).to(tl.uint64, bitcast=True)
                inv = (64 - sh) & 63
                lo = (u0 >> sh) | tl.where(sh == 0, 0, u1 << inv)
                hi = (u1 >> sh) | tl.where(sh == 0, 0, u2 << inv)
                r64 = tl.arange(0, BLOCK_M).to(tl.uint64)
                rowm = (lo >> r64) | tl.where(r64 == 0, 0, hi << ((64 - r64) & 63))
                # fold everything into one 64-bit word per row, so a cell costs a select, an and and a compare
                # (10% faster than testing the diagonal bit, the vertical, the bounds and the causal mask per cell:
                # 51.7 against 57.2 ms at 128K on the H200): the row's causal columns (c <= rel + r, i.e. bits
                # >= BLOCK_N - 1 - rel - r) of the selected verticals join its diagonal bits (offsets < 0 are zero
                # bits, so those are causal already), and columns outside the chunk (key_ok) get no test bit
                b = BLOCK_N - 1 - lane  # the bit of column c in a row's word
                von = tl.load(VON + head * svon_h + key, mask=key_ok, other=0)
                vbits = tl.sum(tl.where(von != 0, tl.full([BLOCK_N], 1, tl.uint64) << b.to(tl.uint64), 0), 0)
                low = BLOCK_N - 1 - rel - tl.arange(0, BLOCK_M)
                below = (tl.full([BLOCK_M], 1, tl.uint64) << tl.minimum(tl.maximum(low, 0), 63).to(tl.uint64)) - 1
                word = rowm | (vbits & tl.where(low >= 64, 0, ~below))
                colbit = tl.where(key_ok, tl.full([BLOCK_N], 1, tl.uint32) << (b & 31).to(tl.uint32), 0)
                half = tl.where(b[None, :] >= 32, (word >> 32).to(tl.uint32)[:, None], word.to(tl.uint32)[:, None])
                keep = (half & colbit[None, :]) != 0
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, keep, qk_scale, True)
            elif (start < 0) | (start + BLOCK_N - 1 > qs) | (width < BLOCK_N):
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, ok, qk_scale, True)
            else:
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, ok, qk_scale, False)

    if HAS_COL:
        ccnt = tl.load(COL_CNT + head * scc_h + qb)
        for c0 in range(0, ccnt, BLOCK_N):
            key, fresh = _fresh_columns(COL + head * scol_h, COVER + head * scov_h, c0 + lane, ccnt, qs, BLOCK_M)
            key_ok = fresh & (key <= row_last)
            k = tl.load(K_h + key[:, None] * skn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(V_h + key[:, None] * svn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
            ok = key_ok[None, :] & (key[None, :] <= offs_m[:, None])
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, ok, qk_scale, True)

    if HAS_BLK:
        if SUB == 1:
            # one key block per tile. Lists are ascending and causal, so every entry but the last lies wholly
            # left of the query block: those run without a mask (and pipeline cleanly); the last one (the
            # diagonal block for the methods' lists) runs with the causal mask.
            cnt = tl.load(BLK_CNT + head * sbc_h + qb)
            blk_base = BLK + head * sblk_h + qb * sblk_q
            for t in range(cnt - 1):
                key = tl.load(blk_base + t) * BLOCK_N + lane
                k = tl.load(K_h + key[:, None] * skn + offs_d[None, :])
                v = tl.load(V_h + key[:, None] * svn + offs_d[None, :])
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, None, qk_scale, False)
            if cnt > 0:
                key = tl.load(blk_base + cnt - 1) * BLOCK_N + lane
                key_ok = key < n
                k = tl.load(K_h + key[:, None] * skn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
                v = tl.load(V_h + key[:, None] * svn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
                ok = key_ok[None, :] & (key[None, :] <= offs_m[:, None])
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, ok, qk_scale, True)
        else:
            SB: tl.constexpr = BLOCK_N // SUB
            sub = lane // SB
            cnt_v = tl.load(BLK_CNT + head * sbc_h + qb * SUB + sub, mask=qs + sub * SB < n, other=0)
            t_max = tl.max(cnt_v, 0)
            blk_base = BLK + head * sblk_h + (qb * SUB + sub) * sblk_q
            for t in range(t_max):
                live = t < cnt_v
                bid = tl.load(blk_base + t, mask=live, other=0)
                key = bid * SB + lane % SB
                key_ok = live & (key < n)
                k = tl.load(K_h + key[:, None] * skn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
                v = tl.load(V_h + key[:, None] * svn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
                ok = key_ok[None, :] & (key[None, :] <= offs_m[:, None])
                ok = ok & (((offs_m - qs) // SB)[:, None] == sub[None, :])
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, ok, qk_scale, True)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if WRITE_LSE:
        tl.store(LSE + head * n_q + local_m, tl.where(l_i > 0, m_i + tl.math.log2(l_safe), _NEG), mask=row_ok)
    tl.store(Out + head * soh + local_m[:, None] * son + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])


SUB_CONFIG: tuple[int, int] | None = None  # (num_warps, num_stages) override for packed sub-block tiles


def _dummy(device: torch.device) -> Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def sparse_prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    rel: tuple[Tensor, Tensor, Tensor] | None = None,
    blocks: tuple[Tensor, Tensor, int] | None = None,
    cols: tuple[Tensor, Tensor, Tensor] | None = None,
    exact: tuple[Tensor, Tensor] | None = None,
    block_m: int = 64,
    block_n: int = 64,
    sm_scale: float | None = None,
    out: Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split: bool = True,
    q_offset: int = 0,
) -> Tensor:
    """Causal attention of ``q [h, n, d]`` over ``k``/``v`` ``[h_kv, n, d]`` restricted to the union of the
    given key sources (see the module docstring); returns ``out [h, n, d]`` in q's dtype. With ``q_offset``,
    ``q``/``out`` are ``[h, n - q_offset, d]``: the rows of positions ``[q_offset, n)`` (per-query-block index
    tensors then have ``ceil((n - q_offset) / block_m)`` blocks, the first at ``q_offset``).

    * ``rel = (rel [h, c], width [h, c], count [h])`` int32 relative chunks;
    * ``blocks = (ids [h, n_sub, k], count [h, n_sub], sb)`` int32 key-block lists of block size ``sb``
      (``sb`` divides ``block_m``; then ``block_n`` is taken as ``block_m``);
    * ``cols = (pos [h, k_v] sorted, count [h, n_qb], cover [h, n + block_m] int8)``;
    * ``exact = (slash_on [h, n] bool, vertical_on [h, n] bool/int8)``: inside relative chunks keep only the
      cells on a selected offset ``i - j`` or a selected column ``j`` (vertical_slash's exact union); the
      offsets are bit-packed and tested with shifts (no per-cell memory access).

    With both ``rel`` and ``cols`` (and ``split``), two launches: the bands write a float32 output and its
    log-sum-exp, the columns pass continues that online softmax and writes the result.
    """
    h, n_q, d = q.shape
    h_kv, n = k.shape[0], k.shape[1]
    assert h % h_kv == 0 and k.shape == v.shape and n == q_offset + n_q and k.shape[2] == d
    for t in (q, k, v):
        assert t.stride(-1) == 1 and t.stride(-2) == d, "rows of q/k/v must be contiguous ([.., n, d] layout)"
    assert d in (16, 32, 64, 128, 256)
    dev = q.device
    if out is None:
        out = torch.empty_like(q)
    assert out.stride(-1) == 1 and out.stride(-2) == d
    sub = 1
    if blocks is not None:
        sb = int(blocks[2])
        assert block_m % sb == 0
        sub = block_m // sb
        block_n = block_m if sub > 1 else sb
        assert sub > 1 or sb == block_n
    dz = _dummy(dev)
    r_, rw, rc = rel if rel is not None else (dz, dz, dz)
    b_, bc = (blocks[0], blocks[1]) if blocks is not None else (dz.view(1, 1, 1), dz.view(1, 1))
    c_, cc, cov = cols if cols is not None else (dz.view(1, 1), dz.view(1, 1), dz.view(1, 1).to(torch.int8))
    if rel is not None:
        r_, rw = r_.contiguous(), rw.contiguous()
        rq = rel_block_counts(r_, rc, n, block_m, block_n, q_offset)
    else:
        rq = dz.view(1, 1)
    if exact is not None:
        assert rel is not None and block_m <= 64 and block_n <= 64, "exact masking: relative chunks, tiles <= 64"
        s_bits = pack_bits(exact[0])
        v_on = exact[1].view(torch.int8) if exact[1].dtype == torch.bool else exact[1]
        assert v_on.dtype == torch.int8 and v_on.stride(-1) == 1
    else:
        s_bits = dz.view(1, 1).to(torch.int64)
        v_on = dz.view(1, 1).to(torch.int8)
    scale = (1.0 / math.sqrt(d)) if sm_scale is None else sm_scale
    n_qb = triton.cdiv(n_q, block_m)
    cuda = dev.type == "cuda"

    def config(use_col: bool) -> tuple[int, int]:
        """(num_warps, num_stages). Register reports (sm_90): the contiguous-tile paths (bands, 64-blocks) fit
        4 warps without spills; gathered columns need 8 warps; packed sub-block tiles miscompute when
        software-pipelined on Triton 3.6 (seen on H100), so they run unpipelined."""
        if sub > 1:
            w, st = SUB_CONFIG if SUB_CONFIG is not None else (8, 1)
        elif use_col:
            w, st = 8, 2
        else:
            # 64-blocks: 2 stages measured 2% faster than 3 (H200, 128K)
            w, st = (4 if block_m <= 64 else 8), (2 if blocks is not None else 3)
        return (num_warps or w), (num_stages or (st if cuda else 1))

    def launch(o, *, use_rel, use_blk, use_col, use_exact, write_lse, merge, pre, lse):
        warps, stages = config(use_col)
        _sparse_prefill_kernel[(n_qb * h,)](
            q, k, v, o,
            q.stride(0), k.stride(0), v.stride(0), o.stride(0), q.stride(1), k.stride(1), v.stride(1), o.stride(1),
            r_, rw, r_.stride(0), rq, rq.stride(0),
            b_, b_.stride(0), b_.stride(1), bc, bc.stride(0),
            c_, c_.stride(0), cc, cc.stride(0), cov, cov.stride(0),
            s_bits, s_bits.stride(0), v_on, v_on.stride(0),
            pre, pre.stride(0), lse,
            n, n_qb, q_offset, h // h_kv, scale * LOG2E,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_REL=use_rel, HAS_BLK=use_blk, SUB=sub, HAS_COL=use_col,
            EXACT=use_exact, PAD_WORDS=_PAD_WORDS, WRITE_LSE=write_lse, MERGE=merge,
            num_warps=warps, num_stages=stages,
        )

    no_pre = torch.zeros(1, 1, 1, dtype=torch.float32, device=dev)
    no_lse = torch.zeros(1, dtype=torch.float32, device=dev)
    if rel is not None and cols is not None and split:
        # two single-loop passes (each fits the registers of 4 warps): bands, then columns merged in
        pre = torch.empty(h, n_q, d, dtype=torch.float32, device=dev)
        lse = torch.empty(h, n_q, dtype=torch.float32, device=dev)
        launch(pre, use_rel=True, use_blk=False, use_col=False, use_exact=exact is not None, write_lse=True,
               merge=False, pre=no_pre, lse=lse)
        launch(out, use_rel=False, use_blk=False, use_col=True, use_exact=False, write_lse=False, merge=True,
               pre=pre, lse=lse)
    else:
        launch(out, use_rel=rel is not None, use_blk=blocks is not None, use_col=cols is not None,
               use_exact=exact is not None, write_lse=False, merge=False, pre=no_pre, lse=no_lse)
    return out


# ---------------------------------------------------------------------------------------------------------
# Index conversions (vectorised torch, no host sync)
# ---------------------------------------------------------------------------------------------------------
_SENTINEL = 1 << 30


_PAD_WORDS = 2  # 64-bit words of zeros before a packed offset bitmap (windows start at rel - 63 >= -63)


def pack_bits(sel: Tensor) -> Tensor:
    """``[h, n]`` bool -> ``[h, 2 + ceil(n / 64) + 2]`` int64 bit words (bit b of word w: position 64 (w - 2) + b)."""
    h, n = sel.shape
    words = triton.cdiv(n, 64)
    padded = torch.zeros(h, (words + 2 * _PAD_WORDS) * 64, dtype=torch.int64, device=sel.device)
    padded[:, _PAD_WORDS * 64:_PAD_WORDS * 64 + n] = sel.to(torch.int64)
    shifts = torch.arange(64, device=sel.device, dtype=torch.int64)
    return (padded.view(h, -1, 64) << shifts).sum(-1)


def query_block_starts(n: int, block_m: int, q_offset: int, device) -> Tensor:
    """Absolute first rows of the query blocks of the rows ``[q_offset, n)``."""
    return q_offset + torch.arange(triton.cdiv(n - q_offset, block_m), device=device) * block_m


def rel_block_counts(rel: Tensor, count: Tensor, n: int, block_m: int = 64, block_n: int = 64,
                     q_offset: int = 0) -> Tensor:
    """``[h, n_qb]``: how many of a head's chunks (sorted by ``rel``) can reach a key ``>= 0`` from each query
    block (``rel <= qs + block_n - 1``), so a block never visits chunks that lie wholly before key 0."""
    h, c = rel.shape
    live = torch.arange(c, device=rel.device)[None, :] < count.to(rel.device).long()[:, None]
    r = torch.where(live, rel.long(), torch.full_like(rel, _SENTINEL, dtype=torch.long))
    qs = query_block_starts(n, block_m, q_offset, rel.device)
    lim = (qs + block_n - 1).expand(h, qs.numel()).contiguous()
    return torch.searchsorted(r, lim, right=True).to(torch.int32)


def _sorted_live(x: Tensor, counts: Tensor | None) -> Tensor:
    """``x [h, k]`` as int64, each row sorted ascending with its entries ``>= counts[h]`` (if given) replaced by
    the sentinel, so they sort last."""
    x = x.to(torch.int64)
    if counts is not None:
        live = torch.arange(x.shape[1], device=x.device)[None, :] < counts.to(x.device)[:, None]
        x = torch.where(live, x, torch.full_like(x, _SENTINEL))
    return x.sort(dim=1).values


def slash_chunks(offsets: Tensor, counts: Tensor | None, n: int, block_m: int = 64, block_n: int = 64
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Slash offsets ``[h, k_s]`` (entries ``>= counts[h]`` ignored; any order) to relative chunks.

    Returns ``(rel [h, c_max], width [h, c_max], count [h], cover [h, n + block_m + 1] int8)`` where
    ``cover[x + block_m]`` says whether ``x = qs - key`` lies inside the head's merged bands.
    """
    h, ks = offsets.shape
    dev = offsets.device
    o = _sorted_live(offsets, counts)
    valid = o < _SENTINEL
    gap = torch.ones_like(o, dtype=torch.bool)
    gap[:, 1:] = (o[:, 1:] - o[:, :-1]) > block_m
    gid = torch.cumsum(gap.to(torch.int64), dim=1) - 1  # interval id per offset
    big = torch.full((h, ks), -1, dtype=torch.int64, device=dev)
    o_hi = big.scatter_reduce(1, gid, o, reduce="amax", include_self=False)
    o_lo = torch.full_like(big, _SENTINEL).scatter_reduce(1, gid, o, reduce="amin", include_self=False)
    g_valid = torch.zeros_like(gid).scatter_reduce(1, gid, valid.to(torch.int64), reduce="amax", include_self=False)
    g_valid = (g_valid > 0) & (o_lo < _SENTINEL)
    span = o_hi - o_lo + block_m  # keys covered by the interval
    nchunk = torch.where(g_valid, (span + block_n - 1) // block_n, torch.zeros_like(span))
    cum = torch.cumsum(nchunk, dim=1)
    total = cum[:, -1]
    c_max = ks * ((block_m + block_n - 1) // block_n + 1)
    p = torch.arange(c_max, device=dev).expand(h, c_max).contiguous()
    g = torch.searchsorted(cum, p, right=True).clamp_max(ks - 1)
    t = p - (cum.gather(1, g) - nchunk.gather(1, g))
    hi = o_hi.gather(1, g)
    rel = hi - t * block_n
    width = (span.gather(1, g) - t * block_n).clamp(max=block_n)
    live_p = p < total[:, None]
    rel = torch.where(live_p, rel, torch.full_like(rel, _SENTINEL))
    rel, perm = rel.sort(dim=1)  # ascending rel: the chunks a query block can reach form a prefix
    width = torch.where(live_p, width, torch.zeros_like(width)).gather(1, perm).to(torch.int32)
    rel = torch.where(rel < _SENTINEL, rel, torch.zeros_like(rel)).to(torch.int32)
    # cover over x + block_m, x in [o_lo - block_m + 1, o_hi]  ->  index [o_lo + 1, o_hi + block_m]
    size = n + block_m + 1
    diff = torch.zeros(h, size + 1, dtype=torch.int32, device=dev)
    lo_i = torch.where(g_valid, (o_lo + 1).clamp(0, size), torch.full_like(o_lo, size))
    hi_i = torch.where(g_valid, (o_hi + block_m + 1).clamp(0, size), torch.full_like(o_hi, size))
    one = torch.ones_like(lo_i, dtype=torch.int32)
    diff.scatter_add_(1, lo_i, one)
    diff.scatter_add_(1, hi_i, -one)
    cover = (torch.cumsum(diff[:, :size], dim=1) > 0).to(torch.int8)
    return rel, width, total.to(torch.int32), cover


def vertical_columns(verticals: Tensor, counts: Tensor | None, n: int, block_m: int = 64, q_offset: int = 0
                     ) -> tuple[Tensor, Tensor]:
    """Vertical key positions ``[h, k_v]`` (entries ``>= counts[h]`` ignored) to ``(sorted pos [h, k_v],
    per-query-block counts [h, n_qb])`` for :func:`sparse_prefill_attention` (query rows ``[q_offset, n)``)."""
    h = verticals.shape[0]
    dev = verticals.device
    pos = _sorted_live(verticals, counts)
    qs = query_block_starts(n, block_m, q_offset, dev)
    last = (qs + block_m - 1).expand(h, qs.numel()).contiguous()
    cnt = torch.searchsorted(pos, last, right=True).to(torch.int32)
    pos = torch.where(pos < _SENTINEL, pos, torch.zeros_like(pos)).to(torch.int32)
    return pos, cnt


# ---------------------------------------------------------------------------------------------------------
# Cells the kernel computes (exactly the allowed cells of its mask), as a device tensor
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _band_cells(a, b, qs, qe):
    """Sum over rows i in [qs, qe) of #{j in [max(a,0), b] : j <= i} (vectorised over a, b)."""
    a = tl.maximum(a, 0)
    i0 = tl.maximum(qs, a)
    i1 = tl.minimum(qe - 1, b)  # rows where the row limit binds: contribute i - a + 1
    n1 = tl.maximum(i1 - i0 + 1, 0)
    s1 = n1 * (i0 - a + 1) + n1 * (n1 - 1) // 2
    i2 = tl.maximum(i0, b + 1)  # rows past b: contribute b - a + 1
    n2 = tl.maximum(qe - i2, 0)
    s2 = n2 * tl.maximum(b - a + 1, 0)
    return tl.where(b >= a, s1 + s2, 0)


@triton.jit
def _count_cells_kernel(
    OUT,
    REL, REL_W, srel_h, REL_CNT,
    BLK, sblk_h, sblk_q, BLK_CNT, sbc_h,
    COL, scol_h, COL_CNT, scc_h, COVER, scov_h,
    n, max_rel, max_blk,
    BLOCK_M: tl.constexpr, CH: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_BLK: tl.constexpr, SUB: tl.constexpr, HAS_COL: tl.constexpr,
    WHOLE_TILE: tl.constexpr,
):
    qb = tl.program_id(0)
    head = tl.program_id(1)
    qs = qb * BLOCK_M
    qe = tl.minimum(qs + BLOCK_M, n)
    lane = tl.arange(0, CH)
    total = tl.zeros([CH], tl.int64)
    if HAS_REL:
        cnt = tl.load(REL_CNT + head)
        for c0 in range(0, max_rel, CH):
            idx = c0 + lane
            live = idx < cnt
            rel = tl.load(REL + head * srel_h + idx, mask=live, other=0).to(tl.int64)
            w = tl.load(REL_W + head * srel_h + idx, mask=live, other=0).to(tl.int64)
            a = qs - rel
            total += tl.where(live, _band_cells(a, a + w - 1, qs, qe), 0)
    if HAS_BLK:
        SB: tl.constexpr = BLOCK_M // SUB
        for s in range(SUB):
            ss = qs + s * SB
            se = tl.minimum(ss + SB, n)
            if WHOLE_TILE:  # packed tiles multiply each block against every row of the query tile
                r0 = qs
                r1 = qe
            else:
                r0 = ss
                r1 = se
            cnt = tl.load(BLK_CNT + head * sbc_h + qb * SUB + s, mask=ss < n, other=0)
            for t0 in range(0, max_blk, CH):
                idx = t0 + lane
                live = idx < cnt
                bid = tl.load(BLK + head * sblk_h + (qb * SUB + s) * sblk_q + idx, mask=live, other=0)
                a = bid.to(tl.int64) * SB
                b = tl.minimum(a + SB - 1, n - 1)
                total += tl.where(live, _band_cells(a, b, r0, r1), 0)
    if HAS_COL:
        ccnt = tl.load(COL_CNT + head * scc_h + qb)
        for c0 in range(0, ccnt, CH):
            key, fresh = _fresh_columns(COL + head * scol_h, COVER + head * scov_h, c0 + lane, ccnt, qs, BLOCK_M)
            ok = fresh & (key < qe)
            total += tl.where(ok, (qe - tl.maximum(qs, key)).to(tl.int64), 0)
    tl.store(OUT + head * tl.num_programs(0) + qb, tl.sum(total, 0))


def count_cells(
    n: int,
    h: int,
    *,
    rel: tuple[Tensor, Tensor, Tensor] | None = None,
    blocks: tuple[Tensor, Tensor, int] | None = None,
    cols: tuple[Tensor, Tensor, Tensor] | None = None,
    block_m: int = 64,
    device: torch.device | str = "cpu",
    whole_tile: bool = False,
) -> Tensor:
    """Allowed (computed) cells per ``[h, n_qb]`` of the same index, as an int64 device tensor (no sync).
    ``whole_tile``: with packed sub-blocks, count each block against every row of its query tile (the
    causal cells the tensor cores multiply) instead of its own sub-block's rows."""
    n_qb = triton.cdiv(n, block_m)
    out = torch.empty(h, n_qb, dtype=torch.int64, device=device)
    dz = _dummy(torch.device(device))
    r_, rw, rc = rel if rel is not None else (dz.view(1, 1), dz.view(1, 1), dz)
    sub = 1
    if blocks is not None:
        b_, bc, sb = blocks
        sub = block_m // int(sb)
    else:
        b_, bc = dz.view(1, 1, 1), dz.view(1, 1)
    c_, cc, cov = cols if cols is not None else (dz.view(1, 1), dz.view(1, 1), dz.view(1, 1).to(torch.int8))
    _count_cells_kernel[(n_qb, h)](
        out, r_, rw, r_.stride(0), rc,
        b_, b_.stride(0), b_.stride(1), bc, bc.stride(0),
        c_, c_.stride(0), cc, cc.stride(0), cov, cov.stride(0),
        n, r_.shape[-1], b_.shape[-1],
        BLOCK_M=block_m, CH=128,
        HAS_REL=rel is not None, HAS_BLK=blocks is not None, SUB=sub, HAS_COL=cols is not None,
        WHOLE_TILE=whole_tile, num_warps=4,
    )
    return out
