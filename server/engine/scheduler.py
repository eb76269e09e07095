"""Admission and batching policy of the native engine.

* Waiting queue: FIFO, bounded by ``max_queue``; a full queue is an :class:`EngineOverloaded` error (the
  server answers 429 with ``Retry-After``).
* Admission: a request is admitted when fewer than ``max_num_seqs`` are running and its worst-case page
  need fits the pool next to the reservations of the running requests. The reservation is
  ``layers * h_kv * (ceil((prompt + max_tokens) / page) + 1)`` pages; after a SnapKV/Ada-SnapKV prefill it
  shrinks to the pages really held plus room for ``max_tokens``. Pages are therefore never exhausted
  mid-request: a request waits rather than fails, and a request that could never fit is rejected up front.
* Interleaving: each engine iteration prefills at most one admitted request (whole prompt), then runs one
  decode step for every running request. A running request thus waits for at most one prefill between two
  of its tokens, and long prompts cannot starve decodes.
"""

from __future__ import annotations

from collections import deque

from .page_pool import PagePool
from .request_state import EngineRequest
from .types import EngineOverloaded


class Scheduler:
    def __init__(self, pool: PagePool, num_layers: int, num_kv_heads: int, max_num_seqs: int, max_queue: int):
        self.pool = pool
        self.heads_total = num_layers * num_kv_heads
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.reserved = 0  # pages reserved by running requests

    def pages_for_tokens(self, tokens: int) -> int:
        return self.heads_total * (-(-tokens // self.pool.page_size) + 1)

    def worst_case_pages(self, req: EngineRequest) -> int:
        return self.pages_for_tokens(req.prompt_len + req.request.sampling.max_tokens)

    def add(self, req: EngineRequest) -> None:
        if len(self.waiting) >= self.max_queue:
            raise EngineOverloaded(f"waiting queue is full ({self.max_queue} requests)", retry_after=1.0)
        self.waiting.append(req)

    def admit_next(self) -> EngineRequest | None:
        """Move the next waiting request to running if it fits; it is then reserved, not yet allocated."""
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return None
        req = self.waiting[0]
        need = self.worst_case_pages(req)
        if self.reserved + need > self.pool.num_pages:
            return None
        self.waiting.popleft()
        req.reserved_pages = need
        self.reserved += need
        self.running.append(req)
        return req

    def shrink_reservation(self, req: EngineRequest) -> None:
        """After eviction: pages held now plus room for the remaining tokens."""
        assert req.kv is not None
        remaining = req.request.sampling.max_tokens - len(req.output_ids)
        need = min(req.reserved_pages, req.kv.num_pages + self.pages_for_tokens(max(remaining, 0)))
        self.reserved -= req.reserved_pages - need
        req.reserved_pages = need

    def remove(self, req: EngineRequest) -> None:
        if req in self.running:
            self.running.remove(req)
            self.reserved -= req.reserved_pages
            req.reserved_pages = 0
        elif req in self.waiting:
            self.waiting.remove(req)
