"""HTTP client for sparse-serve (and any OpenAI-compatible server): completions, chat, streaming, tokenize.

    from clients.client import SparseClient, HttpTokenCounter

    with SparseClient("http://127.0.0.1:8000", api_key=None) as c:
        r = c.chat([{"role": "user", "content": "Hi"}], max_tokens=16, temperature=0,
                   sparse_pattern="vertical_slash:8+quest:20")
        print(r.text, r.usage.completion_tokens, r.sparse.prefill.achieved_compression_ratio)
        for chunk in c.chat_stream([{"role": "user", "content": "Hi"}], max_tokens=16):
            print(chunk.text, end="")
        n = HttpTokenCounter(c).count("a prompt")      # the TokenCounter protocol of clients.tasks

`AsyncSparseClient` has the same methods as coroutines (streams are async iterators).

Retries: 429 and 503 answers (and connection failures, where nothing reached the server) are retried up to
`max_retries` times. The wait before retry k (k = 0, 1, ...) is the server's `Retry-After` when it sent one
(seconds or an HTTP date, capped at `max_retry_after`), else `backoff_base * 2**k` capped at `backoff_max`,
with up to 10% jitter. A stream is retried only before its first event. Anything else raises `APIError` (or a
subclass) carrying the HTTP status and the server's `message`, `type`, `param` and `code`.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import random
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self

import httpx

__all__ = [
    "APIError", "AuthenticationError", "BadRequestError", "NotFoundError", "RateLimitError",
    "ServiceUnavailableError", "ServerError", "APIConnectionError", "APITimeoutError", "StreamError",
    "Usage", "PrefillReport", "DecodeReport", "SparseReport", "Choice", "CompletionResult", "StreamChunk",
    "TokenizeResult", "SparseClient", "AsyncSparseClient", "HttpTokenCounter", "SSEDecoder",
    "parse_retry_after", "RETRY_STATUSES", "RetryPolicy",
]

RETRY_STATUSES = frozenset({429, 503})
DEFAULT_TIMEOUT = 600.0
_STREAM_HEADERS = {"Accept": "text/event-stream"}


# ============================================================================================== errors
class APIError(Exception):
    """A request that failed. `status` is the HTTP status (None for transport failures and errors sent
    inside a stream after it started); `type`, `param`, `code` come from the server's error object."""

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None, retry_after: float | None = None,
                 body: Any = None):
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.body = body
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [f"HTTP {self.status}" if self.status is not None else type(self).__name__]
        extra = ", ".join(f"{k}={v}" for k, v in (("param", self.param), ("code", self.code)) if v)
        return f"{parts[0]}: {self.message}" + (f" ({extra})" if extra else "")


class BadRequestError(APIError):
    """400: invalid request (a bad field, an unknown sparse pattern, context_length_exceeded, ...)."""


class AuthenticationError(APIError):
    """401: missing or wrong API key."""


class NotFoundError(APIError):
    """404: unknown model or route."""


class RateLimitError(APIError):
    """429: the server's waiting queue is full (retried automatically up to max_retries)."""


class ServiceUnavailableError(APIError):
    """503: overloaded or shutting down (retried automatically up to max_retries)."""


class ServerError(APIError):
    """5xx other than 503."""


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The request took longer than the client's timeout."""


class StreamError(APIError):
    """An error event sent inside a stream after it started (`data: {"error": {...}}`)."""


_STATUS_ERRORS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 429: RateLimitError,
    503: ServiceUnavailableError,
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    if secs != secs or secs in (float("inf"), float("-inf")):
        return None
    return max(0.0, secs)


def _error_from_payload(payload: Any, status: int | None, retry_after: float | None,
                        cls: type[APIError] | None = None) -> APIError:
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or "error")
        kw = {"type": err.get("type"), "param": err.get("param"), "code": err.get("code")}
    elif isinstance(err, str):
        message, kw = err, {}
    elif isinstance(payload, dict) and "detail" in payload:  # FastAPI-style servers
        message, kw = str(payload["detail"]), {}
    else:
        message, kw = (str(payload)[:500] if payload else f"HTTP {status}"), {}
    if cls is None:
        cls = _STATUS_ERRORS.get(status or 0) or (ServerError if status and status >= 500 else APIError)
    return cls(message, status=status, retry_after=retry_after, body=payload, **kw)


