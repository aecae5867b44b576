"""In Ray Serve's HTTP proxy, in front of the replicas: the errors the proxy answers itself, in OpenAI's JSON shape.

The replicas answer every error as the single server does. The proxy answers a few on its own: a 500 when the
replica answering a request dies before its answer (it sends nothing at all: uvicorn's plain "Internal Server Error"
would reach the client), a 503 when no replica is up, a 408 when a request times out. :class:`ProxyErrors` turns
those into OpenAI's error objects, and tells them from the replicas' responses by :data:`REPLICA_HEADER`, which
every replica response carries. A stream whose replica dies midway ends, as the single server ends a stream that
fails, with an error event (no ``[DONE]``), rather than with a connection cut short. Ray Serve adds the middleware
to its proxy from the import path in ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (:data:`CALLBACK`), which
:mod:`~latentgraph.serve.replicas` sets for the Serve controller, whose proxies inherit it.

Light on purpose: the proxy process imports it, and has no use for torch.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

REPLICA_HEADER = "X-Latentgraph-Replica"  # names the replica that answered (so whose /metrics a scrape read)
CALLBACK = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": f"{__name__}:middlewares"}
REPLICA_DIED = ("the replica answering this request stopped before its answer (Ray Serve replaces it); retry the "
                "request")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


def middlewares() -> list:
    """What Ray Serve's proxy calls (through :data:`CALLBACK`) for the middleware it adds."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


class ProxyErrors:
    """Rewrites the proxy's own error responses as OpenAI's error objects; passes the replicas' through."""

    def __init__(self, app: Callable[..., Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        answered = stream = ended = False
        held: Message | None = None  # the start of an error of the proxy's own, held until its body is known
        body = b""

        async def sending(message: Message) -> None:
            nonlocal answered, stream, ended, held, body
            if message["type"] == "http.response.start":
                answered = True
                headers = {name.lower(): value for name, value in message.get("headers", [])}
                if message["status"] >= 400 and REPLICA_HEADER.lower().encode() not in headers:
                    held = message
                    return
                stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            if held is not None and message["type"] == "http.response.body":
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    await _send_error(send, held["status"], body.decode(errors="replace").strip(),
                                      [(name, value) for name, value in held.get("headers", [])
                                       if name.lower() == b"retry-after"])
                return
            await send(message)

        await self.app(scope, receive, sending)
        # the replica died (uvicorn drops what is sent here if the client has gone)
        if not answered:  # before its answer: the proxy sent nothing
            await _send_error(send, 500, REPLICA_DIED, [])
        elif stream and not ended:  # in the middle of a stream
            await send({"type": "http.response.body", "body": b"data: " + _error_body(500, REPLICA_DIED) + b"\n\n"})


def _error_body(status: int, message: str) -> bytes:
    """OpenAI's error object, as responses.error_body writes it (not imported: that module pulls in torch)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": message or f"error {status}", "type": kind, "param": None,
                                 "code": None}}).encode()


async def _send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = _error_body(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
