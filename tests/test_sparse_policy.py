"""sparse_pattern "auto": a policy written by `sparse-eval fit --write-policy` from a run's records, loaded by
the server, chooses per prompt length; invalid policies stop the server at start-up."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import ValidationError
from server_harness import FakeEngine, ThreadedServer, metric_samples

from clients.client import SparseClient
from clients.eval_cli import main as eval_main
from server.api import create_app
from server.cli import main as serve_main
from server.settings import ServerSettings
from server.sparse_policy import DEFAULT_POLICY, PolicyError, policy_from_dict

N = 80  # samples per cell: enough that the sampling margin stays under the 0.1 budget for a pattern that holds


def _records(length: int, pattern: str, ratio: float, correct: int) -> list[dict]:
    method = pattern.split(":")[0]
    decode = method in ("quest", "snapkv")
    return [{"task": "ruler_niah_single", "length": length, "seed": 0, "index": i, "pattern": pattern,
             "method": method, "ratio": ratio, "model": "fake", "score": float(i < correct), "parsable": True,
             "achieved_prefill_ratio": 1.0 if decode else ratio, "achieved_decode_ratio": ratio if decode else 1.0}
            for i in range(N)]


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    """A recorded run at 1024 and 4096 tokens: at 1024 quest:4 loses half the answers and snapkv:2 none; at 4096
    both hold. quest:4 is the cheaper one (a quarter of the decode reads)."""
    run = tmp_path_factory.mktemp("run")
    recs = []
    for length, quest_ok in ((1024, N // 2), (4096, N)):
        recs += _records(length, "dense", 1.0, N) + _records(length, "snapkv:2", 2.0, N)
        recs += _records(length, "quest:4", 4.0, quest_ok)
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    path = run / "policy.json"
    assert eval_main(["fit", str(run), "--include-dense", "--write-policy", str(path), "--max-drop", "0.1"]) == 0
    return path


def test_written_policy_bands(policy_path):
    doc = json.loads(policy_path.read_text())
    assert [(b["min_tokens"], b["max_tokens"]) for b in doc["bands"]] == [(0, 973), (973, 2048), (2048, None)]
    at_1k = {c["pattern"]: c for c in doc["bands"][1]["candidates"]}
    assert at_1k["quest:4"]["predicted_drop"] == pytest.approx(0.5)
    assert at_1k["snapkv:2"]["predicted_drop"] == pytest.approx(0.0) and at_1k["snapkv:2"]["margin"] < 0.1
    assert [c["pattern"] for c in doc["bands"][2]["candidates"]] == ["quest:4", "snapkv:2"]  # cheapest first


@pytest.fixture(scope="module")
def server(policy_path):
    engine = FakeEngine(max_model_len=8192, token_delay=0.0)
    with ThreadedServer(create_app(engine, ServerSettings(sparse_policy=str(policy_path)))) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _complete(http, n_tokens: int, pattern: str, **extra) -> httpx.Response:
    # the fake engine's tokenizer is one token per byte
    return http.post("/v1/completions", json={"prompt": "x" * n_tokens, "max_tokens": 3, "sparse_pattern": pattern,
                                              **extra})


@pytest.mark.parametrize("n_tokens, chosen, band", [
    (500, "dense", (0, 973)), (1500, "snapkv:2", (973, 2048)), (5000, "quest:4", (2048, None))])
def test_auto_chooses_the_policy_pattern_per_length(http, n_tokens, chosen, band):
    r = _complete(http, n_tokens, "auto")
    assert r.status_code == 200, r.text
    sparse = r.json()["sparse"]
    auto = sparse["auto"]
    assert auto["requested"] == "auto" and auto["chosen"] == chosen and auto["max_drop"] == 0.1
    assert (auto["band"]["min_tokens"], auto["band"]["max_tokens"]) == band and auto["prompt_tokens"] == n_tokens
    assert sparse["decode"]["method"] == chosen.split(":")[0]  # the engine really ran it
    if chosen != "dense":
        assert auto["predicted_drop"] + auto["margin"] <= 0.1


def test_tight_budget_chooses_dense(http):
    r = _complete(http, 5000, "auto:0.01")
    auto = r.json()["sparse"]["auto"]
    assert (auto["requested"], auto["chosen"], auto["max_drop"]) == ("auto:0.01", "dense", 0.01)
    assert auto["predicted_drop"] is None and "within the budget" in auto["reason"]
    assert r.json()["sparse"]["prefill"]["method"] == r.json()["sparse"]["decode"]["method"] == "dense"


def test_auto_stream_metrics_and_patterns_endpoint(http):
    r = _complete(http, 1500, "auto", stream=True, stream_options={"include_usage": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["sparse"]["auto"]["chosen"] == "snapkv:2"
    samples = metric_samples(http.get("/metrics").text)
    counts = {dict(k[1])["decode_method"]: v for k, v in samples.items() if k[0] == "sparse_serve_auto_choices_total"}
    assert counts.get("snapkv", 0) >= 1
    listed = http.get("/v1/sparse/patterns").json()["auto"]
    assert listed["policy"]["max_drop"] == 0.1 and len(listed["policy"]["bands"]) == 3


def test_client_library_sends_auto_and_reads_the_choice(server):
    with SparseClient(server.url) as c:
        r = c.completions("x" * 1500, max_tokens=2, sparse_pattern="auto")
        tight = c.chat("x" * 5000, max_tokens=2, sparse_pattern="auto:0.01")
    assert r.sparse.auto.chosen == "snapkv:2" == r.sparse.pattern and r.sparse.auto.band["min_tokens"] == 973
    assert tight.sparse.auto.chosen == "dense" and tight.sparse.auto.requested == "auto:0.01"


@pytest.mark.parametrize("body, param", [
    ({"sparse_pattern": "auto:abc"}, "sparse_pattern"),
    ({"sparse_pattern": "auto:2"}, "sparse_pattern"),  # a drop above 1 is no accuracy budget
    ({"sparse_pattern": "auto", "compression_ratio": 4}, "compression_ratio"),
])
def test_bad_auto_requests_are_400(http, body, param):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("bands, message", [
    ([{"min_tokens": 0, "candidates": [{"pattern": "sparsest:4"}]}], "unknown sparse method 'sparsest'"),
    ([{"min_tokens": 0, "candidates": [{"pattern": "quest:0.5"}]}], "must be a finite number >= 1"),
    ([{"min_tokens": 0, "max_tokens": 2000}, {"min_tokens": 1000}], "bands [0, 2000) and [1000, inf) overlap"),
])
def test_invalid_policy_fails_at_start_up(tmp_path, capsys, bands, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"version": 1, "bands": bands}))
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        policy_from_dict(json.loads(path.read_text()), str(path))
    with pytest.raises(ValidationError, match="sparse policy"):
        ServerSettings(sparse_policy=str(path))
    with pytest.raises(SystemExit) as exit_info:  # before any model is loaded
        serve_main(["--sparse-policy", str(path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_default_policy_is_dense_short_and_sparser_longer():
    chosen = [DEFAULT_POLICY.choose(n).spec for n in (1000, 5000, 20000, 100000)]
    assert chosen[0].to_string() == "dense"
    prefill = [s.prefill.compression_ratio for s in chosen[1:]]
    decode = [s.decode.compression_ratio for s in chosen[1:]]
    assert prefill == sorted(prefill) and decode == sorted(decode) and prefill[0] > 1
    assert all(p < d for p, d in zip(prefill, decode, strict=True))  # prefill more cautious than decode
    # unmeasured: an explicit budget never takes it
    from server.sparse_policy import parse_auto

    assert DEFAULT_POLICY.choose(100000, parse_auto("auto:0.5")).spec.to_string() == "dense"


def test_policy_from_the_recorded_smollm2_run(tmp_path):
    """The recorded SmolLM2 run (benchmarks/results): no pattern is within 5 points of dense at 1K, so plain auto
    serves dense; a 0.5 budget admits block_sparse:2 (drop 0.155 + margin 0.297), the only one."""
    from pathlib import Path

    run = Path(__file__).parent.parent / "benchmarks" / "results" / "accuracy-smollm2-cpu-2026-11-30"
    path = tmp_path / "policy.json"
    assert eval_main(["fit", "--results", str(run / "results.jsonl"), "--include-dense",
                      "--write-policy", str(path)]) == 0
    engine = FakeEngine(max_model_len=4096, token_delay=0.0)
    with ThreadedServer(create_app(engine, ServerSettings(sparse_policy=str(path)))) as s, \
            httpx.Client(base_url=s.url, timeout=30) as http:
        chosen = {pat: _complete(http, 1500, pat).json()["sparse"]["auto"]["chosen"] for pat in ("auto", "auto:0.5")}
    assert chosen == {"auto": "dense", "auto:0.5": "block_sparse:2"}
