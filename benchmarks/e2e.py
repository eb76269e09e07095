"""End-to-end benchmark: every engine on one model directory, each sparse method against vLLM dense.

The yardstick of every GPU bar (docs/performance.md). One Qwen2.5-7B-shaped model with random bfloat16 weights
is written once as a Hugging Face directory (with a word-level tokenizer of its vocabulary, so every engine
loads the same files and nothing is downloaded); then each engine runs in its own process:

* ``vllm``         bare vLLM, plugin off (``VLLM_PLUGINS=""``), vLLM's default settings: the baseline;
* ``sparse-vllm``  ``sparse-serve --engine vllm`` (:class:`server.vllm_engine.engine.VllmEngine`): dense and each
                   method at r=10;
* ``native``       the native engine (:class:`server.engine.engine.NativeEngine`): dense and each method at r=10.

What each engine measures (``--part`` picks a subset, so a run fits the device's 10-minute call limit):

* ``ttft``     time to first token of one request alone (``max_tokens=1``) at 8K, 32K and 128K, for dense and each
               prefill method, after one unmeasured request of the same length and pattern (Triton compiles its
               kernels per power-of-two length bucket on first use): the median of 3 requests at 8K and 32K, one
               at 128K;
* ``decode``   decode tokens/s of B concurrent requests with 32K contexts (B = 1, 8, 32) and of one at 128K, for
               dense and each decode method: the tokens delivered during a 3 s window that opens 2 s after every
               request of the batch has its first token (then the requests are aborted). Those 2 s hold a new
               shape's one-off costs (Triton compiling a kernel for a new length bucket, a CUDA graph captured):
               their rate is reported apart (``settle_tokens_per_s``);
* ``agree``    greedy tokens (32) of a 512-token prompt for dense and every method at ratio 1, and a batch of
               8 requests with different patterns against each pattern alone.
* ``capacity`` how many 32K requests one KV memory holds at once, and their aggregate decode tokens/s: 96
               requests submitted together (dense; and snapkv:10, ada_snapkv:10 on the native engine, whose
               eviction frees pages); once no request has started for 3 s, the requests that deliver tokens in a 3 s
               window are counted. Give every engine the same KV memory with ``--kv-memory-mib`` (the same bytes
               for vLLM's pool and the native pool) and say it.
* ``interference`` (dense) 8 requests decode at 32K; after a 3 s steady window one 128K prompt is submitted:
               the 8 streams' inter-token latency p50/p99 while it prefills (every gap between two deliveries of a
               stream that overlaps the time from its submission to its first token) against their steady p50/p99
               before it, and the long request's TTFT. The native engine prefills it in chunks
               (``--max-prefill-chunk``, default 4096; ``--prefill-chunk`` here sets it) between decode steps,
               or, with ``--decode-stall`` (the engine's ``--max-decode-stall``, off by default), each sized by time;
               the bar is p99 during <= 2x steady.

Prompts are random token ids (never reused, so no prefix cache hits). ``report`` merges the parts into
``benchmarks/results/e2e-<card>-<date>.{json,md,png}``: ratios against vLLM dense of the same run.

On the device: ``benchmarks/e2e_device.sh`` runs it in steps that fit the 10-minute calls of one lease (the vLLM
bundle of ``../shared/tools/vllm-gpu`` travels in three of them; the model directory stays in /tmp for the lease).
``--deadline`` stops starting measurements in time for a call to end inside its limit, and keeps what was measured.

then here: ``python benchmarks/e2e.py report PARTS.json... --out-dir benchmarks/results``. ``--tiny`` runs the
same protocol on a tiny model with short prompts on the CPU (a smoke test; the test suite runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

QWEN25_7B = dict(num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_size=3584,
                 intermediate_size=18944, vocab_size=152064, max_position_embeddings=131072 + 8192)
# head dim 32: the smallest vLLM's CPU attention takes
TINY = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=128,
            intermediate_size=224, vocab_size=512, max_position_embeddings=4096)


@dataclass(frozen=True)
class Protocol:
    """Lengths and batches of one run; ``--tiny`` scales them down for the CPU."""

    ttft_lengths: tuple[int, ...] = (8192, 32768, 131072)
    decode_context: int = 32768
    long_context: int = 131072
    batches: tuple[int, ...] = (1, 8, 32)
    ttft_samples: int = 3  # TTFT: the median of this many requests at lengths below long_context (one at it)
    decode_window_s: float = 3.0  # decode measured over this long once every request of the batch has a token
    # ... and has decoded this long more: a shape's first steps (Triton compiling a kernel for a new length bucket,
    # the native engine capturing a CUDA graph) are one-off costs, reported apart as the settle rate
    decode_settle_s: float = 2.0
    decode_max_tokens: int = 2048  # never reached inside the window: the requests are aborted after it
    agree_prompt: int = 512
    agree_tokens: int = 32
    warmup_prompt: int = 4096
    capacity_requests: int = 96
    plateau_s: float = 3.0  # capacity: no new request started for this long = the memory is full
    interference_batch: int = 8  # decoding requests (at decode_context) while one long_context prompt prefills
    prefill_chunk: int | None = None  # the native engine's --max-prefill-chunk; None: its default


TINY_PROTOCOL = Protocol(ttft_lengths=(256, 512, 1024), decode_context=512, long_context=1024, batches=(1, 2, 4),
                         decode_window_s=0.5, decode_settle_s=0.2, decode_max_tokens=256, agree_prompt=128,
                         agree_tokens=8, warmup_prompt=128, capacity_requests=12, plateau_s=1.0, prefill_chunk=256)

DENSE = "dense"
# Patterns are the string grammar, or a label of SPECS for one that needs parameters. block_sparse's default block
# is 16 (the paper's accuracy choice, computed as exact 16x16 tiles); the speed bar is for block 64.
SPECS = {"block_sparse:10/b64": {"prefill": {"method": "block_sparse", "compression_ratio": 10,
                                             "params": {"block_size": 64}}},
         # Quest on 32-token pages (half the page bounds to score): only with --patterns, on the native engine
         # run with --page-size 32 (it runs Quest on its own KV pages)
         "quest:10/p32": {"decode": {"method": "quest", "compression_ratio": 10, "params": {"page_size": 32}}}}
PREFILL_PATTERNS = ("vertical_slash:10", "flexprefill:10", "block_sparse:10/b64", "block_sparse:10")
DECODE_PATTERNS = ("snapkv:10", "ada_snapkv:10", "quest:10")  # quest last: on vLLM its side copy is the largest
AGREE_PATTERNS = ("dense", "vertical_slash:1", "flexprefill:1", "block_sparse:1", "quest:1", "snapkv:1",
                  "ada_snapkv:1")
CAPACITY_PATTERNS = (DENSE, "snapkv:10", "ada_snapkv:10")  # the evicting methods, on the native engine
MIXED_BATCH = ("dense", "vertical_slash:10", "flexprefill:10", "block_sparse:10/b64", "quest:10", "snapkv:10",
               "ada_snapkv:10", "block_sparse:4+quest:4")


# ------------------------------------------------------------------------------------------ the model
def write_model(directory: str, tiny: bool) -> None:
    """A random Qwen2 directory (safetensors + config) and a word-level tokenizer of its vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    shape = TINY if tiny else QWEN25_7B
    cuda = torch.cuda.is_available() and not tiny
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = Qwen2Config(**shape, rope_theta=1e6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    t0 = time.monotonic()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(directory)
    print(f"wrote {directory}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {dtype}, "
          f"{time.monotonic() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------ the engines
class Stream:
    """Token arrival times of one request (a delta's tokens arrive together)."""

    def __init__(self, request_id: str, submitted: float):
        self.request_id = request_id
        self.submitted = submitted
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.report: dict | None = None
        self.error: str | None = None

    def add(self, ids: list[int]) -> None:
        now = time.monotonic()
        self.tokens += ids
        self.times += [now] * len(ids)


class ServingEngine:
    """``sparse-vllm`` and ``native``: anything with the server's Engine protocol."""

    def __init__(self, engine):
        self.engine = engine

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.shutdown(timeout=5)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def run(self, prompt: list[int], max_tokens: int, pattern: str, s: Stream | None = None) -> Stream:
        from attention_backends import parse_pattern
        from server.contract.engine import GenerationRequest, SamplingParams

        s = s or Stream(uuid.uuid4().hex, time.monotonic())
        req = GenerationRequest(s.request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                      ignore_eos=True),
                                parse_pattern(SPECS.get(pattern, pattern)))
        async for out in self.engine.generate(req):
            s.add(list(out.token_ids))
            if out.finished:
                s.error = out.error
                if out.cost is not None:
                    p, d = out.cost.prefill, out.cost.decode
                    s.report = {"prefill_method": p.method, "prefill_ratio": p.achieved_compression_ratio,
                                "decode_method": d.method, "decode_ratio": d.achieved_compression_ratio,
                                "fallback": p.fallback}
        return s


class BareVllm:
    """vLLM's AsyncLLM with this project's plugin off and vLLM's default settings."""

    def __init__(self, model: str, max_model_len: int, cpu: bool, kv_memory: int | None = None):
        os.environ["VLLM_PLUGINS"] = ""  # before vLLM reads its environment
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = dict(model=model, max_model_len=max_model_len, seed=0, disable_log_stats=True)
        if cpu:  # the same CPU settings VllmEngine uses, so the tiny run compares like with like
            kwargs.update(dtype="float32", gpu_memory_utilization=0.05, kv_cache_memory_bytes=1 << 30,
                          enforce_eager=True, distributed_executor_backend="uni")
        if kv_memory is not None:
            kwargs.update(kv_cache_memory_bytes=kv_memory)
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.llm.shutdown()

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def run(self, prompt: list[int], max_tokens: int, pattern: str, s: Stream | None = None) -> Stream:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        assert pattern == DENSE, "bare vLLM serves dense only"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        s = s or Stream(uuid.uuid4().hex, time.monotonic())
        async for out in self.llm.generate({"prompt_token_ids": prompt}, params, s.request_id):
            s.add(list(out.outputs[0].token_ids))
        return s


def make_engine(name: str, model: str, max_model_len: int, tiny: bool, kv_memory: int | None = None,
                prefill_chunk: int | None = None, sparse_prefill_chunk: int | None = None,
                decode_stall: float | None = None, page_size: int | None = None):
    """``kv_memory``: bytes of KV cache (bare vLLM and native); default: each engine's own. ``prefill_chunk``,
    ``sparse_prefill_chunk``, ``decode_stall`` and ``page_size``: the native engine's ``max_prefill_chunk``,
    ``max_sparse_prefill_chunk``, ``max_decode_stall`` and ``page_size`` (default: its own)."""
    cpu = tiny
    if name == "vllm":
        return BareVllm(model, max_model_len, cpu, kv_memory)
    if page_size is not None and name != "native":
        raise SystemExit("--page-size is for the native engine")
    if name == "sparse-vllm":
        from server.vllm_engine.engine import VllmEngine, VllmOptions

        if kv_memory is not None:
            raise SystemExit("--kv-memory-mib is for the vllm and native engines")
        # 0.75 of the GPU for vLLM's pool (bare vLLM takes 0.9): the sparse path keeps side copies of the KV
        # its methods read outside that pool (docs/vllm.md); the 32K x 32 dense batch still fits.
        return ServingEngine(VllmEngine(VllmOptions(model=model, max_model_len=max_model_len, max_num_seqs=64,
                                                    gpu_memory_utilization=None if cpu else 0.75)))
    if name == "native":
        from server.engine.engine import EngineOptions, NativeEngine

        # 80 GiB: room for 32 x (32K + decode_max_tokens) worst-case reservations, and for a 128K prefill's
        # activations beside it (96 GiB ran out of memory there on an H200)
        memory = kv_memory or ((256 << 20) if cpu else (80 << 30))
        extra = {} if prefill_chunk is None else {"max_prefill_chunk": prefill_chunk}
        if sparse_prefill_chunk is not None:
            extra["max_sparse_prefill_chunk"] = sparse_prefill_chunk
        if decode_stall is not None:
            extra["max_decode_stall"] = decode_stall
        if page_size is not None:
            extra["page_size"] = page_size
        return ServingEngine(NativeEngine.from_options(EngineOptions(model=model, max_model_len=max_model_len,
                                                                     kv_cache_memory=memory, max_num_seqs=128,
                                                                     device="cpu" if cpu else "auto", **extra)))
    raise SystemExit(f"unknown engine {name!r}")


# ------------------------------------------------------------------------------------------ measurements
class OutOfTime(Exception):
    pass


class Bench:
    def __init__(self, engine, protocol: Protocol, vocab: int, sparse: bool, deadline: float | None = None,
                 seed: int = 0, patterns: set[str] | None = None):
        self.engine, self.p, self.vocab, self.sparse = engine, protocol, vocab, sparse
        self.only = patterns  # measure these patterns only (None: all)
        self.deadline = deadline  # time.monotonic() after which no new measurement starts
        self.rng = random.Random(seed)
        self.warm: set[str] = set()

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime

    def chosen(self, patterns: tuple[str, ...], phase: str) -> tuple[str, ...]:
        """``patterns`` that ``--patterns`` names (all without it), then the SPECS labels of ``phase`` it names
        that no default list holds (variants measured only on request, e.g. quest:10/p32)."""
        if self.only is None:
            return patterns
        extra = tuple(label for label, spec in SPECS.items() if label in self.only and label not in patterns
                      and phase in spec and self.sparse)
        return tuple(p for p in patterns if p in self.only) + extra

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    async def warmup(self, pattern: str) -> None:
        if pattern not in self.warm:
            await self.engine.run(self.prompt(self.p.warmup_prompt), 4, pattern)
            self.warm.add(pattern)

    async def ttft(self, rows: list[dict]) -> None:
        """Appends to ``rows`` as it goes, so a deadline or a failure keeps what was measured."""
        for pattern in self.chosen((DENSE, *PREFILL_PATTERNS) if self.sparse else (DENSE,), "prefill"):
            self.check_time()
            await self.warmup(pattern)
            for n in self.p.ttft_lengths:
                self.check_time()
                # one request of this length first: the native engine's Triton kernels specialise on the
                # power-of-two bucket of the length and compile on its first request (seconds; on the H200 the
                # first vertical_slash:10 request at 8K took 2.8 s against 0.28 s dense); vLLM compiles at start
                await self.engine.run(self.prompt(n), 1, pattern)
                # the median of a few requests below the long context (1-2% apart from run to run: the bar "no
                # method slower than dense" compares such times), one at it
                runs = [await self.engine.run(self.prompt(n), 1, pattern)
                        for _ in range(self.p.ttft_samples if n < self.p.long_context else 1)]
                times = [s.times[0] - s.submitted for s in runs if s.times]
                s = runs[-1]
                rows.append({"pattern": pattern, "length": n, "ttft_s": statistics.median(times) if times else None,
                             "samples": times, "report": s.report, "error": s.error})
                log(f"ttft {pattern:<18} {n:>7}: {rows[-1]['ttft_s'] or 0:.3f} s (median of {len(times)})  "
                    f"{s.report or ''} {s.error or ''}")

    async def decode(self, batch: int, context: int, rows: list[dict]) -> None:
        for pattern in self.chosen((DENSE, *DECODE_PATTERNS) if self.sparse else (DENSE,), "decode"):
            self.check_time()
            await self.warmup(pattern)
            rows.append({"pattern": pattern, "batch": batch, "context": context,
                         **await self.steady_decode(batch, context, pattern)})
            r = rows[-1]
            log(f"decode {pattern:<16} B={batch:<3} ctx={context:>7}: {r['tokens_per_s'] or 0:.1f} tok/s "
                f"({r['window_tokens']} tokens in {r['window_s']:.2f} s; settle {r['settle_tokens_per_s'] or 0:.1f} "
                f"tok/s)  {r['report'] or ''} {r['error'] or ''}")

    def submit(self, requests: int, context: int, pattern: str) -> tuple[list[Stream], list[asyncio.Task]]:
        """``requests`` fresh prompts of ``context`` tokens, all at once, each to generate until aborted."""
        streams = [Stream(uuid.uuid4().hex, time.monotonic()) for _ in range(requests)]
        tasks = [asyncio.create_task(self.engine.run(self.prompt(context), self.p.decode_max_tokens, pattern, s))
                 for s in streams]
        return streams, tasks

    async def window(self, streams: list[Stream], seconds: float | None = None) -> tuple[list[int], float]:
        """Tokens each stream delivered during a window of ``seconds`` (default ``decode_window_s``), and the
        window's measured length in seconds."""
        before, t0 = [len(s.tokens) for s in streams], time.monotonic()
        await asyncio.sleep(self.p.decode_window_s if seconds is None else seconds)
        return [len(s.tokens) - b for s, b in zip(streams, before, strict=True)], time.monotonic() - t0

    async def abort_all(self, streams: list[Stream], tasks: list[asyncio.Task]) -> str | None:
        """Abort every request, wait for them to end; the first error any of them reported."""
        for s in streams:
            await self.engine.abort(s.request_id)
        await asyncio.gather(*tasks, return_exceptions=True)
        return next((s.error for s in streams if s.error), None)

    async def steady_decode(self, batch: int, context: int, pattern: str) -> dict:
        """Tokens/s of ``batch`` concurrent requests once every one of them decodes: the tokens delivered during a
        fixed window that opens ``decode_settle_s`` after the last request has its first token (the settle period's
        own rate is kept too: it holds the one-off costs of a new shape); then the requests are aborted. A window
        in time, not in tokens, so that engines that deliver several tokens in one delta are counted alike."""
        streams, tasks = self.submit(batch, context, pattern)
        result = {"window_tokens": 0, "window_s": 0.0, "tokens_per_s": None, "settle_tokens_per_s": None,
                  "report": None, "error": None}
        try:
            while not all(s.tokens for s in streams):
                if any(t.done() for t in tasks):  # a request ended before the batch was decoding: an error
                    break
                await asyncio.sleep(0.005)
            else:
                settled, settle_s = await self.window(streams, self.p.decode_settle_s)
                delivered, seconds = await self.window(streams)
                result.update(window_tokens=sum(delivered), window_s=seconds, tokens_per_s=sum(delivered) / seconds,
                              settle_tokens_per_s=sum(settled) / settle_s)
        finally:
            result["error"] = await self.abort_all(streams, tasks)
        if result["tokens_per_s"] is None and result["error"] is None:
            result["error"] = "a request finished before every request of the batch had its first token"
        result["report"] = streams[0].report
        return result

    async def capacity(self, rows: list[dict], patterns: tuple[str, ...]) -> None:
        for pattern in patterns:
            self.check_time()
            await self.warmup(pattern)
            rows.append({"pattern": pattern, "context": self.p.decode_context,
                         **await self.steady_capacity(self.p.capacity_requests, self.p.decode_context, pattern)})
            r = rows[-1]
            log(f"capacity {pattern:<14} ctx={r['context']}: {r['concurrent']} of {r['requests']} decoding, "
                f"{r['tokens_per_s'] or 0:.1f} tok/s {r['error'] or ''}")

    async def steady_capacity(self, requests: int, context: int, pattern: str) -> dict:
        """Submit ``requests`` at once; when no request has started (first token) for ``plateau_s``, count the
        requests that deliver tokens during a ``decode_window_s`` window and their tokens/s; then abort all."""
        streams, tasks = self.submit(requests, context, pattern)
        result = {"requests": requests, "concurrent": 0, "tokens_per_s": None, "report": None, "error": None}
        try:
            started, last_change = 0, time.monotonic()
            while started < requests and time.monotonic() - last_change < self.p.plateau_s:
                if any(t.done() for t in tasks):
                    break
                now_started = sum(1 for s in streams if s.tokens)
                if now_started != started:
                    started, last_change = now_started, time.monotonic()
                await asyncio.sleep(0.01)
            delivered, seconds = await self.window(streams)
            result.update(concurrent=sum(1 for d in delivered if d > 0), tokens_per_s=sum(delivered) / seconds)
        finally:
            result["error"] = await self.abort_all(streams, tasks)
        result["report"] = next((s.report for s in streams if s.report), None)
        return result

    async def interference(self) -> dict:
        """Inter-token latency of ``interference_batch`` decoding requests before and while one long prompt
        prefills, and the long request's TTFT (dense; the module docstring says what is measured)."""
        p = self.p
        await self.warmup(DENSE)
        streams, tasks = self.submit(p.interference_batch, p.decode_context, DENSE)
        long = Stream(uuid.uuid4().hex, 0.0)
        result: dict = {"batch": p.interference_batch, "context": p.decode_context, "prompt": p.long_context,
                        "error": None}
        try:
            while not all(s.tokens for s in streams) and not any(t.done() for t in tasks):
                await asyncio.sleep(0.005)
            steady_from = time.monotonic()
            await asyncio.sleep(p.decode_window_s)
            long.submitted = time.monotonic()
            tasks.append(asyncio.create_task(self.engine.run(self.prompt(p.long_context), 1, DENSE, long)))
            while not long.times and not tasks[-1].done():
                await asyncio.sleep(0.002)
            first = long.times[0] if long.times else time.monotonic()
            await asyncio.sleep(0.2)  # the gaps that end just after the long request's first token
            result.update(ttft_s=first - long.submitted if long.times else None,
                          steady=latency_stats(streams, steady_from, long.submitted, inside=True),
                          during=latency_stats(streams, long.submitted, first, inside=False))
        finally:
            result["error"] = await self.abort_all(streams + [long], tasks)
        steady, during = result.get("steady", {}), result.get("during", {})
        if steady.get("p99_s") and during.get("p99_s"):
            result["p99_ratio"] = during["p99_s"] / steady["p99_s"]
        return result

    async def agree(self) -> dict:
        # the same prompt in every engine's run (the other prompts only need to be fresh)
        prompt = [random.Random(1234).randrange(self.vocab) for _ in range(self.p.agree_prompt)]
        n = self.p.agree_tokens
        solo = {}
        for pattern in AGREE_PATTERNS if self.sparse else (DENSE,):
            solo[pattern] = (await self.engine.run(prompt, n, pattern)).tokens
        result: dict = {"prompt": prompt, "solo": solo}
        if self.sparse:
            alone = {pt: (await self.engine.run(prompt, n, pt)).tokens for pt in MIXED_BATCH}
            mixed = await asyncio.gather(*(self.engine.run(prompt, n, pt) for pt in MIXED_BATCH))
            result["mixed"] = {pt: {"alone": alone[pt], "batched": s.tokens,
                                    "agree_prefix": agree_prefix(alone[pt], s.tokens)}
                               for pt, s in zip(MIXED_BATCH, mixed, strict=True)}
            for pt, r in result["mixed"].items():
                log(f"mixed batch {pt:<22} agrees for {r['agree_prefix']}/{n} tokens")
        return result


def latency_stats(streams: list[Stream], start: float, end: float, inside: bool) -> dict:
    """p50/p99 of the gaps between successive deliveries of each stream: those inside ``[start, end]``
    (``inside``), or those overlapping it (a decode stalled by a prefill shows as one gap spanning it)."""
    gaps = []
    for s in streams:
        times = sorted(set(s.times))
        for a, b in zip(times, times[1:], strict=False):
            if (start <= a and b <= end) if inside else (b > start and a < end):
                gaps.append(b - a)
    gaps.sort()

    def pct(q: float) -> float | None:
        return gaps[min(len(gaps) - 1, int(q * len(gaps)))] if gaps else None

    return {"gaps": len(gaps), "p50_s": pct(0.5), "p99_s": pct(0.99), "max_s": gaps[-1] if gaps else None}


def agree_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


PARTS = ("ttft", "agree", "decode:1", "decode:8", "decode:32", "decode:long",
         "interference")  # "all"; any decode:<batch> is valid
EXTRA_PARTS = ("capacity",)  # not in "all": run with --kv-memory-mib


async def run(args) -> None:
    protocol = TINY_PROTOCOL if args.tiny else Protocol()
    parts = PARTS if args.part == "all" else tuple(args.part.split(","))
    unknown = [p for p in parts if p not in PARTS + EXTRA_PARTS and not re.fullmatch(r"decode:[1-9][0-9]*", p)]
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; choose from {', '.join(PARTS + EXTRA_PARTS)}, decode:<batch> "
                         "or all")
    kv_memory = args.kv_memory_mib << 20 if args.kv_memory_mib else None
    config = json.loads((Path(args.dir) / "config.json").read_text())
    max_len = protocol.long_context + protocol.decode_max_tokens
    t0 = time.monotonic()
    engine = make_engine(args.engine, args.dir, max_len, args.tiny, kv_memory,
                         args.prefill_chunk if args.prefill_chunk is not None else protocol.prefill_chunk,
                         args.sparse_prefill_chunk, args.decode_stall, args.page_size)
    await engine.start()
    load_s = time.monotonic() - t0
    log(f"{args.engine} ready in {load_s:.0f} s")
    deadline = t0 + args.deadline if args.deadline else None
    bench = Bench(engine, protocol, config["vocab_size"], sparse=args.engine != "vllm", deadline=deadline,
                  patterns=set(args.patterns.split(",")) if args.patterns else None)
    result: dict = {"engine": args.engine, "device": device_name(), "load_s": load_s, "parts": list(parts),
                    "protocol": protocol.__dict__, "ttft": [], "decode": [], "capacity": [],
                    "kv_memory_mib": args.kv_memory_mib, "sparse_prefill_chunk": args.sparse_prefill_chunk,
                    "decode_stall": args.decode_stall, "page_size": args.page_size,
                    "versions": versions()}
    saver = asyncio.create_task(save_every(Path(args.out), result, 5.0))  # a call killed mid-part keeps its rows
    try:
        for part in parts:
            try:
                await run_part(bench, part, result)
            except OutOfTime:
                result["stopped"] = f"deadline of {args.deadline} s reached before part {part}"
                log(result["stopped"])
                break
            except Exception as e:  # an engine that died: keep what was measured, say what failed
                result.setdefault("errors", []).append(f"{part}: {type(e).__name__}: {e}")
                log(f"part {part} failed: {e!r}")
            Path(args.out).write_text(json.dumps(result, indent=1))  # what is done survives a later failure
    finally:
        saver.cancel()
        Path(args.out).write_text(json.dumps(result, indent=1))
        await engine.stop()
    log(f"wrote {args.out}")


