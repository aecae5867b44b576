"""What every request passes before it reaches a route: its count and latency, its API key, its body size.

Plain ASGI middleware, so that a request is refused before its body is read (a wrong key), or while it is
read (a body over the limit, whatever its ``Content-Length`` says).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .metrics import ServerMetrics
from .responses import error_body

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED = ("/v1/", "/metrics")  # what needs the API key; /health stays open for load balancers
COUNTED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


async def send_error(send: Send, status: int, message: str, *, code: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
    """An error response in OpenAI's shape."""
    body = json.dumps(error_body(message, status=status, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Counts each request by path and status, and observes its latency (to the end of its response)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # the status if the app fails before it answers

        async def sending(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"]
            label = path if path in COUNTED_PATHS else "/v1/models/{model}" if path.startswith("/v1/models/") \
                else "other"
            self.metrics.requests.inc(path=label, status=str(status))
            self.metrics.latency.observe(time.perf_counter() - start)


class BearerAuth:
    """With an API key set, the protected paths need ``Authorization: Bearer <key>`` (compared in constant
    time); 401 otherwise. CORS preflights (OPTIONS) carry no key and pass."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                return await send_error(send, 401, "missing or wrong API key: send the header 'Authorization: "
                                                   "Bearer <key>' with the server's key", code="invalid_api_key",
                                        headers={"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class BodyLimit:
    """Reads a request's body up to ``max_bytes`` (413 beyond), then hands it on to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = (f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                     "(--max-body-bytes); send a shorter request")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, 413, too_large, code="request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await send_error(send, 413, too_large, code="request_too_large")
            if not message.get("more_body", False):
                break
        body, handed = b"".join(chunks), False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal handed
            if handed:
                return await receive()  # after the body: the disconnect, when it comes
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
