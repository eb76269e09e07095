"""One request's KV cache: a page table per (layer, KV head) over the shared :class:`PagePool`.

``tables[l, j, i]`` is the pool page holding tokens ``i*page_size .. (i+1)*page_size-1`` of layer ``l``, KV
head ``j`` (``-1`` past the end); ``lengths[l, j]`` the tokens that head holds. Each head's tokens are its
kept prompt tokens (``prompt_kept[l, j]`` of them, in prompt order) followed by every generated token.

The tables and their bookkeeping (``lengths``, ``prompt_kept``, ``pages_held``) live on the host, so a decode
step decides and records which heads get a new page without touching the device; the device sees page ids
only through the writes that use them and through a decode step's static buffers. ``version`` changes when
the tables change other than by a decode step's new pages (prefill, eviction, release): a decode step copies
a sequence's whole tables to its buffers then, and otherwise only the entries ``grown`` lists since.
"""

from __future__ import annotations

import itertools

import torch

from .page_pool import PagePool


def _pages(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


class SequenceKV:
    _uids = itertools.count()

    def __init__(self, pool: PagePool, num_layers: int, num_kv_heads: int):
        self.pool = pool
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.uid = next(self._uids)
        self.version = 0
        self.tables = torch.full((num_layers, num_kv_heads, 4), -1, dtype=torch.int32)
        # decode steps' new pages since ``version`` last changed: [m, 4] int32 rows (layer, head, index, page)
        self.grown: list[torch.Tensor] = []
        self.lengths = torch.zeros(num_layers, num_kv_heads, dtype=torch.long)
        self.prompt_kept = torch.zeros(num_layers, num_kv_heads, dtype=torch.long)
        self.pages_held = torch.zeros(num_layers, num_kv_heads, dtype=torch.long)  # pages listed per head
        self._room: int | None = 0  # tokens every head takes before one needs a page (None: to recompute)
        self.prompt_len = 0

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _tables_changed(self) -> None:
        self.version += 1
        self.grown = []
        self._room = None

    def _free_slots(self) -> int:
        """Tokens every (layer, head) can still take in the pages it holds (most decode steps need no page)."""
        if self._room is None:
            self._room = int((self.pages_held * self.pool.page_size - self.lengths).min())
        return self._room

    @property
    def num_pages(self) -> int:
        return int((self.tables >= 0).sum())

    def _grow(self, pages: int) -> None:
        if pages > self.tables.shape[2]:
            extra = max(pages, 2 * self.tables.shape[2]) - self.tables.shape[2]
            pad = torch.full((self.num_layers, self.num_kv_heads, extra), -1, dtype=self.tables.dtype)
            self.tables = torch.cat([self.tables, pad], dim=2)

    def release(self) -> int:
        """Return every page to the pool; returns how many."""
        ids = self.tables[self.tables >= 0]
        self.pool.release(ids)
        self.tables.fill_(-1)
        self.lengths.zero_()
        self.prompt_kept.zero_()
        self.pages_held.zero_()
        self._tables_changed()
        return int(ids.numel())

    # -- prefill ----------------------------------------------------------------------------------------
    def append_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append a chunk of a layer's prompt keys/values ``[h_kv, m, d]`` (before any eviction, so every head
        holds the same tokens): it fills the layer's partly filled last page, then fresh pages. The first chunk
        (or a whole prompt) starts on fresh pages."""
        h_kv, m, d = k.shape
        ps = self.pool.page_size
        held = int(self.lengths[layer, 0])
        first = held // ps  # the page the chunk starts in
        fill = held - first * ps  # tokens already in it
        total = _pages(held + m, ps)
        new = total - _pages(held, ps)
        ids = self.pool.allocate(h_kv * new).view(h_kv, new)
        self._grow(total)
        self.tables[layer, :, total - new : total] = ids  # recorded first, so a failure below still frees them
        self.pages_held[layer] = total
        self._tables_changed()
        if fill:  # rewrite the partly filled page with its tokens and the chunk's first ones
            last = self._on_device(self.tables[layer, :, first])
            k = torch.cat([self.pool.keys[last, :fill], k.to(self.pool.dtype)], dim=1)
            v = torch.cat([self.pool.values[last, :fill], v.to(self.pool.dtype)], dim=1)
        self._write_tokens(self.tables[layer, :, first:total], k, v, fill + m)
        self.lengths[layer] = held + m
        self.prompt_kept[layer] = held + m
        self.prompt_len = held + m

    def prompt_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values ``[h_kv, n, d]`` a layer holds so far (before eviction: its prompt prefix)."""
        n = int(self.lengths[layer, 0])
        pages = _pages(n, self.pool.page_size)
        ids = self._on_device(self.tables[layer, :, :pages])
        h_kv, d = ids.shape[0], self.pool.keys.shape[-1]
        k = self.pool.keys[ids].view(h_kv, pages * self.pool.page_size, d)[:, :n]
        v = self.pool.values[ids].view(h_kv, pages * self.pool.page_size, d)[:, :n]
        return k, v

    def _on_device(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.to(self.pool.device, torch.long)

    def _write_tokens(self, ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Write ``n`` tokens of each head (``k`` ``[h, n, d]``) into page ids ``[h, pages]``, with min/max."""
        h, _, d = k.shape
        ps = self.pool.page_size
        pages = ids.shape[1]
        padded = pages * ps
        kp = torch.zeros(h, padded, d, dtype=self.pool.dtype, device=k.device)
        vp = torch.zeros_like(kp)
        kp[:, :n] = k
        vp[:, :n] = v
        flat = self._on_device(ids.reshape(-1))
        self.pool.keys[flat] = kp.view(h * pages, ps, d)
        self.pool.values[flat] = vp.view(h * pages, ps, d)
        big = torch.finfo(self.pool.dtype).max
        valid = (torch.arange(padded, device=k.device) < n).view(1, pages, ps, 1)
        kp4 = kp.view(h, pages, ps, d)
        self.pool.key_min[flat] = torch.where(valid, kp4, big).amin(dim=2).reshape(-1, d)
        self.pool.key_max[flat] = torch.where(valid, kp4, -big).amax(dim=2).reshape(-1, d)

    def keep_only(self, layer: int, keep: list[torch.Tensor]) -> int:
        """Evict: keep only prompt positions ``keep[j]`` (sorted) of each head of ``layer``; the kept tokens
        are compacted into fresh pages and the old pages go back to the pool. Returns pages freed (net)."""
        ps = self.pool.page_size
        old = self.tables[layer].clone()
        old_pages = int((old >= 0).sum())
        old_dev = self._on_device(old)
        new_tables: list[torch.Tensor] = []
        try:
            for j, idx in enumerate(keep):
                n_j = int(idx.numel())
                src_pages = old_dev[j][idx // ps]
                src_slots = idx % ps
                k = self.pool.keys[src_pages, src_slots].unsqueeze(0)
                v = self.pool.values[src_pages, src_slots].unsqueeze(0)
                ids = self.pool.allocate(_pages(n_j, ps)).view(1, -1)
                new_tables.append(ids[0])
                self._write_tokens(ids, k, v, n_j)
        except BaseException:
            for ids in new_tables:
                self.pool.release(ids)
            raise
        for j, idx in enumerate(keep):
            self.lengths[layer, j] = int(idx.numel())
            self.prompt_kept[layer, j] = int(idx.numel())
        self.pool.release(old[old >= 0])
        self.tables[layer].fill_(-1)
        for j, ids in enumerate(new_tables):
            self.tables[layer, j, : ids.numel()] = ids
            self.pages_held[layer, j] = ids.numel()
        self._tables_changed()
        return old_pages - sum(int(t.numel()) for t in new_tables)

    # -- decode -----------------------------------------------------------------------------------------
    def _heads_needing_a_page(self) -> torch.Tensor:
        """Bool ``[layers, h_kv]``: heads whose next token starts a page they do not hold yet."""
        return self.lengths // self.pool.page_size >= self.pages_held

    def pages_needed_for_append(self) -> int:
        """New pages one more token needs."""
        return 0 if self._free_slots() > 0 else int(self._heads_needing_a_page().sum())

    def prepare_append(self, horizon: int = 1, spare: int = 0) -> int:
        """Make room for one token in every (layer, head): a fresh page where the last one is full. The token
        goes to slot ``lengths % page_size`` of page ``lengths // page_size``. Decided on the host (no device
        read); idempotent until :meth:`commit_append`: a retried step reuses the pages a failed one allocated.

        Heads holding different numbers of tokens (Ada-SnapKV) fill their pages at different steps, so one head
        or another would take a page nearly every step (host work before every step's launch). Whenever one
        must, every head with less than a page of room that will fill it within ``horizon`` tokens (the most this
        request still appends, this one included) takes its next page too, if ``spare`` pages (free beyond what
        the scheduler has promised) cover them all: the heads then take pages together, about once every
        ``page_size`` steps. Returns the pages taken ahead of need."""
        if self._free_slots() > 0:
            return 0
        need = self._heads_needing_a_page()
        if not bool(need.any()):
            return 0
        room = self.pages_held * self.pool.page_size - self.lengths
        early = ~need & (room < self.pool.page_size) & (room < horizon)
        ahead = int(early.sum())
        if ahead > spare:  # all of them or none
            early, ahead = torch.zeros_like(early), 0
        take = need | early
        index = self.pages_held[take]  # each head's next page (a needing head's token starts it)
        self._grow(int(index.max()) + 1)
        ids = self.pool.allocate(int(take.sum())).int()
        layers, heads = take.nonzero(as_tuple=True)
        self.tables[layers, heads, index] = ids
        self.pages_held[take] += 1
        self.grown.append(torch.stack([layers.int(), heads.int(), index.int(), ids], dim=1))
        self._room = None
        return ahead

    def commit_append(self) -> None:
        self.lengths += 1
        if self._room is not None:
            self._room -= 1

    def uncommit_appends(self, steps: int) -> None:
        """Forget the last ``steps`` appended tokens (a decode step whose output was never accepted); their pages
        stay held, and the step run again writes the same slots."""
        self.lengths -= steps
        self._room = None
