"""Choosing which prompt tokens an eviction method keeps: protected tokens first, then the best scores.

Protected tokens are the attention sinks (the first ``sink_tokens``) and the local window (the last
``local_window`` prompt tokens). They count towards the budget. When a budget is smaller than the
protected set, protected tokens are taken in priority order: sinks first (from position 0), then the
most recent tokens (from position ``n - 1`` backwards).
"""

from __future__ import annotations

import torch
from torch import Tensor


def protected_in_priority(n: int, sink_tokens: int, local_window: int, device: torch.device | None = None
                          ) -> Tensor:
    """Positions of the protected tokens, without duplicates, in priority order: sinks ascending, then the
    local window from the most recent token backwards."""
    sinks = torch.arange(min(sink_tokens, n), device=device)
    first_local = max(n - local_window, sinks.numel())
    recent = torch.arange(n - 1, first_local - 1, -1, device=device)
    return torch.cat([sinks, recent])


def keep_top(scores: Tensor, protected: Tensor, count: int) -> Tensor:
    """Sorted positions of ``count`` tokens of one head: the protected ones (``protected`` in priority
    order, truncated if it alone exceeds ``count``), then the highest-scoring others. ``scores [n]``."""
    n = scores.shape[0]
    count = min(count, n)
    forced = protected[:count]
    rest = count - forced.numel()
    if rest > 0:
        candidates = scores.float().clone()
        candidates[forced] = float("-inf")
        forced = torch.cat([forced, candidates.topk(rest).indices])
    return forced.sort().values


def unpad(positions: Tensor, counts: Tensor) -> list[Tensor]:
    """Per-head keep sets from the batched form ``positions [h_kv, max_keep]`` (row ``j`` valid up to
    ``counts[j]``, then padding)."""
    return [positions[j, :c] for j, c in enumerate(counts.tolist())]
