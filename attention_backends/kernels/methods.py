"""The Triton fast path of every method, behind the same contract as the references.

``PREFILL[method](q, k, v, phase) -> PrefillOutcome`` and ``DECODE[method](q, k, v, phase) -> DecodeState``
mirror the references ``prefill/<method>.py`` and ``decode/<method>.py``: same parameters, same index
semantics (same estimate, same keep orders, same top-k), so for the same budgets the output is the
reference's up to float rounding.
What differs is *how* cells are computed, and the report says so honestly:

* vertical_slash / flexprefill: slashes are computed as merged ``block_m``-row bands with an exact per-cell
  mask; ``computed_cells`` counts the band and column cells the kernel really multiplies, and the budget
  search for a target ratio runs on those cells (``details["attended_cells"]`` is the reference's exact
  count of the union).
* block_sparse: the kernel's tiles are the blocks (16 to 128), so the computed cells are the kept cells.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from ..cost import causal_cells
from ..decode import ada_snapkv, snapkv
from ..decode.quest import budget_pages
from ..decode.state import DecodeState
from ..prefill.block_sparse import indexing_flops as block_sparse_indexing_flops
from ..prefill.block_sparse import kept_cells, resolve_top_k
from ..prefill.common import PrefillOutcome, check_chunk_start
from ..prefill.dense import sdpa as dense_prefill
from ..prefill.vertical_slash_index import estimation_flops
from ..spec import PhaseSpec
from .index_vertical_slash import (
    VSCandidates,
    block_scores,
    corrected_search,
    exact_cells,
    grid_search,
    window_scores,
)
from .paged_state import PagedDecodeState, QuestPagedState
from .sparse_prefill import slash_chunks, sparse_prefill_attention, vertical_columns
from .topk import causal_block_topk

VS_BLOCK = 64  # query-block rows of the vertical-slash kernel (bands are this wide)


def _dense(q: Tensor, k: Tensor, v: Tensor, details: dict, q_offset: int = 0) -> PrefillOutcome:
    return PrefillOutcome(dense_prefill(q, k, v, q_offset), causal_cells(k.shape[1], q_offset) * q.shape[0], 0.0,
                          details)


# --------------------------------------------------------------------------------------------- vertical-slash
def vs_attention(q: Tensor, k: Tensor, v: Tensor, cand: VSCandidates, kv: Tensor, ks: Tensor,
                 kv_max: int, ks_max: int, cells: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Attention over the index keeping the first ``kv[h]``/``ks[h]`` entries of each head's orders (``kv_max`` /
    ``ks_max``: host bounds of them). Returns ``(out, computed_cells, attended_cells)``, the counts as device
    scalars (``cells``, when the search counted them already, is returned as given). No host sync."""
    n, c0 = cand.n, cand.q_offset
    sel_s = cand.slash_rank < ks[:, None]
    sel_v = cand.vertical_rank < kv[:, None]
    rel, width, count, cover = slash_chunks(cand.slash_order[:, :ks_max], ks, n, VS_BLOCK, VS_BLOCK)
    pos, ccnt = vertical_columns(cand.vertical_order[:, :kv_max], kv, n, VS_BLOCK, c0)
    out = sparse_prefill_attention(q, k, v, rel=(rel, width, count), cols=(pos, ccnt, cover),
                                   exact=(sel_s.view(torch.int8), sel_v.view(torch.int8)),
                                   block_m=VS_BLOCK, block_n=VS_BLOCK, q_offset=c0)
    if cells is None:
        cells = cand.computed_batch(kv[None], ks[None], kv_max)[0]
    return out, cells, exact_cells(sel_s, sel_v, c0).sum()


def vs_closest_budget(cand: VSCandidates, ratio: float, num_vertical: int | None = None,
                      num_slash: int | None = None) -> tuple[Tensor, Tensor]:
    """``(k, cells)``: the ``k`` whose computed-cell fraction is close to ``1 / ratio`` (the free one of the two
    budgets) and that index's computed cells, as device scalars: :func:`corrected_search` on the curves of every
    ``k`` at once and a few exact counts, no host sync."""
    dev = cand.vertical_rank.device
    k = torch.arange(cand.n + 1, device=dev)
    kv = k if num_vertical is None else torch.full_like(k, num_vertical)
    ks = k if num_slash is None else torch.full_like(k, num_slash)
    band_k, bound_k = (part[1:] for part in cand.estimate_parts(kv, ks))  # every k = 1..n, [n] each
    target = 1.0 / ratio

    def solve(rho: Tensor | float) -> Tensor:
        estimate = band_k + rho * bound_k  # non-decreasing in k
        i = torch.searchsorted(estimate, torch.full((1,), target, dtype=estimate.dtype, device=dev))
        around = torch.cat([i - 1, i]).clamp(0, estimate.numel() - 1)  # the neighbours of the target
        return around[(estimate[around] - target).abs().argmin()] + 1  # the closer (ties: the smaller)

    def measure(k: Tensor) -> Tensor:
        kv_k = (k if num_vertical is None else torch.full_like(k, num_vertical))[None]
        ks_k = (k if num_slash is None else torch.full_like(k, num_slash))[None]
        return cand.measure(kv_k, ks_k, num_vertical)[0]

    return corrected_search(solve, measure, target)


