"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every status.

Handlers raise `APIError` (or one of the helpers below); the exception handlers installed by
`install_error_handlers` turn it, FastAPI's validation errors, Starlette's HTTP errors (unknown
route, wrong method) and anything unexpected into that shape, and count the failure.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.stores.base import StoreFull, StoreUnavailable

log = logging.getLogger("hope.server")

# status -> (OpenAI error type, failure reason for hope_request_failure_total)
_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "unauthorized"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "invalid_request"),
    409: ("conflict_error", "session_busy"),
    413: ("invalid_request_error", "too_large"),
    422: ("invalid_request_error", "invalid_request"),
    429: ("rate_limit_error", "overloaded"),
    500: ("server_error", "internal"),
    503: ("service_unavailable_error", "store_unavailable"),
}


# OpenAI's SDKs retry every 409, 429 and 5xx unless the answer says not to. Errors that a retry
# cannot fix (a name taken, a state of another checkpoint), or that a retry could make worse (a
# commit that may have landed, absorbed twice), say so.
NO_RETRY = {"x-should-retry": "false"}
TURN_SCOPE_KEY = "hope.turn"  # the request's turn on a session (server.sessions.Turn), once it has one


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        kind, default_reason = _KINDS.get(status, ("server_error", "internal"))
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or kind
        self.reason = reason or default_reason  # the label of hope_request_failure_total
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, param=param, code=code)


def too_large(message: str, param: str | None = None, code: str = "too_large") -> APIError:
    return APIError(413, message, param=param, code=code)


def overloaded(message: str, retry_after: int) -> APIError:
    return APIError(429, message, code="overloaded", headers={"Retry-After": str(retry_after)})


def store_unavailable(retry_after: int, full: bool = False) -> APIError:
    if full:  # counted as unavailable (it pages); the message tells the operator what to do
        return APIError(503, "the session store is full and refuses writes; nothing was stored",
                        code="store_full", reason="store_unavailable", headers={"Retry-After": str(retry_after)})
    return APIError(503, "the session store is unreachable; try again shortly", code="store_unavailable",
                    headers={"Retry-After": str(retry_after)})


def engine_unavailable(retry_after: int) -> APIError:
    return APIError(503, "the engine process stopped and is restarting; nothing was stored, try again shortly",
                    code="engine_unavailable", reason="engine_unavailable",
                    headers={"Retry-After": str(retry_after)})


def session_busy(message: str) -> APIError:
    return APIError(409, message, code="session_busy")


def _param_of(loc: tuple[Any, ...]) -> str | None:
    # pydantic names the member of a union it tried ("str", "list[TextPart]",
    # "function-after[...]"); a parameter's path holds field names and list indices only
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")
             and not (isinstance(p, str) and (p in _TYPE_NAMES or "[" in p))]
    return ".".join(parts) or None


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The message and parameter of a request's validation errors: the most specific error
    (the longest path: for a union, the member that got furthest), as OpenAI names one."""
    if not errors:
        return "invalid request", None
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc, kind = tuple(first.get("loc", ())), first.get("type")
    if kind == "json_invalid":
        return "the body is not valid JSON", None
    if loc == ("body",) and kind == "missing":
        return "the request has no body: send a JSON object (Content-Type: application/json)", None
    if loc == ("body",) and kind in ("model_attributes_type", "dict_type"):
        return "the body must be a JSON object, sent with Content-Type: application/json", None
    param = _param_of(loc)
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI, count_failure, retry_after: int,
                           authenticate: Callable[[Request], object] | None = None
                           ) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """`count_failure(request, reason)` is called once for every error answer. `authenticate`
    raises APIError for a request without a valid key: a malformed request is refused as
    unauthenticated first, as a well-formed one is, so the body's errors tell a caller without
    a key nothing. Returns the answer to an unexpected exception, a 500, for a middleware to give
    (server.app.LastAnswer): Starlette's own last-resort handler raises again after answering."""

    @app.exception_handler(StoreUnavailable)
    async def _store(request: Request, exc: StoreUnavailable) -> JSONResponse:
        full = isinstance(exc, StoreFull)
        log.warning("session store full" if full else "session store unreachable", extra={"error": str(exc)})
        err = store_unavailable(retry_after, full)
        count_failure(request, err.reason)
        return err.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        count_failure(request, exc.reason)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers malformed requests with 400 (not FastAPI's 422), naming the parameter
        if authenticate is not None:
            try:
                authenticate(request)
            except APIError as denied:
                count_failure(request, denied.reason)
                return denied.response()
        message, param = _validation_message(list(exc.errors()))
        err = APIError(400, message, param=param, code="invalid_value")
        count_failure(request, err.reason)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and authenticate is not None:  # a body FastAPI could not parse
            try:
                authenticate(request)
            except APIError as denied:
                count_failure(request, denied.reason)
                return denied.response()
        code = {400: "invalid_value", 404: "not_found"}.get(exc.status_code)
        err = APIError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {}))
        count_failure(request, err.reason)
        return err.response()

    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        if getattr(request.scope.get(TURN_SCOPE_KEY), "stored", False):  # a retry would absorb it twice
            err = APIError(500, "internal server error after this request was stored (the session absorbed "
                           "it); do not send it again", code="internal_error", headers=NO_RETRY)
        else:
            err = APIError(500, "internal server error", code="internal_error")
        count_failure(request, err.reason)
        return err.response()

    return _unexpected