def _error_from_response(status: int, headers: Mapping[str, str], content: bytes) -> APIError:
    try:
        payload: Any = json.loads(content) if content else None
    except ValueError:
        payload = content.decode("utf-8", "replace")
    return _error_from_payload(payload, status, parse_retry_after(headers.get("retry-after")))


def _payload(resp: httpx.Response) -> Any:
    """A finished response's body: parsed JSON, else text; an error status raises its :class:`APIError`."""
    if resp.status_code >= 400:
        raise _error_from_response(resp.status_code, resp.headers, resp.content)
    try:
        return resp.json()
    except ValueError:
        return resp.text


def _transport_error(e: httpx.HTTPError) -> APIError:
    err: APIError
    if isinstance(e, httpx.TimeoutException):
        err = APITimeoutError(f"timed out: {e!r}")
    else:
        err = APIConnectionError(f"connection failed: {e!r}")
    # Nothing reached the server when the connection could not be opened, so trying again is safe.
    err.connect_failed = isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout))  # type: ignore[attr-defined]
    return err


# ========================================================================================= result types
def _f(d: Mapping[str, Any] | None, key: str, default: float = 0.0) -> float:
    v = (d or {}).get(key)
    return float(v) if isinstance(v, (int, float)) else default


def _scalars_from(cls: Any, d: Mapping[str, Any] | None) -> Any:
    """``cls`` (a dataclass of str / int / float fields, all with defaults) from a JSON object: a missing or
    mistyped number falls back to the field's default, a string field takes ``str`` of the value, an optional
    string (default None) the value when it is a string."""
    d = d or {}
    kw: dict[str, Any] = {}
    for f in fields(cls):
        if f.default is None:
            value = d.get(f.name)
            kw[f.name] = value if isinstance(value, str) else None
        elif isinstance(f.default, str):
            kw[f.name] = str(d.get(f.name, f.default))
        else:
            kw[f.name] = type(f.default)(_f(d, f.name, f.default))
    return cls(**kw)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Usage | None:
        return _scalars_from(cls, d) if d else None


@dataclass
class _PhaseReport:
    """What both phases report: the method that ran, its target and its achieved compression ratio."""

    method: str = "dense"
    target_compression_ratio: float = 1.0
    achieved_compression_ratio: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Self:
        return _scalars_from(cls, d)


@dataclass
class PrefillReport(_PhaseReport):
    attention_flops: float = 0.0
    dense_attention_flops: float = 0.0
    indexing_flops: float = 0.0
    fallback: str | None = None  # "dense": the method would not have paid at this length; dense attention ran


@dataclass
class DecodeReport(_PhaseReport):
    kv_bytes_read: float = 0.0
    dense_kv_bytes_read: float = 0.0
    metadata_bytes_read: float = 0.0
    kv_cache_tokens: int = 0


