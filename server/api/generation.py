"""Running one HTTP request's engine requests (one per prompt and choice) and merging their outputs.

:class:`GenerationRun` starts every engine request in its own task and merges their deltas into one
queue. Admission errors (``EngineOverloaded``, ``RequestRejected``) surface before a stream starts
(:meth:`GenerationRun.wait_started`), so they can still become a 429/400 status. Whatever happens to the
HTTP side (client gone, handler cancelled, shutdown), :meth:`GenerationRun.abort` aborts every unfinished
engine request so the engine frees its KV pages, and each engine request is recorded in the metrics once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.contract.engine import Engine, EngineOverloaded, GenerationOutput, GenerationRequest, RequestRejected

from .errors import APIError, bad_request, overloaded

logger = logging.getLogger("sparse_serve.api")


class _Ended:
    """The engine's iterator ended without a finished output."""


class _Cut:
    """The server shut down before the request finished (see :meth:`GenerationRun.cut`)."""


@dataclass
class ChoiceState:
    index: int
    request: GenerationRequest
    outputs_seen: int = 0
    finished: bool = False
    final: GenerationOutput | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    recorded: bool = False
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


def engine_error(exc: BaseException, overload_status: int = 429) -> APIError:
    """An exception from ``engine.generate`` as the HTTP error it should become."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloaded):
        return overloaded(str(exc) or "the server is overloaded; retry later", exc.retry_after, overload_status)
    if isinstance(exc, RequestRejected):
        return bad_request(str(exc), param=exc.param, code=exc.code)
    logger.error("engine failure: %r", exc, exc_info=exc)
    return APIError(500, f"the engine failed the request: {type(exc).__name__}", code="engine_error")


_Item = tuple[int, GenerationOutput | None, BaseException | type[_Ended] | type[_Cut] | None]


class GenerationRun:
    """Engine requests of one HTTP request; iterate to get ``(choice index, output)`` pairs."""

    def __init__(
        self,
        engine: Engine,
        requests: list[GenerationRequest],
        *,
        on_finished: Callable[[ChoiceState, str], None] | None = None,
        overload_status: int = 429,
        registry: set[GenerationRun] | None = None,
    ):
        self.engine = engine
        self.registry = registry if registry is not None else set()  # the runs in flight; this one while it is
        self.choices = [ChoiceState(i, r) for i, r in enumerate(requests)]
        self.on_finished = on_finished
        self.overload_status = overload_status
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._buffer: list[_Item] = []
        self._aborted = False

    # -- producing -------------------------------------------------------------------------------------

    def start(self) -> None:
        self.registry.add(self)
        for st in self.choices:
            self._tasks.append(asyncio.create_task(self._produce(st), name=f"gen-{st.request.request_id}"))

    async def _produce(self, st: ChoiceState) -> None:
        try:
            async for out in self.engine.generate(st.request):
                self._queue.put_nowait((st.index, out, None))
                if out.finished:
                    return
            self._queue.put_nowait((st.index, None, _Ended))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is reported to the consumer
            self._queue.put_nowait((st.index, None, exc))

    # -- consuming -------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return all(c.finished for c in self.choices)

    async def wait_started(self) -> None:
        """Wait until every engine request produced its first output (admitted and prefilled) or failed.

        An admission failure aborts the others and raises the :class:`APIError` it maps to, so the caller
        can still answer with a status code instead of a started stream.
        """
        pending = {c.index for c in self.choices}
        while pending:
            item = await self._queue.get()
            self._buffer.append(item)
            idx, out, exc = item
            if exc is not None:
                await self._fail(idx, exc)
            pending.discard(idx)

    async def _fail(self, idx: int, exc: BaseException | type[_Ended] | type[_Cut]) -> None:
        """Record choice ``idx``'s failure, abort the rest and raise the failure's :class:`APIError`."""
        st = self.choices[idx]
        st.finished = True
        if exc is _Cut:
            err = APIError(503, "the server shut down before this request finished", code="server_shutdown")
            self._record(st, "abort")
        elif exc is _Ended:
            err = APIError(500, "the engine ended the request without finishing it", code="engine_error")
            self._record(st, "error")
        else:
            err = engine_error(exc, self.overload_status)  # type: ignore[arg-type]
            if isinstance(exc, (EngineOverloaded, RequestRejected)) or err.status < 500:
                st.recorded = True  # refused at admission: counted with the HTTP answer (.request_metrics)
            else:
                self._record(st, "error")
        await self.abort()
        raise err

    async def events(self) -> AsyncIterator[tuple[int, GenerationOutput]]:
        """Yield ``(choice index, delta)`` until every request finished; an engine failure raises
        :class:`APIError` (after aborting the rest)."""
        while not self.done:
            if self._buffer:
                item = self._buffer.pop(0)
            else:
                item = await self._queue.get()
            idx, out, exc = item
            st = self.choices[idx]
            if st.finished:
                continue
            if exc is not None:
                await self._fail(idx, exc)
            assert out is not None
            st.outputs_seen += 1
            st.prompt_tokens = out.prompt_tokens or st.prompt_tokens
            st.completion_tokens = max(st.completion_tokens, out.completion_tokens)
            if st.first_token_at is None and out.token_ids:
                st.first_token_at = time.monotonic()
            if out.finished:
                st.finished = True
                st.final = out
                if out.finish_reason == "error":
                    self._record(st, "error")
                    await self.abort()
                    raise APIError(500, f"the engine failed the request: {out.error or 'unknown error'}",
                                   code="engine_error")
                self._record(st, "abort" if out.finish_reason == "abort" else "ok")
            yield idx, out
        self.registry.discard(self)

    # -- ending ----------------------------------------------------------------------------------------

    def cut(self) -> None:
        """End every unfinished choice now because the server is shutting down: the consumer gets a 503
        :class:`APIError` (an error event in a stream), and the engine requests are aborted."""
        for st in self.choices:
            if not st.finished:
                self._queue.put_nowait((st.index, None, _Cut))

    async def abort(self) -> None:
        """Abort every unfinished engine request (idempotent; safe to call from ``finally``)."""
        if self._aborted:
            return
        self._aborted = True
        self.registry.discard(self)
        for st in self.choices:
            if not st.finished:
                try:
                    await self.engine.abort(st.request.request_id)
                except Exception:  # noqa: BLE001
                    logger.warning("aborting %s failed", st.request.request_id, exc_info=True)
                st.finished = True
                self._record(st, "abort")
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for task in self._tasks:
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled or already reported
                pass

    def _record(self, st: ChoiceState, status: str) -> None:
        if st.recorded:
            return
        st.recorded = True
        if self.on_finished is not None:
            try:
                self.on_finished(st, status)
            except Exception:  # noqa: BLE001 - metrics never fail a request
                logger.warning("recording metrics failed", exc_info=True)
