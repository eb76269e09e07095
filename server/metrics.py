"""The server's Prometheus metrics, exactly as ``docs/api.md`` ("Prometheus metrics") lists them.

Every metric is prefixed ``sparse_serve_`` and carries a ``model`` label. Labels hold method names and
a small set of statuses only (bounded cardinality); ratios go into histograms. Each :class:`ServerMetrics`
owns its own ``CollectorRegistry``, so several app instances in one process never collide.

``requests_total`` statuses (:data:`STATUSES`):

=============== ==========================================================================
``ok``          finished normally (finish reason ``stop`` or ``length``)
``abort``       aborted before it finished (the client disconnected)
``error``       a server fault (the engine failed the request, or HTTP 5xx other than 503)
``invalid``     rejected with 400 (bad body, bad sparse pattern, ``context_length_exceeded``)
``unauthorized`` rejected with 401/403 (``--api-key`` set and a missing or wrong key)
``not_found``   rejected with 404 (unknown model)
``overloaded``  rejected with 429/503 because the waiting queue was full
=============== ==========================================================================

Method labels are the method names of ``attention_backends`` (``dense``, ``vertical_slash``, ...); a name
that is not a known method of its phase, or none at all (a request rejected before its pattern was
parsed), is recorded as ``unknown``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from attention_backends import DECODE_METHODS, PREFILL_METHODS
from server.contract.cost import RequestCost
from server.contract.engine import EngineStats

PREFIX = "sparse_serve_"

STATUSES: tuple[str, ...] = ("ok", "abort", "error", "invalid", "unauthorized", "not_found", "overloaded")
UNKNOWN_METHOD = "unknown"

# Histogram buckets (seconds, or the compression ratio), roughly log-spaced and densest where SLOs sit.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
               90.0, 120.0, 180.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                 600.0)
RATIO_BUCKETS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0,
                 60.0, 80.0, 100.0)


@dataclass(frozen=True)
class MetricDef:
    name: str  # without the prefix; counters end in _total
    kind: str  # "counter" | "histogram" | "gauge"
    labels: tuple[str, ...]  # besides ``model``
    doc: str
    buckets: tuple[float, ...] | None = None


METRIC_DEFS: tuple[MetricDef, ...] = (
    MetricDef("auto_choices_total", "counter", ("prefill_method", "decode_method"),
              "Prompts whose sparse_pattern 'auto' the policy resolved, by the methods it chose."),
    MetricDef("requests_total", "counter", ("status", "prefill_method", "decode_method"),
              "Requests by final status and sparse methods."),
    MetricDef("time_to_first_token_seconds", "histogram", ("prefill_method",),
              "Time from arrival to the first generated token.", TTFT_BUCKETS),
    MetricDef("time_per_output_token_seconds", "histogram", ("decode_method",),
              "Mean time per output token after the first, one observation per request.", TPOT_BUCKETS),
    MetricDef("e2e_request_latency_seconds", "histogram", ("prefill_method", "decode_method"),
              "Time from arrival to the last token.", E2E_BUCKETS),
    MetricDef("queue_time_seconds", "histogram", (), "Time spent in the waiting queue.", QUEUE_BUCKETS),
    MetricDef("prompt_tokens_total", "counter", ("prefill_method",), "Prompt tokens processed."),
    MetricDef("prefill_fallbacks_total", "counter", ("prefill_method",),
              "Requests whose sparse prefill method ran as dense attention because it would not have paid at "
              "the prompt's length (the response's sparse.prefill.fallback)."),
    MetricDef("generation_tokens_total", "counter", ("decode_method",), "Tokens generated."),
    MetricDef("attention_flops_total", "counter", ("phase", "method", "kind"),
              "Attention FLOPs: kind=actual (computed), dense_equivalent (dense attention would have), "
              "indexing (spent choosing what to compute)."),
    MetricDef("model_flops_total", "counter", ("phase", "kind"),
              "Whole-model FLOPs: kind=actual or dense_equivalent."),
    MetricDef("kv_bytes_read_total", "counter", ("method", "kind"),
              "Decode KV-cache bytes read: kind=actual, dense_equivalent, metadata (e.g. Quest page min/max)."),
    MetricDef("achieved_compression_ratio", "histogram", ("phase", "method"),
              "Achieved compression ratio per request and phase (1 = dense).", RATIO_BUCKETS),
    MetricDef("num_requests_running", "gauge", (), "Requests being prefilled or decoded."),
    MetricDef("num_requests_waiting", "gauge", (), "Requests in the waiting queue."),
    MetricDef("kv_cache_usage_ratio", "gauge", (), "Fraction of KV-cache pages in use (0..1)."),
    MetricDef("kv_cache_free_pages", "gauge", (), "KV-cache pages free."),
    MetricDef("kv_cache_used_pages", "gauge", (), "KV-cache pages in use."),
    MetricDef("kv_cache_total_pages", "gauge", (), "KV-cache pages in the pool."),
)

# Exported metric names as PromQL sees them (counters with their _total), and each one's type.
METRIC_TYPES: dict[str, str] = {PREFIX + d.name: d.kind for d in METRIC_DEFS}
METRIC_NAMES: tuple[str, ...] = tuple(METRIC_TYPES)

_SUFFIXES = {"_bucket": ("histogram",), "_sum": ("histogram",), "_count": ("histogram",),
             "_created": ("histogram", "counter")}


def base_metric_name(sample_name: str) -> str | None:
    """The exported metric a sample or PromQL identifier belongs to, or None if it is none of ours.

    ``..._seconds_bucket`` -> ``..._seconds`` (histograms only), ``sparse_serve_requests_created`` ->
    ``sparse_serve_requests_total`` (prometheus_client names a counter's ``_created`` without ``_total``).
    """
    if sample_name in METRIC_TYPES:
        return sample_name
    for suffix, kinds in _SUFFIXES.items():
        if sample_name.endswith(suffix):
            stem = sample_name[: -len(suffix)]
            for candidate in (stem, stem + "_total") if suffix == "_created" else (stem,):
                if METRIC_TYPES.get(candidate) in kinds:
                    return candidate
    return None


def status_for_finish_reason(reason: str | None) -> str:
    """``requests_total`` status of a request the engine finished (``FinishReason``)."""
    return {"stop": "ok", "length": "ok", "abort": "abort"}.get(reason or "", "error")


def status_for_http(code: int) -> str:
    """``requests_total`` status of a request rejected with HTTP ``code``."""
    if code in (429, 503):
        return "overloaded"
    if code in (401, 403):
        return "unauthorized"
    if code == 404:
        return "not_found"
    if 400 <= code < 500:
        return "invalid"
    return "error"


def _method(name: str | None, known: dict) -> str:
    return name if name in known else UNKNOWN_METHOD


def _finite_nonneg(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x >= 0


class ServerMetrics:
    """One server instance's registry. Thread-safe (prometheus_client's metrics are)."""

    content_type: str = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self._m: dict[str, Counter | Gauge | Histogram] = {}
        for d in METRIC_DEFS:
            labels = ("model", *d.labels)
            if d.kind == "counter":
                metric = Counter(PREFIX + d.name, d.doc, labels, registry=self.registry)
            elif d.kind == "gauge":
                metric = Gauge(PREFIX + d.name, d.doc, labels, registry=self.registry)
            else:
                metric = Histogram(PREFIX + d.name, d.doc, labels, buckets=d.buckets, registry=self.registry)
            self._m[d.name] = metric
        # Series without method labels exist from the start (gauges read 0 until the first update).
        for d in METRIC_DEFS:
            if not d.labels:
                self._child(d.name)

    def _child(self, name: str, **labels: str):
        return self._m[name].labels(model=self.model_name, **labels)

    def _inc(self, name: str, amount: float, **labels: str) -> None:
        if _finite_nonneg(amount):
            self._child(name, **labels).inc(amount)

    def _observe(self, name: str, value: float | None, **labels: str) -> None:
        if _finite_nonneg(value):
            self._child(name, **labels).observe(value)

    @staticmethod
    def _check_status(status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown request status {status!r}; expected one of {STATUSES}")

    def record_auto_choice(self, prefill_method: str, decode_method: str) -> None:
        self._child("auto_choices_total", prefill_method=_method(prefill_method, PREFILL_METHODS),
                    decode_method=_method(decode_method, DECODE_METHODS)).inc()

    def record_finished(
        self,
        prefill_method: str | None,
        decode_method: str | None,
        status: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        tpot_s: float | None,
        e2e_s: float,
        queue_s: float | None,
        cost: RequestCost | None,
    ) -> None:
        """Record a request that reached the engine, once, when it ends (``ok``, ``abort`` or ``error``).

        Latencies that do not apply (no token yet, a single output token, never queued) are ``None``.
        Attention FLOPs are counted per phase when that phase reports any; KV bytes are the decode
        phase's; the compression ratio is observed for prefill when there was a prompt and for decode
        when there was at least one decode step (more than one completion token).
        """
        self._check_status(status)
        pm = _method(prefill_method, PREFILL_METHODS)
        dm = _method(decode_method, DECODE_METHODS)
        self._child("requests_total", status=status, prefill_method=pm, decode_method=dm).inc()
        self._inc("prompt_tokens_total", prompt_tokens, prefill_method=pm)
        self._inc("generation_tokens_total", completion_tokens, decode_method=dm)
        self._observe("time_to_first_token_seconds", ttft_s, prefill_method=pm)
        self._observe("time_per_output_token_seconds", tpot_s, decode_method=dm)
        self._observe("e2e_request_latency_seconds", e2e_s, prefill_method=pm, decode_method=dm)
        self._observe("queue_time_seconds", queue_s)
        if cost is None:
            return
        fallbacks = self._child("prefill_fallbacks_total", prefill_method=pm)  # the series exists from 0 on
        if cost.prefill.fallback is not None:
            fallbacks.inc()
        for phase, pc, method in (("prefill", cost.prefill, pm), ("decode", cost.decode, dm)):
            if pc.attention_flops or pc.dense_attention_flops or pc.indexing_flops:
                self._inc("attention_flops_total", pc.attention_flops, phase=phase, method=method, kind="actual")
                self._inc("attention_flops_total", pc.dense_attention_flops, phase=phase, method=method,
                          kind="dense_equivalent")
                self._inc("attention_flops_total", pc.indexing_flops, phase=phase, method=method, kind="indexing")
            self._inc("model_flops_total", pc.model_flops, phase=phase, kind="actual")
            self._inc("model_flops_total", pc.dense_model_flops, phase=phase, kind="dense_equivalent")
        d = cost.decode
        self._inc("kv_bytes_read_total", d.kv_bytes_read, method=dm, kind="actual")
        self._inc("kv_bytes_read_total", d.dense_kv_bytes_read, method=dm, kind="dense_equivalent")
        self._inc("kv_bytes_read_total", d.metadata_bytes_read, method=dm, kind="metadata")
        if prompt_tokens > 0:
            self._observe("achieved_compression_ratio", cost.prefill.achieved_compression_ratio,
                          phase="prefill", method=pm)
        if completion_tokens > 1:
            self._observe("achieved_compression_ratio", d.achieved_compression_ratio, phase="decode", method=dm)

    def record_rejected(self, status: str, prefill_method: str | None = None,
                        decode_method: str | None = None) -> None:
        """Record a request answered with an error before it reached the engine (see :data:`STATUSES`;
        :func:`status_for_http` maps an HTTP code). Methods are ``None`` when the pattern was never parsed."""
        self._check_status(status)
        self._child("requests_total", status=status, prefill_method=_method(prefill_method, PREFILL_METHODS),
                    decode_method=_method(decode_method, DECODE_METHODS)).inc()

    def update_engine(self, stats: EngineStats) -> None:
        """Set the gauges from the engine's current stats (call before each scrape)."""
        self._child("num_requests_running").set(stats.num_running)
        self._child("num_requests_waiting").set(stats.num_waiting)
        self._child("kv_cache_usage_ratio").set(stats.kv_cache_usage)
        self._child("kv_cache_free_pages").set(stats.free_pages)
        self._child("kv_cache_used_pages").set(stats.total_pages - stats.free_pages)
        self._child("kv_cache_total_pages").set(stats.total_pages)

    def render(self) -> bytes:
        """The registry in Prometheus text format (serve with :attr:`content_type`)."""
        return generate_latest(self.registry)
