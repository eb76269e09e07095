"""``benchmarks/e2e.py`` on the CPU: the GPU yardstick's protocol, run on a tiny model with ``--tiny``.

The same code measures the H200 run, so a broken measurement (a window with no tokens, a report that drops an
engine, agreement computed on the wrong tokens) shows up here first. The native engine runs in ``make test``;
bare vLLM and ``sparse-serve --engine vllm`` run under ``make test-vllm``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "e2e.py"
REPORT = runpy.run_path(str(SCRIPT))["report"]


def e2e(*args: str, timeout: float = 600) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("e2e-model")
    e2e("write-model", "--dir", str(path), "--tiny")
    return path


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def check_part(part: dict, engine: str, sparse: bool) -> None:
    assert part["engine"] == engine
    patterns = {"dense", "vertical_slash:10", "flexprefill:10", "block_sparse:10/b64", "block_sparse:10"} if sparse \
        else {"dense"}
    assert {r["pattern"] for r in part["ttft"]} == patterns
    assert all(r["ttft_s"] > 0 and r["error"] is None for r in part["ttft"])
    for r in part["decode"]:
        # the window opens once every request decodes: it holds at least one step of the whole batch
        assert r["window_tokens"] >= r["batch"], r
        assert r["tokens_per_s"] > 0 and r["error"] is None, r
        assert r["settle_tokens_per_s"] > 0, r  # the settle period before the window is measured apart


def test_native_tiny_run_and_report(model_dir, tmp_path):
    out = tmp_path / "native.json"
    e2e("run", "--engine", "native", "--tiny", "--dir", str(model_dir), "--part",
        "ttft,agree,decode:1,decode:2,interference", "--out", str(out))
    part = load(out)
    check_part(part, "native", sparse=True)
    # interference: the long prompt (1024 tokens, chunks of 256) prefills in 4 steps with a decode step after each
    # of the first 3, so every decoding stream delivers tokens while it prefills (a whole prefill: none)
    inter = part["interference"]
    assert inter["error"] is None and inter["ttft_s"] > 0 and inter["steady"]["p99_s"] > 0
    assert inter["during"]["gaps"] >= 3 * inter["batch"], inter
    assert inter["p99_ratio"] == inter["during"]["p99_s"] / inter["steady"]["p99_s"]
    assert {(r["batch"], r["pattern"]) for r in part["decode"]} == {
        (b, p) for b in (1, 2) for p in ("dense", "quest:10", "snapkv:10", "ada_snapkv:10")}
    # sparse methods report what they computed; decode ratios follow the target
    for r in part["decode"]:
        if r["pattern"] != "dense":
            assert r["report"]["decode_method"] == r["pattern"].split(":")[0]
            assert r["report"]["decode_ratio"] > 2
    # float32 on the CPU: ratio 1 is dense, and batching never changes a request's tokens
    solo = part["agree"]["solo"]
    assert all(tokens == solo["dense"] for tokens in solo.values()), solo
    assert all(m["agree_prefix"] == len(m["alone"]) for m in part["agree"]["mixed"].values())

    # a later part re-measuring a case replaces it in the report; the other cases stay
    remeasured = tmp_path / "native-again.json"
    fell_back = {**(part["ttft"][0]["report"] or {}), "fallback": "dense"}  # as the dense-fallback rule reports
    again = {**part, "ttft": [{**part["ttft"][0], "ttft_s": 123.0, "report": fell_back}], "decode": [],
             "agree": part["agree"]}
    remeasured.write_text(json.dumps(again))
    stem = REPORT([str(out), str(remeasured)], str(tmp_path / "results"))
    md = stem.with_suffix(".md").read_text()
    assert "| native | block_sparse:10 |" in md and "decode B=2 512" in md and "123.000 s [dense fallback]" in md
    assert md.count("fallback]") == 1  # the CPU has no profile: nothing else fell back
    assert "## Decode while a long prompt prefills" in md and "| native | 8 (512) | 1K |" in md
    assert stem.with_suffix(".png").stat().st_size > 1000
    merged = load(stem.with_suffix(".json"))["engines"]["native"]
    assert [r["ttft_s"] for r in merged["ttft"]] == [123.0] + [r["ttft_s"] for r in part["ttft"][1:]]
    assert [r["part"] for r in merged["ttft"]] == ["native-again.json"] + ["native.json"] * (len(part["ttft"]) - 1)
    assert len(merged["decode"]) == len(part["decode"])


def test_patterns_picks_the_cases_to_measure(model_dir, tmp_path):
    """``--patterns`` re-measures some cases beside their dense baseline; the parts it does not name still run."""
    out = tmp_path / "some.json"
    e2e("run", "--engine", "native", "--tiny", "--dir", str(model_dir), "--part", "ttft,decode:1", "--patterns",
        "dense,quest:10,block_sparse:10/b64", "--out", str(out))
    part = load(out)
    assert {r["pattern"] for r in part["ttft"]} == {"dense", "block_sparse:10/b64"}
    assert {r["pattern"] for r in part["decode"]} == {"dense", "quest:10"}
    assert all(r["tokens_per_s"] > 0 for r in part["decode"])


def test_page_size_runs_quest_on_the_native_engines_larger_pages(model_dir, tmp_path):
    """``--page-size 32`` with the ``quest:10/p32`` label: Quest's pages are the engine's, so both change together
    (the label is measured only when named; the engine rejects a Quest page size that is not its own)."""
    out = tmp_path / "p32.json"
    e2e("run", "--engine", "native", "--tiny", "--dir", str(model_dir), "--part", "decode:2", "--page-size", "32",
        "--patterns", "dense,quest:10/p32", "--out", str(out))
    part = load(out)
    assert part["page_size"] == 32
    assert {r["pattern"] for r in part["decode"]} == {"dense", "quest:10/p32"}
    quest = next(r for r in part["decode"] if r["pattern"] == "quest:10/p32")
    assert quest["error"] is None and quest["tokens_per_s"] > 0
    assert quest["report"]["decode_method"] == "quest" and quest["report"]["decode_ratio"] > 1


def test_native_capacity_on_a_fixed_kv_memory(model_dir, tmp_path):
    """The capacity part: on the same KV memory, the evicting methods hold more requests at once than dense, and
    the report states the memory."""
    out = tmp_path / "capacity.json"
    e2e("run", "--engine", "native", "--tiny", "--dir", str(model_dir), "--part", "capacity", "--kv-memory-mib", "2",
        "--out", str(out))
    part = load(out)
    rows = {r["pattern"]: r for r in part["capacity"]}
    assert set(rows) == {"dense", "snapkv:10", "ada_snapkv:10"} and part["kv_memory_mib"] == 2
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in rows.values())
    assert 1 <= rows["dense"]["concurrent"] < rows["dense"]["requests"]  # the memory is the limit for dense
    assert rows["snapkv:10"]["concurrent"] >= 2 * rows["dense"]["concurrent"]
    md = REPORT([str(out)], str(tmp_path / "results")).with_suffix(".md").read_text()
    assert "## Capacity" in md and "| native | snapkv:10 | 2 |" in md


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make test-vllm)")
def test_vllm_engines_tiny_against_bare_vllm(model_dir, tmp_path):
    """Bare vLLM and sparse-serve's vLLM engine in one run: the report's speedups are against bare vLLM, and every
    method at ratio 1 gives bare vLLM's greedy tokens."""
    parts = []
    for engine in ("vllm", "sparse-vllm"):
        parts.append(tmp_path / f"{engine}.json")
        e2e("run", "--engine", engine, "--tiny", "--dir", str(model_dir), "--part", "ttft,agree,decode:2",
            "--out", str(parts[-1]))
    bare, sparse = load(parts[0]), load(parts[1])
    check_part(bare, "vllm", sparse=False)
    check_part(sparse, "sparse-vllm", sparse=True)
    reference = bare["agree"]["solo"]["dense"]
    assert len(reference) == bare["protocol"]["agree_tokens"]
    assert all(tokens == reference for tokens in sparse["agree"]["solo"].values()), sparse["agree"]["solo"]

    stem = REPORT([str(p) for p in parts], str(tmp_path / "results"))
    rows = load(stem.with_suffix(".json"))["ratios"]
    base = [r for r in rows if r["engine"] == "vllm"]
    assert base and all(abs(r["speedup"] - 1.0) < 1e-9 for r in base)  # the baseline against itself
    assert all(r["speedup"] is not None for r in rows if r["engine"] == "sparse-vllm")


