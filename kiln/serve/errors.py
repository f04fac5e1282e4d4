"""Every error leaves the server in one envelope: {"error": {"message", "type", "param", "code"}}.

Validation errors (FastAPI's 422) become 400; messages name the field and never show server paths.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    InvalidRequestError,
    RequestFailedError,
)

logger = logging.getLogger("kiln.serve")

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
UNAVAILABLE = "service_unavailable_error"
INTERNAL = "internal_server_error"


class APIError(Exception):
    """An error with its HTTP status and envelope fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def unsupported(field: str, what: str = "") -> APIError:
    detail = f" ({what})" if what else ""
    return APIError(
        400,
        f"'{field}' is not supported by kiln yet{detail}; remove it from the request.",
        INVALID_REQUEST,
        field,
        "unsupported_parameter",
    )


def from_engine_error(e: BaseException, param_map: dict[str, str] | None = None) -> APIError:
    """Map an exception raised by the engine (or SamplingParams) for one request to an APIError."""
    if isinstance(e, ContextLengthExceededError):
        return APIError(400, str(e), INVALID_REQUEST, e.param, "context_length_exceeded")
    if isinstance(e, InvalidRequestError):
        return APIError(400, _rename(str(e), param_map), INVALID_REQUEST, _map_param(e.param, param_map))
    if isinstance(e, EngineDeadError):
        return APIError(
            500, "The engine stopped after a fatal error; restart the server.", INTERNAL, code="engine_dead"
        )
    if isinstance(e, RequestFailedError):
        return APIError(500, f"The request failed in the engine: {e}", INTERNAL, code="request_failed")
    if isinstance(e, ValueError):  # SamplingParams: the message starts with the field name
        m = re.match(r"([a-z_]+)", str(e))
        param = _map_param(m.group(1) if m else None, param_map)
        return APIError(400, _rename(str(e), param_map), INVALID_REQUEST, param)
    logger.exception("engine fault", exc_info=e)
    return APIError(500, "Internal error in the engine.", INTERNAL, code="internal_error")


def _map_param(param: str | None, param_map: dict[str, str] | None) -> str | None:
    if param is None or not param_map:
        return param
    return param_map.get(param, param)


def _rename(message: str, param_map: dict[str, str] | None) -> str:
    """The message in the fields the client sent (max_completion_tokens, not the engine's max_tokens)."""
    for ours, theirs in (param_map or {}).items():
        message = re.sub(rf"\b{re.escape(ours)}\b", theirs, message)
    return message


def _loc_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        if p.isdigit():
            out += f"[{p}]"
        elif "[" in p or p in ("str", "int", "float", "bool", "function-after", "function-before"):
            continue  # union member / validator labels say nothing to the caller
        else:
            out += ("." if out else "") + p
    return out


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for pydantic / FastAPI validation errors."""
    first = errors[0]
    kind = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"The request body is not valid JSON: {ctx.get('error', 'parse error')}.", None
    name = _loc_name(loc)
    top = next((str(p) for p in loc if p != "body"), None)
    if kind == "extra_forbidden":
        return (
            f"Unknown or unsupported field '{name}': kiln does not support it; remove it from the request.",
            top,
        )
    if kind == "missing":
        if not name:
            return "The request body is missing; send a JSON object.", None
        return f"Missing required field '{name}'.", top
    if kind in ("model_type", "model_attributes_type", "dict_type") and not name:
        return "The request body must be a JSON object.", None
    msg = str(first.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return (f"Invalid value for '{name}': {msg}." if name else f"Invalid request: {msg}."), top


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(req: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        ctype = req.headers.get("content-type", "")
        if param is None and ctype and "json" not in ctype:
            message = f"The body must be JSON sent with Content-Type: application/json (got {ctype!r})."
        return error_response(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            err = APIError(404, "Not found: no such route.", NOT_FOUND, code="not_found")
        elif status == 405:
            err = APIError(
                405, "Method not allowed on this route.", INVALID_REQUEST, code="method_not_allowed"
            )
        else:
            detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
            err = APIError(status, detail, INVALID_REQUEST if status < 500 else INTERNAL)
        return error_response(err, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(APIError(500, "Internal server error.", INTERNAL, code="internal_error"))
