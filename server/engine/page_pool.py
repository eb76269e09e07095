"""The KV page pool and its allocator.

A page holds ``page_size`` consecutive tokens of ONE (request, layer, KV head): keys and values
``[page_size, head_dim]`` each, plus the element-wise key min/max of the tokens written so far (Quest's page
summary). Because a page belongs to a single KV head, heads of one request can hold different numbers of
pages (Ada-SnapKV) and eviction returns whole pages to the pool.

The pool is a fixed set of tensors sized once from a memory budget (never grows). The allocator is a free
list with counters (allocated, freed, in use) that the scheduler reads to admit requests and tests read to
check that eviction and aborts really return memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than asked for (the scheduler's reservations should prevent it)."""


@dataclass
class PoolCounters:
    total_pages: int
    free_pages: int
    pages_allocated: int  # cumulative
    pages_freed: int  # cumulative

    @property
    def used_pages(self) -> int:
        return self.total_pages - self.free_pages

    @property
    def usage(self) -> float:
        return self.used_pages / self.total_pages if self.total_pages else 0.0


def page_bytes(page_size: int, head_dim: int, dtype: torch.dtype) -> int:
    """Memory of one page: K + V + key min/max."""
    return (2 * page_size + 2) * head_dim * torch.empty((), dtype=dtype).element_size()


def pages_for_memory(memory_bytes: int, page_size: int, head_dim: int, dtype: torch.dtype) -> int:
    """Number of pages that fit a memory budget."""
    return max(1, memory_bytes // page_bytes(page_size, head_dim, dtype))


class PagePool:
    def __init__(self, num_pages: int, page_size: int, head_dim: int, dtype: torch.dtype, device: str | torch.device):
        self.num_pages = num_pages
        self.page_size = page_size
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.keys = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=self.device)
        self.values = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=self.device)
        # Quest page summaries, set by the write of a page's first token (slot 0, or a prefill's whole page).
        self.key_min = torch.zeros(num_pages, head_dim, dtype=dtype, device=self.device)
        self.key_max = torch.zeros(num_pages, head_dim, dtype=dtype, device=self.device)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._lock = threading.Lock()
        self._allocated = 0
        self._freed = 0

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def counters(self) -> PoolCounters:
        with self._lock:
            return PoolCounters(self.num_pages, len(self._free), self._allocated, self._freed)

    def allocate(self, count: int) -> torch.Tensor:
        """Hand out ``count`` pages: int64 ids on the host (no device work: whoever writes a page's first token
        also sets its key min/max, so a fresh page needs no reset)."""
        with self._lock:
            if count > len(self._free):
                raise OutOfPages(f"asked for {count} KV pages, {len(self._free)} free of {self.num_pages}")
            taken = self._free[len(self._free) - count :]
            del self._free[len(self._free) - count :]
            self._allocated += count
        return torch.tensor(taken, dtype=torch.long)

    def release(self, ids: torch.Tensor | list[int]) -> None:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if not ids:
            return
        with self._lock:
            self._free.extend(ids)
            self._freed += len(ids)
