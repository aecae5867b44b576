"""In Ray Serve's HTTP proxy, in front of the replicas: the errors the proxy answers itself, in OpenAI's JSON shape.

The replicas answer every error as the single server does. The proxy answers a few on its own: a 500 when the
replica answering a request dies before its answer (it sends nothing at all: uvicorn's plain "Internal Server
Error" would reach the client), a 503 when no replica is up, a 408 when a request times out. :class:`ProxyErrors`
turns those into OpenAI's error objects, and tells them from the replicas' responses by :data:`REPLICA_HEADER`,
which every replica response carries. Ray Serve adds the middleware to its proxy from the import path
in ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (:data:`CALLBACK`), which :mod:`~latentgraph.serve.replicas`
sets for the Serve controller, whose proxies inherit it.

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
        answered = False
        held: Message | None = None  # the start of an error of the proxy's own, held until its body is known
        body = b""

        async def sending(message: Message) -> None:
            nonlocal answered, held, body
            if message["type"] == "http.response.start":
                answered = True
                names = {name.lower() for name, _ in message.get("headers", [])}
                if message["status"] >= 400 and REPLICA_HEADER.lower().encode() not in names:
                    held = message
                    return
            elif held is not None and message["type"] == "http.response.body":
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    await _send_error(send, held["status"], body.decode(errors="replace").strip(),
                                      [(name, value) for name, value in held.get("headers", [])
                                       if name.lower() == b"retry-after"])
                return
            await send(message)

        await self.app(scope, receive, sending)
        if not answered:  # the replica died: the proxy sent nothing (uvicorn ignores this if the client left)
            await _send_error(send, 500, REPLICA_DIED, [])


async def _send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    # OpenAI's error object, as responses.error_body writes it (not imported: that module pulls in torch)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps({"error": {"message": message or f"error {status}", "type": kind, "param": None,
                                 "code": None}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
