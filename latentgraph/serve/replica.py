"""One copy of the system on a Ray Serve replica: the deployment class behind ``latentgraph serve --replicas N``.

Its HTTP ingress is the single server's app (:func:`~latentgraph.serve.app.create_app`): the same routes,
errors, API key, body limit, CORS and metrics, and an engine thread of its own that batches the requests this
replica gets. It receives the system *choice* (the style name, folder or file, and how to load it), not a loaded
system, and loads its copy in its constructor, so that Ray Serve sends it requests only once it can answer them.

Needs Ray Serve (``pip install "latentgraph[replicas]"``); :mod:`~latentgraph.serve.replicas` deploys it.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve

from ..cli_system import load
from ..core.system import System
from ..errors import WorkerError
from .app import create_app
from .limits import Limits
from .middleware import ASGIApp, Receive, Scope, Send
from .proxy import REPLICA_HEADER


@serve.ingress()  # the app comes from __serve_build_asgi_app__, once the constructor has loaded the system
class Replica:
    """The app serving ``style`` (loaded with ``load_options`` by :func:`latentgraph.load`), one per replica."""

    async def __init__(self, style: str, load_options: dict[str, Any], *, name: str, limits: Limits,
                       api_key: str | None, cors_origins: Sequence[str], threads: int):
        torch.set_num_threads(threads)
        system = await asyncio.to_thread(_load_with_backbones, style, load_options)
        self.asgi = create_app(system, name=name, limits=limits, api_key=api_key, cors_origins=cors_origins)
        self.asgi.add_middleware(NamesReplica, replica=serve.get_replica_context().replica_tag)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.asgi

    async def check_health(self) -> None:
        """Healthy once the app's engine thread runs; Ray Serve replaces a replica whose check fails. Its first
        check, which Ray Serve waits for before routing to it, waits for the engine thread, which the app starts
        right after the constructor."""
        service = self.asgi.state.service
        while service.batcher is None and service.error is None:
            await asyncio.sleep(0.05)
        if service.error is not None:
            raise WorkerError(f"the system failed to load: {service.error}")


def _load_with_backbones(style: str, load_options: dict[str, Any]) -> System:
    system = load(style, **load_options)
    for agent in system.graph().agents.values():  # a nested system's too
        agent.backbone.load()  # here, so that a replica is ready only with its weights in memory
    return system


class NamesReplica:
    """Adds :data:`~latentgraph.serve.proxy.REPLICA_HEADER` to every response: which replica answered."""

    def __init__(self, app: ASGIApp, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def naming(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.lower().encode(), self.replica)]
            await send(message)

        await self.app(scope, receive, naming)