async def save_every(path: Path, result: dict, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        path.write_text(json.dumps(result, indent=1))


async def run_part(bench: Bench, part: str, result: dict) -> None:
    protocol = bench.p
    if part == "ttft":
        await bench.ttft(result["ttft"])
    elif part == "agree":
        result["agree"] = await bench.agree()
    elif part == "interference":
        result["interference"] = await bench.interference()
        r = result["interference"]
        log(f"interference: ITL p50/p99 steady {r.get('steady')} during {r.get('during')}, "
            f"long TTFT {r.get('ttft_s')} s {r['error'] or ''}")
    elif part == "capacity":
        patterns = CAPACITY_PATTERNS if result["engine"] == "native" else (DENSE,)
        await bench.capacity(result["capacity"], patterns)
    elif part == "decode:long":
        await bench.decode(1, protocol.long_context, result["decode"])
    else:
        await bench.decode(int(part.split(":")[1]), protocol.decode_context, result["decode"])


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def versions() -> dict:
    import torch

    out = {"torch": torch.__version__}
    try:
        import vllm

        out["vllm"] = vllm.__version__
    except ImportError:
        pass
    return out


# ------------------------------------------------------------------------------------------ the report
def merge(paths: list[str]) -> dict:
    """One record per engine from its part files, in the order given: a later part's measurement of the same case
    (pattern and length, or pattern, batch and context) replaces an earlier one, so a re-measured case can be
    passed after the part it corrects."""
    engines: dict[str, dict] = {}
    for path in paths:
        part = json.loads(Path(path).read_text())
        e = engines.setdefault(part["engine"], {"device": part["device"], "ttft": {}, "decode": {}, "capacity": {},
                                                 "load_s": [], "versions": part["versions"], "parts": []})
        for r in part["ttft"]:
            e["ttft"][(r["pattern"], r["length"])] = r | {"part": Path(path).name}
        for r in part["decode"]:
            e["decode"][(r["pattern"], r["batch"], r["context"])] = r | {"part": Path(path).name}
        for r in part.get("capacity", []):  # keyed by the memory too: capacity is a property of the memory
            mib = part.get("kv_memory_mib")
            e["capacity"][(r["pattern"], r["context"], mib)] = r | {"kv_memory_mib": mib, "part": Path(path).name}
        e["load_s"].append(part["load_s"])
        e["parts"].append({"file": Path(path).name, "errors": part.get("errors"), "stopped": part.get("stopped")})
        for key in ("agree", "interference"):
            if key in part:
                e[key] = part[key]
    for e in engines.values():
        e["ttft"], e["decode"] = list(e["ttft"].values()), list(e["decode"].values())
        e["capacity"] = list(e["capacity"].values())
    return engines


def ratios(engines: dict) -> list[dict]:
    """Every (engine, pattern, case) against vLLM dense of the same run: TTFT speedup and decode speedup."""
    base = engines.get("vllm", {})
    base_ttft = {r["length"]: r["ttft_s"] for r in base.get("ttft", []) if r["pattern"] == DENSE}
    base_dec = {(r["batch"], r["context"]): r["tokens_per_s"] for r in base.get("decode", []) if r["pattern"] == DENSE}
    rows = []
    for name, e in engines.items():
        for r in e["ttft"]:
            b = base_ttft.get(r["length"])
            rows.append({"engine": name, "pattern": r["pattern"], "case": f"TTFT {tokens_label(r['length'])}",
                         "value": r["ttft_s"], "unit": "s",
                         "speedup": b / r["ttft_s"] if b and r["ttft_s"] else None,
                         "fallback": (r.get("report") or {}).get("fallback")})
        for r in e["decode"]:
            b = base_dec.get((r["batch"], r["context"]))
            rows.append({"engine": name, "pattern": r["pattern"],
                         "case": f"decode B={r['batch']} {tokens_label(r['context'])}", "value": r["tokens_per_s"],
                         "unit": "tok/s", "speedup": r["tokens_per_s"] / b if b and r["tokens_per_s"] else None})
    return rows


def agreement(engines: dict) -> list[dict]:
    """Greedy tokens of every pattern at ratio 1 against bare vLLM's dense tokens (same prompt and model)."""
    ref = engines.get("vllm", {}).get("agree", {}).get("solo", {}).get(DENSE)
    rows = []
    for name, e in engines.items():
        for pattern, tokens in e.get("agree", {}).get("solo", {}).items():
            rows.append({"engine": name, "pattern": pattern, "tokens": len(tokens),
                         "agree_with_vllm_dense": agree_prefix(ref, tokens) if ref else None})
        for pattern, m in e.get("agree", {}).get("mixed", {}).items():
            rows.append({"engine": name, "pattern": f"{pattern} (batch of 8 vs alone)", "tokens": len(m["alone"]),
                         "agree_with_vllm_dense": None, "mixed_agree_prefix": m["agree_prefix"]})
    return rows


def tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def pivot(rows: list[dict], kind: str) -> list[str]:
    """A Markdown table: one row per (engine, pattern), one column per case, cells "value (speedup)"."""
    rows = [r for r in rows if r["case"].startswith(kind)]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    cell = {(r["engine"], r["pattern"], r["case"]): r for r in rows}
    out = ["| engine | pattern | " + " | ".join(cases) + " |", "|---|---|" + "---|" * len(cases)]
    for engine, pattern in dict.fromkeys((r["engine"], r["pattern"]) for r in rows):
        cells = []
        for case in cases:
            r = cell.get((engine, pattern, case))
            if r is None or r["value"] is None:
                cells.append("-")
                continue
            value = f"{r['value']:.3f} s" if r["unit"] == "s" else f"{r['value']:.1f}"
            cells.append(value + (f" ({r['speedup']:.2f}x)" if r["speedup"] else "")
                         + (f" [{r['fallback']} fallback]" if r.get("fallback") else ""))
        out.append(f"| {engine} | {pattern} | " + " | ".join(cells) + " |")
    return out


def part_names(paths: list[str]) -> list[str]:
    """The part files relative to the folder that holds them all (``a.json session4/a.json``): unambiguous."""
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), root) for p in paths]


