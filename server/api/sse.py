"""Server-sent events, and noticing a client that went away.

:class:`EventStreamResponse` sends ``data: {json}\\n\\n`` events from an async iterator while a second task
waits for ``http.disconnect``; when the client leaves first, the iterator is closed (its ``finally`` aborts
the engine requests) and ``on_disconnect`` runs. This does not depend on the ASGI server noticing the
disconnect only at the next write. :func:`run_unless_disconnected` does the same for a plain JSON response
still being computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
CLIENT_CLOSED = 499  # the status logged for a request whose client went away first (nginx's convention)


def encode_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStreamResponse(Response):
    """A ``text/event-stream`` response fed by ``events`` (already-encoded chunks)."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        *,
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
        headers: dict[str, str] | None = None,
        status_code: int = 200,
    ):
        self.events = events
        self.on_disconnect = on_disconnect
        self.status_code = status_code
        self.background = None
        self.init_headers({
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
            **{k.lower(): v for k, v in (headers or {}).items()},
        })

    async def _pump(self, send: Send) -> None:
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        })
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not pump.done():  # the client left (or we are being cancelled): stop generating
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump
                with contextlib.suppress(Exception):
                    await self.events.aclose()  # type: ignore[attr-defined]
                if self.on_disconnect is not None:
                    await asyncio.shield(self.on_disconnect())
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            exc = pump.exception()
            if not isinstance(exc, OSError):
                raise exc  # type: ignore[misc]


async def run_unless_disconnected(receive: Receive, work: Awaitable[T],
                                  on_disconnect: Callable[[], Awaitable[None]]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it, run ``on_disconnect`` and raise
    :class:`ClientDisconnected`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await asyncio.shield(on_disconnect())
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
