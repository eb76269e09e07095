"""Soak: the real ``sparse-serve`` process (embedded SmolLM2, float32 CPU) under a minute of mixed traffic, then one
SIGTERM. It talks HTTP only, so it covers whatever the engine does about admission.

16 clients loop over completions and chats with every sparse pattern, streaming or not; about one request in
ten hangs up early, and a few are huge or malformed. Meanwhile a separate process times ``/health`` and the
server's memory is sampled. The run must show no 5xx, ``/health`` p99 under 100 ms, flat memory after the
warm-up, every KV page back once the load stops (the page gauges), and at the SIGTERM: streams past the
deadline cut with an error event and ``[DONE]``, a log that says so, exit 0. The numbers are printed (-s).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_harness import Observer, free_port, metric_samples, parse_sse, wait_healthy, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DURATION = float(os.environ.get("SPARSE_SOAK_SECONDS", "60"))
CONCURRENCY = 16
PATTERNS = ["dense", "quest:4", "snapkv:2", "ada_snapkv:4", "vertical_slash:2", "block_sparse:2", "flexprefill",
            "vertical_slash:4+quest:4", "block_sparse:2+snapkv:2"]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def hostile_bodies() -> list[tuple[bytes, set[int]]]:
    """(body, acceptable statuses): what an attacker or a broken client sends."""
    return [
        (json.dumps({"prompt": ["a"] * 1_000_000, "max_tokens": 1}).encode(), {413}),
        (json.dumps({"prompt": "a" * 10_000_000, "max_tokens": 1}).encode(), {400}),
        (b'{"prompt": "a\\ud800b", "max_tokens": 2}', {400}),
        (b'{"prompt": "abc", "max_tokens": ', {400}),
        (b'{"prompt": "x", "stop": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", {400, 413}),
        (json.dumps({"prompt": "hi", "sparse_pattern": {"decode": {"method": "quest", "params": {"x": [0] * 99}}}})
         .encode(), {400}),
    ]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Load:
    def __init__(self, url: str, end: float):
        self.url, self.end = url, end
        self.statuses: dict[int | str, int] = {}
        self.bad: list[str] = []  # unexpected outcomes
        self.hostile = hostile_bodies()

    def count(self, key: int | str) -> None:
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def body(self, rng: random.Random) -> tuple[str, dict]:
        pattern = rng.choice(PATTERNS)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        common = {"sparse_pattern": pattern, "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 99)}
        if rng.random() < 0.3:  # chat; some without max_tokens (the openai SDK's default: the rest of the context)
            body = {"messages": [{"role": "user", "content": text}], **common}
            if rng.random() < 0.8:
                body["max_tokens"] = rng.randint(2, 12)
            else:  # a long prompt, so that the rest of the 512-token context is short
                body["messages"][0]["content"] = " ".join(rng.choice(WORDS) for _ in range(420))
            return "/v1/chat/completions", body
        return "/v1/completions", {"prompt": text, "max_tokens": rng.randint(2, 12), "n": rng.choice([1, 1, 1, 2]),
                                   **common}

    async def hostile_one(self, c: httpx.AsyncClient, k: int) -> None:
        body, ok = self.hostile[k % len(self.hostile)]
        r = await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        self.count(f"hostile {r.status_code}")
        if r.status_code not in ok:
            self.bad.append(f"hostile {body[:60]!r}: {r.status_code} {r.text[:200]}")

    async def one(self, c: httpx.AsyncClient, rng: random.Random, hang_up: bool = False) -> None:
        if not hang_up and rng.random() < 0.03:  # the small ones: the huge ones come at the start (see client)
            await self.hostile_one(c, rng.randrange(2, len(self.hostile)))
            return
        path, body = self.body(rng)
        stream, hang_up = rng.random() < 0.5, hang_up or rng.random() < 0.1
        if stream:
            body["stream"] = True
            async with c.stream("POST", path, json=body) as r:
                lines = []
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                    if hang_up and len(lines) >= 2:
                        self.count("hung up")
                        return
                self.count(r.status_code)
                if r.status_code == 200:
                    events = parse_sse("\n\n".join(lines) + "\n\n")
                    if events[-1] != "[DONE]" or any("error" in e for e in events[:-1] if isinstance(e, dict)):
                        self.bad.append(f"stream {body}: {lines[-2:]}")
                    return
                await r.aread()
        else:
            try:
                r = await asyncio.wait_for(c.post(path, json=body), 0.3 if hang_up else 600)
            except TimeoutError:
                self.count("hung up")
                return
            self.count(r.status_code)
        if r.status_code >= 500 or r.status_code not in (200, 429):
            self.bad.append(f"{path} {body}: {r.status_code} {r.text[:200]}")

    async def client(self, i: int) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=self.url, timeout=600) as c:
            # Every kind a few times, while the others' requests run; during the warm-up, so that memory
            # measured after it shows growth with the request count, not the allocator keeping what 10 MB
            # bodies took.
            await self.hostile_one(c, i)
            # a quarter of the clients hang up on their first request, so a slow machine that completes only a
            # few requests still sees disconnects (the rest hang up at random, one request in ten)
            first = i % 4 == 0
            while time.monotonic() < self.end:
                try:
                    await self.one(c, rng, hang_up=first)
                    first = False
                except httpx.HTTPError as e:
                    self.bad.append(f"transport error {e!r}")

    async def run(self) -> None:
        """Until the deadline; requests still running 30 s past it are hung up on (as clients would)."""
        clients = [asyncio.ensure_future(self.client(i)) for i in range(CONCURRENCY)]
        _, late = await asyncio.wait(clients, timeout=self.end - time.monotonic() + 30)
        for task in late:
            task.cancel()
            self.count("hung up at the end")
        await asyncio.gather(*late, return_exceptions=True)


def gauges(url: str) -> dict[str, float]:
    m = metric_samples(httpx.get(url + "/metrics", timeout=30).text)
    return {n.removeprefix("sparse_serve_"): v for (n, _), v in m.items()
            if n in ("sparse_serve_num_requests_running", "sparse_serve_num_requests_waiting",
                     "sparse_serve_kv_cache_used_pages", "sparse_serve_kv_cache_free_pages",
                     "sparse_serve_kv_cache_total_pages")}


def test_soak_mixed_load_disconnects_hostile_requests_then_sigterm():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).parent / "sparse-serve"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([*cmd, "--port", str(port), "--device", "cpu", "--dtype", "float32",
                                 "--max-model-len", "512", "--kv-cache-memory", "64MiB", "--max-num-seqs", "8",
                                 "--max-queue", "64", "--shutdown-timeout", "2", "--no-access-log"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            wait_healthy(url, proc, 240)
            memory: list[tuple[float, int]] = []
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.wait(1.0):
                    memory.append((time.monotonic(), rss_bytes(proc.pid)))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            start = time.monotonic()
            load = Load(url, start + DURATION)
            with Observer(url) as obs:
                t0 = time.time()
                asyncio.run(load.run())
                t1 = time.time()
            sampling.set()
            sampler.join()
            health = obs.between("health", t0, t1)
            assert wait_until(lambda: gauges(url)["kv_cache_used_pages"] == 0, 30), gauges(url)
            idle = gauges(url)

            # One SIGTERM with streams in flight that outlast the 2 s shutdown timeout.
            cut: list[list[str]] = [[] for _ in range(3)]

            def long_stream(k: int) -> None:
                body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
                with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
                    cut[k].extend(line for line in r.iter_lines() if line)

            streams = [threading.Thread(target=long_stream, args=(k,), daemon=True) for k in range(3)]
            for t in streams:
                t.start()
            assert wait_until(lambda: all(cut), 60)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            for t in streams:
                t.join(30)
            log.seek(0)
            stderr = log.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    warm = [m for t, m in memory if t - start > DURATION / 3]
    mib = 1 << 20
    # Flat: the later half of the samples after warm-up sits where the earlier half did. (Single samples jump
    # by tens of MiB when a 10 MB body comes and goes: the allocator keeps freed memory for a while.)
    early, late = statistics.median(warm[: len(warm) // 2]), statistics.median(warm[len(warm) // 2:])
    total = sum(v for v in load.statuses.values())
    print(f"\nsoak {DURATION:.0f} s at concurrency {CONCURRENCY}: {total} requests {load.statuses}; "
          f"/health p50 {statistics.median(health) * 1000:.1f} ms, "
          f"p99 {statistics.quantiles(health, n=100, method='inclusive')[98] * 1000:.1f} ms, "
          f"max {max(health) * 1000:.1f} ms over {len(health)} probes; RSS after warm-up: median {early / mib:.0f} "
          f"then {late / mib:.0f} MiB (first {warm[0] / mib:.0f}, last {warm[-1] / mib:.0f}, "
          f"min {min(warm) / mib:.0f}, max {max(warm) / mib:.0f}); "
          f"idle gauges {idle}")
    assert not load.bad, load.bad[:10]
    assert not obs.result["health_failures"], obs.result["health_failures"][:5]
    assert statistics.quantiles(health, n=100, method="inclusive")[98] < 0.1
    assert load.statuses.get(200, 0) >= 5 and load.statuses.get("hung up", 0) >= 1, load.statuses
    assert sum(v for k, v in load.statuses.items() if str(k).startswith("hostile")) >= CONCURRENCY
    assert idle["kv_cache_used_pages"] == 0 and idle["kv_cache_free_pages"] == idle["kv_cache_total_pages"] > 0
    assert idle["num_requests_running"] == idle["num_requests_waiting"] == 0
    # 64 MiB: a few dozen requests on this CPU; the allocator alone has been seen to add ~40 MiB when a new
    # batch shape first comes late in the run, while a leak of a request's KV or prompt would add far more.
    assert late - early < 64 * mib, [m // mib for m in warm]
    for lines in cut:
        events = parse_sse("\n\n".join(lines) + "\n\n")
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutdown", lines[-2:]
    assert "cutting off 3 in-flight request" in stderr and "Traceback" not in stderr, stderr[-3000:]