@dataclass
class AutoReport:
    """What `sparse_pattern: "auto"` chose for the request and why (present only when it asked for auto)."""

    requested: str = "auto"  # "auto" or "auto:<max_drop>"
    chosen: str = "dense"  # the pattern that ran, in the string grammar
    max_drop: float | None = None  # the budget applied
    prompt_tokens: int = 0
    band: dict[str, Any] | None = None  # {"min_tokens": .., "max_tokens": ..} of the policy band used
    predicted_drop: float | None = None  # of the chosen pattern, from the policy (None: dense or unmeasured)
    margin: float | None = None
    reason: str = ""
    policy: str = ""  # the policy file, or "built-in default"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> AutoReport | None:
        if not isinstance(d, Mapping):
            return None
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class SparseReport:
    """The server's cost report (docs/api.md, "The `sparse` response object")."""

    prefill: PrefillReport = field(default_factory=PrefillReport)
    decode: DecodeReport = field(default_factory=DecodeReport)
    model_flops: float = 0.0
    dense_model_flops: float = 0.0
    auto: AutoReport | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SparseReport | None:
        if not isinstance(d, Mapping):
            return None
        return cls(PrefillReport.from_dict(d.get("prefill")), DecodeReport.from_dict(d.get("decode")),
                   _f(d, "model_flops"), _f(d, "dense_model_flops"), AutoReport.from_dict(d.get("auto")))

    @property
    def pattern(self) -> str:
        """The pattern that ran, in the string grammar (e.g. `vertical_slash:8+quest:20`, `dense`)."""
        def one(method: str, ratio: float) -> str:
            return method if method == "dense" else f"{method}:{ratio:g}"
        p = one(self.prefill.method, self.prefill.target_compression_ratio)
        d = one(self.decode.method, self.decode.target_compression_ratio)
        if self.decode.method == "dense":
            return p
        return d if self.prefill.method == "dense" else f"{p}+{d}"


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: Any = None


@dataclass
class CompletionResult:
    """A finished completion or chat completion (also what a consumed stream adds up to)."""

    id: str
    model: str
    choices: list[Choice]
    usage: Usage | None
    sparse: SparseReport | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    latency: float = 0.0  # seconds from sending to the full answer
    ttft: float | None = None  # streams only: seconds to the first content
    attempts: int = 1  # HTTP attempts made (1 + retries)

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


@dataclass
class StreamChunk:
    """One event of a stream. `text` is the content delta of choice `index` ("" for role/usage-only events);
    the last event carries `usage` and `sparse` when the request asked for include_usage."""

    text: str = ""
    index: int = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    sparse: SparseReport | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    time: float = 0.0  # seconds since the request was sent


@dataclass
class TokenizeResult:
    tokens: list[int]
    count: int
    max_model_len: int | None = None


# ============================================================================================= SSE parsing
class SSEDecoder:
    """Incremental Server-Sent-Events parser: feed text lines, get the `data` payload of each event.

    Follows the SSE rules that matter here: `data:` lines (one optional space after the colon) of one event
    are joined with newlines; an empty line ends the event; `:` comment lines and other fields are ignored.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """The last event when the stream ended without its blank line."""
        return self.feed_line("")

    def iter_events(self, lines: Iterable[str]) -> Iterator[str]:
        for line in lines:
            ev = self.feed_line(line)
            if ev is not None:
                yield ev
        ev = self.flush()
        if ev is not None:
            yield ev


def _chunk_from_event(payload: dict[str, Any], chat: bool, elapsed: float) -> list[StreamChunk]:
    """StreamChunks of one decoded event (one per choice; one with text "" when there is no choice)."""
    if "error" in payload and "choices" not in payload:
        raise _error_from_payload(payload, None, None, StreamError)
    usage = Usage.from_dict(payload.get("usage"))
    sparse = SparseReport.from_dict(payload.get("sparse"))
    out = []
    for ch in payload.get("choices") or []:
        text = ((ch.get("delta") or {}).get("content") or "") if chat else (ch.get("text") or "")
        out.append(StreamChunk(text, int(ch.get("index", 0)), ch.get("finish_reason"), usage, sparse, payload,
                               elapsed))
    if not out:
        out.append(StreamChunk("", 0, None, usage, sparse, payload, elapsed))
    return out


class _EventReader:
    """The stream loop both clients share: SSE lines in, :class:`StreamChunk` lists out, up to ``[DONE]``.
    A malformed event (the last one too, when the stream ends without its blank line) is a StreamError."""

    def __init__(self, chat: bool, start: float) -> None:
        self.chat = chat
        self.start = start
        self.done = False
        self._sse = SSEDecoder()

    def feed(self, line: str) -> list[StreamChunk]:
        return self._event(self._sse.feed_line(line))

    def end(self) -> list[StreamChunk]:
        return self._event(self._sse.flush())

    def _event(self, data: str | None) -> list[StreamChunk]:
        if data is None or self.done:
            return []
        if data.strip() == "[DONE]":
            self.done = True
            return []
        try:
            payload = json.loads(data)
        except ValueError:
            raise StreamError(f"malformed stream event: {data[:200]!r}") from None
        return _chunk_from_event(payload, self.chat, time.perf_counter() - self.start)


class _StreamAccumulator:
    """Adds stream chunks up into a CompletionResult."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.texts: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.usage: Usage | None = None
        self.sparse: SparseReport | None = None
        self.id = ""
        self.model = ""
        self.ttft: float | None = None

    def add(self, c: StreamChunk) -> None:
        self.id = self.id or str(c.raw.get("id", ""))
        self.model = self.model or str(c.raw.get("model", ""))
        if c.raw.get("choices"):
            self.texts.setdefault(c.index, [])
        if c.text:
            self.texts.setdefault(c.index, []).append(c.text)
            if self.ttft is None:
                self.ttft = c.time
        if c.finish_reason is not None:
            self.finish[c.index] = c.finish_reason
        if c.usage is not None:
            self.usage = c.usage
        if c.sparse is not None:
            self.sparse = c.sparse

    def result(self, attempts: int) -> CompletionResult:
        choices = [Choice(i, "".join(self.texts[i]), self.finish.get(i)) for i in sorted(self.texts)]
        return CompletionResult(self.id, self.model, choices, self.usage, self.sparse, {},
                                time.perf_counter() - self.start, self.ttft, attempts)


