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

:func:`select_pages` is the one page selection (batched, a budget per row): the reference of the Triton
:func:`..kernels.quest_select.quest_select`; :class:`QuestState` (the public API's per-sequence state) and the
engine's portable decode step call it, their Triton counterparts call the kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..spec import PhaseSpec
from .paged import page_fill
from .state import DecodeState, check_impl


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
    """``ub[..., i, p] = sum_d max(q_d * min_pd, q_d * max_pd)`` for query head ``i`` (``q_t [..., h, d]``)
    over the pages of its KV head (``page_min/max [..., h_kv, P, d]``) -> ``[..., h, P]`` float32.

    ``max(q * lo, q * hi)`` is ``q * hi`` where ``q >= 0`` and ``q * lo`` where ``q < 0``, so the sum is two
    matrix products: ``relu(q) . max + min(q, 0) . min``."""
    *lead, h, d = q_t.shape
    h_kv = page_min.shape[-3]
    q = q_t.float().view(*lead, h_kv, h // h_kv, d)  # [..., h_kv, g, d]
    ub = (q.clamp(min=0) @ page_max.float().transpose(-1, -2)
          + q.clamp(max=0) @ page_min.float().transpose(-1, -2))  # [..., h_kv, g, P]
    return ub.reshape(*lead, h, -1)


def choose_pages(q: Tensor, key_min: Tensor, key_max: Tensor, tables: Tensor, lengths: Tensor,
                 budget_pages: Tensor, page_size: int) -> tuple[Tensor, Tensor]:
    """Quest's page choice for a batch of decode queries (steps 1-3 above, a budget per row).

    ``q [B, h, d]``; pool ``key_min``/``key_max`` ``[num_pages, d]``; ``tables [B, h_kv, P]``; ``lengths
    [B, h_kv]`` tokens held (the current token included); ``budget_pages [B]`` pages to read per head (0:
    none). Returns the chosen logical page indices ``[B, h_kv, S]`` in ascending order, real choices first,
    and the number of real choices ``[B, h_kv]`` (rows with a smaller budget, or fewer pages, pad). Because
    the only partial page is the last one, the chosen pages hold their tokens as one contiguous prefix."""
    b, h, _ = q.shape
    h_kv, p = tables.shape[1], tables.shape[2]
    ids = tables.clamp(min=0)
    ub = page_upper_bounds(q, key_min[ids], key_max[ids])  # [B, h, P]
    ub = ub.view(b, h_kv, h // h_kv, p).sum(2)  # a GQA group shares its pages
    n_pages = -(-lengths // page_size)  # [B, h_kv]
    logical = torch.arange(p, device=q.device).view(1, 1, p)
    ub = ub.masked_fill(logical >= n_pages.unsqueeze(-1), float("-inf"))
    ub = ub.masked_fill(logical == (n_pages - 1).unsqueeze(-1), float("inf"))  # the current page
    s = int(min(p, int(budget_pages.max())))
    chosen = ub.topk(s, dim=-1).indices  # [B, h_kv, S]
    count = torch.minimum(budget_pages.view(b, 1).clamp(max=s), n_pages)
    rank = torch.arange(s, device=q.device).view(1, 1, s)
    chosen = torch.where(rank < count.unsqueeze(-1), chosen, p).sort(dim=-1).values  # pads sort last
    return chosen.clamp(max=p - 1), count


def _chosen_tokens(tables: Tensor, lengths: Tensor, chosen: Tensor, count: Tensor, page_size: int) -> Tensor:
    """Tokens ``[B, h_kv]`` among the first ``lengths`` of each head that the chosen pages hold."""
    fill = page_fill(lengths, tables.shape[2], page_size).gather(2, chosen)
    real = torch.arange(chosen.shape[2], device=chosen.device).view(1, 1, -1) < count.unsqueeze(-1)
    return (fill * real).sum(-1)


def select_pages(q: Tensor, key_min: Tensor, key_max: Tensor, tables: Tensor, lengths: Tensor,
                 budget_pages: Tensor, page_size: int, prompt_kept: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The reference of :func:`..kernels.quest_select.quest_select`: the chosen pages as a page table ``[B,
    h_kv, S]`` (ascending; padding past the token length), the tokens to read ``[B, h_kv]``, and, given
    ``prompt_kept [B, h_kv]`` (each head's prompt tokens, which come first), the prompt tokens among them."""
    chosen, count = choose_pages(q, key_min, key_max, tables, lengths, budget_pages, page_size)
    sel_len = _chosen_tokens(tables, lengths, chosen, count, page_size)
    prompt_read = None if prompt_kept is None else _chosen_tokens(tables, prompt_kept, chosen, count, page_size)
    return tables.gather(2, chosen), sel_len, prompt_read


def plan(q: Tensor, key_min: Tensor, key_max: Tensor, tables: Tensor, lengths: Tensor, budget_pages: Tensor,
         page_size: int, prompt_kept: Tensor, *, width: int, impl: str = "reference",
         read_counts: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Quest's per-step plan for a batch (the engine's decode step calls it every layer): the pages each (row,
    KV head) reads -> ``(page table [B, h_kv, <= width], tokens to read [B, h_kv], prompt tokens among them
    [B, h_kv])``; ``read_counts [2, B]`` (int64, optional) gets each row's prompt and total tokens read added.
    ``width`` bounds every row's budget. ``impl="triton"``: the kernel (no host sync, CUDA-graph safe; the counts
    added in the kernel); else :func:`select_pages`."""
    if check_impl(impl) == "reference":
        sel, sel_len, prompt_read = select_pages(q, key_min, key_max, tables, lengths, budget_pages, page_size,
                                                 prompt_kept)
        if read_counts is not None:
            read_counts[0] += prompt_read.sum(-1)  # type: ignore[union-attr]
            read_counts[1] += sel_len.sum(-1)
        return sel, sel_len, prompt_read  # type: ignore[return-value]
    from ..kernels.quest_select import quest_select  # imports Triton: only when asked for

    prompt_read = torch.empty(lengths.shape, dtype=torch.int32, device=q.device)
    sel, sel_len = quest_select(q, key_min, key_max, tables, lengths, budget_pages, page_size, width=width,
                                prompt_kept=prompt_kept, prompt_read=prompt_read, read_counts=read_counts)
    return sel, sel_len, prompt_read


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
        h_kv, num_pages, d = self.page_min.shape
        if self.budget_pages is None or self.budget_pages >= num_pages:
            self._scored_pages = 0
            self.details["pages_selected"] = num_pages
            return None
        self._scored_pages = num_pages
        # this state's bounds as a page pool with one table per head (what select_pages takes)
        tables = torch.arange(h_kv * num_pages, device=q_t.device).view(1, h_kv, num_pages)
        lengths = torch.full((1, h_kv), self.cache_len, device=q_t.device)
        budget = torch.tensor([self.budget_pages], device=q_t.device)
        chosen, _ = choose_pages(q_t[None], self.page_min.reshape(-1, d), self.page_max.reshape(-1, d), tables,
                                 lengths, budget, self.page_size)
        self.details["pages_selected"] = self.budget_pages
        offsets = torch.arange(self.page_size, device=q_t.device)
        tokens = (chosen[0, :, :, None] * self.page_size + offsets).flatten(1)  # [h_kv, K * page_size]
        return [row[row < self.cache_len] for row in tokens]

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
