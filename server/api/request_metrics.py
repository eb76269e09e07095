"""The one owner of a generation HTTP request's metrics.

A completion or chat request is counted in ``requests_total`` exactly once per engine request that reached the
engine (with its latencies and cost, :meth:`GenerationMetrics.engine_finished`), or, when none did, once for
the HTTP request at its end (rejected before the engine, or refused at admission:
:meth:`GenerationMetrics.http_finished`). The access-log middleware creates one per generation request; the
route and :class:`~.generation.GenerationRun` report to it.
"""

from __future__ import annotations

import time

from attention_backends import SparseSpec
from server.metrics import ServerMetrics, status_for_http
from server.sparse_policy import AutoChoice, AutoRequest

from .generation import ChoiceState
from .sparse_request import spec_labels
from .sse import CLIENT_CLOSED


class GenerationMetrics:
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.labels: tuple[str, str] | None = None  # (prefill, decode) methods once the pattern parsed
        self.engine_recorded = False

    def set_spec(self, spec: SparseSpec | AutoRequest) -> None:
        self.labels = spec_labels(spec)

    def auto_chosen(self, choices: list[AutoChoice]) -> None:
        """What ``auto`` chose, per prompt; call once the request is valid."""
        for a in choices:
            self.metrics.record_auto_choice(a.spec.prefill.method, a.spec.decode.method)

    def engine_finished(self, st: ChoiceState, status: str) -> None:
        """One engine request ended (``ok``, ``abort`` or ``error``): its latencies, tokens and cost."""
        now = time.monotonic()
        out = st.final
        t = out.timings if out is not None else None
        if t is not None and t.arrival:  # the engine's own clock: queueing included
            first, end = t.first_token, t.finished or now
            ttft = first - t.arrival if first is not None else None
            e2e = end - t.arrival
            queue = t.scheduled - t.arrival if t.scheduled is not None else None
        else:
            first, end = st.first_token_at, now
            ttft = first - st.started_at if first is not None else None
            e2e = end - st.started_at
            queue = None
        tpot = (end - first) / (st.completion_tokens - 1) if first is not None and st.completion_tokens > 1 else None
        pm, dm = self.labels or (None, None)
        self.metrics.record_finished(pm, dm, status, st.prompt_tokens, st.completion_tokens, ttft, tpot, e2e, queue,
                                     out.cost if out is not None else None)
        self.engine_recorded = True

    def http_finished(self, status: int) -> None:
        """The HTTP answer went out with ``status``: an error that no engine request accounted for is counted
        here (a client that hung up is not an error of the server's)."""
        if status >= 400 and status != CLIENT_CLOSED and not self.engine_recorded:
            self.metrics.record_rejected(status_for_http(status), *(self.labels or (None, None)))
