"""Test helpers for the HTTP server: a scriptable fake engine and a real uvicorn server on a free port.

The fake engine implements the ``Engine`` protocol with a byte-level tokenizer: fast and deterministic, so
the HTTP layer's behaviour (errors, SSE, disconnects, queue limits, fuzzing) is tested without a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from server.contract.cost import PhaseCost, RequestCost
from server.contract.engine import (
    EngineOverloaded,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    RequestRejected,
    RequestTimings,
    TokenLogprob,
)
from server.engine.detokenizer import IncrementalDetokenizer

OFFSET = 3  # ids 0..2 are special: 0 pad, 1 bos, 2 eos


class ByteTokenizer:
    eos_token_id = 2
    vocab_size = 256 + OFFSET

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if "BOOM_TOKENIZER" in text:
            raise RuntimeError("injected tokenizer fault")
        return list(map(OFFSET.__add__, text.encode("utf-8")))

    def get_vocab(self) -> dict[str, int]:
        return {chr(b): b + OFFSET for b in range(256)}  # one byte a token: never more than one character

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i - OFFSET for i in ids if OFFSET <= i < 256 + OFFSET)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    """Generates the prompt's bytes cyclically (greedy) or seeded random letters (temperature > 0)."""

    def __init__(self, *, max_model_len: int = 512, max_num_seqs: int = 8, max_queue: int = 64,
                 token_delay: float = 0.002, model_name: str = "fake-model"):
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = ByteTokenizer()
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.token_delay = token_delay
        self.running: set[str] = set()
        self.waiting: list[str] = []
        self.aborted: set[str] = set()
        self.seen: list[GenerationRequest] = []
        self._started = False
        self._admit: asyncio.Condition | None = None

    async def start(self) -> None:
        self._started = True
        self._admit = asyncio.Condition()

    async def shutdown(self, timeout: float = 30.0) -> None:
        self._started = False

    def ready(self) -> bool:
        return self._started

    def stats(self) -> EngineStats:
        used = len(self.running)
        return EngineStats(used, len(self.waiting), used / self.max_num_seqs, self.max_num_seqs - used,
                           self.max_num_seqs)

    async def abort(self, request_id: str) -> None:
        if request_id in self.running or request_id in self.waiting:
            self.aborted.add(request_id)

    def _cost(self, req: GenerationRequest, n_out: int) -> RequestCost:
        p, d = req.spec.prefill, req.spec.decode
        n = len(req.prompt_token_ids)
        dense_p = float(n * (n + 1) // 2 * 100)
        dense_d = float(max(0, n_out - 1) * n * 64)
        return RequestCost(
            prefill=PhaseCost(p.method, p.compression_ratio, dense_units=dense_p,
                              actual_units=dense_p / p.compression_ratio, attention_flops=dense_p / p.compression_ratio,
                              dense_attention_flops=dense_p, indexing_flops=10.0 if p.method != "dense" else 0.0,
                              model_flops=1000.0 * n, dense_model_flops=1100.0 * n),
            decode=PhaseCost(d.method, d.compression_ratio, dense_units=dense_d,
                             actual_units=dense_d / d.compression_ratio,
                             kv_bytes_read=dense_d / d.compression_ratio, dense_kv_bytes_read=dense_d,
                             metadata_bytes_read=1.0 if d.method == "quest" else 0.0, kv_cache_tokens=n + n_out,
                             model_flops=1000.0 * n_out, dense_model_flops=1100.0 * n_out),
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        rid, sp, prompt = request.request_id, request.sampling, request.prompt_token_ids
        if not prompt:
            raise RequestRejected("empty prompt", param="prompt")
        if len(prompt) + sp.max_tokens > self.max_model_len:
            raise RequestRejected("too long", param="max_tokens", code="context_length_exceeded")
        text = self.tokenizer.decode(prompt)
        if "FAIL_ADMIT" in text:
            raise RuntimeError("injected engine failure")
        if len(self.waiting) >= self.max_queue:
            raise EngineOverloaded(f"queue full ({self.max_queue})", retry_after=1.5)
        self.seen.append(request)
        timings = RequestTimings(arrival=time.monotonic())
        assert self._admit is not None
        self.waiting.append(rid)
        try:
            async with self._admit:
                await self._admit.wait_for(lambda: len(self.running) < self.max_num_seqs or rid in self.aborted)
                self.waiting.remove(rid)
                aborted = rid in self.aborted
                if not aborted:
                    self.running.add(rid)
        except BaseException:
            if rid in self.waiting:
                self.waiting.remove(rid)
            raise
        if aborted:
            self.aborted.discard(rid)
            yield GenerationOutput(rid, [], "", True, "abort", prompt_tokens=len(prompt), cost=RequestCost(),
                                   timings=timings)
            return
        timings.scheduled = time.monotonic()
        rng = random.Random(sp.seed)
        detok = IncrementalDetokenizer(self.tokenizer, sp.stop)
        n_out = 0
        prompt_lps = None if sp.prompt_logprobs is None else fake_prompt_logprobs(prompt, sp.prompt_logprobs)
        try:
            if sp.max_tokens == 0:  # echo only: the scored prompt, no token
                yield GenerationOutput(rid, [], "", True, "length", None, len(prompt), 0, self._cost(request, 0),
                                       timings, prompt_logprobs=prompt_lps)
                return
            while True:
                await asyncio.sleep(self.token_delay)
                if rid in self.aborted:
                    yield GenerationOutput(rid, [], "", True, "abort", prompt_tokens=len(prompt),
                                           completion_tokens=n_out, cost=self._cost(request, n_out), timings=timings)
                    return
                if sp.temperature == 0:
                    tok = prompt[n_out % len(prompt)]
                else:
                    tok = ord(rng.choice("abcdefghijklmnopqrstuvwxyz ")) + OFFSET
                n_out += 1
                if timings.first_token is None:
                    timings.first_token = time.monotonic()
                lp = None
                if sp.logprobs is not None:
                    lp = [TokenLogprob(tok, -0.5, [(tok, -0.5), (OFFSET + 32, -1.5)][: sp.logprobs])]
                if "FAIL_MIDSTREAM" in text and n_out == 3:
                    timings.finished = time.monotonic()
                    yield GenerationOutput(rid, [], "", True, "error", prompt_tokens=len(prompt),
                                           completion_tokens=n_out, error="injected failure", timings=timings)
                    return
                delta, stopped = detok.add(tok)
                reason = None
                if tok == self.tokenizer.eos_token_id or tok in sp.stop_token_ids or stopped:
                    reason = "stop"
                elif n_out >= sp.max_tokens:
                    reason = "length"
                if reason is not None:
                    if not stopped:
                        delta += detok.flush()
                    timings.finished = time.monotonic()
                    yield GenerationOutput(rid, [tok], delta, True, reason, lp, len(prompt), n_out,
                                           self._cost(request, n_out), timings, prompt_logprobs=prompt_lps)
                    return
                yield GenerationOutput(rid, [tok], delta, False, None, lp, len(prompt), n_out,
                                       prompt_logprobs=prompt_lps)
                prompt_lps = None  # only on the first delta
        finally:
            self.running.discard(rid)
            self.aborted.discard(rid)
            async with self._admit:
                self._admit.notify_all()


def fake_prompt_logprobs(prompt: list[int], k: int) -> list[TokenLogprob | None]:
    """The fake engine's prompt logprobs: token i scores -i/10, with a space (-5.0) as the runner-up."""
    return [None] + [TokenLogprob(t, -i / 10, [(t, -i / 10), (OFFSET + 32, -5.0)][:k])
                     for i, t in enumerate(prompt[1:], start=1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """uvicorn serving ``app`` in a background thread (its own event loop) on a free port."""

    def __init__(self, app, port: int | None = None):
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> ThreadedServer:
        original_startup = self.server.startup

        async def startup(*args: Any, **kwargs: Any) -> None:
            self.loop = asyncio.get_running_loop()
            await original_startup(*args, **kwargs)

        self.server.startup = startup  # type: ignore[method-assign]
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def call(self, coro, timeout: float = 60):
        """Run ``coro`` on the server's event loop (e.g. to drive the engine directly)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def serve_app(app) -> Iterator[ThreadedServer]:
    with ThreadedServer(app) as srv:
        yield srv


def parse_sse(text: str) -> list[Any]:
    """Events of an SSE body: JSON objects, and the string "[DONE]"."""
    import json

    events: list[Any] = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append("[DONE]" if data == "[DONE]" else json.loads(data))
    return events


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from Prometheus text, via prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def client(url: str, **kw: Any) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=kw.pop("timeout", 60), **kw)


# A sparse-serve process (the real CLI's serve()) on the fake engine; build_engine sleeps load_s first, like a
# model that takes time to load.
_FAKE_SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from server_harness import FakeEngine
import server.cli as cli
from server.settings import ServerSettings
cli.build_engine = lambda settings: time.sleep({load_s}) or FakeEngine(**{engine!r})
cli.configure_logging({log_level!r})
sys.exit(cli.serve(ServerSettings(port={port}, **{settings!r})))
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


def start_fake_process(*, settings: dict[str, Any] | None = None, engine: dict[str, Any] | None = None,
                       load_s: float = 0.0, wait: bool = True, log_level: str = "info",
                       ) -> tuple[subprocess.Popen, str]:
    """``sparse-serve`` in a child process on a :class:`FakeEngine`; returns (process, base url)."""
    port = free_port()
    tests = str(Path(__file__).resolve().parent)
    code = _FAKE_SERVER.format(tests=tests, port=port, load_s=load_s, engine=engine or {}, settings=settings or {},
                               log_level=log_level)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(tests).parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    if wait:
        wait_healthy(url, proc, 60)
    return proc, url


# Watches a server from its own process (so the test's own work cannot delay it): times GET /health every
# 20 ms and, optionally, the gaps between the events of one long stream, until its stdin closes; then prints
# {"health": [[unix time, seconds]...], "health_failures": [...], "gaps": [[unix time, seconds]...],
# "stream_tail": [last 3 events]}.
_OBSERVER = r"""
import json, sys, threading, time
import httpx
url, stream_body = sys.argv[1], json.loads(sys.argv[2])
out = {"health": [], "health_failures": [], "gaps": [], "stream_tail": []}
stop = threading.Event()
def probe():
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                code = c.get("/health").status_code
                if code != 200:
                    out["health_failures"].append(code)
            except httpx.HTTPError as e:
                out["health_failures"].append(repr(e))
            out["health"].append((time.time(), time.perf_counter() - t))
            time.sleep(0.02)
def stream():
    with httpx.Client(base_url=url, timeout=120) as c, c.stream("POST", "/v1/completions", json=stream_body) as r:
        last = None
        for line in r.iter_lines():
            if not line:
                continue
            now = time.perf_counter()
            if last is not None:
                out["gaps"].append((time.time(), now - last))
            last = now
            out["stream_tail"] = (out["stream_tail"] + [line])[-3:]
threads = [threading.Thread(target=probe, daemon=True)]
if stream_body:
    threads.append(threading.Thread(target=stream, daemon=True))
for t in threads:
    t.start()
print("ready", flush=True)
sys.stdin.read()
stop.set()
for t in threads:
    t.join(120)
print(json.dumps(out), flush=True)
"""


class Observer:
    """``with Observer(url, stream_body) as obs: ...``, then ``obs.result`` (see ``_OBSERVER``) and
    :meth:`between`."""

    def __init__(self, url: str, stream_body: dict[str, Any] | None = None):
        import json

        self.proc = subprocess.Popen([sys.executable, "-c", _OBSERVER, url, json.dumps(stream_body or {})],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.result: dict[str, Any] = {}

    def __enter__(self) -> Observer:
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc: Any) -> None:
        import json

        out, _ = self.proc.communicate("", timeout=180)
        self.result = json.loads(out.strip().splitlines()[-1])

    def between(self, key: str, t0: float, t1: float) -> list[float]:
        """The /health latencies (``key="health"``) or stream gaps (``"gaps"``) seen between two ``time.time()``s."""
        return [x for t, x in self.result[key] if t0 <= t <= t1]
