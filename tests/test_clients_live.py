"""`sparse-eval` and `sparse-loadtest` end to end against a live server on the embedded SmolLM2 (CPU, float32).

One server for the module (the harness's uvicorn thread with the real NativeEngine); the tools run as
subprocesses, as a user runs them. The eval run is SIGKILLed after some records are written and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_harness import ThreadedServer

from server.api import create_app
from server.cli import build_engine
from server.settings import ServerSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
QA = ROOT / "tests" / "fixtures" / "qa"
TASKS = ["ruler_niah", "ruler_vt", "ruler_cwe", "qa_squad", "qa_quality", "qa_toefl", "story_retrieval",
         "story_multihop", "story_filtering"]
PATTERNS = ["dense", "vertical_slash:2+quest:2"]
SAMPLES = 2


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(device="cpu", dtype="float32", max_model_len=2048, kv_cache_memory=384 << 20,
                              max_num_seqs=8, max_queue=64, access_log=False)
    engine = build_engine(settings)
    with ThreadedServer(create_app(engine, settings)) as srv:
        yield srv


def _cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_eval_run_kill_resume_report(server, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--url", server.url, "--tasks", "all", "--lengths", "1024", "--samples", str(SAMPLES),
            "--patterns", ",".join(PATTERNS), "--max-tokens", "32", "--qa-data", str(QA), "--out", str(out),
            "--concurrency", "4", "--timeout", "300", "--no-progress"]
    results = out / "results.jsonl"
    total = len(TASKS) * SAMPLES * len(PATTERNS)

    # first run: SIGKILL once a few records are on disk
    proc = subprocess.Popen(_cmd("clients.eval_cli", *args), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while len(_lines(results)) < 6:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no records written"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    before = results.read_bytes()
    kept = [json.loads(x) for x in before.decode().splitlines(keepends=True) if x.endswith("\n")]
    assert 6 <= len(kept) < total

    # second run: finishes the rest, redoes nothing that was finished
    done = subprocess.run(_cmd("clients.eval_cli", *args), env=_env(), capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(kept)} of {total} samples already finished" in done.stderr
    recs = [json.loads(x) for x in _lines(results)]
    keys = [(r["task"], r["length"], r["pattern"], r["seed"], r["index"]) for r in recs]
    assert len(recs) == total and len(set(keys)) == total
    assert set(keys) == {(t, 1024, p, 0, i) for t in TASKS for p in PATTERNS for i in range(SAMPLES)}
    assert recs[: len(kept)] == kept  # finished records untouched, in place
    for r in recs:
        assert 0.95 * 1024 <= r["prompt_tokens"] <= 1024 and r["server_prompt_tokens"] == r["prompt_tokens"]
        assert 0 <= r["score"] <= 1 and r["latency_s"] > 0 and r["completion_tokens"] <= 32
        if r["pattern"] == "dense":
            assert r["achieved_prefill_ratio"] == 1 and r["attention_flops"] == r["dense_attention_flops"]
        else:
            assert (r["prefill_method"], r["decode_method"]) == ("vertical_slash", "quest")
            assert r["target_prefill_ratio"] == 2 and r["target_decode_ratio"] == 2
            assert r["achieved_prefill_ratio"] > 1.2 and r["attention_flops"] < r["dense_attention_flops"]
            assert r["kv_bytes_read"] < r["dense_kv_bytes_read"] and r["method"] == "vertical_slash+quest"

    # a third run has nothing to do
    again = subprocess.run(_cmd("clients.eval_cli", *args), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 new" in again.stderr and len(_lines(results)) == total

    rep = subprocess.run(_cmd("clients.eval_cli", "report", str(out)), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert rep.returncode == 0, rep.stderr
    for t in TASKS:
        assert t in rep.stdout
        assert (out / "plots" / f"{t}.png").stat().st_size > 5000
    assert "vertical_slash+quest" in rep.stdout and "attn_FLOPs_saved" in rep.stdout
    csv_rows = (out / "summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("task,length,method,ratio,n,mean,stderr,unparsable")
    assert sum(1 for r in csv_rows if r.startswith("ruler_niah,1024,")) == 2


def test_loadtest_closed_loop(server, tmp_path):
    out = tmp_path / "load.json"
    mix = "dense=0.5,vertical_slash:2+quest:2=0.5"
    t0 = time.monotonic()
    r = subprocess.run(_cmd("clients.loadtest", "--url", server.url, "--duration", "20", "--concurrency", "4",
                            "--prompt-tokens", "uniform:64:192", "--max-tokens", "12", "--patterns", mix,
                            "--slo-ttft-ms", "10000", "--slo-tpot-ms", "2000", "--out", str(out), "--seed", "1",
                            "--timeout", "120"),
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 >= 20
    rep = json.loads(out.read_text())
    overall = rep["overall"]
    assert overall["failed"] == 0 and overall["errors"] == {} and overall["completed"] >= 8
    assert overall["requests"] == sum(p["requests"] for p in rep["patterns"].values())
    counts = [rep["patterns"][p]["requests"] for p in ("dense", "vertical_slash:2+quest:2")]
    assert abs(counts[0] - counts[1]) <= 1  # the mix is 50/50; smooth round robin keeps it within one
    for s in [overall, *rep["patterns"].values()]:
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            st = s[metric]
            assert all(st[k] is not None and st[k] > 0 for k in ("mean", "p50", "p90", "p99")), (metric, st)
            assert st["p50"] <= st["p90"] <= st["p99"]
        assert s["request_throughput"] > 0 and s["output_token_throughput"] > 0 and s["goodput"] >= 0
        assert s["mean_output_tokens"] == 12  # ignore_eos: the drawn length
        assert 48 <= s["mean_prompt_tokens"] <= 230  # sized with /tokenize
    sparse = rep["patterns"]["vertical_slash:2+quest:2"]
    assert sparse["mean_achieved_decode_ratio"] > 1.2
    for word in ("TTFT (ms)", "TPOT (ms)", "ITL (ms)", "E2E latency (ms)", "p99", "goodput"):
        assert word in r.stdout
