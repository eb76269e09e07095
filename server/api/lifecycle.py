"""The serving process's start and end, around the app.

* :class:`StartupGate` - the ASGI app uvicorn serves from the moment the port is bound: it answers 503
  ``starting`` while the engine loads (minutes for a large model) instead of leaving the port refusing
  connections, then hands every request to the real app.
* :func:`drain` - a graceful shutdown's first half, while the port still answers (503 to new work and to
  ``/health``): in-flight generation requests get up to the shutdown timeout to finish; at the deadline those
  left are cut, each ending as an HTTP response should (a stream with an error event and ``[DONE]``, a
  non-streaming request with a 503 body). Only then is the server told to close connections, so its own
  graceful timeout never fires on a request that is still producing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from .context import ServerContext
from .errors import APIError, raw_error_response

logger = logging.getLogger("sparse_serve")

FLUSH_SECONDS = 5.0  # after cutting: time for the cut responses to reach their clients
_POLL = 0.05


async def _wait_until_idle(ctx: ServerContext, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while ctx.open_generations and loop.time() < deadline:
        await asyncio.sleep(_POLL)


async def drain(ctx: ServerContext, timeout: float) -> int:
    """Stop admitting, let generation requests finish for up to ``timeout`` seconds, cut the rest; returns how
    many HTTP requests were cut."""
    ctx.draining = True
    await _wait_until_idle(ctx, timeout)
    if not ctx.open_generations:
        return 0
    ctx.cutting = True  # requests still being prepared are cut as soon as they start
    runs = list(ctx.runs)
    for run in runs:
        run.cut()
    await _wait_until_idle(ctx, FLUSH_SECONDS)
    return len(runs)


class StartupGate:
    """Serves 503 ``starting`` until ``load()`` (run in a thread: it loads the model) returns the real app,
    whose lifespan the gate then runs; ``on_failure`` is called if loading or starting fails."""

    def __init__(self, load: Callable[[], ASGIApp], on_failure: Callable[[BaseException], None]):
        self._load = load
        self._on_failure = on_failure
        self.app: ASGIApp | None = None
        self.error: BaseException | None = None
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._loading: asyncio.Future | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            err = APIError(503, "the server is starting (loading the model)", code="starting",
                           headers={"Retry-After": "5"})
            start, body = raw_error_response(503, err)
            await send(start)
            await send(body)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup: answered at once, so that uvicorn starts serving the port
        self._loading = asyncio.ensure_future(self._start(scope))
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        self._loading.cancel()
        with contextlib.suppress(BaseException):
            await self._loading
        if self.app is not None:
            await self._inbox.put({"type": "lifespan.shutdown"})
            await self._outbox.get()
        await send({"type": "lifespan.shutdown.complete"})

    async def _start(self, scope: Scope) -> None:
        try:
            app = await _in_daemon_thread(self._load)
            asyncio.ensure_future(app({**scope, "state": scope.get("state", {})}, self._inbox.get, self._outbox.put))
            await self._inbox.put({"type": "lifespan.startup"})
            reply = await self._outbox.get()
            if reply["type"] != "lifespan.startup.complete":
                raise RuntimeError(f"the app failed to start: {reply.get('message', '')}")
            self.app = app
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - reported to the caller, which stops the server
            self.error = e
            self._on_failure(e)


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a daemon thread: a shutdown during a long model load need not wait for it to finish."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def work() -> None:
        try:
            result, ok = fn(), True
        except BaseException as e:  # noqa: BLE001
            result, ok = e, False
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=work, name="sparse-serve-load", daemon=True).start()
    return await future
