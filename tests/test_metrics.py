"""server/metrics.py: the exported names, labels and buckets of docs/api.md, and exact counter arithmetic."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.contract.cost import PhaseCost, RequestCost
from server.contract.engine import EngineStats
from server.metrics import (
    E2E_BUCKETS,
    METRIC_DEFS,
    METRIC_NAMES,
    METRIC_TYPES,
    PREFIX,
    QUEUE_BUCKETS,
    RATIO_BUCKETS,
    STATUSES,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    ServerMetrics,
    base_metric_name,
    status_for_finish_reason,
    status_for_http,
)

MODEL = "smollm2-135m"


def make_cost() -> RequestCost:
    return RequestCost(
        prefill=PhaseCost(method="vertical_slash", target_compression_ratio=8, dense_units=7.5, actual_units=1,
                          attention_flops=1.0e9, dense_attention_flops=7.5e9, indexing_flops=2.0e7,
                          model_flops=4.0e10, dense_model_flops=4.9e10),
        decode=PhaseCost(method="quest", target_compression_ratio=20, dense_units=18.0, actual_units=1,
                         kv_bytes_read=4.0e6, dense_kv_bytes_read=7.2e7, metadata_bytes_read=3.0e5,
                         kv_cache_tokens=1100, model_flops=1.0e10, dense_model_flops=1.1e10),
    )


def record(m: ServerMetrics, cost: RequestCost | None = None) -> None:
    m.record_finished(prefill_method="vertical_slash", decode_method="quest", status="ok", prompt_tokens=1000,
                      completion_tokens=12, ttft_s=0.05, tpot_s=0.02, e2e_s=0.3, queue_s=0.004,
                      cost=cost if cost is not None else make_cost())
    m.record_auto_choice("vertical_slash", "quest")


def samples(m: ServerMetrics) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return PREFIX + name, frozenset({"model": MODEL, **labels}.items())


def test_render_has_every_metric_with_its_labels():
    m = ServerMetrics(MODEL)
    record(m)
    m.update_engine(EngineStats(num_running=2, num_waiting=3, kv_cache_usage=0.25, free_pages=75, total_pages=100))
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    for d in METRIC_DEFS:
        fam_name = PREFIX + d.name.removesuffix("_total") if d.kind == "counter" else PREFIX + d.name
        fam = families[fam_name]
        assert fam.type == d.kind
        assert fam.samples, d.name
        for s in fam.samples:
            extra = {"le"} if s.name.endswith("_bucket") else set()
            assert set(s.labels) == {"model", *d.labels} | extra, s
            assert s.labels["model"] == MODEL
    s = samples(m)
    for phase, method in (("prefill", "vertical_slash"),):
        for kind in ("actual", "dense_equivalent", "indexing"):
            assert key("attention_flops_total", phase=phase, method=method, kind=kind) in s
    for phase in ("prefill", "decode"):
        for kind in ("actual", "dense_equivalent"):
            assert key("model_flops_total", phase=phase, kind=kind) in s
    for kind in ("actual", "dense_equivalent", "metadata"):
        assert key("kv_bytes_read_total", method="quest", kind=kind) in s
    assert key("achieved_compression_ratio_count", phase="prefill", method="vertical_slash") in s
    assert key("achieved_compression_ratio_count", phase="decode", method="quest") in s
    assert s[key("num_requests_running")] == 2
    assert s[key("num_requests_waiting")] == 3
    assert s[key("kv_cache_usage_ratio")] == 0.25
    pages = [s[key(f"kv_cache_{kind}_pages")] for kind in ("free", "used", "total")]
    assert pages == [75, 25, 100]


def test_counters_grow_by_exactly_the_recorded_amounts():
    m = ServerMetrics(MODEL)
    record(m)
    before = samples(m)
    cost = make_cost()
    record(m, cost)
    record(m, cost)
    after = samples(m)

    def delta(name, **labels):
        k = key(name, **labels)
        return after[k] - before[k]

    assert delta("requests_total", status="ok", prefill_method="vertical_slash", decode_method="quest") == 2
    assert delta("prompt_tokens_total", prefill_method="vertical_slash") == 2000
    assert delta("generation_tokens_total", decode_method="quest") == 24
    assert delta("prefill_fallbacks_total", prefill_method="vertical_slash") == 0  # both ran the method
    fell_back = make_cost()
    fell_back.prefill.fallback = "dense"
    record(m, fell_back)
    assert samples(m)[key("prefill_fallbacks_total", prefill_method="vertical_slash")] == 1
    p, d = cost.prefill, cost.decode
    for kind, v in (("actual", p.attention_flops), ("dense_equivalent", p.dense_attention_flops),
                    ("indexing", p.indexing_flops)):
        assert delta("attention_flops_total", phase="prefill", method="vertical_slash", kind=kind) == 2 * v
    for phase, actual, dense in (("prefill", p.model_flops, p.dense_model_flops),
                                 ("decode", d.model_flops, d.dense_model_flops)):
        assert delta("model_flops_total", phase=phase, kind="actual") == 2 * actual
        assert delta("model_flops_total", phase=phase, kind="dense_equivalent") == 2 * dense
    for kind, v in (("actual", d.kv_bytes_read), ("dense_equivalent", d.dense_kv_bytes_read),
                    ("metadata", d.metadata_bytes_read)):
        assert delta("kv_bytes_read_total", method="quest", kind=kind) == 2 * v
    # No decode attention FLOPs were reported, so no decode attention series is invented.
    assert not any(n == PREFIX + "attention_flops_total" and ("phase", "decode") in labels for n, labels in after)

    # Histograms: one observation per request, sums add up, the value lands in the right bucket.
    for name, labels, value in (
        ("time_to_first_token_seconds", {"prefill_method": "vertical_slash"}, 0.05),
        ("time_per_output_token_seconds", {"decode_method": "quest"}, 0.02),
        ("e2e_request_latency_seconds", {"prefill_method": "vertical_slash", "decode_method": "quest"}, 0.3),
        ("queue_time_seconds", {}, 0.004),
        ("achieved_compression_ratio", {"phase": "prefill", "method": "vertical_slash"}, 7.5),
        ("achieved_compression_ratio", {"phase": "decode", "method": "quest"}, 18.0),
    ):
        assert delta(name + "_count", **labels) == 2
        assert math.isclose(delta(name + "_sum", **labels), 2 * value)
        buckets = [(float(dict(lb)["le"]), after[(n, lb)]) for n, lb in after
                   if n == PREFIX + name + "_bucket" and all(dict(lb).get(k) == v for k, v in labels.items())]
        below = [c for le, c in buckets if le < value]
        assert max(below, default=0) == 0 and all(c == 3 for le, c in buckets if le >= value), name


def test_optional_latencies_and_single_token_requests():
    m = ServerMetrics(MODEL)
    m.record_finished("dense", "snapkv", "abort", prompt_tokens=50, completion_tokens=1, ttft_s=0.2, tpot_s=None,
                      e2e_s=0.25, queue_s=None, cost=None)
    s = samples(m)
    assert s[key("requests_total", status="abort", prefill_method="dense", decode_method="snapkv")] == 1
    assert s[key("time_to_first_token_seconds_count", prefill_method="dense")] == 1
    assert key("time_per_output_token_seconds_count", decode_method="snapkv") not in s
    assert s[key("queue_time_seconds_count")] == 0
    assert not any(n.startswith(PREFIX + "achieved_compression_ratio") for n, _ in s)


def test_rejected_requests_and_bounded_labels():
    m = ServerMetrics(MODEL)
    m.record_rejected("overloaded", "block_sparse", "ada_snapkv")
    m.record_rejected(status_for_http(400))  # pattern never parsed
    m.record_rejected("invalid", "not_a_method", "quest")
    s = samples(m)
    assert s[key("requests_total", status="overloaded", prefill_method="block_sparse", decode_method="ada_snapkv")] == 1
    assert s[key("requests_total", status="invalid", prefill_method="unknown", decode_method="unknown")] == 1
    assert s[key("requests_total", status="invalid", prefill_method="unknown", decode_method="quest")] == 1
    with pytest.raises(ValueError):
        m.record_rejected("teapot")
    with pytest.raises(ValueError):
        m.record_finished("dense", "dense", "stop", 1, 1, None, None, 0.1, None, None)
    assert [status_for_http(c) for c in (400, 401, 404, 413, 429, 500, 503)] == [
        "invalid", "unauthorized", "not_found", "invalid", "overloaded", "error", "overloaded"]
    assert [status_for_finish_reason(r) for r in ("stop", "length", "abort", "error")] == [
        "ok", "ok", "abort", "error"]
    assert set(STATUSES) >= {status_for_http(c) for c in range(400, 600)}


def test_instances_have_separate_registries():
    a, b = ServerMetrics("a"), ServerMetrics("b")
    record(a)
    assert b.render().count(b"sparse_serve_requests_total{") == 0
    assert a.render().count(b'model="a"') > 0 and b'model="a"' not in b.render()
    assert a.content_type.startswith("text/plain")


def test_metric_names_and_buckets_match_the_spec():
    m = ServerMetrics(MODEL)
    record(m)
    exported = {base_metric_name(s.name) for f in text_string_to_metric_families(m.render().decode())
                for s in f.samples}
    assert exported == set(METRIC_NAMES)
    assert len(METRIC_NAMES) == 19 and all(n.startswith(PREFIX) for n in METRIC_NAMES)
    assert METRIC_TYPES["sparse_serve_requests_total"] == "counter"
    assert base_metric_name("sparse_serve_requests_created") == "sparse_serve_requests_total"
    assert base_metric_name("sparse_serve_time_to_first_token_seconds_bucket") == (
        "sparse_serve_time_to_first_token_seconds")
    assert base_metric_name("sparse_serve_prompt_tokens_total") == "sparse_serve_prompt_tokens_total"
    assert base_metric_name("sparse_serve_requests_total_bucket") is None  # a counter has no buckets
    assert base_metric_name("sparse_serve_nonexistent") is None
    for buckets, lo, hi in ((TTFT_BUCKETS, 0.001, 120), (TPOT_BUCKETS, 0.001, 10), (E2E_BUCKETS, 0.01, 600),
                            (RATIO_BUCKETS, 1, 100), (QUEUE_BUCKETS, 0.001, 600)):
        assert buckets[0] == lo and buckets[-1] == hi
        assert all(a < b for a, b in zip(buckets, buckets[1:], strict=False))