def vertical_slash_prefill(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec, q_offset: int = 0) -> PrefillOutcome:
    """No host sync: the budget search runs on the device and the counts stay device scalars (the report's
    consumer reads them once, :meth:`..reports.PrefillCallReport.resolved`)."""
    h, _, d = q.shape
    n = k.shape[1]
    p = phase.params
    nv, ns = p["num_vertical"], p["num_slash"]
    if phase.compression_ratio <= 1.0 and nv is None and ns is None:
        return _dense(q, k, v, {"num_vertical": n, "num_slash": n}, q_offset)
    check_chunk_start(q_offset, VS_BLOCK)  # the kernel's query blocks
    cols, slash, W = window_scores(q, k, p["window"])
    cand = VSCandidates(cols, slash, W, p["sink_tokens"], p["local_window"], VS_BLOCK, q_offset)
    cells = None
    kv_max = n if nv is None else min(max(nv, cand.forced_vertical), n)  # host bounds of the budgets
    ks_max = n if ns is None else min(max(ns, cand.forced_slash), n)
    if nv is None or ns is None:
        budget, cells = vs_closest_budget(cand, phase.compression_ratio, nv, ns)
        nv = budget if nv is None else nv
        ns = budget if ns is None else ns
    kv = cand.counts(nv, cand.forced_vertical)
    ks = cand.counts(ns, cand.forced_slash)
    out, cells, attended = vs_attention(q, k, v, cand, kv, ks, kv_max, ks_max, cells)
    details = {"num_vertical": kv.max(), "num_slash": ks.max(), "attended_cells": attended,
               "block_m": VS_BLOCK, "impl": "triton"}
    return PrefillOutcome(out, cells, estimation_flops(h, n, d, W), details)


# ------------------------------------------------------------------------------------------------ flexprefill
FLEX_ALPHA_POINTS = 16  # alphas estimated at once (one host sync); 5 rounds resolve alpha to 15^-5 (~2^-20)


def grid_search_alpha(fractions, ratio: float, rel_tol: float = 0.01, rounds: int = 5) -> float:
    """The alpha in [0, 1] whose fraction (non-decreasing in alpha) is closest to ``1 / ratio``: the reference's
    bisection (:func:`..prefill.flexprefill.search_alpha`) one grid of alphas per host sync."""

    def grid(a: float, b: float) -> list[float]:
        return [a + (b - a) * i / (FLEX_ALPHA_POINTS - 1) for i in range(FLEX_ALPHA_POINTS)]

    return grid_search(fractions, 1.0 / ratio, 0.0, 1.0, grid, rel_tol, max_rounds=rounds)


