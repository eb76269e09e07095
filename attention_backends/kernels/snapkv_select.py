"""SnapKV / Ada-SnapKV keep sets on the GPU (same semantics as ``decode/snapkv.py``/``decode/ada_snapkv.py``).

The observation-window probabilities are never materialised: :func:`.index_vertical_slash.window_scores`
reduces them per key column inside the kernel (sum for SnapKV, max for Ada-SnapKV) per query head; the
GQA group is then reduced (mean / max), pooled, and the keep sets chosen with vectorised top-k over all
KV heads at once (no per-head Python loop). Output: sorted kept positions ``[h_kv, max_keep]`` (int64,
padded with ``n``) and per-head counts -- what :func:`pack_pages` turns into a paged cache.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..decode.keep_sets import protected_in_priority
from ..decode.window_scores import Reduction, avg_pool_same, max_pool_same
from .index_vertical_slash import window_scores


def triton_token_importance(q: Tensor, k: Tensor, window: int, reduction: Reduction) -> Tensor:
    """:func:`.window_scores.token_importance` (``[h_kv, n]`` float32) without the ``[g, W, n]`` probabilities."""
    h = q.shape[0]
    h_kv, n = k.shape[0], k.shape[1]
    cols, _, _ = window_scores(q, k, window, col_reduce="max" if reduction == "max" else "sum", diagonal=False)
    cols = cols.view(h_kv, h // h_kv, n)
    return cols.amax(1) if reduction == "max" else cols.mean(1)


def _top_with_protected(scores: Tensor, protected: Tensor, count: int) -> Tensor:
    """``[h_kv, n]`` bool: per head the protected tokens (priority-truncated) then the top scores."""
    h_kv, n = scores.shape
    count = min(count, n)
    keep = torch.zeros(h_kv, n, dtype=torch.bool, device=scores.device)
    forced = protected[:count]
    keep[:, forced] = True
    rest = count - forced.numel()
    if rest > 0:
        cand = scores.float().masked_fill(keep, float("-inf"))
        keep.scatter_(1, cand.topk(rest, dim=1).indices, True)
    return keep


def _compact(keep: Tensor, max_keep: int) -> tuple[Tensor, Tensor]:
    h_kv, n = keep.shape
    pos = torch.arange(n, device=keep.device).expand(h_kv, n)
    idx = torch.where(keep, pos, torch.full_like(pos, n)).sort(dim=1).values[:, :max_keep]
    return idx, keep.sum(1).to(torch.int32)


def snapkv_keep(q: Tensor, k: Tensor, *, capacity: int, window: int = 256, kernel_size: int = 21,
                sink_tokens: int = 4, local_window: int = 128) -> tuple[Tensor, Tensor]:
    """SnapKV: every KV head keeps ``capacity`` prompt tokens -> ``(positions [h_kv, C] sorted, counts)``."""
    n = k.shape[1]
    scores = avg_pool_same(triton_token_importance(q, k, window, "sum_of_group_mean"), kernel_size)
    protected = protected_in_priority(n, sink_tokens, local_window, device=k.device)
    keep = _top_with_protected(scores, protected, capacity)
    return _compact(keep, min(capacity, n))


def ada_snapkv_keep(q: Tensor, k: Tensor, *, capacity: int, window: int = 256, kernel_size: int = 21,
                    sink_tokens: int = 4, local_window: int = 128, floor_fraction: float = 0.2
                    ) -> tuple[Tensor, Tensor]:
    """Ada-SnapKV: per-head floors, then the rest of ``capacity * h_kv`` by global score -> ``(positions
    [h_kv, max_keep] sorted, padded with n; counts [h_kv])``."""
    h_kv, n, _ = k.shape
    capacity = min(capacity, n)
    scores = max_pool_same(triton_token_importance(q, k, window, "max"), kernel_size)
    protected = protected_in_priority(n, sink_tokens, local_window, device=k.device)
    floor = min(capacity, max(math.ceil(floor_fraction * capacity), protected.numel()))
    keep = _top_with_protected(scores, protected, floor)
    extra = capacity * h_kv - floor * h_kv
    if extra > 0:
        remaining = scores.masked_fill(keep, float("-inf")).flatten()
        chosen = remaining.topk(extra).indices
        keep.view(-1)[chosen] = True
    return _compact(keep, min(n, floor + extra))


def pack_pages(k: Tensor, v: Tensor, positions: Tensor, counts: Tensor, page_size: int = 16,
               extra_tokens: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Gather the kept tokens of ``k``/``v [h_kv, n, d]`` into a fresh page pool -> ``(k_pages, v_pages,
    page_table [1, h_kv, pages])``; each head gets room for ``extra_tokens`` more (generated tokens)."""
    h_kv, n, d = k.shape
    max_keep = positions.shape[1]
    pages = -(-(max_keep + extra_tokens) // page_size)
    idx = positions.clamp_max(n - 1)
    kk = torch.gather(k, 1, idx[..., None].expand(h_kv, max_keep, d))
    vv = torch.gather(v, 1, idx[..., None].expand(h_kv, max_keep, d))
    k_pages = k.new_zeros(h_kv * pages * page_size, d)
    v_pages = v.new_zeros(h_kv * pages * page_size, d)
    base = (torch.arange(h_kv, device=k.device) * pages * page_size)[:, None]
    dst = (base + torch.arange(max_keep, device=k.device)[None, :]).flatten()
    k_pages[dst] = kk.reshape(-1, d)
    v_pages[dst] = vv.reshape(-1, d)
    table = torch.arange(h_kv * pages, device=k.device, dtype=torch.int32).view(1, h_kv, pages)
    return k_pages.view(-1, page_size, d), v_pages.view(-1, page_size, d), table
