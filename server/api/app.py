"""The FastAPI app factory and its ASGI middleware.

``create_app(engine, settings)`` serves any :class:`server.contract.engine.Engine`. Middleware, outermost first:

* :class:`RequestContextMiddleware` - ``X-Request-Id`` (echoed, or generated), one JSON access-log line per
  request (logger ``sparse_serve.access``), and each generation request's
  :class:`~.request_metrics.GenerationMetrics` (which counts it once its answer went out);
* :class:`AuthMiddleware` - ``Authorization: Bearer <key>`` when an API key is set (401 otherwise);
  ``/health``, ``/metrics`` and the API docs stay open;
* :class:`BodyLimitMiddleware` - 413 for a body over ``max_body_bytes`` (checked on ``Content-Length`` and
  while reading a chunked body) or with more JSON values than any servable request needs
  (:func:`.limits.body_shape_error`, before the app parses it); the body is buffered and replayed to the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.contract.engine import Engine
from server.metrics import ServerMetrics
from server.settings import ServerSettings

from .context import ServerContext
from .errors import APIError, install_error_handlers, raw_error_response
from .limits import body_shape_error
from .request_metrics import GenerationMetrics
from .routes_extra import router as extra_router
from .routes_openai import router as openai_router
from .sse import CLIENT_CLOSED

access_logger = logging.getLogger("sparse_serve.access")
logger = logging.getLogger("sparse_serve.api")

REQUEST_ID_HEADER = "x-request-id"
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, ctx: ServerContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID_OK.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["log_fields"] = {}
        start = time.perf_counter()
        status = 0
        sent = 0
        generation = scope.get("path") in GENERATION_PATHS
        if generation:
            self.ctx.open_generations += 1  # until the response is complete (a drain waits for these)
            state["generation_metrics"] = GenerationMetrics(self.ctx.metrics)

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # A fault no handler turned into a response: answer 500 here (keeping the request id), log it,
            # and let the server go on with other requests.
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if status == 0:
                err = APIError(500, "internal server error", code="internal_error")
                start_msg, body_msg = raw_error_response(500, err)
                with contextlib.suppress(Exception):
                    await send_wrapper(start_msg)
                    await send_wrapper(body_msg)
            status = status or 500
        finally:
            if generation:
                self.ctx.open_generations -= 1
            if state["log_fields"].get("client_disconnected"):
                status = CLIENT_CLOSED
            self._after(scope, state, status, sent, time.perf_counter() - start, request_id)

    def _after(self, scope: Scope, state: dict[str, Any], status: int, sent: int, elapsed: float,
               request_id: str) -> None:
        path = scope.get("path", "")
        if "generation_metrics" in state:
            try:
                state["generation_metrics"].http_finished(status)
            except Exception:  # noqa: BLE001 - metrics never fail a request
                logger.warning("recording a rejection failed", exc_info=True)
        if not self.ctx.settings.access_log or not access_logger.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        record = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": "access",
            "request_id": request_id,
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
            "bytes_sent": sent,
            "client": f"{client[0]}:{client[1]}" if client else None,
            "user_agent": _header(scope, b"user-agent"),
            **state.get("log_fields", {}),
        }
        access_logger.info(json.dumps(record, default=str))


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization")
        if given is not None:
            scheme, _, token = given.strip().partition(" ")
            given = f"{scheme.capitalize()} {token.strip()}" if scheme.lower() == "bearer" else given
        if given is None or not secrets.compare_digest(given.encode("latin-1", "replace"), self.expected):
            msg = "missing API key (send Authorization: Bearer <key>)" if given is None else "invalid API key"
            err = APIError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            start, body = raw_error_response(401, err)
            await send(start)
            await send(body)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, ctx: ServerContext):
        self.app = app
        self.ctx = ctx
        self.max_bytes = ctx.settings.max_body_bytes

    async def _reject(self, send: Send, err: APIError | None = None) -> None:
        err = err or APIError(413, f"the request body exceeds this server's limit of {self.max_bytes} bytes",
                              code="request_too_large")
        start, body = raw_error_response(err.status, err, [(b"connection", b"close")])
        await send(start)
        await send(body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_bytes:
                    await self._reject(send)
                    return
            except ValueError:
                pass
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        if len(chunks) > 1:  # a large body: let other requests run between the passes over it
            await asyncio.sleep(0)
        shape_error = body_shape_error(raw, self.ctx.engine.max_model_len, self.ctx.settings.max_choices)
        if len(chunks) > 1:
            await asyncio.sleep(0)
        if shape_error is not None:
            await self._reject(send, shape_error)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sparse-serve")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0+unknown"


def create_app(engine: Engine, settings: ServerSettings | None = None, *,
               metrics: ServerMetrics | None = None, manage_engine: bool = True) -> FastAPI:
    """An app serving ``engine``. With ``manage_engine`` the app's lifespan starts the engine and shuts it
    down (finishing in-flight requests for up to ``settings.shutdown_timeout`` seconds)."""
    settings = settings or ServerSettings()
    model_name = settings.served_model_name or engine.model_name
    ctx = ServerContext(
        engine=engine,
        settings=settings,
        metrics=metrics or ServerMetrics(model_name),
        model_name=model_name,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            ctx.draining = True
            ctx.close()
            if manage_engine:
                await engine.shutdown(timeout=settings.shutdown_timeout)

    app = FastAPI(
        title="sparse-serve",
        version=_version(),
        description="OpenAI-compatible inference with per-request training-free sparse attention.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(extra_router)
    # add_middleware wraps: the last added runs first.
    app.add_middleware(BodyLimitMiddleware, ctx=ctx)
    app.add_middleware(AuthMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestContextMiddleware, ctx=ctx)
    return app
