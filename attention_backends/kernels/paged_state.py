"""Decode states of the Triton path: the kept tokens live in a page pool, every step is one paged kernel.

Same contract and reports as :class:`~attention_backends.decode.state.DecodeState` (the reference): the
prompt tokens each KV head keeps, then every generated token. Per head ``j`` the cache is the pages
``page_table[0, j]``; appends write in place (the pool grows by doubling when a head runs out of room).
:class:`QuestPagedState` adds per-page key min/max and selects pages with :mod:`.quest_select`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..decode.state import DecodeState
from ..reports import DecodeCallReport
from ..spec import PhaseSpec
from .paged_decode import paged_decode
from .quest_select import pool_page_bounds, quest_select


class PagedDecodeState(DecodeState):
    def __init__(self, phase: PhaseSpec, k: Tensor, v: Tensor, keep: list[Tensor] | None = None,
                 num_heads: int | None = None, details: dict[str, Any] | None = None, page_size: int = 16):
        self._init_keep_set(phase, k, keep, num_heads, details)
        self.page_size = page_size
        self.lengths_host = list(self.prompt_kept)
        self._alloc(max(self.prompt_kept) + 64, k.dtype, k.device)
        for j, idx in enumerate(self.kept_positions):
            self._write(j, 0, k[j, idx], v[j, idx])
        self._sync_lengths()

    # -- page pool ------------------------------------------------------------------------------------
    def _alloc(self, tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        ps = self.page_size
        self.pages_per_head = -(-tokens // ps)
        total = self.num_kv_heads * self.pages_per_head
        self.k_pages = torch.zeros(total, ps, self.head_dim, dtype=dtype, device=device)
        self.v_pages = torch.zeros_like(self.k_pages)
        self.page_table = torch.arange(total, dtype=torch.int32, device=device).view(
            1, self.num_kv_heads, self.pages_per_head)

    def _flat(self, j: int) -> tuple[Tensor, Tensor]:
        ps, pph = self.page_size, self.pages_per_head
        return (self.k_pages[j * pph:(j + 1) * pph].view(pph * ps, -1),
                self.v_pages[j * pph:(j + 1) * pph].view(pph * ps, -1))

    def _write(self, j: int, start: int, keys: Tensor, values: Tensor) -> None:
        kf, vf = self._flat(j)
        kf[start:start + keys.shape[0]] = keys
        vf[start:start + values.shape[0]] = values

    def _grow(self) -> None:
        old = [self._flat(j) for j in range(self.num_kv_heads)]
        old = [(a.clone(), b.clone()) for a, b in old]
        self._alloc(2 * self.pages_per_head * self.page_size, self.k_pages.dtype, self.k_pages.device)
        for j, (a, b) in enumerate(old):
            self._write(j, 0, a[: self.lengths_host[j]], b[: self.lengths_host[j]])

    def _sync_lengths(self) -> None:
        self.lengths = torch.tensor([self.lengths_host], dtype=torch.int32, device=self.k_pages.device)

    # -- DecodeState contract -------------------------------------------------------------------------
    @property
    def cache_tokens(self) -> int:
        return sum(self.lengths_host)

    def append(self, k_t: Tensor, v_t: Tensor) -> None:
        if max(self.lengths_host) + 1 > self.pages_per_head * self.page_size:
            self._grow()
        for j in range(self.num_kv_heads):  # one token per head: host-known positions, no sync
            kj, vj = k_t[j:j + 1].to(self.k_pages.dtype), v_t[j:j + 1].to(self.v_pages.dtype)
            self._write(j, self.lengths_host[j], kj, vj)
            self.lengths_host[j] += 1
        self._sync_lengths()
        self.generated += 1
        self.on_append(k_t)

    def attend(self, q_t: Tensor) -> tuple[Tensor, list[int], list[int]]:
        """Returns ``(out [h, d], prompt tokens read per head, generated tokens read per head)``."""
        out = paged_decode(q_t[None].contiguous(), self.k_pages, self.v_pages, self.page_table, self.lengths,
                           max_len=max(self.lengths_host))[0]
        return out, list(self.prompt_kept), [self.generated] * self.num_kv_heads

    def step(self, q_t: Tensor, k_t: Tensor, v_t: Tensor) -> tuple[Tensor, DecodeCallReport]:
        self.append(k_t, v_t)
        out, prompt, gen = self.attend(q_t)
        report = DecodeCallReport.of_step(
            self.phase, prompt_read=sum(prompt), generated_read=sum(gen), prompt_len=self.prompt_len,
            generated=self.generated, kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            element_bytes=self.element_bytes, metadata_elements=self.metadata_elements_read(),
            cache_tokens=self.cache_tokens, details=self.details)
        return out, report


class QuestPagedState(PagedDecodeState):
    """Keep-all paged cache with per-page key bounds; each step reads the top pages of each KV head."""

    def __init__(self, phase: PhaseSpec, k: Tensor, v: Tensor, num_heads: int, page_size: int,
                 budget_pages: int | None, details: dict[str, Any]):
        super().__init__(phase, k, v, num_heads=num_heads, details=details, page_size=page_size)
        self.budget_pages = budget_pages
        self._scored_pages = 0
        self._rebuild_bounds()

    def _rebuild_bounds(self) -> None:
        d = self.head_dim
        self.page_min = torch.zeros(self.k_pages.shape[0], d, dtype=self.k_pages.dtype, device=self.k_pages.device)
        self.page_max = torch.zeros_like(self.page_min)
        length = self.lengths_host[0]
        npg = -(-length // self.page_size)
        ids = self.page_table[0, :, :npg].reshape(-1)
        fill = torch.full((npg,), self.page_size, dtype=torch.int64, device=ids.device)
        fill[-1] = length - (npg - 1) * self.page_size
        lo, hi = pool_page_bounds(self.k_pages, ids, fill.repeat(self.num_kv_heads))
        self.page_min[ids.long()] = lo
        self.page_max[ids.long()] = hi

    def _grow(self) -> None:
        super()._grow()
        self._rebuild_bounds()

    def on_append(self, k_t: Tensor) -> None:
        length = self.lengths_host[0]
        slot = (length - 1) // self.page_size
        ids = self.page_table[0, :, slot].long()
        k_t = k_t.to(self.page_min.dtype)
        if (length - 1) % self.page_size == 0:
            self.page_min[ids] = k_t
            self.page_max[ids] = k_t
        else:
            self.page_min[ids] = torch.minimum(self.page_min[ids], k_t)
            self.page_max[ids] = torch.maximum(self.page_max[ids], k_t)

    def attend(self, q_t: Tensor) -> tuple[Tensor, list[int], list[int]]:
        length = self.lengths_host[0]
        npg = -(-length // self.page_size)
        if self.budget_pages is None or self.budget_pages >= npg:
            self._scored_pages = 0
            self.details["pages_selected"] = npg
            return super().attend(q_t)
        self._scored_pages = npg
        self.details["pages_selected"] = self.budget_pages
        q = q_t[None].contiguous()
        prompt_kept = torch.tensor([self.prompt_kept], dtype=torch.int32, device=q.device)
        prompt_read = torch.empty_like(prompt_kept)
        sel, sel_len = quest_select(q, self.page_min, self.page_max, self.page_table, self.lengths,
                                    self.budget_pages, self.page_size, prompt_kept=prompt_kept,
                                    prompt_read=prompt_read)
        out = paged_decode(q, self.k_pages, self.v_pages, sel, sel_len, max_len=self.budget_pages * self.page_size)[0]
        return out, prompt_read[0].tolist(), (sel_len[0] - prompt_read[0]).tolist()

    def metadata_elements_read(self) -> int:
        return 2 * self.head_dim * self._scored_pages * self.num_kv_heads