def _parse_result(payload: dict[str, Any], chat: bool, latency: float, attempts: int) -> CompletionResult:
    choices = []
    for ch in payload.get("choices") or []:
        text = ((ch.get("message") or {}).get("content") or "") if chat else (ch.get("text") or "")
        choices.append(Choice(int(ch.get("index", 0)), text, ch.get("finish_reason"), ch.get("logprobs")))
    return CompletionResult(str(payload.get("id", "")), str(payload.get("model", "")), choices,
                            Usage.from_dict(payload.get("usage")), SparseReport.from_dict(payload.get("sparse")),
                            payload, latency, None, attempts)


# ============================================================================================ the clients
@dataclass(frozen=True)
class RetryPolicy:
    """Which failed requests are tried again and how long to wait first (the module docstring says how)."""

    max_retries: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0
    retry_connect_errors: bool = True
    _rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        delay = min(self.backoff_max, self.backoff_base * (2 ** attempt))
        return delay * (1 + 0.1 * self._rng.random())

    def wait(self, exc: httpx.HTTPError | APIError, attempt: int) -> float:
        """Seconds to wait before trying again after attempt `attempt` failed with `exc`; raises the error instead
        when it is not retried: not a 429/503 or a refused connection, retries used up, or a failure after a
        stream started (an error without a status)."""
        if isinstance(exc, httpx.HTTPError):
            err = _transport_error(exc)
        elif exc.status is None:
            raise exc
        else:
            err = exc
        retry = err.status in RETRY_STATUSES or (self.retry_connect_errors and getattr(err, "connect_failed", False))
        if attempt >= self.max_retries or not retry:
            raise err
        return self.delay(attempt, err.retry_after)