def report(paths: list[str], out_dir: str) -> Path:
    engines = merge(paths)
    card = next(iter(engines.values()))["device"]
    stem = Path(out_dir) / f"e2e-{card.replace(' ', '-')}-{dt.date.today().isoformat()}"
    rows, agree = ratios(engines), agreement(engines)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"card": card, "engines": engines, "ratios": rows,
                                                     "agreement": agree}, indent=1))
    lines = [f"# End-to-end benchmark on {card}, {dt.date.today().isoformat()}", "",
             f"`python benchmarks/e2e.py report {' '.join(part_names(paths))}` over the part files of the "
             "device calls in `benchmarks/e2e.py`'s docstring. In brackets: speedup against bare vLLM dense of the "
             "same run (TTFT: vLLM's time over this time; decode: this rate over vLLM's).", "",
             "## Time to first token (one request alone)", "", *pivot(rows, "TTFT"), "",
             "## Decode tokens/s (all requests of the batch together)", "", *pivot(rows, "decode"), "",
             *capacity_table(engines), *interference_table(engines),
             "## Greedy agreement", "",
             "| engine | pattern | tokens | agreeing prefix with vLLM dense | batch of 8 vs alone |",
             "|---|---|---|---|---|"]
    for r in agree:
        with_vllm = r["agree_with_vllm_dense"]
        lines.append(f"| {r['engine']} | {r['pattern']} | {r['tokens']} | {'-' if with_vllm is None else with_vllm} | "
                     f"{r.get('mixed_agree_prefix', '-')} |")
    loads = ", ".join(f"{k} {', '.join(f'{x:.0f}' for x in e['load_s'])}" for k, e in engines.items())
    lines += ["", f"Load times (s): {loads}",
              "Versions: " + ", ".join(f"{k} {e['versions']}" for k, e in engines.items()), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    chart(rows, stem.with_suffix(".png"), card)
    print(f"wrote {stem}.json, .md and .png")
    return stem


def capacity_table(engines: dict) -> list[str]:
    """Markdown lines of the capacity part (none when no part measured it)."""
    rows = [(name, r) for name, e in engines.items() for r in e.get("capacity", [])]
    if not rows:
        return []
    lines = ["## Capacity: requests one KV memory holds at once, and their decode tokens/s", "",
             "| engine | pattern | KV memory (MiB) | context | decoding at once (of submitted) | tokens/s |",
             "|---|---|---|---|---|---|"]
    for name, r in rows:
        rate = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
        lines.append(f"| {name} | {r['pattern']} | {r['kv_memory_mib'] or 'default'} | {tokens_label(r['context'])} | "
                     f"{r['concurrent']} ({r['requests']}) | {rate} |")
    return lines + [""]


def interference_table(engines: dict) -> list[str]:
    """Markdown lines of the interference part (none when no part measured it)."""
    rows = [(name, e["interference"]) for name, e in engines.items() if "interference" in e]
    if not rows:
        return []

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1000 * x:.1f}"

    lines = ["## Decode while a long prompt prefills (inter-token latency, ms)", "",
             "| engine | decoding (context) | prompt | steady p50 | steady p99 | during p50 | during p99 | "
             "p99 during / steady | long TTFT (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        s, d = r.get("steady", {}), r.get("during", {})
        ratio = "-" if r.get("p99_ratio") is None else f"{r['p99_ratio']:.2f}"
        ttft = "-" if r.get("ttft_s") is None else f"{r['ttft_s']:.2f}"
        lines.append(f"| {name} | {r['batch']} ({tokens_label(r['context'])}) | {tokens_label(r['prompt'])} | "
                     f"{ms(s.get('p50_s'))} | {ms(s.get('p99_s'))} | {ms(d.get('p50_s'))} | {ms(d.get('p99_s'))} | "
                     f"{ratio} | {ttft} |")
    return lines + [""]


def chart(rows: list[dict], path: Path, card: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted(dict.fromkeys(r["case"] for r in rows), key=lambda c: not c.startswith("TTFT"))  # stable
    series = sorted({(r["engine"], r["pattern"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(cases)), 5))
    width = 0.8 / max(len(series), 1)
    for i, (engine, pattern) in enumerate(series):
        vals = {r["case"]: r["speedup"] for r in rows if (r["engine"], r["pattern"]) == (engine, pattern)}
        xs = [c + i * width for c, case in enumerate(cases) if vals.get(case)]
        ys = [vals[case] for case in cases if vals.get(case)]
        ax.bar(xs, ys, width, label=f"{engine} {pattern}", color=plt.cm.tab20(i % 20))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], cases, rotation=20)
    ax.set_ylabel("speedup vs bare vLLM dense (same run)")
    ax.set_title(f"sparse-serve end to end, {card}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-model", help="write the random Qwen2.5-7B-shaped model directory")
    w.add_argument("--dir", required=True)
    w.add_argument("--tiny", action="store_true", help="a tiny model for a CPU smoke run")
    r = sub.add_parser("run", help="measure one engine; writes a part file")
    r.add_argument("--engine", required=True, choices=["vllm", "sparse-vllm", "native"])
    r.add_argument("--dir", required=True, help="the model directory write-model wrote")
    r.add_argument("--part", default="all",
                   help=f"comma-separated subset of {', '.join(PARTS)} (decode:<batch> for any batch), or all")
    r.add_argument("--out", required=True, help="the part file (JSON) to write")
    r.add_argument("--tiny", action="store_true", help="tiny protocol (short prompts, small batches) on the CPU")
    r.add_argument("--kv-memory-mib", type=int, default=None,
                   help="KV cache memory in MiB for the vllm and native engines (the capacity part compares "
                        "engines on the same memory); default: each engine's own")
    r.add_argument("--prefill-chunk", type=int, default=None,
                   help="the native engine's --max-prefill-chunk (default: the engine's; --tiny: 256)")
    r.add_argument("--sparse-prefill-chunk", type=int, default=None,
                   help="the native engine's --max-sparse-prefill-chunk (default: the engine's)")
    r.add_argument("--decode-stall", type=float, default=None,
                   help="the native engine's --max-decode-stall (default: the engine's; 0: fixed chunks)")
    r.add_argument("--page-size", type=int, default=None,
                   help="the native engine's --page-size (default: the engine's, 16); Quest runs on these pages, so "
                        "measure it with a matching label, e.g. --page-size 32 --patterns dense,quest:10/p32")
    r.add_argument("--patterns", default=None,
                   help="comma-separated patterns to measure in the ttft and decode parts (e.g. dense,quest:10, to "
                        "re-measure some cases beside their dense baseline); default: every pattern")
    r.add_argument("--deadline", type=float, default=None,
                   help="seconds after start (model load included) past which no new measurement starts, so a "
                        "device call ends inside its limit with what it measured")
    p = sub.add_parser("report", help="merge part files into the recorded JSON, Markdown table and PNG chart")
    p.add_argument("parts", nargs="+")
    p.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    if args.cmd == "write-model":
        write_model(args.dir, args.tiny)
    elif args.cmd == "run":
        asyncio.run(run(args))
    else:
        report(args.parts, args.out_dir)


if __name__ == "__main__":
    main()
