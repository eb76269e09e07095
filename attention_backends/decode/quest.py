"""Quest: keep the whole KV cache; each step read only the pages whose keys can score highest.

The cache of every KV head (prompt, then generated tokens) is cut into pages of ``page_size`` tokens; the
last page may be partial. Per (KV head, page) the element-wise min and max of the page's keys are kept
(:attr:`QuestState.page_min` / :attr:`QuestState.page_max`, ``[h_kv, pages, d]``) and updated on every
append: the last page's bounds widen, or a new page starts.

At every decode step:

1. Upper bound of ``q . k`` over page ``p`` for query head ``i``:
   ``ub = sum_d max(q_d * min_pd, q_d * max_pd)``.
2. A GQA group shares its pages: ``score(kv_head, p) = sum of ub over the group's g query heads``.
3. Each KV head reads its top ``budget / page_size`` pages, always including the last (current) page, and
   attends densely over them. ``budget`` is the ``budget`` parameter, else ``ceil(n / r)``, rounded up to
   whole pages; the page count includes the current page.

When the budget covers every page, everything is read (dense) and no page bounds are read. At ``r = 1``
with no explicit ``budget`` the budget is unbounded, so ``quest:1`` stays dense however long the
generation. Indexing cost: ``2 * d`` elements per page per KV head each step the pages are scored.
Achieved compression counts prompt tokens only, so once generated tokens fill pages that win selection,
fewer prompt tokens are read and the achieved ratio rises above the target.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..spec import PhaseSpec
from .state import DecodeState


def page_bounds(keys: Tensor, page_size: int) -> tuple[Tensor, Tensor]:
    """Element-wise min and max of the keys of each page: ``keys [h_kv, L, d]`` -> two
    ``[h_kv, ceil(L / page_size), d]`` tensors (a partial last page covers only its real tokens)."""
    h_kv, length, d = keys.shape
    pages = math.ceil(length / page_size)
    pad = pages * page_size - length
    big = torch.finfo(keys.dtype).max
    low = torch.cat([keys, keys.new_full((h_kv, pad, d), big)], dim=1)
    high = torch.cat([keys, keys.new_full((h_kv, pad, d), -big)], dim=1)
    return (low.view(h_kv, pages, page_size, d).amin(dim=2), high.view(h_kv, pages, page_size, d).amax(dim=2))


def page_upper_bounds(q_t: Tensor, page_min: Tensor, page_max: Tensor) -> Tensor:
    """``ub[i, p] = sum_d max(q_d * min_pd, q_d * max_pd)`` for query head ``i`` (``q_t [h, d]``) over the
    pages of its KV head (``page_min/max [h_kv, P, d]``) -> ``[h, P]`` float32.

    ``max(q * lo, q * hi)`` is ``q * hi`` where ``q >= 0`` and ``q * lo`` where ``q < 0``, so the sum is two
    matrix products: ``relu(q) . max + min(q, 0) . min``."""
    h = q_t.shape[0]
    group = h // page_min.shape[0]
    q = q_t.float().view(page_min.shape[0], group, -1)  # [h_kv, g, d]
    ub = q.clamp(min=0) @ page_max.float().transpose(1, 2) + q.clamp(max=0) @ page_min.float().transpose(1, 2)
    return ub.reshape(h, -1)


class QuestState(DecodeState):
    """Keep-all cache with per-page key bounds and query-aware page selection."""

    def __init__(self, phase: PhaseSpec, k: Tensor, v: Tensor, num_heads: int, page_size: int,
                 budget_pages: int | None, details: dict):
        super().__init__(phase, k, v, num_heads=num_heads, details=details)
        self.page_size = page_size
        self.budget_pages = budget_pages  # None: unbounded (read everything)
        self.page_min, self.page_max = page_bounds(k, page_size)
        self._scored_pages = 0

    @property
    def cache_len(self) -> int:
        """Tokens held per KV head (all heads hold the same tokens)."""
        return self.keys[0].shape[0]

    def on_append(self, k_t: Tensor) -> None:
        k_t = k_t.to(self.page_min.dtype)
        if (self.cache_len - 1) % self.page_size == 0:  # the new token opens a page
            self.page_min = torch.cat([self.page_min, k_t[:, None]], dim=1)
            self.page_max = torch.cat([self.page_max, k_t[:, None]], dim=1)
        else:  # it joins the last page
            self.page_min[:, -1] = torch.minimum(self.page_min[:, -1], k_t)
            self.page_max[:, -1] = torch.maximum(self.page_max[:, -1], k_t)

    def select(self, q_t: Tensor) -> list[Tensor] | None:
        num_pages = self.page_min.shape[1]
        if self.budget_pages is None or self.budget_pages >= num_pages:
            self._scored_pages = 0
            self.details["pages_selected"] = num_pages
            return None
        self._scored_pages = num_pages
        group = self.num_heads // self.num_kv_heads
        ub = page_upper_bounds(q_t, self.page_min, self.page_max)  # [h, P]
        scores = ub.view(self.num_kv_heads, group, num_pages).sum(dim=1)  # [h_kv, P]
        scores[:, -1] = float("inf")  # the current page is always read
        pages = scores.topk(self.budget_pages, dim=1).indices.sort(dim=1).values  # [h_kv, K]
        self.details["pages_selected"] = self.budget_pages
        offsets = torch.arange(self.page_size, device=pages.device)
        chosen = []
        for j in range(self.num_kv_heads):
            tokens = (pages[j, :, None] * self.page_size + offsets).flatten()
            chosen.append(tokens[tokens < self.cache_len])
        return chosen

    def metadata_elements_read(self) -> int:
        return 2 * self.head_dim * self._scored_pages * self.num_kv_heads


def budget_pages(n: int, phase: PhaseSpec) -> int | None:
    """Pages read per step for an n-token prompt: the ``budget`` param, else ceil(n / r), rounded up to whole
    pages; ``None`` (every page) at r = 1 with no explicit budget, so ratio 1 stays dense as generation grows."""
    params = phase.params
    budget = params["budget"]
    if budget is None and phase.compression_ratio <= 1.0:
        return None
    tokens = math.ceil(n / phase.compression_ratio) if budget is None else int(budget)
    return max(1, math.ceil(tokens / int(params["page_size"])))


def prepare(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec) -> QuestState:
    page_size = int(phase.params["page_size"])
    pages = budget_pages(k.shape[1], phase)
    details = {"page_size": page_size, "budget": None if pages is None else pages * page_size,
               "pages_selected": None}
    return QuestState(phase, k, v, num_heads=q.shape[0], page_size=page_size, budget_pages=pages,
                      details=details)
