"""The ``sparse-serve`` process: --help, graceful shutdown on SIGTERM (exit 0), and the real CLI with a tiny
queue (429 + Retry-After, then still serving) and JSON access logs on stdout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_harness import free_port, parse_sse

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

FAKE_SERVER = """
import sys
sys.path.insert(0, {tests!r})
from server_harness import FakeEngine
from server.cli import configure_logging, serve
from server.settings import ServerSettings
configure_logging("info")
sys.exit(serve(ServerSettings(port={port}, shutdown_timeout={timeout}), engine=FakeEngine(token_delay=0.02)))
"""


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become healthy")


def start_fake(timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    code = FAKE_SERVER.format(tests=str(ROOT / "tests"), port=port, timeout=timeout)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 60)
    return proc, url


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


def test_sigterm_finishes_in_flight_aborts_overdue_and_exits_0():
    proc, url = start_fake(timeout=3)
    try:
        short, short_result = stream_in_thread(url, {"prompt": "abc", "max_tokens": 60, "stream": True,
                                                     "temperature": 0})
        # 400 tokens at 20 ms each outlast the 3 s shutdown timeout (and fit the fake engine's 512-token context)
        long, long_result = stream_in_thread(url, {"prompt": "abc", "max_tokens": 400, "stream": True,
                                                   "ignore_eos": True})
        while ("first_at" not in short_result or "first_at" not in long_result) and long.is_alive():
            time.sleep(0.02)
        assert long_result.get("status") == 200 and short_result.get("status") == 200, (short_result, long_result)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.HTTPError):  # no longer admitting: the listening socket is closed
            httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=2)
        assert proc.wait(30) == 0
        assert time.monotonic() - start < 12
        short.join(10)
        long.join(10)
        events = parse_sse(short_result["text"] + "\n\n")
        assert short_result["status"] == 200 and events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"  # the in-flight request finished
        assert "[DONE]" not in long_result.get("text", "")  # past the timeout: aborted, not finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
