"""Quest's per-step device counts, read off the step's critical path (the CUDA backend's :mod:`.cache_decode` rows).

A Quest row's prompt and total tokens read add up on the device over a step's layers. Reading them at the step's end
(``.tolist()`` in the side channel, before sampling) made the host wait for the step's forward every step. vLLM 0.25
schedules asynchronously (two steps in flight): while the GPU runs step N, the host prepares and launches step N+1.
A wait in step N's end stops that, so the GPU idles while the next step is launched. With the sparse rows' steps on
piecewise graphs, the launch is long.

Here the step's end only queues the counts' copy into pinned host memory and records an event. A reader thread
waits for the event, which releases the GIL, and hands the host counts to ``fold``. The worker's fold adds the step's
reports to the requests' accounts and writes their cost files. Steps are folded in order. Without CUDA, the counts are
read at once and folded in the caller's thread.

A request's file therefore lands a little after its last step's tokens. It says how many decode steps it holds, and
the front end waits for the last one (``accounting.load_cost``, ``VllmEngine``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("sparse_serve.vllm_engine")

Fold = Callable[[list[Any], list[list[list[int]]]], None]  # (the step's row batches, their counts as lists)


class CountReader:
    """Reads ``rows.counts`` (a device tensor per row batch) of each step submitted, in order, then ``fold``."""

    def __init__(self, fold: Fold, threaded: bool | None = None):
        self._fold = fold
        self._threaded = threaded  # None: on CUDA only
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, batches: list[Any]) -> None:
        """Queue the step's counts (``batches``: objects with a ``counts`` tensor). Call it after the step's kernels
        were launched: the copy follows them on the current stream."""
        if not batches:
            return
        counts = [b.counts for b in batches]
        threaded = self._threaded if self._threaded is not None else counts[0].is_cuda
        if not threaded:
            self._fold(batches, [c.tolist() for c in counts])
            return
        event = None
        if counts[0].is_cuda:
            host = [torch.empty(c.shape, dtype=c.dtype, pin_memory=True) for c in counts]
            for h, c in zip(host, counts, strict=True):
                h.copy_(c, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = [c.clone() for c in counts]
        self._queue.put((batches, host, event))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sparse-serve-counts", daemon=True)
            self._thread.start()

    def drain(self) -> None:
        """Wait until every step submitted so far is folded."""
        if self._thread is not None:
            self._queue.join()

    def _run(self) -> None:
        while True:
            batches, host, event = self._queue.get()
            try:
                if event is not None:
                    event.synchronize()
                self._fold(batches, [h.tolist() for h in host])
            except Exception:  # an account is lost, not the engine
                log.exception("could not fold a step's Quest counts into the cost reports")
            finally:
                self._queue.task_done()

