"""lm-evaluation-harness itself (``lm-eval run --model local-completions``) against a live server on the embedded
SmolLM2: a multiple-choice task (loglikelihood requests: ``echo`` + ``logprobs``) and a generation task, both
defined in ``tests/fixtures/lm_eval`` on local data, dense and with a sparse prefill pattern sent as a header
through the harness's ``model_args``. Nothing is downloaded: datasets and the hub are offline, and the tokenizer
lm-eval counts context tokens with is the server's own, saved to a directory.

The harness's numbers are checked against the engine's own: each choice's loglikelihood (and so the accuracy)
recomputed from the engine's prompt logprobs, and each generation against the server's greedy completion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from engine_helpers import collect, make_request
from server_harness import metric_samples
from test_server_e2e import E2E_SETTINGS, serve_engine

from server.settings import ServerSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TASKS = Path(__file__).parent / "fixtures" / "lm_eval"
MC, GEN = "sparse_serve_mc", "sparse_serve_gen"
SPARSE = "vertical_slash:4"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with serve_engine(ServerSettings(**E2E_SETTINGS)) as s:
        s.tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
        s.engine.tokenizer.hf_tokenizer.save_pretrained(str(s.tokenizer_dir))
        yield s


def run_lm_eval(srv, out: Path, pattern: str | None) -> tuple[dict, dict[str, list[dict]]]:
    """One ``lm-eval run`` of both tasks; returns its results and its logged samples per task."""
    model_args = {"model": srv.engine.model_name, "base_url": f"{srv.url}/v1/completions",
                  "tokenizer": str(srv.tokenizer_dir), "tokenizer_backend": "huggingface", "max_length": 600}
    if pattern is not None:
        model_args["header"] = {"X-Sparse-Pattern": pattern}
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "lm-eval"), "run", "--model", "local-completions",
           "--model_args", json.dumps(model_args), "--tasks", MC, GEN, "--include_path", str(TASKS),
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [p for p in out.rglob("results_*.json")]
    assert len(results) == 1, list(out.rglob("*"))
    samples = {task: read_jsonl(next(out.rglob(f"samples_{task}_*.jsonl"))) for task in (MC, GEN)}
    return json.loads(results[0].read_text())["results"], samples


def engine_loglikelihoods(srv, pattern: str) -> list[list[float]]:
    """Each choice's loglikelihood from the engine's own prompt logprobs, tokenized as lm-eval does
    (context alone, then context + " choice"; the continuation is what the whole adds)."""
    tok = srv.engine.tokenizer
    out = []
    for i, doc in enumerate(read_jsonl(TASKS / "mc.jsonl")):
        context = f"{doc['passage']}\nQuestion: {doc['question']}\nAnswer:"
        n_ctx = len(tok.encode(context, add_special_tokens=False))
        lls = []
        for j, choice in enumerate(doc["choices"]):
            whole = tok.encode(f"{context} {choice}", add_special_tokens=False)
            req = make_request(f"ll-{pattern}-{i}-{j}", whole, pattern, max_tokens=0, prompt_logprobs=0)
            res = srv.call(collect(srv.engine, req), timeout=120)
            lls.append(sum(lp.logprob for lp in res.prompt_logprobs[n_ctx:]))
        out.append(lls)
    return out


def requests_by_prefill(srv) -> dict[str, float]:
    samples = metric_samples(httpx.get(srv.url + "/metrics", timeout=30).text)
    out: dict[str, float] = {}
    for (name, labels), v in samples.items():
        if name == "sparse_serve_requests_total":
            method = dict(labels)["prefill_method"]
            out[method] = out.get(method, 0) + v
    return out


def test_lm_eval_local_completions_dense_and_sparse(srv, tmp_path):
    docs = read_jsonl(TASKS / "mc.jsonl")
    n_ll = sum(len(d["choices"]) for d in docs)
    n_gen = len(read_jsonl(TASKS / "gen.jsonl"))
    before = requests_by_prefill(srv)
    dense, dense_samples = run_lm_eval(srv, tmp_path / "dense", None)
    sparse, sparse_samples = run_lm_eval(srv, tmp_path / "sparse", SPARSE)
    after = requests_by_prefill(srv)
    # every harness request reached the server, the sparse run's under the sparse prefill
    assert after.get("dense", 0) - before.get("dense", 0) == n_ll + n_gen
    assert after.get("vertical_slash", 0) - before.get("vertical_slash", 0) == n_ll + n_gen

    for results, samples, pattern in ((dense, dense_samples, "dense"), (sparse, sparse_samples, SPARSE)):
        ours = engine_loglikelihoods(srv, pattern)
        theirs = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples[MC]}  # logged as text
        assert sorted(theirs) == list(range(len(docs)))
        for i, lls in enumerate(ours):
            assert theirs[i] == pytest.approx(lls, abs=1e-4), (pattern, i)
        accuracy = sum(max(range(len(lls)), key=lls.__getitem__) == d["answer"] for lls, d in zip(ours, docs,
                                                                                                 strict=True))
        assert results[MC]["acc,none"] == pytest.approx(accuracy / len(docs)), pattern
        # generations: the server's own greedy completion of each prompt under the same pattern
        for s in samples[GEN]:
            body = {"prompt": s["doc"]["prompt"], "max_tokens": 8, "temperature": 0, "stop": ["\n"],
                    "sparse_pattern": pattern}
            expected = httpx.post(srv.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
            assert s["resps"][0][0] == expected
        assert 0.0 <= results[GEN]["exact_match,none"] <= 1.0
    # the sparse run scored what the sparse prefill computed, not dense logprobs
    assert [s["filtered_resps"] for s in sparse_samples[MC]] != [s["filtered_resps"] for s in dense_samples[MC]]
    print(f"lm-eval acc dense {dense[MC]['acc,none']:.3f} {SPARSE} {sparse[MC]['acc,none']:.3f}; exact_match "
          f"dense {dense[GEN]['exact_match,none']:.3f} {SPARSE} {sparse[GEN]['exact_match,none']:.3f}")
