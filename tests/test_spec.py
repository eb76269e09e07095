"""Sparse pattern grammar, object form, precedence of ratios, and errors that name the offending field."""

import math

import pytest

from attention_backends import DENSE, InvalidSparsePattern, describe_methods, parse_pattern


def test_string_grammar_single_and_combined():
    s = parse_pattern("vertical_slash:8+quest:20")
    assert (s.prefill.method, s.prefill.compression_ratio) == ("vertical_slash", 8.0)
    assert (s.decode.method, s.decode.compression_ratio) == ("quest", 20.0)
    assert s.to_string() == "vertical_slash:8+quest:20"
    lone_decode = parse_pattern("quest:4")
    assert lone_decode.prefill.is_dense and lone_decode.decode.method == "quest"
    lone_prefill = parse_pattern("block_sparse:5")
    assert lone_prefill.decode.is_dense and lone_prefill.prefill.compression_ratio == 5.0
    assert parse_pattern("dense") == DENSE and parse_pattern(None) == DENSE


def test_default_ratio_fills_phases_without_one():
    s = parse_pattern("vertical_slash+quest:20", compression_ratio=4)
    assert s.prefill.compression_ratio == 4.0 and s.decode.compression_ratio == 20.0
    assert parse_pattern("snapkv").decode.compression_ratio == 1.0  # no ratio at all means dense budget


def test_object_form_with_params():
    s = parse_pattern({
        "prefill": {"method": "block_sparse", "compression_ratio": 8, "params": {"block_size": 64}},
        "decode": {"method": "quest", "compression_ratio": 20, "params": {"page_size": 16}},
    })
    assert s.prefill.params["block_size"] == 64 and s.prefill.params["top_k"] is None
    assert s.decode.params["page_size"] == 16
    assert parse_pattern({"decode": "snapkv"}, compression_ratio=3).decode.compression_ratio == 3.0


@pytest.mark.parametrize(
    ("pattern", "ratio", "param", "fragment"),
    [
        ("nonsense", None, "sparse_pattern", "unknown sparse method"),
        ("quest+snapkv", None, "sparse_pattern", "decode method, not a prefill"),
        ("vertical_slash+block_sparse", None, "sparse_pattern", "prefill method, not a decode"),
        ("vertical_slash:0", None, "sparse_pattern", ">= 1"),
        ("vertical_slash:-1", None, "sparse_pattern", ">= 1"),
        ("vertical_slash:nan", None, "sparse_pattern", ">= 1"),
        ("vertical_slash:inf", None, "sparse_pattern", ">= 1"),
        ("vertical_slash:abc", None, "sparse_pattern", "number"),
        ("a+b+c", None, "sparse_pattern", "malformed"),
        ("", None, "sparse_pattern", "empty"),
        ("quest", 0.5, "compression_ratio", ">= 1"),
        ("quest", math.nan, "compression_ratio", ">= 1"),
        ({"prefill": {"method": "quest"}}, None, "sparse_pattern.prefill.method", "decode method"),
        ({"prefill": {"method": "block_sparse", "params": {"bogus": 1}}}, None,
         "sparse_pattern.prefill.params.bogus", "unknown parameter"),
        ({"prefill": {"method": "block_sparse", "params": {"block_size": 17}}}, None,
         "sparse_pattern.prefill.params.block_size", "one of"),
        ({"decode": {"method": "snapkv", "params": {"window": 0}}}, None,
         "sparse_pattern.decode.params.window", ">= 1"),
        ({"decode": {"method": "ada_snapkv", "params": {"floor_fraction": 1.5}}}, None,
         "sparse_pattern.decode.params.floor_fraction", "<= 1"),
        ({"decode": {"method": "quest", "compression_ratio": "x"}}, None,
         "sparse_pattern.decode.compression_ratio", "number"),
        ({"middle": {}}, None, "sparse_pattern.middle", "unknown field"),
        (42, None, "sparse_pattern", "string or an object"),
    ],
)
def test_invalid_patterns_name_the_field(pattern, ratio, param, fragment):
    with pytest.raises(InvalidSparsePattern) as err:
        parse_pattern(pattern, ratio)
    assert err.value.param == param
    assert fragment in err.value.message


def test_header_param_name_is_used():
    with pytest.raises(InvalidSparsePattern) as err:
        parse_pattern("bogus", param="X-Sparse-Pattern")
    assert err.value.param == "X-Sparse-Pattern"


def test_describe_methods_lists_every_method_with_ranges():
    d = describe_methods()
    assert {m["name"] for m in d["prefill"]} == {"dense", "vertical_slash", "flexprefill", "block_sparse"}
    assert {m["name"] for m in d["decode"]} == {"dense", "snapkv", "ada_snapkv", "quest"}
    bs = next(m for m in d["prefill"] if m["name"] == "block_sparse")
    assert bs["params"]["block_size"]["choices"] == [16, 32, 64, 128]


def test_parse_resolves_every_parameter_once():
    # The methods read phase.params as they are: parse_pattern must hand them every parameter, defaults filled.
    from attention_backends.spec import METHODS

    for phase, methods in METHODS.items():
        for name, info in methods.items():
            for pattern in (f"{name}:2" if name != "dense" else name, {phase: {"method": name}}):
                got = getattr(parse_pattern(pattern), phase).params
                assert set(got) == set(info.defaults()), (phase, name, pattern)
    assert parse_pattern({"decode": {"method": "quest", "params": {"budget": 64}}}).decode.params == \
        {"page_size": 16, "budget": 64}
