"""The ``sparse-serve`` process: --help, graceful shutdown on SIGTERM (exit 0), and the real CLI with a tiny
queue (429 + Retry-After, then still serving) and JSON access logs on stdout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_harness import free_port, parse_sse, start_fake_process, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

def start_fake(timeout: float, load_s: float = 0.0, wait: bool = True) -> tuple[subprocess.Popen, str]:
    return start_fake_process(settings={"shutdown_timeout": timeout}, engine={"token_delay": 0.02}, load_s=load_s,
                              wait=wait)


def stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def go():
        try:
            with httpx.Client(timeout=60) as c:
                with c.stream("POST", url + "/v1/completions", json=body) as r:
                    result["status"] = r.status_code
                    chunks = []
                    for line in r.iter_lines():
                        chunks.append(line)
                        result.setdefault("first_at", time.monotonic())
                    result["text"] = "\n".join(chunks)
        except httpx.HTTPError as e:
            result["error"] = repr(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, result


def test_sigterm_drains_with_503_then_cuts_overdue_streams_cleanly():
    proc, url = start_fake(timeout=3)
    try:
        short, short_result = stream_in_thread(url, {"prompt": "abc", "max_tokens": 60, "stream": True,
                                                     "temperature": 0})
        # 400 tokens at 20 ms each outlast the 3 s shutdown timeout (and fit the fake engine's 512-token context)
        long, long_result = stream_in_thread(url, {"prompt": "abc", "max_tokens": 400, "stream": True,
                                                   "ignore_eos": True})
        plain: dict = {}

        def post_plain() -> None:  # not streamed: outlasts the timeout too
            r = httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 400, "ignore_eos": True},
                           timeout=60)
            plain.update(status=r.status_code, body=r.json())

        plain_thread = threading.Thread(target=post_plain, daemon=True)
        plain_thread.start()
        while ("first_at" not in short_result or "first_at" not in long_result) and long.is_alive():
            time.sleep(0.02)
        assert long_result.get("status") == 200 and short_result.get("status") == 200, (short_result, long_result)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Draining: the port still answers, with 503, until the server closes (load balancers see it go).
        health_codes = []
        while time.monotonic() - start < 2.5:
            health_codes.append(httpx.get(url + "/health", timeout=2).status_code)
            time.sleep(0.2)
        assert set(health_codes) == {503}, health_codes
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=2)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert time.monotonic() - start < 12
        short.join(10)
        long.join(10)
        events = parse_sse(short_result["text"] + "\n\n")
        assert short_result["status"] == 200 and events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"  # the in-flight request finished
        # Past the timeout: cut, but as a stream ends - an OpenAI-style error event, then [DONE].
        events = parse_sse(long_result["text"] + "\n\n")
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutdown", events[-3:]
        assert events[-2]["error"]["type"] == "service_unavailable_error"
        plain_thread.join(10)
        assert plain["status"] == 503 and plain["body"]["error"]["code"] == "server_shutdown", plain
        assert "cutting off 2 in-flight request" in err and "shut down cleanly" not in err, err[-3000:]
        assert "Traceback" not in err and "Cancel" not in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_port_answers_503_starting_while_the_model_loads():
    proc, url = start_fake(timeout=1, load_s=4, wait=False)
    try:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 200 not in seen:
            try:
                r = httpx.get(url + "/health", timeout=2)
                seen.append(r.status_code)
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "starting" and r.headers["retry-after"]
            except httpx.ConnectError:
                seen.append("refused")
            time.sleep(0.1)
        assert seen.count(503) >= 5 and seen[-1] == 200, seen
        assert seen.index(503) < seen.index(200) and "refused" not in seen[seen.index(503):], seen
        assert httpx.head(url + "/health", timeout=2).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "shut down cleanly" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_busy_port_fails_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        exe = VENV_BIN / "sparse-serve"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]
        # A model path that does not exist: loading it first would fail with exit code 2 and "not found".
        proc = subprocess.run([*cmd, "--port", str(port), "--model", "/nonexistent/model"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "address already in use" in proc.stderr.lower() and "before loading the model" in proc.stderr
    assert "not found" not in proc.stderr.lower()


@pytest.mark.slow
def test_real_cli_tiny_queue_and_access_log():
    port = free_port()
    exe = VENV_BIN / "sparse-serve"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]
    env = {**os.environ, "SPARSE_SERVE_API_KEY": "k"}
    proc = subprocess.Popen([*cmd, "--port", str(port), "--device", "cpu", "--dtype", "float32", "--max-model-len",
                             "256", "--kv-cache-memory", "48MiB", "--max-num-seqs", "1", "--max-queue", "1",
                             "--default-sparse-pattern", "quest:4", "--shutdown-timeout", "20"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer k"}
    try:
        wait_healthy(url, proc, 240)
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=10).status_code == 401

        async def burst():
            async with httpx.AsyncClient(base_url=url, headers=auth, timeout=120) as c:
                body = {"prompt": "Count: one two three", "max_tokens": 8, "ignore_eos": True}
                return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))

        rs = asyncio.run(burst())
        codes = [r.status_code for r in rs]
        assert codes.count(200) >= 1 and codes.count(429) >= 3, codes
        assert all(int(r.headers["retry-after"]) >= 1 for r in rs if r.status_code == 429)
        ok = next(r for r in rs if r.status_code == 200).json()
        assert ok["sparse"]["decode"]["method"] == "quest" and ok["usage"]["completion_tokens"] == 8
        r = httpx.post(url + "/v1/completions", headers=auth, json={"prompt": "after", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        statuses = [x["status"] for x in lines if x["path"] == "/v1/completions"]
        assert sorted(statuses) == sorted([401, *codes, 200])
        assert all(x["request_id"] for x in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
