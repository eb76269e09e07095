"""`sparse-loadtest`: a streaming load generator for sparse-serve (or any OpenAI-compatible server).

    sparse-loadtest --url http://127.0.0.1:8000 --duration 60 --rate 4 --burstiness 1 \\
        --prompt-tokens uniform:500:1500 --max-tokens 128 \\
        --patterns dense=0.5,vertical_slash:10+quest:20=0.5 --slo-ttft-ms 2000 --slo-tpot-ms 100 --out load.json

Arrivals: `--rate R` is an open loop with gamma-distributed gaps of mean 1/R and shape `--burstiness B`
(B = 1: Poisson; B < 1 burstier; B > 1 more regular; `--burstiness inf` or `--constant`: exactly 1/R).
`--concurrency C` alone is a closed loop (C users, each sends its next request when the last one finishes);
with `--rate` too, C caps the requests in flight. The run ends after `--duration S` seconds of sending or
`--requests N` requests, whichever comes first, then waits (up to `--drain-timeout`) for those in flight.

Sizes: `--prompt-tokens` and `--max-tokens` take a number or a distribution: `uniform:LO:HI`,
`normal:MEAN:STD`, `exponential:MEAN` (values are rounded and at least 1). Prompts are synthetic word text
sized with the server's /tokenize (two calls at start; a 4-characters-per-token estimate if that fails).
Requests ask for `ignore_eos` so that the output length is the one drawn (servers that do not know the field
ignore it; `--no-ignore-eos` to let the model stop).

Patterns: `--patterns` is a weighted mix `PATTERN=WEIGHT,...` (weight 1 when omitted). Requests are given
patterns by smooth weighted round robin, so the counts sent follow the weights exactly (within one request).

Per pattern and overall: TTFT, TPOT (time per output token after the first), ITL (gaps between streamed
chunks) and end-to-end latency (mean, p50, p90, p99, in ms), request and token throughput, goodput (requests
per second meeting every SLO given) and errors by status. Printed as tables and written as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from .cli_help import HelpFormatter
from .client import APIError, APITimeoutError, AsyncSparseClient, SparseClient, StreamError

PERCENTILES = (50, 90, 99)

_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "river garden window village market bridge letter music paper table forest island winter summer light "
    "stone glass road train ship horse bird tree flower cloud rain snow fire field mountain ocean valley "
    "quiet bright small large early late strong gentle careful simple rapid ancient modern golden silver "
    "walks carries builds finds opens closes writes reads watches follows remembers explains describes"
).split()


# ================================================================================================ specs
@dataclass(frozen=True)
class Distribution:
    kind: str  # constant, uniform, normal, exponential
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str | int | float) -> Distribution:
        if isinstance(text, (int, float)):
            return cls("constant", float(text))
        t = text.strip().lower()
        parts = t.split(":")
        try:
            if len(parts) == 1:
                d = cls("constant", float(parts[0]))
            elif parts[0] in ("uniform", "u") and len(parts) == 3:
                d = cls("uniform", float(parts[1]), float(parts[2]))
                if d.b < d.a:
                    raise ValueError
            elif parts[0] in ("normal", "n", "gaussian") and len(parts) == 3:
                d = cls("normal", float(parts[1]), float(parts[2]))
            elif parts[0] in ("exponential", "exp") and len(parts) == 2:
                d = cls("exponential", float(parts[1]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"bad size spec {text!r}: use N, uniform:LO:HI, normal:MEAN:STD or "
                             "exponential:MEAN") from None
        bad = {"constant": d.a <= 0, "exponential": d.a <= 0, "uniform": d.a < 0 or d.b <= 0,
               "normal": d.a <= 0 or d.b < 0}[d.kind]
        if bad:
            raise ValueError(f"bad size spec {text!r}: sizes must be positive")
        return d

    def sample(self, rng: random.Random) -> int:
        if self.kind == "constant":
            v = self.a
        elif self.kind == "uniform":
            v = rng.uniform(self.a, self.b)
        elif self.kind == "normal":
            v = rng.gauss(self.a, self.b)
        else:
            v = rng.expovariate(1.0 / self.a)
        return max(1, int(round(v)))

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    def __str__(self) -> str:
        if self.kind == "constant":
            return f"{self.a:g}"
        return f"{self.kind}:{self.a:g}" + (f":{self.b:g}" if self.kind in ("uniform", "normal") else "")


def parse_mix(text: str) -> list[tuple[str, float]]:
    """`dense=0.5,vertical_slash:10+quest:20=0.5` -> [(pattern, weight), ...] (weights need not sum to 1)."""
    out: list[tuple[str, float]] = []
    for item in text.split(","):
        item = "".join(item.split())
        if not item:
            continue
        pattern, sep, w = item.rpartition("=")
        if not sep:
            pattern, w = item, "1"
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"bad weight {w!r} in pattern mix item {item!r}") from None
        if not pattern or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"bad pattern mix item {item!r} (want PATTERN=WEIGHT)")
        if weight > 0:
            out.append((pattern, weight))
    if not out:
        raise ValueError(f"empty pattern mix {text!r}")
    merged: dict[str, float] = {}
    for p, w in out:
        merged[p] = merged.get(p, 0.0) + w
    return list(merged.items())


class PatternPicker:
    """Smooth weighted round robin: after n picks each pattern has been chosen round(n * share) times
    (within one), in an interleaved order."""

    def __init__(self, mix: Sequence[tuple[str, float]]):
        self.mix = list(mix)
        self.total = sum(w for _, w in self.mix)
        self.current = [0.0] * len(self.mix)

    def next(self) -> str:
        for i, (_, w) in enumerate(self.mix):
            self.current[i] += w
        best = max(range(len(self.mix)), key=lambda i: self.current[i])
        self.current[best] -= self.total
        return self.mix[best][0]


def arrival_gaps(rate: float, burstiness: float, rng: random.Random) -> Any:
    """Infinite generator of inter-arrival gaps (seconds): gamma(shape=B, scale=1/(R*B)), constant if B=inf."""
    while True:
        if math.isinf(burstiness):
            yield 1.0 / rate
        else:
            yield rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


# ============================================================================================== prompts
@dataclass
class PromptSizer:
    """Characters per token and the chat-template overhead, measured with /tokenize."""

    chars_per_token: float = 4.0
    overhead_tokens: int = 0
    measured: bool = False

    @classmethod
    def measure(cls, client: SparseClient, chat: bool, rng: random.Random) -> PromptSizer:
        a = " ".join(rng.choices(_WORDS, k=40))
        b = " ".join(rng.choices(_WORDS, k=800))

        def count(text: str) -> int:
            if chat:
                return client.tokenize(messages=[{"role": "user", "content": text}]).count
            return client.tokenize(text).count

        try:
            ca, cb = count(a), count(a + " " + b)
        except (APIError, httpx.HTTPError):
            return cls()
        per_char = (cb - ca) / (len(b) + 1)
        if per_char <= 0:
            return cls()
        overhead = max(0, int(round(ca - len(a) * per_char)))
        return cls(1.0 / per_char, overhead, True)

    def text(self, tokens: int, rng: random.Random, tag: str) -> str:
        chars = max(1.0, (tokens - self.overhead_tokens)) * self.chars_per_token
        words = [tag]
        n = len(tag)
        while n < chars:
            w = rng.choice(_WORDS)
            words.append(w)
            n += len(w) + 1
        return " ".join(words)


# ============================================================================================== results
@dataclass
class RequestResult:
    index: int
    pattern: str
    start: float  # seconds since the run began
    ok: bool = False
    status: str | None = None  # error kind: HTTP status, "connection", "timeout", "stream_error", "cancelled"
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    target_prompt_tokens: int = 0
    max_tokens: int = 0
    achieved_prefill_ratio: float | None = None
    achieved_decode_ratio: float | None = None

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def _stats_ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "n": 0}
    import numpy as np

    arr = np.asarray(values, dtype=float) * 1000.0
    out: dict[str, float | None] = {"mean": float(arr.mean())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    out["n"] = len(values)
    return out


def summarize(results: Sequence[RequestResult], duration: float, slo_ttft_ms: float | None,
              slo_tpot_ms: float | None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors = Counter(r.status for r in results if not r.ok)

    def meets(r: RequestResult) -> bool:
        if slo_ttft_ms is not None and (r.ttft is None or r.ttft * 1000 > slo_ttft_ms):
            return False
        if slo_tpot_ms is not None and r.tpot is not None and r.tpot * 1000 > slo_tpot_ms:
            return False
        return True

    good = [r for r in ok if meets(r)]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    d = max(duration, 1e-9)

    def mean_of(xs: Sequence[float | None]) -> float | None:
        vals = [x for x in xs if x is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": {str(k): v for k, v in sorted(errors.items(), key=lambda kv: str(kv[0]))},
        "request_throughput": len(ok) / d, "output_token_throughput": out_tokens / d,
        "total_token_throughput": (out_tokens + in_tokens) / d,
        "good_requests": len(good), "goodput": len(good) / d, "slo_attainment": len(good) / len(ok) if ok else None,
        "mean_prompt_tokens": mean_of([r.prompt_tokens for r in ok]),
        "mean_output_tokens": mean_of([r.output_tokens for r in ok]),
        "mean_achieved_prefill_ratio": mean_of([r.achieved_prefill_ratio for r in ok]),
        "mean_achieved_decode_ratio": mean_of([r.achieved_decode_ratio for r in ok]),
        "ttft_ms": _stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats_ms([x for r in ok for x in r.itl]),
        "e2e_ms": _stats_ms([r.e2e for r in ok if r.e2e is not None]),
    }


# ================================================================================================= runner
@dataclass
class LoadConfig:
    url: str
    duration: float | None = None
    requests: int | None = None
    rate: float | None = None
    burstiness: float = 1.0
    concurrency: int | None = None
    prompt_tokens: Distribution = field(default_factory=lambda: Distribution("constant", 256))
    max_tokens: Distribution = field(default_factory=lambda: Distribution("constant", 64))
    patterns: list[tuple[str, float]] = field(default_factory=lambda: [("dense", 1.0)])
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    api_key: str | None = None
    seed: int = 0
    endpoint: str = "chat"
    model: str | None = None
    ignore_eos: bool = True
    timeout: float = 600.0
    drain_timeout: float = 300.0


async def _one(client: AsyncSparseClient, cfg: LoadConfig, res: RequestResult, prompt: str, t0: float) -> None:
    kw: dict[str, Any] = {"max_tokens": res.max_tokens, "temperature": 0, "sparse_pattern": res.pattern}
    if cfg.ignore_eos:
        kw["ignore_eos"] = True
    start = time.perf_counter()
    res.start = start - t0
    last = None
    chunks = 0
    try:
        if cfg.endpoint == "chat":
            stream = client.chat_stream([{"role": "user", "content": prompt}], **kw)
        else:
            stream = client.completions_stream(prompt, **kw)
        async for ch in stream:
            now = time.perf_counter()
            if ch.text:
                if res.ttft is None:
                    res.ttft = now - start
                elif last is not None:
                    res.itl.append(now - last)
                last = now
                chunks += 1
            if ch.usage is not None:
                res.prompt_tokens = ch.usage.prompt_tokens
                res.output_tokens = ch.usage.completion_tokens
            if ch.sparse is not None:
                res.achieved_prefill_ratio = ch.sparse.prefill.achieved_compression_ratio
                res.achieved_decode_ratio = ch.sparse.decode.achieved_compression_ratio
        res.e2e = time.perf_counter() - start
        if not res.output_tokens:
            res.output_tokens = chunks
        res.ok = True
    except APITimeoutError as e:
        res.status, res.error = "timeout", str(e)
    except StreamError as e:
        res.status, res.error = "stream_error", str(e)
    except APIError as e:
        res.status, res.error = (str(e.status) if e.status is not None else "connection"), str(e)
    except asyncio.CancelledError:
        res.status, res.error = "cancelled", "cancelled at the end of the drain timeout"
        raise


async def run_load(cfg: LoadConfig, *, log: Any = None) -> dict[str, Any]:
    """Run the load test; returns the JSON-ready report."""
    say = log or (lambda m: print(m, file=sys.stderr))
    if cfg.rate is None and not cfg.concurrency:
        raise ValueError("give --rate or --concurrency")
    if cfg.duration is None and cfg.requests is None:
        raise ValueError("give --duration or --requests")
    rng = random.Random(cfg.seed)
    text_rng = random.Random(cfg.seed + 1)
    with SparseClient(cfg.url, api_key=cfg.api_key, model=cfg.model, timeout=60, max_retries=2) as sync:
        sizer = PromptSizer.measure(sync, cfg.endpoint == "chat", random.Random(cfg.seed + 2))
        model = cfg.model
        if model is None:
            try:
                models = sync.models()
                model = str(models[0]["id"]) if models else None
            except (APIError, httpx.HTTPError, KeyError):
                model = None
    say(f"sparse-loadtest: {cfg.url} model={model} prompt sizing: "
        + (f"{sizer.chars_per_token:.2f} chars/token, template overhead {sizer.overhead_tokens} tokens (measured)"
           if sizer.measured else "4 chars/token (estimate; /tokenize unavailable)"))
    picker = PatternPicker(cfg.patterns)
    limit = max(100, 2 * (cfg.concurrency or 0))
    client = AsyncSparseClient(cfg.url, api_key=cfg.api_key, model=model, timeout=cfg.timeout, max_retries=0,
                               limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))
    results: list[RequestResult] = []
    tasks: set[asyncio.Task] = set()
    sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    t0 = time.perf_counter()
    deadline = t0 + cfg.duration if cfg.duration is not None else math.inf
    max_requests = cfg.requests if cfg.requests is not None else math.inf

    def new_request() -> tuple[RequestResult, str]:
        i = len(results)
        res = RequestResult(i, picker.next(), 0.0, target_prompt_tokens=cfg.prompt_tokens.sample(rng),
                            max_tokens=cfg.max_tokens.sample(rng))
        results.append(res)
        return res, sizer.text(res.target_prompt_tokens, text_rng, f"[request {i}]")

    try:
        if cfg.rate is not None:  # open loop, optionally capped by --concurrency
            gaps = arrival_gaps(cfg.rate, cfg.burstiness, rng)
            next_at = t0

            async def guarded(res: RequestResult, prompt: str) -> None:
                if sem is None:
                    await _one(client, cfg, res, prompt, t0)
                    return
                async with sem:
                    await _one(client, cfg, res, prompt, t0)

            while len(results) < max_requests:
                now = time.perf_counter()
                if next_at >= deadline:
                    break
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                res, prompt = new_request()
                task = asyncio.create_task(guarded(res, prompt))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += next(gaps)
        else:  # closed loop
            async def user() -> None:
                while len(results) < max_requests and time.perf_counter() < deadline:
                    res, prompt = new_request()
                    await _one(client, cfg, res, prompt, t0)

            for _ in range(cfg.concurrency or 1):
                task = asyncio.create_task(user())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:
            done, pending = await asyncio.wait(set(tasks), timeout=cfg.drain_timeout
                                               + (max(0.0, deadline - time.perf_counter())
                                                  if cfg.rate is None else 0.0))
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                say(f"cancelled {len(pending)} request(s) still running after the drain timeout")
    finally:
        await client.aclose()
    t_end = time.perf_counter()
    for r in results:
        if not r.ok and r.status is None:
            r.status, r.error = "cancelled", "never finished"
    ends = [r.start + (r.e2e or 0.0) for r in results if r.ok]
    duration = (max(ends) if ends else t_end - t0)
    by_pattern: dict[str, list[RequestResult]] = defaultdict(list)
    for r in results:
        by_pattern[r.pattern].append(r)
    total_w = sum(w for _, w in cfg.patterns)
    report = {
        "config": {
            "url": cfg.url, "model": model, "duration_s": cfg.duration, "requests": cfg.requests, "rate": cfg.rate,
            "burstiness": None if cfg.rate is None else (cfg.burstiness if math.isfinite(cfg.burstiness)
                                                         else "inf"),
            "concurrency": cfg.concurrency, "mode": "open" if cfg.rate is not None else "closed",
            "prompt_tokens": str(cfg.prompt_tokens), "max_tokens": str(cfg.max_tokens),
            "patterns": {p: w / total_w for p, w in cfg.patterns}, "slo_ttft_ms": cfg.slo_ttft_ms,
            "slo_tpot_ms": cfg.slo_tpot_ms, "seed": cfg.seed, "endpoint": cfg.endpoint,
            "ignore_eos": cfg.ignore_eos,
            "prompt_sizing": {"chars_per_token": sizer.chars_per_token, "overhead_tokens": sizer.overhead_tokens,
                              "measured": sizer.measured},
        },
        "duration_s": duration,
        "wall_s": t_end - t0,
        "overall": summarize(results, duration, cfg.slo_ttft_ms, cfg.slo_tpot_ms),
        "patterns": {p: summarize(by_pattern.get(p, []), duration, cfg.slo_ttft_ms, cfg.slo_tpot_ms)
                     for p, _ in cfg.patterns},
    }
    report["_results"] = results
    return report


# ================================================================================================ output
def format_report(report: dict[str, Any]) -> str:
    rows = [("all", report["overall"])] + list(report["patterns"].items())
    name_w = max(8, *(len(n) for n, _ in rows))
    lines = []
    c = report["config"]
    mode = (f"open loop {c['rate']} req/s, burstiness {c['burstiness']}" if c["mode"] == "open"
            else f"closed loop, concurrency {c['concurrency']}")
    lines.append(f"{mode}; prompt tokens {c['prompt_tokens']}, max tokens {c['max_tokens']}; "
                 f"duration {report['duration_s']:.1f} s")
    hdr = ["pattern".ljust(name_w), "requests", "ok", "failed", "req/s", "out tok/s", "tot tok/s", "goodput",
           "SLO %", "ach_prefill", "ach_decode", "errors"]
    lines.append("  ".join(hdr))

    def n(x: Any, fmt: str = "{:.2f}") -> str:
        return "-" if x is None else fmt.format(x)

    for name, s in rows:
        errs = ",".join(f"{k}:{v}" for k, v in s["errors"].items()) or "-"
        cells = [name.ljust(name_w), str(s["requests"]).rjust(8), str(s["completed"]).rjust(2),
                 str(s["failed"]).rjust(6), n(s["request_throughput"]).rjust(5),
                 n(s["output_token_throughput"], "{:.1f}").rjust(9), n(s["total_token_throughput"], "{:.1f}").rjust(9),
                 n(s["goodput"]).rjust(7), n(None if s["slo_attainment"] is None else 100 * s["slo_attainment"],
                                             "{:.1f}").rjust(5),
                 n(s["mean_achieved_prefill_ratio"]).rjust(11), n(s["mean_achieved_decode_ratio"]).rjust(10), errs]
        lines.append("  ".join(cells))
    for metric, title in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                          ("e2e_ms", "E2E latency (ms)")):
        lines.append("")
        lines.append(f"{title.ljust(name_w)}  {'mean':>9}  {'p50':>9}  {'p90':>9}  {'p99':>9}  {'n':>6}")
        for name, s in rows:
            st = s[metric]
            lines.append(f"{name.ljust(name_w)}  " + "  ".join(n(st[k], "{:.1f}").rjust(9)
                                                             for k in ("mean", "p50", "p90", "p99"))
                         + f"  {st['n']:>6}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-loadtest", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--url", required=True, help="server base URL (the only host contacted)")
    stop = p.add_argument_group("length of the run (one or both)")
    stop.add_argument("--duration", type=float, default=None, help="seconds to keep sending")
    stop.add_argument("--requests", type=int, default=None, help="requests to send")
    load = p.add_argument_group("load shape")
    load.add_argument("--rate", type=float, default=None, help="open loop: mean requests per second")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the gaps (1 = Poisson, inf = constant)")
    load.add_argument("--constant", action="store_true", help="constant gaps of 1/rate (= --burstiness inf)")
    load.add_argument("--concurrency", type=int, default=None,
                      help="closed loop with this many users; with --rate, a cap on requests in flight")
    p.add_argument("--prompt-tokens", default="256", help="N | uniform:LO:HI | normal:MEAN:STD | exponential:MEAN")
    p.add_argument("--max-tokens", default="64", help="output tokens per request (same forms)")
    p.add_argument("--patterns", default="dense", help="weighted mix, e.g. dense=0.5,vertical_slash:10+quest:20=0.5")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT objective for goodput")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT objective for goodput")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--save-requests", action="store_true", help="include every request in the JSON report")
    p.add_argument("--api-key", default=None, help="bearer token (default: $SPARSE_SERVE_API_KEY)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--no-ignore-eos", action="store_true", help="let generation stop at end-of-sequence")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds to wait for requests in flight after sending stops")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = LoadConfig(
            url=a.url, duration=a.duration, requests=a.requests, rate=a.rate,
            burstiness=math.inf if a.constant else a.burstiness, concurrency=a.concurrency,
            prompt_tokens=Distribution.parse(a.prompt_tokens), max_tokens=Distribution.parse(a.max_tokens),
            patterns=parse_mix(a.patterns), slo_ttft_ms=a.slo_ttft_ms, slo_tpot_ms=a.slo_tpot_ms,
            api_key=a.api_key or os.environ.get("SPARSE_SERVE_API_KEY"), seed=a.seed, endpoint=a.endpoint,
            model=a.model, ignore_eos=not a.no_ignore_eos,
            timeout=a.timeout, drain_timeout=a.drain_timeout)
        if cfg.rate is not None and (cfg.rate <= 0 or not math.isfinite(cfg.rate)):
            raise ValueError("--rate must be a positive number")
        if cfg.burstiness <= 0:
            raise ValueError("--burstiness must be > 0")
        if cfg.concurrency is not None and cfg.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if cfg.rate is None and cfg.concurrency is None:
            raise ValueError("give --rate R (open loop) or --concurrency C (closed loop)")
        if cfg.duration is None and cfg.requests is None:
            raise ValueError("give --duration S or --requests N")
    except ValueError as e:
        print(f"sparse-loadtest: {e}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_load(cfg))
    except KeyboardInterrupt:
        print("sparse-loadtest: interrupted", file=sys.stderr)
        return 130
    results = report.pop("_results")
    print(format_report(report))
    if a.out:
        if a.save_requests:
            report["requests"] = [dict(asdict(r), tpot=r.tpot) for r in results]
        with open(a.out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        print(f"\nwrote {a.out}", file=sys.stderr)
    return 0 if report["overall"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
