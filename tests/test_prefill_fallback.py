"""The dense-fallback rule (attention_backends/prefill_cost.py): when a sparse prefill method would cost more than
dense attention at a length, dense runs and the report says so; ``"fallback": "never"`` turns it off."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from attention_backends import InvalidSparsePattern, describe_methods, parse_pattern, sparse_prefill
from attention_backends.cost import causal_cells
from attention_backends.prefill.dense import sdpa
from attention_backends.prefill_cost import (
    PROFILE_DIR,
    PROFILE_ENV,
    PROFILE_OFF,
    PrefillProfile,
    decide,
    decide_prompt,
    device_profile,
    load_profile,
    predict,
)
from attention_backends.reports import PrefillCallReport
from clients.client import SparseReport
from server.api.cost_report import cost_report
from server.contract.cost import RequestCost
from server.vllm_engine.worker_state import encode_spec, spec_from_extra_args

H, D = 28, 128  # Qwen2.5-7B-shaped layer

# Vertical-slash pays only at long prompts: a 20 ms index per layer against dense's 1e-12 s per cell
# (8K: 20.1 ms vs 0.9 ms dense; 128K: 20 + 24 ms vs 240 ms dense).
PROFILE = {
    "card": "test", "impl": "reference", "head_dim": D,
    "dense": {"per_cell_s": 1e-12},
    "methods": {"vertical_slash": {"fixed_s": 0.02, "per_cell_s": 1e-12},
                "block_sparse/b64": {"fixed_s": 0.02, "per_cell_s": 1e-12}},
}


def profile(**changes) -> PrefillProfile:
    return PrefillProfile.from_dict({**PROFILE, **changes})


def prefill_phase(method: str = "vertical_slash", ratio: float = 10, **extra):
    return parse_pattern({"prefill": {"method": method, "compression_ratio": ratio, **extra}}).prefill


def test_falls_back_where_the_method_cannot_pay_and_never_overrides():
    prof = profile()
    assert decide(prefill_phase(), 8192, H, D, prof) == "dense"
    assert decide(prefill_phase(), 131072, H, D, prof) is None
    method_s, dense_s = predict(prof, prefill_phase(), 8192, H, D)
    assert method_s > dense_s
    assert decide(prefill_phase(fallback="never"), 8192, H, D, prof) is None
    assert decide(prefill_phase(fallback="auto"), 8192, H, D, prof) == "dense"


def test_the_rule_is_asked_per_chunk():
    """An index paid once per chunk: vertical_slash:10 pays on a whole 128K prompt (20 + 24 ms against 240 ms) but
    not on its last 4096-token chunk (20 + 1.5 ms against 14.8 ms); on a 16384-token chunk it pays again (25.6
    against 56.4 ms). A profile that times dense chunks apart (here twice as slow per cell) is used for them."""
    prof, n = profile(), 131072
    assert decide(prefill_phase(), n, H, D, prof) is None
    assert decide(prefill_phase(), n, H, D, prof, q_offset=n - 4096) == "dense"
    assert decide(prefill_phase(), n, H, D, prof, q_offset=n - 16384) is None
    method_s, dense_s = predict(prof, prefill_phase(), n, H, D, q_offset=n - 4096)
    assert dense_s == pytest.approx(causal_cells(n, n - 4096) * H * 1e-12)
    assert method_s == pytest.approx(0.02 + dense_s / 10)
    slow_chunks = profile(dense_chunk={"per_cell_s": 2e-12})
    assert decide(prefill_phase(), n, H, D, slow_chunks, q_offset=n - 4096) is None
    assert decide(prefill_phase(), 8192, H, D, slow_chunks) == "dense"  # a whole prompt: the whole-prompt terms
    assert PrefillProfile.from_dict(slow_chunks.to_dict()).dense_chunk == slow_chunks.dense_chunk


def test_a_chunked_prompt_runs_the_method_only_if_its_chunks_beat_one_dense_call():
    """The engine prefills a dense prompt whole, so a sparse prompt's chunks compete with one dense call over the
    whole prompt (240 ms at 128K here), and dense chunks are slower per cell (1.5x here). In 4096-token chunks the
    20 ms index makes nearly every chunk run dense, and those chunks add up to ~1.5x the whole call: dense. In
    16384-token chunks the method runs on all but the first two, ~165 ms in all: the method."""
    prof, n = profile(dense_chunk={"per_cell_s": 1.5e-12}), 131072
    assert decide(prefill_phase(), n, H, D, prof) is None  # the whole prompt in one call would pay
    assert decide_prompt(prefill_phase(), n, H, D, prof, tuple(range(0, n, 4096))) == "dense"
    assert decide_prompt(prefill_phase(), n, H, D, prof, tuple(range(0, n, 16384))) is None
    for length in (8192, n):  # one chunk: the per-call rule
        assert decide_prompt(prefill_phase(), length, H, D, prof) == decide(prefill_phase(), length, H, D, prof)
    assert decide_prompt(prefill_phase(fallback="never"), n, H, D, prof, tuple(range(0, n, 4096))) is None


def test_where_the_rule_does_not_apply():
    prof = profile()
    assert decide(prefill_phase(), 8192, H, D, None) is None  # no profile for the device (the CPU)
    assert decide(prefill_phase(ratio=1), 8192, H, D, prof) is None  # ratio 1: the method is dense already
    assert decide(prefill_phase("dense"), 8192, H, D, prof) is None
    # the method's own parameters set the budget: its cells are unknown before the index is built
    pinned = prefill_phase(params={"num_vertical": 64, "num_slash": 64})
    assert decide(pinned, 8192, H, D, prof) is None
    assert decide(prefill_phase(params={"num_vertical": 64}), 8192, H, D, prof) == "dense"  # ratio sets the other
    # no entry for the method or its block size
    assert decide(prefill_phase("flexprefill"), 8192, H, D, prof) is None
    assert decide(prefill_phase("block_sparse"), 8192, H, D, prof) is None  # block 16
    assert decide(prefill_phase("block_sparse", params={"block_size": 64}), 8192, H, D, prof) == "dense"


def test_profile_applies_only_to_its_impl_and_comes_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PROFILE))
    cpu = torch.device("cpu")
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert device_profile(cpu, "reference") is None  # the CPU ships no profile
    monkeypatch.setenv(PROFILE_ENV, str(path))
    assert device_profile(cpu, "reference").card == "test"
    assert device_profile(cpu, "triton") is None
    monkeypatch.setenv(PROFILE_ENV, PROFILE_OFF)  # the rule off everywhere (the GPU checks of the methods)
    assert device_profile(cpu, "reference") is None


def test_shipped_h200_profile_reproduces_the_recorded_orderings():
    """benchmarks/calibrate_fallback.py on the H200 (7B layer, 2026-12-01, the fifth session: vertical_slash without
    host syncs) and the e2e TTFTs of the same lease (benchmarks/results/e2e-NVIDIA-H200-2026-12-01-parts/session5):
    vertical_slash:10 and flexprefill:10 lose on a 4096-token chunk at 32K and win on a 16384-token chunk at 128K;
    on whole prompts in 16384-token chunks both pay at 128K only (6.96 and 6.79 s against dense's 8.99 s; flexprefill
    fell back at 128K before, 9.12 s); block_sparse:10 b64 wins from 8K (session4: 32K 0.81 s, 128K 4.02 s against
    1.10 and 9.14 s); block 16 at r=4 never pays."""
    prof = load_profile(str(PROFILE_DIR / "prefill-NVIDIA-H200.json"))
    assert (prof.card, prof.impl) == ("NVIDIA H200", "triton") and prof.dense_chunk is not None

    def chunked(phase, n, size=16384):
        return decide_prompt(phase, n, H, D, prof, tuple(range(0, n, size)))

    for method in ("vertical_slash", "flexprefill"):
        assert decide(prefill_phase(method), 32768, H, D, prof, q_offset=32768 - 4096) == "dense"
        assert decide(prefill_phase(method), 131072, H, D, prof, q_offset=131072 - 16384) is None
    for method in ("vertical_slash", "flexprefill"):
        assert [chunked(prefill_phase(method), n) for n in (8192, 32768, 131072)] == ["dense", "dense", None]
    # in 32768-token chunks (the default since 2026-12-03; e2e-NVIDIA-H200-2026-12-03-parts): a 32K prompt is one
    # chunk, where vertical_slash pays (1.052 s against dense's 1.082) and flexprefill does not (it fell back)
    assert [chunked(prefill_phase("vertical_slash"), n, 32768) for n in (8192, 32768, 131072)] == ["dense", None, None]
    assert [chunked(prefill_phase("flexprefill"), n, 32768) for n in (8192, 32768, 131072)] == ["dense", "dense", None]
    b64 = prefill_phase("block_sparse", params={"block_size": 64})
    assert [chunked(b64, n) for n in (8192, 32768, 131072)] == [None] * 3
    assert [chunked(prefill_phase("block_sparse", 4), n) for n in (8192, 32768, 131072)] == ["dense"] * 3


def test_sparse_prefill_runs_dense_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**PROFILE, "head_dim": 16, "methods": {"vertical_slash": {"fixed_s": 1.0}}}))
    monkeypatch.setenv(PROFILE_ENV, str(path))
    g = torch.Generator().manual_seed(0)
    h, n = 4, 256
    q, k, v = (torch.randn(heads, n, 16, generator=g) for heads in (h, 2, 2))
    spec = parse_pattern("vertical_slash:4")
    out, report = sparse_prefill(q, k, v, spec)
    assert report.fallback == "dense" and report.method == "vertical_slash" and report.target_compression_ratio == 4
    assert report.computed_cells == report.dense_cells == causal_cells(n) * h
    assert report.achieved_compression_ratio == 1 and report.indexing_flops == 0
    assert torch.equal(out, sdpa(q, k, v))

    never = parse_pattern({"prefill": {"method": "vertical_slash", "compression_ratio": 4, "fallback": "never"}})
    out, report = sparse_prefill(q, k, v, never)
    assert report.fallback is None and report.achieved_compression_ratio > 1.5


def test_fallback_field_is_validated_and_prefill_only():
    assert parse_pattern("vertical_slash:4").prefill.fallback == "auto"
    assert describe_methods()["prefill_fallback"]["choices"] == ["auto", "never"]  # GET /v1/sparse/patterns
    with pytest.raises(InvalidSparsePattern) as e:
        parse_pattern({"prefill": {"method": "vertical_slash", "fallback": "always"}})
    assert e.value.param == "sparse_pattern.prefill.fallback"
    with pytest.raises(InvalidSparsePattern) as e:
        parse_pattern({"decode": {"method": "quest", "fallback": "never"}})
    assert e.value.param == "sparse_pattern.decode.fallback"


def test_the_vllm_side_channel_keeps_the_fallback_mode():
    never = parse_pattern({"prefill": {"method": "block_sparse", "compression_ratio": 4, "fallback": "never"},
                           "decode": "quest"})
    for spec in (never, parse_pattern("vertical_slash:4")):
        assert spec_from_extra_args({"sparse_pattern": json.dumps(encode_spec(spec))}) == spec


def test_cost_report_and_client_carry_the_fallback():
    spec = parse_pattern("vertical_slash:8")
    fell_back, ran = RequestCost.for_spec(spec), RequestCost.for_spec(spec)
    for _ in range(2):  # two layers
        fell_back.add_prefill(PrefillCallReport.dense(100, 64, "vertical_slash", 8.0, "dense"))
        ran.add_prefill(PrefillCallReport("vertical_slash", 8.0, 20, 100, 1.0, 5.0))
    report = cost_report(fell_back)["prefill"]
    assert report["fallback"] == "dense" and report["achieved_compression_ratio"] == 1
    assert report["method"] == "vertical_slash" and report["target_compression_ratio"] == 8
    assert cost_report(ran)["prefill"]["fallback"] is None
    assert SparseReport.from_dict({"prefill": report, "decode": {}}).prefill.fallback == "dense"
    assert SparseReport.from_dict({"prefill": {"fallback": None}, "decode": {}}).prefill.fallback is None
    # several engine requests (prompts or choices): "dense" only when every one fell back
    assert RequestCost.combine([fell_back, fell_back]).prefill.fallback == "dense"
    mixed = RequestCost.combine([fell_back, ran]).prefill
    assert mixed.fallback is None and mixed.achieved_compression_ratio == 200 / 120


@pytest.mark.slow
def test_calibration_tiny_smoke_run_writes_a_profile_the_rule_loads(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import calibrate_fallback

    out = calibrate_fallback.main(["--tiny", "--out", str(tmp_path / "p.json"), "--lengths", "128,256",
                                   "--chunks", "128"])
    prof = load_profile(str(out))
    assert prof.impl == "triton" and prof.head_dim == 16
    assert set(prof.methods) == {"vertical_slash", "flexprefill", "block_sparse/b16"}
    timings = prof.extra["timings"]
    # 128 whole, and the last 128-token chunk of 256 (queries from 128), each at 2 ratios
    assert [(r["n"], r["q_offset"]) for r in timings["dense"] + timings["dense_chunk"]] == [(128, 0), (256, 128)]
    assert all(len(timings[key]) == 4 for key in prof.methods)
    assert timings["vertical_slash"][-1]["dense_cells"] == causal_cells(256, 128) * 2
    for terms in (prof.dense, prof.dense_chunk, *prof.methods.values()):
        values = (terms.fixed_s, terms.per_token_s, terms.per_cell_s, terms.per_dense_cell_s)
        assert min(values) >= 0 and max(values) > 0
    assert predict(prof, prefill_phase(), 192, 2, 16) is not None
