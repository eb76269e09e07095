"""How long a dense prefill chunk may be while requests decode: sized by time, not by a fixed token count.

A running request waits for one prefill chunk between two of its tokens (:mod:`.scheduler`, "Interleaving"). A
chunk of a fixed token count costs more the later it starts in a long prompt (its queries attend to every earlier
key): on the H200 (2026-12-02) 4096-token chunks of a 128K prompt held 8 decodes at 32K for 465 ms (p50) and
818 ms (p99) between tokens, against 9 ms steady. The pacer instead gives each chunk a time budget, ``stall``
times the decode step's own time, and takes as many tokens as the budget predicts to fit, so a decoding request's
inter-token latency stays near ``1 + stall`` times its steady value for the whole prefill (at the cost of the
long prompt's time to first token: it gets that share of the device).

The prediction is measured as the engine runs, so it needs no card profile: a decode step's time (the median of
the latest steps with no chunk) and the chunk's cost per FLOP (:func:`~attention_backends.cost.dense_chunk_flops`:
projections, MLP, the chunk's queries against all earlier keys), averaged over the chunks so far. The first chunk
(no rate yet) is the smallest, one ``align`` of tokens. What a chunk costs beyond its FLOPs (reading the weights
and the earlier keys once) is folded into the rate at the sizes the pacer actually runs, where the estimate
converges: a chunk that took less than its budget makes the next one longer, one that took more makes it shorter.

The budget protects decodes from a prefill, not the other way round: when more admitted requests wait for their
first token than decode (a burst of prompts), the budget grows by that ratio (``share``), so the device's time
goes to each phase in proportion to the requests waiting on it, and a burst prefills in long, efficient chunks.

Only dense prefills are paced: a sparse method is defined per chunk, so its chunks stay the fixed
``max_sparse_prefill_chunk`` (its answer must not depend on load).
"""

from __future__ import annotations

import statistics
from collections import deque

from attention_backends.cost import ModelShape, dense_chunk_flops

DECODE_WINDOW = 16  # decode steps whose median is "the decode step" (a step that compiled or captured is an outlier)
RATE_WEIGHT = 0.5  # weight of the latest chunk's seconds per FLOP (chunks of one prompt change slowly)


class ChunkPacer:
    """Chunk sizes for dense prefills interleaved with decode steps: multiples of ``align`` tokens, at most
    ``max_chunk``, predicted to take at most ``stall`` times a decode step."""

    def __init__(self, shape: ModelShape, stall: float, max_chunk: int, align: int):
        if stall <= 0 or max_chunk <= 0:
            raise ValueError("a pacer needs a positive stall and a positive max_chunk")
        self.shape, self.stall, self.max_chunk, self.align = shape, stall, max_chunk, align
        self._decode_steps: deque[float] = deque(maxlen=DECODE_WINDOW)  # latest decode steps with no chunk (s)
        self.seconds_per_flop: float | None = None  # running average over dense chunks run between decode steps

    def observe_decode_step(self, seconds: float) -> None:
        """A decode step that ran with no prefill chunk took ``seconds`` (its launch to its tokens)."""
        self._decode_steps.append(seconds)

    def observe_chunk(self, start: int, end: int, seconds: float) -> None:
        """A dense chunk of prompt positions ``[start, end)`` took ``seconds`` on the device."""
        flops = dense_chunk_flops(self.shape, start, end)
        if flops <= 0 or seconds <= 0:
            return
        rate, old = seconds / flops, self.seconds_per_flop
        self.seconds_per_flop = rate if old is None else (1 - RATE_WEIGHT) * old + RATE_WEIGHT * rate

    @property
    def decode_step_s(self) -> float | None:
        """The decode step's time: the median of the latest ones (``None`` before the first)."""
        return statistics.median(self._decode_steps) if self._decode_steps else None

    def budget_s(self, share: float = 1.0) -> float | None:
        """The time a chunk may take: ``stall`` decode steps, times ``share`` (``None`` until a decode step has
        been timed)."""
        step = self.decode_step_s
        return None if step is None else self.stall * step * share

    def chunk_tokens(self, start: int, share: float = 1.0) -> int:
        """Tokens of the next chunk starting at prompt position ``start``: the most (a multiple of ``align``, at
        most ``max_chunk``, at least ``align``) predicted to fit :meth:`budget_s` with ``share``; ``max_chunk``
        before any decode step has been timed; ``align`` before any chunk has."""
        budget = self.budget_s(share)
        if budget is None:
            return self.max_chunk
        if self.seconds_per_flop is None:
            return self.align
        fits = budget / self.seconds_per_flop  # FLOPs the budget buys
        lo, hi = 1, self.max_chunk // self.align  # in units of align; the predicted time grows with the size
        if dense_chunk_flops(self.shape, start, start + hi * self.align) <= fits:
            return hi * self.align
        while lo < hi - 1:  # invariant: lo fits or is the floor, hi does not fit
            mid = (lo + hi) // 2
            if dense_chunk_flops(self.shape, start, start + mid * self.align) <= fits:
                lo = mid
            else:
                hi = mid
        return lo * self.align
