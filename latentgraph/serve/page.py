"""The live page at ``/``, and the graph it draws at ``GET /v1/graph``.

The page is three static files shipped in the package (``static/``: plain HTML, JavaScript and CSS, nothing
loaded from elsewhere, no build step). It asks ``/v1/graph`` for the system's drawing, then streams answers
from ``/v1/chat/completions`` with the agents' events and lights each agent as it thinks, speaks and
delivers. The page and its files need no API key (they hold no data); ``/v1/graph``, like every ``/v1/``
route, does when the server has one, and the page sends the key its user enters.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import graphviz
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from starlette.staticfiles import StaticFiles

from ..core.render import MISSING_DOT, render

if TYPE_CHECKING:
    from ..core.plan import Plan
    from ..core.system import System
    from .service import Service

STATIC = Path(__file__).parent / "static"
# The page runs only its own files and talks only to this server.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_page_routes(app: FastAPI, service: Service) -> None:
    """``/`` (the page), ``/static/...`` (its files) and ``/v1/graph`` (the system it draws)."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/graph")
    async def graph() -> JSONResponse:
        batcher = service.ready()
        body = await asyncio.to_thread(graph_of, service.system, batcher.plan)
        limits = service.limits
        body["model"] = service.name
        body["limits"] = {"max_tokens_cap": limits.max_tokens_cap,
                          "default_max_tokens": min(limits.default_max_tokens, limits.max_tokens_cap)}
        return JSONResponse(body)


def graph_of(system: System, plan: Plan) -> dict[str, Any]:
    """The system as the page draws it: Graphviz's SVG of :func:`~latentgraph.render` (None when the ``dot``
    program is missing, with ``note`` saying why; the page then lays the graph out itself from ``agents`` and
    ``edges``), its DOT source, and the turns each round takes in order."""
    diagram = render(system)
    try:
        svg = diagram.pipe(format="svg", encoding="utf-8")
        svg, note = svg[svg.index("<svg"):], None  # without the XML prolog: the page puts it inside its HTML
    except graphviz.ExecutableNotFound:
        svg, note = None, MISSING_DOT
    network = system.to_networkx()
    return {
        "agents": [{"name": name, **node} for name, node in network.nodes(data=True)],
        "edges": [{"src": src, "dst": dst, **edge} for src, dst, edge in network.edges(data=True)],
        "answer": plan.answer,
        "rounds": plan.rounds,
        "turns": [[turn.name for turn in turns] for turns in plan.turns],
        "svg": svg,
        "dot": diagram.source,
        "note": note,
    }
