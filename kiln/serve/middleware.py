"""ASGI middlewares: API-key check and request-body size limit (plain ASGI, so streaming is untouched)."""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.serve.errors import AUTHENTICATION, INVALID_REQUEST, error_body

OPEN_PATHS = frozenset({"/health"})


async def _send_error(
    send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": payload})


class ApiKeyMiddleware:
    """Every route but /health needs ``Authorization: Bearer <key>``.

    Keys are compared as SHA-256 digests with ``hmac.compare_digest``: constant time, and the length of
    the key does not leak either.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(api_key.encode("utf-8")).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                auth = value
                break
        scheme, _, token = auth.partition(b" ")
        given = hashlib.sha256(token.strip()).digest()
        ok = hmac.compare_digest(given, self._digest) and scheme.lower() == b"bearer"
        if not ok:
            message = (
                "Missing API key: send 'Authorization: Bearer <key>'."
                if not auth
                else "Incorrect API key provided."
            )
            await _send_error(
                send,
                401,
                error_body(message, AUTHENTICATION, None, "invalid_api_key"),
                [(b"www-authenticate", b"Bearer")],
            )
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Requests whose body exceeds ``max_bytes`` get 413, checked on Content-Length and while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> dict:
        return error_body(
            f"The request body is larger than this server's limit of {self.max_bytes} bytes.",
            INVALID_REQUEST,
            None,
            "request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_error(send, 413, self._error())
                    return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # Read the whole body first (bounded by the limit), then replay it to the app as one message.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client gone before the body arrived
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                await _send_error(send, 413, self._error())
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
