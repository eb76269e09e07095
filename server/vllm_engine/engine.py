"""VllmEngine: the :class:`~server.contract.engine.Engine` protocol over vLLM's ``AsyncLLM``.

Requests go to ``AsyncLLM.generate`` with ``RequestOutputKind.DELTA``; a sparse request's spec travels in
``SamplingParams.extra_args["sparse_pattern"]`` (object form) together with a key naming its cost side file
(see :mod:`.accounting`). The final delta carries the request's :class:`RequestCost`: read from the side
file the worker wrote for sparse requests, computed analytically for dense ones.

At :meth:`VllmEngine.start` a self-test checks that the sparse backend is really in place (a sparse request
must leave a cost file, which only the plugin writes) and that a sparse path at ratio 1 gives the dense
tokens; it raises instead of silently serving dense.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from attention_backends.cost import ModelShape
from server.contract.cost import RequestCost
from server.contract.engine import (
    EngineOverloaded,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    RequestRejected,
    RequestTimings,
    SamplingParams,
    TokenLogprob,
    wait_drained,
)
from server.settings import EngineSettings

from . import graph_sizes
from .accounting import COST_DIR_ENV, cost_dir, dense_cost, load_cost
from .worker_state import PATTERN_KEY, REQUEST_KEY, encode_spec

# the longest the front end waits for a sparse request's last decode step in its cost file (the worker writes it
# within about a step of the last token; missing it, the report holds the steps before and says so in the log)
COST_FILE_WAIT_S = 2.0
log = logging.getLogger("sparse_serve.vllm_engine")


class VllmOptions(EngineSettings):
    """The settings every engine takes (``model``: a Hugging Face model directory, or a hub name already in the
    local cache; ``kv_cache_memory``: vLLM's kv_cache_memory_bytes; ``page_size``: vLLM's block_size), plus
    vLLM's own."""

    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = False  # a prefix-cache hit makes a sparse request run dense (docs/vllm.md)
    max_num_batched_tokens: int | None = None  # default: max_model_len, so prompts prefill in one chunk
    seed: int = 0
    gpu_memory_utilization: float | None = None
    self_test: bool = True


def _token_logprob(token: int, entry, k: int) -> TokenLogprob:
    """One position of vLLM's logprobs: ``{token id: Logprob}`` holds the top ``k`` by rank and the chosen token."""
    top = sorted(((int(t), float(lp.logprob)) for t, lp in entry.items() if lp.rank <= k), key=lambda x: -x[1])
    return TokenLogprob(int(token), float(entry[token].logprob), top)


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


