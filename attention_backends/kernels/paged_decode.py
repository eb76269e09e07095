"""Paged decode attention in Triton: one kernel for every decode method.

Cache layout (README.md, "How the native engine keeps KV": every (request, layer, KV head) is its own
sequence of pages)::

    k_pages, v_pages  [num_pages, page_size, d]    a page holds page_size tokens of ONE KV head
                   or [num_pages, page_size, h_kv, d]  a page holds every KV head's tokens (vLLM's FlashAttention
                                                   cache, ``kv_cache[:, 0]`` / ``[:, 1]``: any strides, unit last)
    page_table        [B, h_kv, max_pages] int32   page ids of sequence b, KV head j, in token order (a shared page
                                                   table may have head stride 0: vLLM's block table, expanded)
    lengths           [B, h_kv] int32              tokens held by (b, j): may differ per head (Ada-SnapKV)
    q                 [B, h, d]                    query head i reads KV head i // g (g = h // h_kv)
    out               [B, h, d]

Token ``t`` of ``(b, j)`` lives at ``k_pages[page_table[b, j, t // page_size], t % page_size]`` (``[..., j]`` in
the shared layout). Dense decode,
SnapKV (fewer tokens per head), Ada-SnapKV (a different count per head) and Quest (a page table of the
selected pages only, see :mod:`.quest_select`) all call :func:`paged_decode`.

Split-K: grid ``(B * h_kv, splits)``; each program takes the g query heads of one KV head together (one
``[g, d] x [d, block_n]`` product per key tile, so K/V are read once per KV head, never repeated), keeps an
online softmax over its share of the tokens in float32 and writes a partial (max, sum, acc); a second kernel
merges the splits. No host sync: ``max_len`` (an upper bound of ``lengths``) only sizes the grid; each row
divides its own length among the splits, so one grid serves any lengths (CUDA-graph replay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import steps_by_one
from .sparse_prefill import LOG2E

_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _paged_decode_split_kernel(
    Q, KP, VP, PT, LEN, MP, LP, AP, KT, KW, KCNT, PLEN,
    sqb, sqh, skp, skt, skh, svp, svt, svh, spt_b, spt_h, slen_b, skt_b, skt_h, skc_b,
    h_kv, group, qk_scale, num_splits, layer,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, G_PAD: tl.constexpr, KEEP: tl.constexpr,
    KEEP_PTR: tl.constexpr, SKIP_EMPTY: tl.constexpr,
):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = bh // h_kv
    kvh = bh % h_kv
    length = tl.load(LEN + b * slen_b + kvh)
    # each row spreads its own tokens over the splits: the grid never depends on the lengths (a CUDA graph
    # replays it for any), and a short row beside a long one does not idle most of its programs
    tokens_per_split = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, length)
    g = tl.arange(0, G_PAD)
    g_ok = g < group
    if SKIP_EMPTY:  # a row of length 0 reads and writes nothing (the combine leaves its output alone)
        g_ok = g < tl.where(length > 0, group, 0)
    offs_d = tl.arange(0, HEAD_DIM)
    qh = kvh * group + g
    q = tl.load(Q + b * sqb + qh[:, None] * sqh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    m_i = tl.full([G_PAD], _NEG, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
    pt = PT + b * spt_b + kvh * spt_h
    kp = KP + kvh * skh  # (skh = 0 where a page belongs to one KV head)
    vp = VP + kvh * svh
    lane = tl.arange(0, BLOCK_N)
    if KEEP:  # the row's i-th token read: its i-th kept prompt position, then the generated tokens
        if KEEP_PTR:  # (the row's own stack [layers, h_kv, width] at the address KT[b]: a request's, not a copy)
            kt = tl.load(KT + b).to(tl.pointer_type(tl.int32)) + (layer * h_kv + kvh) * tl.load(KW + b)
        else:
            kt = KT + b * skt_b + kvh * skt_h
        kept = tl.load(KCNT + b * skc_b + kvh)
        gen0 = tl.load(PLEN + b) - kept  # position of read token i >= kept: prompt_len + (i - kept)
    for t0 in range(start, end, BLOCK_N):
        tok = t0 + lane
        live = tok < end
        if KEEP:
            pos = tl.where(tok < kept, tl.load(kt + tok, mask=live & (tok < kept), other=0), gen0 + tok)
        else:
            pos = tok
        page = tl.load(pt + pos // PAGE, mask=live, other=0).to(tl.int64)
        within = pos % PAGE
        k = tl.load(kp + page[:, None] * skp + within[:, None] * skt + offs_d[None, :], mask=live[:, None], other=0.0)
        v = tl.load(vp + page[:, None] * svp + within[:, None] * svt + offs_d[None, :], mask=live[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(live[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    row = (b * h_kv * group + qh) * num_splits + s
    tl.store(MP + row, m_i, mask=g_ok)
    tl.store(LP + row, l_i, mask=g_ok)
    tl.store(AP + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _combine_kernel(MP, LP, AP, Out, LEN, num_splits, slen_b, h, group, HEAD_DIM: tl.constexpr, S_PAD: tl.constexpr,
                    SKIP_EMPTY: tl.constexpr):
    row = tl.program_id(0)  # b * h + head
    width = HEAD_DIM
    s = tl.arange(0, S_PAD)
    s_ok = s < num_splits
    if SKIP_EMPTY:  # a row of length 0 leaves its output as it was (and its partials were not written)
        width = tl.where(tl.load(LEN + (row // h) * slen_b + (row % h) // group) > 0, HEAD_DIM, 0)
        s_ok = s < tl.where(width > 0, num_splits, 0)
    m = tl.load(MP + row * num_splits + s, mask=s_ok, other=_NEG)
    l_ = tl.load(LP + row * num_splits + s, mask=s_ok, other=0.0)
    offs_d = tl.arange(0, HEAD_DIM)
    a = tl.load(AP + (row * num_splits + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - m_max)
    denom = tl.sum(w * l_, 0)
    num = tl.sum(w[:, None] * a, 0)
    denom = tl.where(denom > 0, denom, 1.0)
    tl.store(Out + row * HEAD_DIM + offs_d, (num / denom).to(Out.dtype.element_ty), mask=offs_d < width)


@dataclass(frozen=True)
class StackedPositions:
    """Kept positions read through pointers: row ``b``'s are an int32 ``[layers, h_kv, widths[b]]`` tensor at address
    ``pointers[b]`` (a request's own keep stack, kept alive by its owner), and ``layer`` picks the layer. A row of
    length 0 is never read (its pointer may be 0)."""

    pointers: Tensor  # [B] int64
    widths: Tensor  # [B] int32
    layer: int


def page_strides(pages: Tensor, h_kv: int) -> tuple[int, int, int]:
    """``(page, token, KV head)`` strides of a page pool in either layout of the module docstring (a page of one
    KV head: head stride 0)."""
    if pages.dim() == 3:
        return pages.stride(0), pages.stride(1), 0
    assert pages.dim() == 4 and pages.shape[2] == h_kv, f"pages {tuple(pages.shape)} for {h_kv} KV heads"
    return pages.stride(0), pages.stride(1), pages.stride(2)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_splits(batch_heads: int, max_len: int, block_n: int, device: torch.device, waves: int = 4) -> int:
    """Splits per (sequence, KV head): enough programs to fill the GPU ``waves`` times, at least one key tile
    of work per split."""
    tiles = max(1, triton.cdiv(max_len, block_n))
    want = max(1, triton.cdiv(waves * num_sms(device), max(1, batch_heads)))
    return max(1, min(tiles, want, 256))


def paged_decode(
    q: Tensor,
    k_pages: Tensor,
    v_pages: Tensor,
    page_table: Tensor,
    lengths: Tensor,
    *,
    max_len: int | None = None,
    num_splits: int | None = None,
    sm_scale: float | None = None,
    block_n: int | None = None,
    out: Tensor | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    keep: tuple[Tensor | StackedPositions, Tensor, Tensor] | None = None,
    skip_empty: bool = False,
) -> Tensor:
    """Decode attention of ``q [B, h, d]`` over paged K/V (layout in the module docstring) -> ``[B, h, d]``.

    ``max_len`` bounds ``lengths`` (default: ``max_pages * page_size``); it only sizes the grid. A row of
    length 0 writes zeros, or, with ``skip_empty``, leaves ``out`` as it was (rows another kernel wrote).

    ``keep = (positions [B, h_kv, K], kept [B, h_kv], prompt_lens [B])`` (int32): each (row, KV head) reads the
    ``kept`` prompt positions listed first in ``positions`` (a SnapKV / Ada-SnapKV read-set over a cache that holds
    the whole prompt, such as vLLM's), then its generated tokens, positions ``prompt_len ..``; ``lengths`` is then
    ``kept`` plus the generated tokens, and ``page_table`` maps positions to pages as without ``keep``. The
    positions may instead be :class:`StackedPositions` (each row's own stack, through a pointer: what a CUDA graph
    replays over requests that change from step to step).
    """
    B, h, d = q.shape
    page, d2 = k_pages.shape[1], k_pages.shape[-1]
    assert d2 == d and v_pages.shape == k_pages.shape
    assert page_table.dim() == 3 and page_table.shape[0] == B and lengths.shape == page_table.shape[:2]
    h_kv = page_table.shape[1]
    kst, vst = page_strides(k_pages, h_kv), page_strides(v_pages, h_kv)
    assert h % h_kv == 0
    assert steps_by_one(q, k_pages, v_pages, page_table, lengths)
    group = h // h_kv
    dev = q.device
    if max_len is None:
        max_len = page_table.shape[2] * page
    if block_n is None:  # 32-token tiles, 4 warps: measured best on H100 (2.9 TB/s at 128K, batch 8)
        block_n = max(page, 32)
    assert block_n % page == 0 or page % block_n == 0
    if num_splits is None:
        num_splits = choose_splits(B * h_kv, max_len, block_n, dev)
    g_pad = max(16, triton.next_power_of_2(group))
    mp = torch.empty(B * h * num_splits, dtype=torch.float32, device=dev)
    lp = torch.empty_like(mp)
    ap = torch.empty(B * h * num_splits, d, dtype=torch.float32, device=dev)
    scale = (1.0 / math.sqrt(d)) if sm_scale is None else sm_scale
    if num_stages is None:
        num_stages = 3 if dev.type == "cuda" else 1
    # the keep-set's arguments: positions (or their pointers), widths, kept counts, prompt lengths, their strides
    # and the layer of a stack (unused without ``keep``)
    kt = kw = kcnt = plen = lengths
    skt_b = skt_h = skc_b = layer = 0
    stacked = keep is not None and isinstance(keep[0], StackedPositions)
    if keep is not None:
        positions, kcnt, plen = keep
        assert kcnt.shape == (B, h_kv) and plen.shape == (B,) and steps_by_one(kcnt, plen)
        skc_b = kcnt.stride(0)
        if stacked:
            assert positions.pointers.shape == positions.widths.shape == (B,)
            assert positions.pointers.dtype == torch.int64 and positions.widths.dtype == torch.int32
            kt, kw, layer = positions.pointers, positions.widths, positions.layer
        else:
            assert positions.shape[:2] == (B, h_kv) and steps_by_one(positions)
            kt = kw = positions
            skt_b, skt_h = positions.stride(0), positions.stride(1)
    _paged_decode_split_kernel[(B * h_kv, num_splits)](
        q, k_pages, v_pages, page_table, lengths, mp, lp, ap, kt, kw, kcnt, plen,
        q.stride(0), q.stride(1), *kst, *vst,
        page_table.stride(0), page_table.stride(1), lengths.stride(0), skt_b, skt_h, skc_b,
        h_kv, group, scale * LOG2E, num_splits, layer,
        HEAD_DIM=d, PAGE=page, BLOCK_N=block_n, G_PAD=g_pad, KEEP=keep is not None, KEEP_PTR=stacked,
        SKIP_EMPTY=skip_empty, num_warps=num_warps, num_stages=num_stages,
    )
    if out is None:
        out = torch.empty(B, h, d, dtype=q.dtype, device=dev)
    assert out.is_contiguous()
    _combine_kernel[(B * h,)](mp, lp, ap, out, lengths, num_splits, lengths.stride(0), h, group, HEAD_DIM=d,
                              S_PAD=max(2, triton.next_power_of_2(num_splits)), SKIP_EMPTY=skip_empty, num_warps=4)
    return out


def pages_from_contiguous(k: Tensor, v: Tensor, page_size: int = 16, *, shuffle: bool = True,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Scatter contiguous ``k``/``v [B, h_kv, n, d]`` into a page pool (random page order when ``shuffle``)
    -> ``(k_pages, v_pages, page_table [B, h_kv, ceil(n / page_size)])``. For tests and benchmarks."""
    B, h_kv, n, d = k.shape
    npg = triton.cdiv(n, page_size)
    total = B * h_kv * npg
    dev = k.device
    perm = (torch.randperm(total, generator=generator, device="cpu").to(dev) if shuffle
            else torch.arange(total, device=dev))
    table = perm.view(B, h_kv, npg).to(torch.int32)
    pad = npg * page_size - n
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).reshape(total, page_size, d)
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad)).reshape(total, page_size, d)
    k_pages = torch.empty_like(kp)
    v_pages = torch.empty_like(vp)
    k_pages[perm] = kp
    v_pages[perm] = vp
    return k_pages, v_pages, table


def shared_pages_from_contiguous(k: Tensor, v: Tensor, page_size: int = 16, *, spare: int = 3,
                                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Scatter contiguous ``k``/``v [B, h_kv, n, d]`` into vLLM's FlashAttention cache layout -> ``(kv_cache
    [num_blocks, 2, page_size, h_kv, d], block_table [B, ceil(n / page_size)] int32)``: a block holds every KV
    head's tokens, blocks in random order, ``spare`` unused blocks filled with NaN (a kernel that reads one fails).
    For tests and benchmarks."""
    B, h_kv, n, d = k.shape
    npg = triton.cdiv(n, page_size)
    total = B * npg + spare
    perm = torch.randperm(total, generator=generator, device="cpu")[: B * npg].to(k.device)
    cache = torch.full((total, 2, page_size, h_kv, d), float("nan"), dtype=k.dtype, device=k.device)
    pad = npg * page_size - n
    for i, x in enumerate((k, v)):  # [B, h_kv, n, d] -> [B * npg, page, h_kv, d]
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, h_kv, npg, page_size, d)
        cache[perm, i] = x.permute(0, 2, 3, 1, 4).reshape(B * npg, page_size, h_kv, d)
    return cache, perm.view(B, npg).to(torch.int32)
