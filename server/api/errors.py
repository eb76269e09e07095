"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every failure the HTTP layer produces goes through :class:`APIError`; the handlers registered by
:func:`install_error_handlers` turn FastAPI's validation errors into 400 (never 422), unknown routes into 404,
and anything unexpected into a logged 500.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("sparse_serve.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(message: str, retry_after: float, status: int = 429) -> APIError:
    seconds = max(1, math.ceil(retry_after)) if math.isfinite(retry_after) else 1
    return APIError(status, message, code="server_overloaded", headers={"Retry-After": str(seconds)})


def unavailable(message: str, retry_after: int = 5) -> APIError:
    return APIError(503, message, code="service_unavailable", headers={"Retry-After": str(retry_after)})


def raw_error_response(status: int, err: APIError, extra_headers: list[tuple[bytes, bytes]] | None = None):
    """(start message, body message) for ASGI middleware that answers before the app runs."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    headers += extra_headers or []
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    )


_UNION_TAG_WORDS = {"str", "int", "float", "bool", "dict", "list", "none", "null", "tuple"}


def _is_union_tag(part: str) -> bool:
    return part in _UNION_TAG_WORDS or "[" in part or part.startswith(("function-", "constrained-", "json-or-"))


def loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"`` (union branch tags dropped)."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            if out:
                out += f"[{part}]"
            continue
        part = str(part)
        if _is_union_tag(part):
            continue
        out = f"{out}.{part}" if out else part
    return out or None


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error", "")
        return f"malformed JSON body{': ' + str(detail) if detail else ''}", None
    param = loc_to_param(first.get("loc", ()))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        msg = "field required"
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            err = APIError(404, f"route {request.method} {request.url.path} not found", code="not_found")
        elif status == 405:
            err = APIError(405, f"method {request.method} not allowed on {request.url.path}",
                           code="method_not_allowed")
        elif status == 400:
            err = bad_request(str(exc.detail) if exc.detail else "invalid request")
        else:
            err = APIError(status, str(exc.detail), type=_TYPES.get(status))
        if exc.headers:
            err.headers.update(exc.headers)
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error").response()
