"""Unit tests of the HTTP layer's parsing: sparse-spec precedence, error params, settings, CLI flags."""

from __future__ import annotations

import math

import pytest

from server.api.cost_report import cost_report
from server.api.errors import APIError, loc_to_param
from server.api.schemas import ChatCompletionRequest, CompletionRequest, unsupported_field
from server.api.sparse_request import resolve_sparse_spec
from server.cli import build_parser, settings_from_args
from server.contract.cost import PhaseCost, RequestCost
from server.settings import ServerSettings, parse_size


def spec(**kw):
    return resolve_sparse_spec(**kw)


def test_precedence_body_over_xargs_over_headers_over_default():
    h = {"X-Sparse-Pattern": "quest:4", "X-Compression-Ratio": "3"}
    s = spec(body_pattern="snapkv:8", xargs={"sparse_pattern": "ada_snapkv"}, headers=h, default_pattern="quest:2")
    assert (s.decode.method, s.decode.compression_ratio) == ("snapkv", 8)
    s = spec(xargs={"sparse_pattern": "ada_snapkv"}, headers=h, default_pattern="quest:2")
    assert (s.decode.method, s.decode.compression_ratio) == ("ada_snapkv", 3)  # ratio from the header
    s = spec(headers=h, default_pattern="quest:2")
    assert (s.decode.method, s.decode.compression_ratio) == ("quest", 4)
    s = spec(default_pattern="quest:2")
    assert (s.decode.method, s.decode.compression_ratio) == ("quest", 2)
    assert spec().is_dense


def test_ratio_sources_and_precedence():
    # the body's ratio applies to a header's pattern, and beats the header's ratio
    s = spec(body_ratio=8, headers={"X-Sparse-Pattern": "vertical_slash", "X-Compression-Ratio": "2"})
    assert (s.prefill.method, s.prefill.compression_ratio) == ("vertical_slash", 8)
    s = spec(body_pattern="vertical_slash:6+quest", body_ratio=10)
    assert s.prefill.compression_ratio == 6 and s.decode.compression_ratio == 10
    s = spec(body_ratio=5, default_pattern="quest")
    assert (s.decode.method, s.decode.compression_ratio) == ("quest", 5)
    s = spec(body_pattern={"prefill": {"method": "block_sparse", "compression_ratio": 4, "params": {"block_size": 32}},
                           "decode": "quest"}, body_ratio=9)
    assert s.prefill.params["block_size"] == 32 and s.decode.compression_ratio == 9


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"body_pattern": "nope"}, "sparse_pattern"),
        ({"body_pattern": "quest+vertical_slash"}, "sparse_pattern"),
        ({"body_pattern": {"prefill": {"method": "quest"}}}, "sparse_pattern.prefill.method"),
        ({"body_pattern": {"decode": {"method": "quest", "params": {"bogus": 1}}}},
         "sparse_pattern.decode.params.bogus"),
        ({"body_pattern": "quest:0"}, "sparse_pattern"),
        ({"body_ratio": 0}, "compression_ratio"),
        ({"body_ratio": -1}, "compression_ratio"),
        ({"body_ratio": math.nan}, "compression_ratio"),
        ({"body_ratio": "abc"}, "compression_ratio"),
        ({"body_ratio": True}, "compression_ratio"),
        ({"headers": {"X-Sparse-Pattern": "bogus"}}, "X-Sparse-Pattern"),
        ({"headers": {"X-Compression-Ratio": "nan"}}, "X-Compression-Ratio"),
        ({"headers": {"X-Compression-Ratio": "0.5"}}, "X-Compression-Ratio"),
        ({"xargs": {"sparse_pattern": 5}}, "vllm_xargs.sparse_pattern"),
        ({"xargs": {"compression_ratio": "x"}}, "vllm_xargs.compression_ratio"),
        # an invalid header is reported even when the body overrides it
        ({"body_pattern": "quest", "headers": {"X-Sparse-Pattern": "bogus"}}, "X-Sparse-Pattern"),
    ],
)
def test_invalid_specs_name_their_param(kw, param):
    with pytest.raises(APIError) as e:
        spec(**kw)
    assert e.value.status == 400 and e.value.param == param


def test_loc_to_param():
    assert loc_to_param(("body", "messages", 0, "content")) == "messages[0].content"
    assert loc_to_param(("body", "stop", "list[str]", 1)) == "stop[1]"
    assert loc_to_param(("body", "n")) == "n"
    assert loc_to_param(("body",)) is None