class VllmEngine:
    def __init__(self, options: VllmOptions):
        if not options.model or not Path(options.model).is_dir():
            raise RequestRejected(
                f"--engine vllm needs a Hugging Face model directory (got {options.model!r}); the embedded GGUF "
                "default is served by the native engine", param="model")
        import json

        from server.tokenizer import load_hf_tokenizer

        self.options = options
        config = json.loads((Path(options.model) / "config.json").read_text())
        self.shape = ModelShape.from_hf_config(config)
        self.tokenizer = load_hf_tokenizer(options.model)
        self.model_name = options.served_model_name or Path(options.model).name
        self.max_model_len = options.max_model_len or int(config.get("max_position_embeddings", 2048))
        self._cost_dir = cost_dir()
        self._element_bytes = 4 if self._dtype() == "float32" else 2
        self._llm = None
        self._requests: dict[str, GenerationRequest] = {}
        self._accepting = False

    # -- lifecycle --------------------------------------------------------------------------------------
    def _device(self) -> str:
        if self.options.device != "auto":
            return self.options.device
        try:
            from vllm.platforms import current_platform

            return "cpu" if current_platform.is_cpu() else "cuda"
        except Exception:
            return "cpu"

    def _dtype(self) -> str:
        if self.options.dtype != "auto":
            return self.options.dtype
        return "float32" if self._device() == "cpu" else "bfloat16"

    def engine_args(self, logits_processors: list[str] | None = None):
        from vllm.engine.arg_utils import AsyncEngineArgs

        from .plugin import CUDA_BACKEND_NAME, V1_PROCESSOR

        o = self.options
        kwargs = dict(
            model=o.model,
            tokenizer=o.model,
            dtype=self._dtype(),
            max_model_len=self.max_model_len,
            max_num_seqs=o.max_num_seqs,
            max_num_batched_tokens=o.max_num_batched_tokens or max(self.max_model_len, 2048),
            enable_prefix_caching=o.enable_prefix_caching,
            enforce_eager=self._device() == "cpu" if o.enforce_eager is None else o.enforce_eager,
            tensor_parallel_size=o.tensor_parallel_size,
            seed=o.seed,
            disable_log_stats=True,
            logits_processors=logits_processors or [V1_PROCESSOR],
        )
        if o.kv_cache_memory:
            kwargs["kv_cache_memory_bytes"] = o.kv_cache_memory
        if self._device() == "cpu":
            # vLLM's CPU worker refuses to start unless gpu_memory_utilization x RAM is free; the KV cache is
            # sized by kv_cache_memory_bytes instead (default 1 GiB, like the native engine).
            kwargs["gpu_memory_utilization"] = o.gpu_memory_utilization or 0.05
            kwargs.setdefault("kv_cache_memory_bytes", 1 << 30)
            if o.tensor_parallel_size == 1:
                kwargs["distributed_executor_backend"] = "uni"  # the worker runs inside the engine-core process
        elif o.gpu_memory_utilization:
            kwargs["gpu_memory_utilization"] = o.gpu_memory_utilization
        if o.page_size:
            kwargs["block_size"] = o.page_size
        if self._device() != "cpu":
            kwargs["attention_config"] = {"backend": CUDA_BACKEND_NAME}
            if graph_sizes.enabled() and not kwargs["enforce_eager"]:  # graphs per set of kernels (graph_sizes.py)
                sizes = graph_sizes.GraphSizes.for_batch(o.max_num_seqs, kwargs["max_num_batched_tokens"],
                                                         graph_sizes.graph_kernels())
                kwargs["compilation_config"] = {"cudagraph_capture_sizes": sizes.all}
        return AsyncEngineArgs(**kwargs)

    async def start(self) -> None:
        if self._llm is not None:
            return
        os.environ[COST_DIR_ENV] = str(self._cost_dir)  # inherited by the engine-core process
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from .plugin import V2_PROCESSOR, SparseSideChannelV2, register

        register()  # the entry point does this too; harmless twice, and makes a non-installed checkout work
        args = self.engine_args()
        if SparseSideChannelV2 is not None and \
                args.create_engine_config(UsageContext.ENGINE_CONTEXT).use_v2_model_runner:
            args = self.engine_args([V2_PROCESSOR])
        self._llm = AsyncLLM.from_engine_args(args)
        self._accepting = True
        if self.options.self_test:
            await self.self_test()

    async def self_test(self) -> None:
        """Fail loudly unless the sparse backend is in place and a sparse path reproduces dense."""
        from attention_backends import parse_pattern

        vocab = self.shape.vocab_size
        prompt = [(7 * i + 3) % vocab for i in range(24)]
        outs = {}
        for pattern in ("dense", "quest:1"):
            req = GenerationRequest(f"sparse-serve-selftest-{pattern}-{uuid.uuid4().hex[:8]}", prompt,
                                    SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                                    parse_pattern(pattern))
            final = None
            tokens: list[int] = []
            async for out in self.generate(req):
                tokens += out.token_ids
                final = out
            outs[pattern] = (tokens, final)
        dense_tokens, _ = outs["dense"]
        sparse_tokens, final = outs["quest:1"]
        if final is None or not getattr(final, "_sparse_measured", False):
            raise RuntimeError(
                "sparse-serve vLLM self-test: the sparse attention backend did not run (no cost report from the "
                "worker); is the plugin registered (vllm.general_plugins entry point) and VLLM_PLUGINS unset?")
        if sparse_tokens != dense_tokens:
            message = (f"sparse-serve vLLM self-test: quest:1 gave {sparse_tokens}, dense gave {dense_tokens}; the "
                       "sparse path does not reproduce dense attention")
            if self._dtype() == "float32":
                raise RuntimeError(message)
            # in 16-bit the sparse path (another kernel) and vLLM's differ by rounding, which can flip a near-tie
            log.warning("%s (%s: rounding can flip near-ties; the backend itself is in effect)", message,
                        self._dtype())
        log.info("vLLM sparse backend self-test passed")

    def ready(self) -> bool:
        return self._llm is not None and self._accepting

    async def shutdown(self, timeout: float = 30.0) -> None:
        self._accepting = False
        await wait_drained(self._requests, timeout)
        for rid in list(self._requests):
            await self.abort(rid)
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        shutil.rmtree(self._cost_dir, ignore_errors=True)

    def stats(self) -> EngineStats:
        # AsyncLLM does not expose its scheduler's queues to the caller; in-flight requests count as running.
        return EngineStats(len(self._requests), 0, 0.0, 0, 0)

    # -- requests ---------------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        n, sp = len(request.prompt_token_ids), request.sampling
        if n == 0:
            raise RequestRejected("the prompt must contain at least one token", param="prompt")
        if any(t < 0 or t >= self.shape.vocab_size for t in request.prompt_token_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {self.shape.vocab_size})", param="prompt")
        if n + sp.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has {n} "
                f"tokens and max_tokens is {sp.max_tokens}", param="max_tokens", code="context_length_exceeded")

    def sampling_params(self, request: GenerationRequest, key: str):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = request.sampling
        extra = None
        if not request.spec.is_dense:
            extra = {PATTERN_KEY: encode_spec(request.spec), REQUEST_KEY: key}
        return VllmSamplingParams(
            max_tokens=max(1, sp.max_tokens),  # vLLM needs one; generate() drops it for max_tokens 0 (as vLLM's server)
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k if sp.top_k and sp.top_k > 0 else 0,
            seed=sp.seed,
            stop=list(sp.stop) or None,
            stop_token_ids=list(sp.stop_token_ids) or None,
            ignore_eos=sp.ignore_eos,
            logprobs=sp.logprobs,
            prompt_logprobs=sp.prompt_logprobs,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        self.validate(request)
        if self._llm is None or not self._accepting:
            raise EngineOverloaded("the engine is not running", retry_after=5.0)
        if request.request_id in self._requests:
            raise RequestRejected(f"duplicate request id {request.request_id!r}", param="request_id")
        if len(self._requests) >= self.options.max_num_seqs + self.options.max_queue:
            raise EngineOverloaded()
        key = uuid.uuid4().hex
        params = self.sampling_params(request, key)
        timings = RequestTimings(arrival=time.monotonic())
        prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
        self._requests[request.request_id] = request
        completion = 0
        finished = False
        try:
            from vllm.exceptions import VLLMValidationError

            stream = self._llm.generate(prompt, params, request.request_id)
            try:
                first = await anext(stream)
            except (ValueError, VLLMValidationError) as e:  # admission-time validation (validate_params, ...)
                raise RequestRejected(str(e), param=getattr(e, "parameter", None) or "sparse_pattern") from None
            scoring_only = request.sampling.max_tokens == 0
            async for ro in _chain(first, stream):
                c = ro.outputs[0]
                if timings.first_token is None and c.token_ids:
                    timings.scheduled = timings.scheduled or time.monotonic()
                    timings.first_token = time.monotonic()
                tokens = [] if scoring_only else list(c.token_ids)
                completion += len(tokens)
                out = GenerationOutput(request.request_id, tokens, "" if scoring_only else c.text,
                                       logprobs=None if scoring_only else self._logprobs(request, c),
                                       prompt_tokens=len(request.prompt_token_ids), completion_tokens=completion,
                                       prompt_logprobs=self._prompt_logprobs(request, ro))
                if ro.finished:
                    finished = True
                    timings.finished = time.monotonic()
                    out.finished = True
                    reason = c.finish_reason if c.finish_reason in ("stop", "length") else "abort"
                    out.finish_reason = "length" if scoring_only and reason == "stop" else reason
                    out.cost, measured = await self._cost(request, key, completion)
                    out._sparse_measured = measured  # type: ignore[attr-defined]
                    out.timings = timings
                yield out
                if finished:
                    break
        finally:
            self._requests.pop(request.request_id, None)
            if not finished and self._llm is not None:
                await self._llm.abort(request.request_id)
            (self._cost_dir / f"{key}.json").unlink(missing_ok=True)

    @staticmethod
    def _logprobs(request: GenerationRequest, c) -> list[TokenLogprob] | None:
        k = request.sampling.logprobs
        if c.logprobs is None or k is None:
            return None
        return [_token_logprob(tok, entry, k) for tok, entry in zip(c.token_ids, c.logprobs, strict=False)]

    @staticmethod
    def _prompt_logprobs(request: GenerationRequest, ro) -> list[TokenLogprob | None] | None:
        """vLLM's prompt logprobs (on the first delta; the first token's None) in the engine-neutral form."""
        if request.sampling.prompt_logprobs is None or not ro.prompt_logprobs:
            return None
        k = request.sampling.prompt_logprobs
        return [None if entry is None else _token_logprob(tok, entry, k)
                for tok, entry in zip(request.prompt_token_ids, ro.prompt_logprobs, strict=True)]

    async def _cost(self, request: GenerationRequest, key: str, completion: int) -> tuple[RequestCost, bool]:
        """The request's cost, and whether the worker measured it (else it is dense attention's)."""
        prompt_len = len(request.prompt_token_ids)
        cost = None
        if not request.spec.is_dense:
            cost = await self._read_cost(key, completion)
            if cost is None:
                log.warning("no sparse cost report for %s; reporting dense cost", request.request_id)
        measured = cost is not None
        if cost is None:
            cost = dense_cost(request.spec, self.shape, prompt_len, completion, self._element_bytes)
        if cost.prefill.dense_units:  # the prefill ran (a request aborted while queued has none)
            cost.end_prefill(self.shape, prompt_len)
        return cost, measured

    async def _read_cost(self, key: str, completion: int) -> RequestCost | None:
        """The worker's account of a sparse request. A Quest account over vLLM's cache is folded just after each step
        ran (off the step's path: ``count_reader``), so its last step may land after the last token: wait for it."""
        deadline = time.monotonic() + COST_FILE_WAIT_S
        loaded = load_cost(self._cost_dir, key)
        while loaded is not None and not loaded.complete(completion) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
            loaded = load_cost(self._cost_dir, key)
        if loaded is None:
            return None
        if not loaded.complete(completion):
            log.warning("the cost report of %s holds %d of its %d decode steps", key, loaded.decode_steps,
                        completion - 1)
        return loaded.cost

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)