class _Base:
    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT, max_retries: int = 4,
                 backoff_base: float = 0.5, backoff_max: float = 30.0, max_retry_after: float = 120.0,
                 headers: Mapping[str, str] | None = None, retry_connect_errors: bool = True):
        self.retry = RetryPolicy(max_retries, backoff_base, backoff_max, max_retry_after, retry_connect_errors)
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self._headers = {"Accept": "application/json", "User-Agent": "sparse-serve-client/0.1"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._headers.update(headers or {})

    # ------------------------------------------------------------------------------------ request bodies
    def _body(self, base: dict[str, Any], *, model: str | None, sparse_pattern: str | Mapping[str, Any] | None,
              compression_ratio: float | None, extra: Mapping[str, Any]) -> dict[str, Any]:
        body = dict(base)
        m = model or self.model
        if m:
            body["model"] = m
        if sparse_pattern is not None:
            body["sparse_pattern"] = sparse_pattern if isinstance(sparse_pattern, str) else dict(sparse_pattern)
        if compression_ratio is not None:
            body["compression_ratio"] = compression_ratio
        for k, v in extra.items():
            if v is not None:
                body[k] = v
        return body

    @staticmethod
    def _stream_body(body: dict[str, Any], include_usage: bool) -> dict[str, Any]:
        body = dict(body, stream=True)
        if include_usage:
            opts = dict(body.get("stream_options") or {})
            opts["include_usage"] = True
            body["stream_options"] = opts
        return body

    def _completion_body(self, prompt: Any, kw: dict[str, Any]) -> dict[str, Any]:
        model, sp, cr = kw.pop("model", None), kw.pop("sparse_pattern", None), kw.pop("compression_ratio", None)
        return self._body({"prompt": prompt}, model=model, sparse_pattern=sp, compression_ratio=cr, extra=kw)

    def _chat_body(self, messages: Any, kw: dict[str, Any]) -> dict[str, Any]:
        model, sp, cr = kw.pop("model", None), kw.pop("sparse_pattern", None), kw.pop("compression_ratio", None)
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        return self._body({"messages": msgs}, model=model, sparse_pattern=sp, compression_ratio=cr, extra=kw)

    @staticmethod
    def _tokenize_body(prompt: str | None, messages: Any, add_generation_prompt: bool,
                       add_special_tokens: bool | None, model: str | None) -> dict[str, Any]:
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        body: dict[str, Any] = {}
        if model:
            body["model"] = model
        if messages is not None:
            body["messages"] = list(messages)
            body["add_generation_prompt"] = add_generation_prompt
        else:
            body["prompt"] = prompt
            if add_special_tokens is not None:
                body["add_special_tokens"] = add_special_tokens
        return body

    @staticmethod
    def _detokenize_body(tokens: list[int], model: str | None) -> dict[str, Any]:
        return {"tokens": list(tokens), **({"model": model} if model else {})}

    @staticmethod
    def _tokenize_result(d: Mapping[str, Any]) -> TokenizeResult:
        tokens = list(d.get("tokens") or [])
        return TokenizeResult(tokens, int(d.get("count", len(tokens))), d.get("max_model_len"))


class SparseClient(_Base):
    """Synchronous client. Thread-safe (one pooled httpx.Client); use as a context manager or call close()."""

    def __init__(self, base_url: str, *, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep, **kwargs: Any):
        super().__init__(base_url, **kwargs)
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self.timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SparseClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --------------------------------------------------------------------------------------- transport
    def _request(self, method: str, path: str, body: Any = None) -> tuple[Any, int]:
        attempt = 0
        while True:
            try:
                return _payload(self._http.request(method, path, json=body)), attempt + 1
            except (httpx.HTTPError, APIError) as e:
                delay = self.retry.wait(e, attempt)
            self._sleep(delay)
            attempt += 1

    def _stream(self, path: str, body: dict[str, Any], chat: bool) -> Iterator[StreamChunk]:
        attempt = 0
        while True:
            reader = _EventReader(chat, time.perf_counter())
            try:
                with self._http.stream("POST", path, json=body, headers=_STREAM_HEADERS) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        raise _error_from_response(resp.status_code, resp.headers, resp.content)
                    try:
                        for line in resp.iter_lines():
                            yield from reader.feed(line)
                            if reader.done:
                                return
                        yield from reader.end()
                    except httpx.HTTPError as e:  # after the stream started: never retried
                        raise _transport_error(e) from e
                    return
            except (httpx.HTTPError, APIError) as e:
                delay = self.retry.wait(e, attempt)
            self._sleep(delay)
            attempt += 1

    def _result(self, path: str, body: dict[str, Any], chat: bool) -> CompletionResult:
        t0 = time.perf_counter()
        payload, attempts = self._request("POST", path, body)
        return _parse_result(payload, chat, time.perf_counter() - t0, attempts)

    # --------------------------------------------------------------------------------------------- API
    def completions(self, prompt: Any, **kw: Any) -> CompletionResult:
        """POST /v1/completions. Keyword arguments are body fields (max_tokens, temperature, stop, seed, ...)
        plus `model`, `sparse_pattern` (string or object) and `compression_ratio`."""
        return self._result("/v1/completions", self._completion_body(prompt, kw), chat=False)

    def chat(self, messages: Any, **kw: Any) -> CompletionResult:
        """POST /v1/chat/completions; `messages` is a list of {role, content} or one user message string."""
        return self._result("/v1/chat/completions", self._chat_body(messages, kw), chat=True)

    def completions_stream(self, prompt: Any, *, include_usage: bool = True, **kw: Any) -> Iterator[StreamChunk]:
        return self._stream("/v1/completions", self._stream_body(self._completion_body(prompt, kw), include_usage),
                            chat=False)

    def chat_stream(self, messages: Any, *, include_usage: bool = True, **kw: Any) -> Iterator[StreamChunk]:
        return self._stream("/v1/chat/completions", self._stream_body(self._chat_body(messages, kw), include_usage),
                            chat=True)

    def collect(self, chunks: Iterable[StreamChunk]) -> CompletionResult:
        """Consume a stream into one CompletionResult (with ttft)."""
        acc = _StreamAccumulator(time.perf_counter())
        for c in chunks:
            acc.add(c)
        return acc.result(1)

    def tokenize(self, prompt: str | None = None, *, messages: Any = None, add_generation_prompt: bool = True,
                 add_special_tokens: bool | None = None, model: str | None = None) -> TokenizeResult:
        body = self._tokenize_body(prompt, messages, add_generation_prompt, add_special_tokens, model or self.model)
        return self._tokenize_result(self._request("POST", "/tokenize", body)[0])

    def detokenize(self, tokens: list[int], *, model: str | None = None) -> str:
        d, _ = self._request("POST", "/detokenize", self._detokenize_body(tokens, model or self.model))
        return str(d.get("prompt", ""))

    def models(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/models")[0].get("data") or [])

    def patterns(self) -> Any:
        return self._request("GET", "/v1/sparse/patterns")[0]

    def health(self) -> bool:
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not self.health():
            if time.monotonic() > deadline:
                raise APIConnectionError(f"{self.base_url}/health not ready after {timeout:.0f} s")
            time.sleep(interval)


class AsyncSparseClient(_Base):
    """asyncio client with the same methods as SparseClient (as coroutines; streams are async iterators)."""

    def __init__(self, base_url: str, *, transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Any] = asyncio.sleep, limits: httpx.Limits | None = None,
                 **kwargs: Any):
        super().__init__(base_url, **kwargs)
        self._sleep = sleep
        kw: dict[str, Any] = {"limits": limits} if limits is not None else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self.timeout,
                                       transport=transport, **kw)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSparseClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # --------------------------------------------------------------------------------------- transport
    # The same loops as SparseClient's, with awaits.
    async def _request(self, method: str, path: str, body: Any = None) -> tuple[Any, int]:
        attempt = 0
        while True:
            try:
                return _payload(await self._http.request(method, path, json=body)), attempt + 1
            except (httpx.HTTPError, APIError) as e:
                delay = self.retry.wait(e, attempt)
            await self._sleep(delay)
            attempt += 1

    async def _stream(self, path: str, body: dict[str, Any], chat: bool) -> AsyncIterator[StreamChunk]:
        attempt = 0
        while True:
            reader = _EventReader(chat, time.perf_counter())
            try:
                async with self._http.stream("POST", path, json=body, headers=_STREAM_HEADERS) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        raise _error_from_response(resp.status_code, resp.headers, resp.content)
                    try:
                        async for line in resp.aiter_lines():
                            for c in reader.feed(line):
                                yield c
                            if reader.done:
                                return
                        for c in reader.end():
                            yield c
                    except httpx.HTTPError as e:
                        raise _transport_error(e) from e
                    return
            except (httpx.HTTPError, APIError) as e:
                delay = self.retry.wait(e, attempt)
            await self._sleep(delay)
            attempt += 1

    async def _result(self, path: str, body: dict[str, Any], chat: bool) -> CompletionResult:
        t0 = time.perf_counter()
        payload, attempts = await self._request("POST", path, body)
        return _parse_result(payload, chat, time.perf_counter() - t0, attempts)

    # --------------------------------------------------------------------------------------------- API
    async def completions(self, prompt: Any, **kw: Any) -> CompletionResult:
        return await self._result("/v1/completions", self._completion_body(prompt, kw), chat=False)

    async def chat(self, messages: Any, **kw: Any) -> CompletionResult:
        return await self._result("/v1/chat/completions", self._chat_body(messages, kw), chat=True)

    def completions_stream(self, prompt: Any, *, include_usage: bool = True,
                           **kw: Any) -> AsyncIterator[StreamChunk]:
        return self._stream("/v1/completions", self._stream_body(self._completion_body(prompt, kw), include_usage),
                            chat=False)

    def chat_stream(self, messages: Any, *, include_usage: bool = True, **kw: Any) -> AsyncIterator[StreamChunk]:
        return self._stream("/v1/chat/completions", self._stream_body(self._chat_body(messages, kw), include_usage),
                            chat=True)

    async def collect(self, chunks: AsyncIterator[StreamChunk]) -> CompletionResult:
        acc = _StreamAccumulator(time.perf_counter())
        async for c in chunks:
            acc.add(c)
        return acc.result(1)

    async def tokenize(self, prompt: str | None = None, *, messages: Any = None, add_generation_prompt: bool = True,
                       add_special_tokens: bool | None = None, model: str | None = None) -> TokenizeResult:
        body = self._tokenize_body(prompt, messages, add_generation_prompt, add_special_tokens, model or self.model)
        return self._tokenize_result((await self._request("POST", "/tokenize", body))[0])

    async def detokenize(self, tokens: list[int], *, model: str | None = None) -> str:
        d, _ = await self._request("POST", "/detokenize", self._detokenize_body(tokens, model or self.model))
        return str(d.get("prompt", ""))

    async def models(self) -> list[dict[str, Any]]:
        return list((await self._request("GET", "/v1/models"))[0].get("data") or [])

    async def patterns(self) -> Any:
        return (await self._request("GET", "/v1/sparse/patterns"))[0]

    async def health(self) -> bool:
        try:
            return (await self._http.get("/health")).status_code == 200
        except httpx.HTTPError:
            return False


# =========================================================================================== token counter
class HttpTokenCounter:
    """`clients.tasks.TokenCounter` over the server's /tokenize: the prompt as one user turn, chat template
    applied with the generation prompt (optionally after a system message). Counts are cached (LRU, keyed by
    the prompt's SHA-1) because length fitting asks for the same texts repeatedly. Thread-safe."""

    def __init__(self, client: SparseClient, *, system_prompt: str | None = None, cache_size: int = 1024):
        self.client = client
        self.system_prompt = system_prompt
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()
        self.max_model_len: int | None = None
        self.requests = 0  # /tokenize calls made (cache misses)

    def messages(self, prompt: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": prompt}]

    def count(self, prompt: str) -> int:
        key = hashlib.sha1(prompt.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        r = self.client.tokenize(messages=self.messages(prompt), add_generation_prompt=True)
        with self._lock:
            self.requests += 1
            if r.max_model_len:
                self.max_model_len = int(r.max_model_len)
            self._cache[key] = r.count
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return r.count