def flexprefill_prefill(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec, q_offset: int = 0) -> PrefillOutcome:
    from ..prefill.flexprefill import DEFAULT_ALPHA, DEFAULT_MIN_BUDGET, Coverage  # noqa: F401

    h, _, d = q.shape
    n = k.shape[1]
    p = phase.params
    alpha, min_budget, ratio = p["alpha"], p["min_budget"], phase.compression_ratio
    if ratio <= 1.0 and alpha is None:
        return _dense(q, k, v, {"alpha": None, "min_budget": None, "num_vertical": [n] * h, "num_slash": [n] * h},
                      q_offset)
    check_chunk_start(q_offset, VS_BLOCK)  # the kernel's query blocks
    cols, slash, W = window_scores(q, k, p["window"])
    cand = VSCandidates(cols, slash, W, p["sink_tokens"], p["local_window"], VS_BLOCK, q_offset)
    vcov = Coverage(cols, W, cand.forced_vertical)
    scov = Coverage(slash, W, cand.forced_slash)
    if min_budget is None:
        min_budget = DEFAULT_MIN_BUDGET
        if ratio > 1.0:
            min_budget = min(min_budget, int(vs_closest_budget(cand, ratio)[0]))

    def budgets(a: float | Tensor) -> tuple[Tensor, Tensor]:  # [h] each, or [A, h] for A alphas
        return vcov.count(a).clamp(min=min_budget), scov.count(a).clamp(min=min_budget)

    if alpha is None:  # corrected_search over alpha: the grid on the curves' estimate, then exact counts
        def solve(rho: Tensor) -> float:
            def estimates(alphas: list[float]) -> list[float]:
                band, bound = cand.estimate_parts(*budgets(torch.tensor(alphas)))
                return (band + float(rho) * bound).tolist()

            return grid_search_alpha(estimates, ratio)

        def measure(a: Tensor) -> Tensor:
            nv_a, ns_a = budgets(float(a))
            return cand.measure(nv_a[None], ns_a[None])[0].cpu()  # on the host: the search may stop early

        alpha, cells = corrected_search(solve, measure, 1.0 / ratio)
        alpha, cells = float(alpha), cells.to(q.device).long()
    else:
        cells = None
    nv, ns = budgets(alpha)
    kv = cand.counts(nv, cand.forced_vertical)
    ks = cand.counts(ns, cand.forced_slash)
    kv_list, ks_list = kv.tolist(), ks.tolist()
    out, cells, attended = vs_attention(q, k, v, cand, kv, ks, max(kv_list), max(ks_list), cells)
    details = {"alpha": alpha, "min_budget": min_budget, "num_vertical": kv_list, "num_slash": ks_list,
               "attended_cells": attended, "block_m": VS_BLOCK, "impl": "triton"}
    return PrefillOutcome(out, cells, estimation_flops(h, n, d, W), details)


# ----------------------------------------------------------------------------------------------- block-sparse
def block_sparse_index(q: Tensor, k: Tensor, block: int, top_k: int, q_offset: int = 0) -> tuple[Tensor, Tensor]:
    """``(ids [h, nqb, top_k] ascending, counts [h, nqb])`` of the kept key blocks per query block of ``q``
    (the first one starting at ``q_offset``)."""
    return causal_block_topk(block_scores(q, k, block, q_offset), top_k, force_prev=True, row0=q_offset // block)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, cnt: Tensor, block: int,
                           q_offset: int = 0) -> Tensor:
    """Exact ``block x block`` tiles: only the kept blocks are multiplied. (Packing 16-blocks into 64-row tiles
    multiplies each kept block against the whole tile, the union of four query blocks' choices: on the H200
    that computed nearly dense cells at r=4 and ran 2.1x slower than exact tiles;
    benchmarks/results/block-sparse-tiles-NVIDIA-H200-2026-11-30.txt.)"""
    return sparse_prefill_attention(q, k, v, blocks=(ids, cnt, block), block_m=block, q_offset=q_offset)


def block_sparse_prefill(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec, q_offset: int = 0) -> PrefillOutcome:
    h, _, d = q.shape
    n = k.shape[1]
    block, top_k = resolve_top_k(n, phase, q_offset)
    details = {"block_size": block, "top_k": top_k, "impl": "triton"}
    if top_k >= math.ceil(n / block):
        return _dense(q, k, v, details, q_offset)
    ids, cnt = block_sparse_index(q, k, block, top_k, q_offset)
    out = block_sparse_attention(q, k, v, ids, cnt, block, q_offset)
    cells = kept_cells(n, block, top_k, q_offset) * h  # exact tiles compute exactly the kept cells
    flops = block_sparse_indexing_flops(h, k.shape[0], n, d, block, top_k, q_offset)
    return PrefillOutcome(out, cells, flops, details)


# Every prefill method's fast path.
PREFILL = {
    "dense": lambda q, k, v, phase, q_offset=0: _dense(q, k, v, {}, q_offset),
    "vertical_slash": vertical_slash_prefill,
    "flexprefill": flexprefill_prefill,
    "block_sparse": block_sparse_prefill,
}


# ---------------------------------------------------------------------------------------------------- decode
def quest_prepare(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec) -> DecodeState:
    page_size = int(phase.params["page_size"])
    pages = budget_pages(k.shape[1], phase)
    details = {"page_size": page_size, "budget": None if pages is None else pages * page_size, "pages_selected": None}
    return QuestPagedState(phase, k, v, num_heads=q.shape[0], page_size=page_size, budget_pages=pages,
                           details=details)


# Every decode method's state: its prompt tokens in pages, every step the paged kernel (SnapKV and Ada-SnapKV:
# their method module's state over the Triton keep path).
DECODE = {
    "dense": lambda q, k, v, phase: PagedDecodeState(phase, k, v, num_heads=q.shape[0]),
    "snapkv": partial(snapkv.prepare, impl="triton"),
    "ada_snapkv": partial(ada_snapkv.prepare, impl="triton"),
    "quest": quest_prepare,
}
