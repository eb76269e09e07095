"""Admission, growth and preemption policy of the native engine.

* Admission on present need: a waiting request is admitted when fewer than ``max_num_seqs`` run and the pool
  can hold what it needs *now*: its prompt (and, when it resumes, the tokens it already generated) plus one
  page per KV head for its next token, next to the prefills promised to other admitted requests and one page
  per KV head for the next token of every running request (so an admission does not force a preemption at
  the next step). Admission is FIFO and takes as many requests as fit, when they arrive and at every step;
  no worst case (prompt + max_tokens) is reserved.
  SnapKV/Ada-SnapKV are counted at their footprint after eviction (:meth:`Scheduler.need_pages`).
* Growth and preemption: a running request's pages grow one token at a time. When a decode step's new pages
  do not fit, the youngest request (latest arrival) is preempted: its pages go back to the pool and it
  returns to the head of the queue, to resume by recomputing its cache; no later request is admitted before
  it. The oldest running request is never preempted, and a request whose whole context could not fit the
  pool even alone is refused up front (:meth:`need_alone`), so every admitted request completes.
* Waiting queue: bounded by ``max_queue`` (the backlog of requests that do not fit yet); a full queue is an
  :class:`EngineOverloaded` error whose ``retry_after`` estimates when the queue will have drained, from its
  length and the recent completion rate.
* Interleaving (chunked prefill): each engine step prefills at most one chunk of the oldest admitted request
  still prefilling (:meth:`chunk_end`; 0 = the whole prompt), then runs one decode step for every prefilled
  request. A running request thus waits for at most one chunk between two of its tokens, and long prompts cannot
  stall decodes. Chunks of dense attention hold at most ``max_prefill_chunk`` prompt tokens, fewer where the
  engine's :class:`~.chunk_pacer.ChunkPacer` predicts more would hold a decode step up too long, and exist for the
  decodes: a prefill that computes dense attention (a dense pattern, or a sparse one that falls back to dense
  at its length) with no request decoding runs the rest of its prompt at once (:meth:`prefill_end`). A sparse
  prefill method is defined per chunk and always runs in chunks of ``max_sparse_prefill_chunk`` (longer by
  default: it pays its index once per chunk, and computes a fraction of a dense chunk's cells). A request
  between chunks holds the pages of its prefix and the rest of its need stays promised (:meth:`_promised`);
  it can be aborted or preempted there, and a preempted one prefills again from its first chunk.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque

from attention_backends import DECODE_METHODS
from attention_backends.decode.state import eviction_capacity
from server.contract.engine import EngineOverloaded, GenerationRequest

from .chunk_pacer import ChunkPacer
from .page_pool import PagePool
from .request_state import EngineRequest

FALLBACK_RATE = 1.0  # completions per second assumed before any request has finished
MAX_RETRY_AFTER = 300.0


class Scheduler:
    def __init__(self, pool: PagePool, num_layers: int, num_kv_heads: int, max_num_seqs: int, max_queue: int,
                 max_prefill_chunk: int = 0, max_sparse_prefill_chunk: int = 0, pacer: ChunkPacer | None = None):
        self.pool = pool
        self.max_prefill_chunk = max_prefill_chunk
        self.max_sparse_prefill_chunk = max_sparse_prefill_chunk
        self.pacer = pacer  # sizes dense chunks by time while requests decode (None: max_prefill_chunk tokens)
        self.num_kv_heads = num_kv_heads
        self.heads_total = num_layers * num_kv_heads
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []  # admitted, in arrival order: the youngest last
        self._arrivals = itertools.count()
        self._finished_at: deque[float] = deque(maxlen=32)  # completion times, for the throughput estimate

    # -- page needs -------------------------------------------------------------------------------------
    def pages_for_tokens(self, tokens: int) -> int:
        """Pages holding ``tokens`` in every (layer, KV head), plus one each for the next token."""
        return self.heads_total * (-(-tokens // self.pool.page_size) + 1)

    def need_pages(self, request: GenerationRequest, generated: int = 0) -> int:
        """Pages a (re)prefill needs: the prompt and the ``generated`` tokens it will recompute, plus one token.

        SnapKV/Ada-SnapKV evict layer by layer after the prefill's last chunk, so they are counted at their
        footprint after eviction (the memory they free is concurrency) and at their peak: prefilled whole, while
        the last layer holds its whole prompt and its kept copy, every earlier layer only its kept tokens; in
        chunks, every layer holds the whole prompt until the last chunk evicts them one by one. Afterwards every
        layer holds its kept tokens and the generated ones."""
        n = len(request.prompt_token_ids)
        if not DECODE_METHODS[request.spec.decode.method].evicts:
            return self.pages_for_tokens(n + generated)
        h_kv, ps = self.num_kv_heads, self.pool.page_size
        layers = self.heads_total // h_kv
        kept = eviction_capacity(request.spec.decode, n) * h_kv  # a layer's kept prompt tokens (all its heads)

        def layer_pages(tokens: int) -> int:  # at most, however a layer's tokens are spread over its heads
            return -(-tokens // ps) + h_kv

        if self.may_chunk(request):
            peak = self.heads_total * -(-n // ps) + layer_pages(kept)
        else:
            peak = layers * layer_pages(kept) + h_kv * -(-n // ps)
        return max(peak, layers * layer_pages(kept + h_kv * (generated + 1)))

    def chunk_size(self, dense: bool) -> int:
        """Prompt tokens per chunk of a prefill that computes dense (``dense``) or sparse attention; 0: whole."""
        return self.max_prefill_chunk if dense else self.max_sparse_prefill_chunk

    def may_chunk(self, request: GenerationRequest) -> bool:
        """Whether some engine step may prefill ``request`` in more than one piece, whichever attention runs (a
        paced dense chunk can be as short as the pacer's smallest)."""
        n = len(request.prompt_token_ids)
        if self.pacer is not None and self.chunk_end(request, 0, True, self.pacer.align) < n:
            return True
        return min(self.chunk_end(request, 0, dense) for dense in (False, True)) < n

    def chunk_end(self, request: GenerationRequest, start: int, dense: bool, size: int | None = None) -> int:
        """Where the prefill chunk starting at prompt position ``start`` ends: ``size`` (default
        :meth:`chunk_size`) tokens on, or the prompt's end. A tail shorter than an eviction method's observation
        window joins the chunk before it, so the last chunk holds the window's queries."""
        n = len(request.prompt_token_ids)
        size = self.chunk_size(dense) if size is None else size
        if not size or n - start <= size:
            return n
        decode = request.spec.decode
        min_last = decode.params["window"] if DECODE_METHODS[decode.method].evicts else 1
        end = start + size
        return n if n - end < min_last else end

    def chunk_starts(self, request: GenerationRequest) -> tuple[int, ...]:
        """Where the chunks of a sparse prefill of ``request`` start (``(0,)``: it prefills whole)."""
        starts, n = [0], len(request.prompt_token_ids)
        while (end := self.chunk_end(request, starts[-1], dense=False)) < n:
            starts.append(end)
        return tuple(starts)

    def prefill_end(self, req: EngineRequest, dense: bool) -> int:
        """Where this engine step's prefill of ``req`` ends. With no request decoding there is nothing to let
        through, and a prefill that computes dense attention (``dense``: a dense pattern, or a sparse one the
        fallback rule runs as dense at this prompt's length) runs the rest of its prompt at once: a dense chunk
        computes what the whole prompt would, only slower (PyTorch's flash kernel does about half the cells per
        ms on a chunk's queries against all earlier keys as on a whole causal prompt, benchmarks/sdpa_chunk.py).
        Sparse prefill methods are defined per chunk, so they follow ``max_sparse_prefill_chunk`` alone: an answer
        must not depend on load. A dense chunk while requests decode takes what the pacer's time budget allows,
        if the engine has one, scaled by how many more admitted requests prefill than decode."""
        if dense and not self.decoding():
            return len(req.request.prompt_token_ids)
        paced = None
        if dense and self.pacer is not None:
            decoding = sum(r.prefilled for r in self.running)
            share = max(1.0, (len(self.running) - decoding) / decoding)  # requests waiting on each phase
            paced = self.pacer.chunk_tokens(req.prefill_pos, share)
        return self.chunk_end(req.request, req.prefill_pos, dense, paced)

    def decoding(self) -> bool:
        """Whether some admitted request is past its prefill (a chunk now holds up its next token)."""
        return any(r.prefilled for r in self.running)

    def need_alone(self, request: GenerationRequest) -> int:
        """Pages the request needs at its peak: what it must be able to hold with the pool to itself."""
        return self.need_pages(request, request.sampling.max_tokens)

    def max_tokens_alone(self) -> int:
        """The longest context (prompt + completion) one request can hold with the pool to itself."""
        return max(0, self.pool.num_pages // self.heads_total - 1) * self.pool.page_size

    def _need(self, req: EngineRequest) -> int:
        return self.need_pages(req.request, len(req.output_ids))

    def _promised(self) -> int:
        """Pages admitted requests will still take until they are prefilled (their need, less the pages of the
        chunks they already prefilled)."""
        return sum(max(0, self._need(r) - (int(r.kv.pages_held.sum()) if r.kv is not None else 0))
                   for r in self.running if not r.prefilled)

    def _fits(self, req: EngineRequest) -> bool:
        headroom = self.heads_total * sum(1 for r in self.running if r.prefilled)
        return self._need(req) <= self.pool.free_pages - self._promised() - headroom

    # -- queue and admission ----------------------------------------------------------------------------
    def add(self, req: EngineRequest) -> None:
        """Queue a new request and admit what fits; refuse it if it must wait behind a full queue."""
        req.arrival = next(self._arrivals)
        self.waiting.append(req)
        self.admit()
        if len(self.waiting) > self.max_queue:  # FIFO: if anything still waits, the new request does
            self.waiting.pop()
            raise EngineOverloaded(f"waiting queue is full ({self.max_queue} requests)",
                                   retry_after=self.retry_after(len(self.waiting)))

    def admit(self) -> None:
        """Admit waiting requests, oldest first, while they fit (a large request at the head is not overtaken)."""
        while self.waiting and len(self.running) < self.max_num_seqs and self._fits(self.waiting[0]):
            req = self.waiting.popleft()
            bisect.insort(self.running, req, key=lambda r: r.arrival)

    def next_prefill(self) -> EngineRequest | None:
        """The oldest admitted request that has no cache yet."""
        return next((r for r in self.running if not r.prefilled and not r.aborted), None)

    def decode_batch(self) -> tuple[list[EngineRequest], list[EngineRequest], int]:
        """The prefilled requests for one decode step, after preempting the youngest requests until the step's
        new pages fit beside the promised prefills. Returns ``(batch, preempted, spare)``: ``spare`` free pages
        the step may take ahead of need (:meth:`SequenceKV.prepare_append`)."""
        preempted: list[EngineRequest] = []
        while True:
            batch = [r for r in self.running if r.prefilled and not r.aborted]
            room = self.step_room(batch)
            if room is not None or len(self.running) <= 1:
                return batch, preempted, room or 0
            victim = self.running.pop()
            victim.preempt()
            self.waiting.appendleft(victim)  # the oldest of several victims ends up first
            preempted.append(victim)

    def step_room(self, batch: list[EngineRequest]) -> int | None:
        """Pages free beside the promised prefills once a decode step of ``batch`` took the pages it needs, or
        None when they do not fit."""
        need = sum(r.kv.pages_needed_for_append() for r in batch)  # type: ignore[union-attr]
        free = self.pool.free_pages - self._promised()
        return free - need if need <= free else None

    def remove(self, req: EngineRequest) -> None:
        if req in self.running:
            self.running.remove(req)
            self.record_finish()
        elif req in self.waiting:
            self.waiting.remove(req)

    # -- Retry-After ------------------------------------------------------------------------------------
    def record_finish(self, now: float | None = None) -> None:
        self._finished_at.append(time.monotonic() if now is None else now)

    def retry_after(self, queued: int, now: float | None = None) -> float:
        """Seconds until ``queued`` requests have left the queue at the recent completion rate (completions since
        the oldest remembered one, up to now: the estimate slows down while nothing finishes)."""
        now = time.monotonic() if now is None else now
        times = self._finished_at
        rate = FALLBACK_RATE
        if len(times) >= 2:
            rate = (len(times) - 1) / max(now - times[0], 1e-3)
        return min(max(queued / rate, 1.0), MAX_RETRY_AFTER)