def test_decode_host_benchmark_runs_and_pages_ahead_cut_the_host_work():
    """benchmarks/decode_host.py (the host's per-step bookkeeping): Ada-like sequences, whose heads take pages at
    different steps, edit their page tables nearly every step unless heads take their pages ahead together (then
    about once a page, like SnapKV-like ones). The edit counts are exact; the time only has to follow them (by a
    margin a loaded 2-core CI machine keeps: about 7x measured)."""
    script = ROOT / "benchmarks" / "decode_host.py"

    def per_step(ahead: int) -> dict[str, tuple[float, float]]:
        out = subprocess.run([sys.executable, str(script), "--batch", "8", "--steps", "40", "--kinds", "snapkv,ada",
                              "--ahead", str(ahead)], check=True, cwd=ROOT, capture_output=True, text=True,
                             timeout=300).stdout
        rows = [line.split() for line in out.splitlines() if line.startswith("batch")]
        return {r[2]: (float(r[3]), float(r[7])) for r in rows}  # kind: (us/step, table edits/sequence/step)

    before, after = per_step(0), per_step(1)
    assert before["ada"][1] > 0.9  # some head crosses a page nearly every step
    assert after["ada"][1] < 0.2 and before["snapkv"][1] < 0.2  # about once a page of 16 tokens
    assert after["ada"][0] < before["ada"][0] / 2
