"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}} with the right status.

Every failure the API can report ends up here: our own :class:`APIError`, pydantic validation
errors (400), the engine's ``RequestError`` (400) and ``QueueFull`` (429 with Retry-After),
the adapter store's errors (their ``http_status``: 404 not found, 409 exists, 413 too large),
``AdapterError`` (400), Starlette's HTTP errors (404 unknown route, 405) and anything
unexpected (500, logged).
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.format import AdapterError
from adapters.store import AdapterNotFound, StoreError
from server.engine.request import EngineUnavailable, QueueFull, RequestError

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "request_too_large", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}
RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error with its HTTP status, reported to the client in the OpenAI shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def as_api_error(exc: Exception) -> APIError:
    """The APIError a known exception stands for (engine, store, adapter format); others are 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, EngineUnavailable):
        return APIError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, AdapterNotFound):
        return APIError(404, str(exc), param="adapter", code="adapter_not_found")
    if isinstance(exc, StoreError):
        return APIError(exc.http_status, str(exc))
    if isinstance(exc, (RequestError, AdapterError)):
        return APIError(400, str(exc))
    return APIError(500, "internal server error")


_BOUNDS = {"greater_than": ("gt", "greater than {}"), "greater_than_equal": ("ge", "at least {}"),
           "less_than": ("lt", "less than {}"), "less_than_equal": ("le", "at most {}")}


# what else bounds a field than its schema range (the engine checks it)
_BOUND_HINTS = {"max_tokens": "and, with the prompt, fit the model's context",
                "max_completion_tokens": "and, with the prompt, fit the model's context",
                "tokens": "and name a token of the model's vocabulary"}


def _bound_message(error: dict) -> str | None:
    """'top_k: 10**30 is out of range; it must be at most 1048576' for pydantic's numeric bound errors."""
    bound = _BOUNDS.get(error.get("type", ""))
    value = (error.get("ctx") or {}).get(bound[0]) if bound else None
    if value is None:
        return None
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    field = next((part for part in reversed(error.get("loc", ())) if isinstance(part, str)), "")
    hint = _BOUND_HINTS.get(field)
    return f"{shown} is out of range; it must be {bound[1].format(value)}" + (f" {hint}" if hint else "")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = _bound_message(first) or str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not location and first.get("type") == "missing":
        message = "the request body is empty; send a JSON object"
    elif not location and first.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        message = "the request body must be a JSON object (Content-Type: application/json)"
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    async def _known(request: Request, exc: Exception):
        error = as_api_error(exc)
        return error_response(error.status, error.message, error.param, error.code, error.headers)

    for exc_type in (APIError, RequestError, QueueFull, EngineUnavailable, StoreError, AdapterError):
        app.add_exception_handler(exc_type, _known)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")
