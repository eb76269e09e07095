"""NativeEngine: the PyTorch engine behind the HTTP API.

The engine loop runs on its own thread (model work never blocks the event loop); ``generate`` hands a
request to it and relays its outputs to the caller's event loop. See :mod:`.scheduler` for the admission
and interleaving policy, :mod:`.runner` for how each step runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

import torch

from attention_backends import DECODE_METHODS
from server.contract.engine import (
    EngineOverloaded,
    EngineStats,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    RequestRejected,
    Tokenizer,
    TokenLogprob,
    wait_drained,
)
from server.settings import PREFILL_CHUNK_ALIGN, EngineSettings

from .chunk_pacer import ChunkPacer
from .detokenizer import IncrementalDetokenizer
from .page_pool import PagePool, pages_for_memory
from .request_state import EngineRequest
from .runner import ModelRunner, PendingDecode
from .sampler import Sampled, SamplerState, greedy_only, sample
from .scheduler import Scheduler

log = logging.getLogger("sparse_serve.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PAGE_SIZE = 16  # Quest's default page size: Quest runs on the engine's pages


class EngineOptions(EngineSettings):
    """The native engine takes just the settings every engine takes. ``max_model_len`` defaults to the model's
    (capped to what one request can hold in the KV cache); ``kv_cache_memory`` to 1 GiB on CPU, half the free
    GPU memory on CUDA."""

    def resolved_page_size(self) -> int:
        return self.page_size or DEFAULT_PAGE_SIZE

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[self.dtype]


class NativeEngine:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, options: EngineOptions, model_name: str):
        cfg = model.config
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.options = options
        self.shape = cfg.to_model_shape()
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        memory = options.kv_cache_memory or self._default_kv_memory(device)
        page_size = options.resolved_page_size()
        pages = pages_for_memory(memory, page_size, cfg.head_dim, dtype)
        self.pool = PagePool(pages, page_size, cfg.head_dim, dtype, device)
        self.runner = ModelRunner(model, self.pool, self.shape)
        pacer = ChunkPacer(self.shape, options.max_decode_stall, options.max_prefill_chunk, PREFILL_CHUNK_ALIGN) \
            if options.max_decode_stall > 0 and options.max_prefill_chunk > 0 else None
        self.scheduler = Scheduler(self.pool, cfg.num_layers, cfg.num_kv_heads, options.max_num_seqs,
                                   options.max_queue, options.max_prefill_chunk, options.max_sparse_prefill_chunk,
                                   pacer)
        self.max_model_len = self._served_context(cfg.max_position_embeddings, cfg.sliding_window)
        if device.type == "cuda" and not options.enforce_eager:
            self.runner.enable_cuda_graphs(options.max_num_seqs, self.max_model_len)
        self.stop_token_ids = set(getattr(tokenizer, "stop_token_ids", None) or [])
        if tokenizer.eos_token_id is not None:
            self.stop_token_ids.add(int(tokenizer.eos_token_id))
        self._lock = threading.Condition()
        self._requests: dict[str, EngineRequest] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        # Decode tokens accepted but not streamed yet: their text and output are made while the next step runs
        # on the GPU (:meth:`_publish`), so the host's per-token work does not sit between two steps.
        self._unpublished: list[tuple[EngineRequest, int, TokenLogprob | None]] = []
        # A greedy batch's next decode step, launched from the previous step's tokens on the device before the
        # host read them (so the host's work between two steps overlaps the device's): (batch, step) not read yet.
        self._ahead: tuple[list[EngineRequest], PendingDecode] | None = None
        self.decode_retries = 0  # batched decode steps that failed and were retried one request at a time
        self.preemptions = 0  # requests whose cache was dropped to make room, to be recomputed

    @classmethod
    def from_options(cls, options: EngineOptions) -> NativeEngine:
        from .model_loader import load_model

        model, tokenizer = load_model(options.model, options.resolved_device(), options.resolved_dtype())
        name = options.served_model_name or model.config.name or "model"
        return cls(model, tokenizer, options, name)

    def _served_context(self, model_len: int, sliding_window: int | None) -> int:
        """The context served: ``--max-model-len``, else the model's, capped to what one request can hold in the
        pool (a request that may use the whole context, as one without max_tokens does, must fit alone)."""
        length = self.options.max_model_len
        if length is None:
            length = min(int(model_len), self.scheduler.max_tokens_alone())
            if length < model_len:
                log.warning("the KV cache holds at most %d tokens for one request: serving that context instead "
                            "of the model's %d (raise --kv-cache-memory or set --max-model-len)", length, model_len)
        if sliding_window is not None and sliding_window < length:
            raise ValueError(
                f"this model uses a sliding window of {sliding_window} tokens, which the native engine does not "
                f"implement: it would attend over the whole context of {length} tokens. Serve it with "
                f"--max-model-len {sliding_window} (the window then never applies) or with --engine vllm")
        return length

    @staticmethod
    def _default_kv_memory(device: torch.device) -> int:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free // 2
        return 1 << 30

    # -- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sparse-serve-engine", daemon=True)
            self._thread.start()

    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._accepting

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting; let in-flight requests finish for up to ``timeout`` s, abort the rest, stop."""
        self._accepting = False
        await wait_drained(self._requests, timeout)
        for rid in list(self._requests):
            self._abort(rid)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None

    def stats(self) -> EngineStats:
        c = self.pool.counters()
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), c.usage, c.free_pages,
                           c.total_pages)

    # -- requests ---------------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Raise RequestRejected for a request this engine can never serve."""
        n, sp = len(request.prompt_token_ids), request.sampling
        if n == 0:
            raise RequestRejected("the prompt must contain at least one token", param="prompt")
        vocab = self.shape.vocab_size
        if any(t < 0 or t >= vocab for t in request.prompt_token_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if n + sp.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has {n} "
                f"tokens and max_tokens is {sp.max_tokens}", param="max_tokens", code="context_length_exceeded")
        decode = request.spec.decode
        if DECODE_METHODS[decode.method].selects_pages and decode.params["page_size"] != self.pool.page_size:
            raise RequestRejected(f"the native engine runs Quest on its KV page size ({self.pool.page_size})",
                                  param="sparse_pattern.decode.params.page_size")
        need = self.scheduler.need_alone(request)
        if need > self.pool.num_pages:
            raise RequestRejected(
                f"the request needs up to {need} KV pages but the pool has {self.pool.num_pages}; lower max_tokens "
                "or raise --kv-cache-memory", param="max_tokens", code="kv_cache_too_small")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        self.validate(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()

        def emit(out: GenerationOutput) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, out)

        req = EngineRequest(request, emit, SamplerState.for_params(request.sampling),
                            IncrementalDetokenizer(self.tokenizer, request.sampling.stop))
        with self._lock:
            if not self._accepting:
                raise EngineOverloaded("the server is shutting down", retry_after=5.0)
            if request.request_id in self._requests:
                raise RequestRejected(f"duplicate request id {request.request_id!r}", param="request_id")
            self.scheduler.add(req)
            self._requests[request.request_id] = req
            self._lock.notify_all()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:  # the consumer went away (client disconnect): free the request's pages
                self._abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return
            req.aborted = True
            if req in self.scheduler.waiting:  # never started: finish it here
                self._finish(req, "abort")
            self._lock.notify_all()

    # -- the loop ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():  # every tensor the loop makes or updates (pages, tables) is inference-only
            self._run_loop()

    def _run_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.scheduler.waiting and not self.scheduler.running:
                    self._lock.wait(0.5)
                if self._stopping and not self.scheduler.running:
                    return
            try:
                self._step()
            except Exception:  # a bug outside per-request isolation: fail what is running, keep the loop
                log.exception("engine step failed")
                self._ahead = None
                with self._lock:
                    for req in list(self.scheduler.running):
                        self._finish(req, "error", error="internal engine error")

    def _step(self) -> None:
        started = time.perf_counter()
        with self._lock:
            for req in [r for r in self.scheduler.running if r.aborted]:
                self._finish(req, "abort")
            self.scheduler.admit()
            pending = self.scheduler.next_prefill()
        if self._ahead is not None:  # read the step launched ahead (launching the next one first, if it can)
            batch, step = self._ahead
            self._ahead = None
            self._complete(batch, step)
            if self._ahead is not None or pending is None:
                self._pace_decode(started, pending)
                return
        if pending is not None:
            self._publish()
            self._prefill(pending)
        with self._lock:
            batch, preempted, spare = self.scheduler.decode_batch()
            for req in preempted:
                if req.output_ids:
                    self.preemptions += 1
                    log.info("preempted request %s: the KV pool is full; it resumes by recomputing %d tokens",
                             req.request_id, req.prompt_len + len(req.output_ids) - 1)
        if batch:
            self._decode(batch, spare)
            self._pace_decode(started, pending)
        else:
            self._publish()

    def _pace_decode(self, started: float, pending: EngineRequest | None) -> None:
        """Time an engine step that decoded and prefilled nothing: one decode step, launch to tokens (a step whose
        successor was launched ahead waited for its own tokens only), for the chunk pacer's budget."""
        if pending is None and self.scheduler.pacer is not None:
            self.scheduler.pacer.observe_decode_step(time.perf_counter() - started)

    def _prefill(self, req: EngineRequest) -> None:
        """Prefill the next chunk of a request's prompt; after its last chunk, sample the first token of a new
        request, or go on decoding a preempted one (its prompt cache rebuilt)."""
        resuming = bool(req.output_ids)
        if not resuming and req.prefill_pos == 0:
            req.timings.scheduled = time.monotonic()
        try:
            if req.kv is None:
                req.kv = self.runner.new_sequence()
            if req.prefill_pos == 0:
                req.prefill_dense = self.runner.prefill_runs_dense(req, self.scheduler.chunk_starts(req.request))
            start, end = req.prefill_pos, self.scheduler.prefill_end(req, req.prefill_dense)
            pacer = self.scheduler.pacer if req.prefill_dense else None
            paced = pacer is not None and self.scheduler.decoding()
            began = time.perf_counter()
            logits = self.runner.prefill(req, end)
            if paced:  # a dense chunk between decode steps: its device time sizes the next one
                self.runner.synchronize()
                pacer.observe_chunk(start, end, time.perf_counter() - began)  # type: ignore[union-attr]
            if logits is None:  # more chunks to come; decodes run in between
                return
            sp = req.request.sampling
            sampled = None if resuming or not sp.max_tokens else sample(logits, [sp], [req.sampler])[0]
        except Exception as exc:
            log.exception("prefill failed for request %s", req.request_id)
            with self._lock:
                self._finish(req, "error", error=f"prefill failed: {exc}")
            return
        with self._lock:
            req.prefilled = True
            if resuming:
                req.catch_up()
                return
            req.timings.first_token = time.monotonic()
            if sampled is None:  # max_tokens 0: the prompt (and its logprobs) is the whole answer
                self._finish(req, "length", last=GenerationOutput(
                    req.request_id, [], "", prompt_tokens=req.prompt_len, prompt_logprobs=req.prompt_logprobs))
            else:
                self._on_token(req, sampled.token_id, sampled.logprob)

    def _decode(self, batch: list[EngineRequest], spare_pages: int = 0, go_on: bool = True) -> None:
        try:
            step = self.runner.launch_decode(batch, spare_pages, greedy=self._greedy(batch))
        except Exception:
            self._retry_alone(batch)
            return
        self._complete(batch, step, go_on)

    @staticmethod
    def _greedy(batch: list[EngineRequest]) -> bool:
        """Every row of a step of ``batch`` samples a new token by the device's argmax (no row recomputes a known
        token, none samples or wants logprobs): its tokens can feed the next step on the device."""
        return all(r.samples_next for r in batch) and greedy_only([r.request.sampling for r in batch],
                                                                  [r.sampler for r in batch])

    def _complete(self, batch: list[EngineRequest], step: PendingDecode, go_on: bool = True) -> None:
        """Read a launched step and accept its tokens. Before reading a greedy step, when ``go_on`` and the next
        engine step would decode the same batch (no prefill due, nothing aborted, every request still running, the
        next step's pages free), launch that step from this one's tokens on the device: the host's work below
        then overlaps it. A request that ends with this step's token leaves a row of that step nobody reads."""
        if go_on and step.next_ids is not None:
            with self._lock:  # the next engine step would decode this batch again: no prefill due, all running
                room = None if self.scheduler.next_prefill() is not None or any(
                    r.aborted or r.request_id not in self._requests for r in batch) else self.scheduler.step_room(batch)
            if room is not None:
                try:
                    ahead = self.runner.launch_decode(batch, room, greedy=True, after=step)
                except Exception:  # nothing launched ahead: the next engine step launches it the usual way
                    log.warning("could not launch a decode step ahead", exc_info=True)
                else:
                    assert self._ahead is None, "one decode step ahead at most"
                    self._ahead = (batch, ahead)  # before this step's tokens: a request they end knows of it
        self._publish()  # the previous step's outputs, while this step (and the one ahead) run on the device
        with self._lock:
            live = [i for i, r in enumerate(batch) if r.request_id in self._requests and not r.aborted]
        rows = [i for i in step.sampling_rows if i in live]
        try:
            step.settle(live)
            if step.next_ids is not None:
                tokens = step.tokens()
                sampled = [Sampled(tokens[i]) for i in rows]
            else:
                logits = step.logits()
                sampled = sample(logits[rows], [batch[i].request.sampling for i in rows],
                                 [batch[i].sampler for i in rows]) if rows else []
        except Exception:
            # no token of this step was accepted, nor of the step launched after it: undo both launches (each
            # advanced the requests' caches), or every retry would find no token to feed
            launched = 1 + (self._ahead is not None)
            self._ahead = None
            self._publish()
            again = [batch[i] for i in live]
            for req in again:
                req.rewind_decode(launched)
            self._retry_alone(again)
            return
        with self._lock:
            for i, token in zip(rows, sampled, strict=True):
                req = batch[i]
                if not req.aborted:
                    self._on_token(req, token.token_id, token.logprob, defer=True)
            for i in live:
                batch[i].catch_up()

    def _retry_alone(self, batch: list[EngineRequest]) -> None:
        """A batched decode step failed: run its requests one by one, so that a failing one ends alone."""
        self._publish()
        if not batch:
            return
        if len(batch) == 1:
            log.exception("decode failed for request %s", batch[0].request_id)
            with self._lock:
                self._finish(batch[0], "error", error="decode step failed")
            return
        log.warning("batched decode of %d requests failed; retrying one by one", len(batch), exc_info=True)
        self.decode_retries += 1
        for req in batch:  # isolate the failing request(s); the others go on (one step each, none ahead)
            self._decode([req], go_on=False)

    def _publish(self, only: EngineRequest | None = None) -> None:
        """Stream the accepted tokens not streamed yet (``only``: that request's)."""
        with self._lock:
            keep = [u for u in self._unpublished if only is not None and u[0] is not only]
            todo = [u for u in self._unpublished if only is None or u[0] is only]
            self._unpublished = keep
            for req, token, logprob in todo:
                if req.request_id in self._requests:
                    self._stream_token(req, token, logprob)

    # -- outputs (called with the lock held) ------------------------------------------------------------
    def _on_token(self, req: EngineRequest, token: int, logprob, defer: bool = False) -> None:
        """Accept a sampled token. ``defer``: a token that cannot end the request (no stop strings to look for,
        not a stop token, not the last) is streamed by the next :meth:`_publish`."""
        req.output_ids.append(token)
        if defer and self._token_end(req, token) is None and not req.detok.stop:
            self._unpublished.append((req, token, logprob))
        else:
            self._stream_token(req, token, logprob)

    def _token_end(self, req: EngineRequest, token: int) -> FinishReason | None:
        """How the request's latest token ``token`` ends it without looking at text: a stop token, or its last."""
        sp = req.request.sampling
        if token in self.stop_token_ids and not sp.ignore_eos or token in sp.stop_token_ids:
            return "stop"
        return "length" if len(req.output_ids) >= sp.max_tokens else None

    def _stream_token(self, req: EngineRequest, token: int, logprob) -> None:
        """Text and output of the request's token ``token`` (already in ``output_ids``); finish it if it ends."""
        reason = self._token_end(req, token)
        if reason == "stop":
            text = req.detok.flush()
        else:
            text, stopped = req.detok.add(token)
            if stopped:
                reason = "stop"
            elif reason == "length":
                text += req.detok.flush()
        out = GenerationOutput(req.request_id, [token], text, logprobs=[logprob] if logprob is not None else None,
                               prompt_tokens=req.prompt_len, completion_tokens=len(req.output_ids),
                               prompt_logprobs=req.prompt_logprobs if len(req.output_ids) == 1 else None)
        if reason is None:
            req.emit(out)
        else:
            self._finish(req, reason, last=out)

    def _finish(self, req: EngineRequest, reason: FinishReason, error: str | None = None,
                last: GenerationOutput | None = None) -> None:
        if req.request_id not in self._requests:
            return
        self._publish(only=req)  # what it generated before it ends
        del self._requests[req.request_id]
        self.scheduler.remove(req)  # first: whatever fails below, the request never runs again
        req.timings.finished = time.monotonic()
        try:  # a device that fails every call (a sticky CUDA error) must not cost the request its final output
            if req.kv is not None:
                tokens = int(req.kv.lengths.sum())
                if self._ahead is not None and any(r is req for r in self._ahead[0]):
                    tokens -= req.kv.lengths.numel()  # the step launched ahead appended a token it never accepted
                req.cost.decode.kv_cache_tokens = tokens
                req.kv.release()
            req.cost.settle()  # a prefill cut short leaves device scalars unread
        except Exception:
            log.exception("releasing request %s failed", req.request_id)
            if error is None:
                reason, error = "error", "internal engine error"
        out = last or GenerationOutput(req.request_id, [], "", prompt_tokens=req.prompt_len,
                                       completion_tokens=len(req.output_ids))
        out.finished, out.finish_reason, out.error = True, reason, error
        out.cost, out.timings = req.cost, req.timings
        req.emit(out)