def test_unsupported_fields():
    assert unsupported_field(CompletionRequest(prompt="x")) is None
    assert unsupported_field(CompletionRequest(prompt="x", presence_penalty=0, logit_bias={})) is None
    assert unsupported_field(CompletionRequest(prompt="x", frequency_penalty=0.3)) == "frequency_penalty"
    assert unsupported_field(CompletionRequest(prompt="x", best_of=3)) == "best_of"
    assert unsupported_field(CompletionRequest(prompt="x", best_of=2, n=2)) is None
    assert unsupported_field(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                                                   tools=[{"type": "function"}])) == "tools"
    assert unsupported_field(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                                                   response_format={"type": "json_object"})) == "response_format"
    # unknown fields are ignored
    CompletionRequest(prompt="x", totally_unknown=1)


def test_costs_of_several_requests_combine():
    """Ratios are recomputed from the summed units they compare (cells; prompt KV tokens, not bytes: generated
    tokens, which every decode method reads in full, do not dilute the decode ratio)."""
    a = RequestCost(PhaseCost("vertical_slash", 4, dense_units=40, actual_units=10, attention_flops=10,
                              dense_attention_flops=40, model_flops=1, dense_model_flops=2),
                    PhaseCost("quest", 8, dense_units=80, actual_units=10, kv_bytes_read=30,
                              dense_kv_bytes_read=100, kv_cache_tokens=5))
    b = RequestCost(PhaseCost("vertical_slash", 4, dense_units=60, actual_units=30, attention_flops=30,
                              dense_attention_flops=60),
                    PhaseCost("quest", 8, kv_bytes_read=0, dense_kv_bytes_read=0, kv_cache_tokens=7,
                              model_flops=3, dense_model_flops=4))
    agg = cost_report(RequestCost.combine([a, b]))
    assert agg["prefill"]["attention_flops"] == 40 and agg["prefill"]["achieved_compression_ratio"] == 2.5
    assert agg["decode"]["achieved_compression_ratio"] == 8 and agg["decode"]["kv_cache_tokens"] == 12
    assert agg["decode"]["kv_bytes_read"] == 30 and agg["decode"]["dense_kv_bytes_read"] == 100
    assert agg["model_flops"] == 4 and agg["dense_model_flops"] == 6
    assert RequestCost.combine([a]) is a


def test_parse_size():
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("1G") == 1 << 30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("1048576") == 1 << 20
    for bad in ("", "abc", "-1", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_settings_reject_bad_default_pattern():
    with pytest.raises(ValueError):
        ServerSettings(default_sparse_pattern="bogus:3")
    assert ServerSettings(default_sparse_pattern="quest:20").default_spec().decode.method == "quest"


def test_page_size_flag_reaches_both_engines_options():
    """--page-size is an engine setting: the native engine's page size, vLLM's block size."""
    from server.engine.engine import EngineOptions
    from server.vllm_engine.engine import VllmOptions

    parser = build_parser()
    assert "--page-size" in parser.format_help()
    s = settings_from_args(parser.parse_args(["--page-size", "32", "--max-num-seqs", "3"]))
    assert s.page_size == 32
    native, vllm = EngineOptions.from_settings(s), VllmOptions.from_settings(s, self_test=False)
    assert (native.page_size, native.max_num_seqs, vllm.page_size, vllm.self_test) == (32, 3, 32, False)
    assert EngineOptions.from_settings(settings_from_args(parser.parse_args([]))).resolved_page_size() == 16
    with pytest.raises(ValueError):
        settings_from_args(parser.parse_args(["--page-size", "0"]))


def test_cli_flags_and_env_key(monkeypatch):
    parser = build_parser()
    help_text = parser.format_help()
    for flag in ("--model", "--host", "--port", "--device", "--dtype", "--max-model-len", "--kv-cache-memory",
                 "--max-num-seqs", "--max-queue", "--default-sparse-pattern", "--api-key", "--served-model-name",
                 "--log-level", "--engine", "SPARSE_SERVE_API_KEY"):
        assert flag in help_text
    monkeypatch.setenv("SPARSE_SERVE_API_KEY", "from-env")
    s = settings_from_args(parser.parse_args(["--kv-cache-memory", "256MiB", "--port", "9000"]))
    assert s.api_key == "from-env" and s.kv_cache_memory == 256 << 20 and s.port == 9000
    assert (s.host, s.engine, s.default_sparse_pattern) == ("127.0.0.1", "native", "dense")
    s = settings_from_args(parser.parse_args(["--api-key", "flag"]))
    assert s.api_key == "flag"
