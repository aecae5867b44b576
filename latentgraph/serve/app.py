"""The HTTP API: an OpenAI-compatible FastAPI app that answers with a latentgraph system.

``create_app(load_system, name=...)`` returns the app. It loads the system in the background when it starts
(``GET /health`` is 503 until then), answers ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``
through one :class:`~latentgraph.serve.batcher.Batcher`, and reports ``/metrics``. Every error reaches the
client in OpenAI's JSON shape with its status. ``/`` is the live page, with ``/v1/graph`` (see
:mod:`~latentgraph.serve.page`), and a deployment can wrap the same app (Ray Serve's ``serve.ingress``, say).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from ..core.system import System
from ..errors import LatentGraphError, RequestError
from .batcher import Batcher, Failed, Item, Ticket
from .limits import Limits
from .metrics import ServerMetrics
from .middleware import BearerAuth, BodyLimit, RequestMetrics
from .page import add_page_routes
from .protocol import ChatRequest, CompletionRequest, job_of, parse, prompt_questions, question_of
from .responses import Reply, error_body, request_error_body, sse

logger = logging.getLogger("latentgraph.serve")
LOADING_RETRY = "5"  # seconds a client should wait while the system loads
CLIENT_GONE = 499  # the status (nginx's) counted for a request whose client went away before its answer


class Service:
    """The system behind the app, loaded in a thread, and its batcher once it is ready."""

    def __init__(self, load_system: Callable[[], System], name: str, limits: Limits):
        self.load_system, self.name, self.limits = load_system, name, limits
        self.metrics = ServerMetrics(queue_depth=lambda: self.batcher.depth if self.batcher else 0)
        self.system: System | None = None  # once loaded
        self.batcher: Batcher | None = None
        self.error: str | None = None  # why loading failed
        self.created = int(time.time())

    def start(self) -> None:
        threading.Thread(target=self._load, name="latentgraph-load", daemon=True).start()

    def _load(self) -> None:
        try:
            system = self.load_system()
            for agent in system.graph().agents.values():  # a nested system's too
                agent.backbone.load()  # now, not in the first request
            batcher = Batcher(system, self.limits, self.metrics)
        except Exception as e:  # reported by /health and to every request
            self.error = " ".join(str(e).split()) if isinstance(e, LatentGraphError) else repr(e)
            logger.error("the system could not be loaded: %s", self.error)
            return
        batcher.start()
        self.system, self.batcher = system, batcher

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()

    def ready(self) -> Batcher:
        """The batcher, or a 503 saying why there is none yet."""
        if self.batcher is not None:
            return self.batcher
        if self.error is not None:
            raise RequestError(f"the system failed to load: {self.error}", status=503)
        raise RequestError("the system is still loading; retry shortly", status=503,
                           headers={"Retry-After": LOADING_RETRY})


def create_app(load_system: System | Callable[[], System], *, name: str, limits: Limits | None = None,
               api_key: str | None = None, cors_origins: Sequence[str] = ()) -> FastAPI:
    """An OpenAI-compatible app serving a system under the model id ``name``. Serve a system from one app at a
    time: the app's engine thread must be the only one running it.

    Args:
        load_system: the system, or a function that loads it (run in a thread when the app starts).
        limits: batching and request limits (:class:`~latentgraph.serve.protocol.Limits`).
        api_key: when given, ``/v1/...`` and ``/metrics`` need ``Authorization: Bearer <api_key>``.
        cors_origins: origins browsers may call the API from; none by default (no CORS headers).
    """
    service = Service(load_system if callable(load_system) and not isinstance(load_system, System)
                      else lambda: load_system, name, limits or Limits())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        await asyncio.to_thread(service.stop)

    app = FastAPI(title="latentgraph", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _add_routes(app, service)
    add_page_routes(app, service)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestMetrics, metrics=service.metrics)  # added last: the outermost, it sees every status
    return app


def _add_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if service.batcher is not None:
            return JSONResponse({"status": "ok", "model": service.name})
        if service.error is not None:
            return JSONResponse({"status": "failed", "error": service.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": LOADING_RETRY})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    def model() -> dict:
        return {"id": service.name, "object": "model", "created": service.created, "owned_by": "latentgraph"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str) -> dict:
        _check_model(model_id, service.name, "model")
        return model()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _complete(request, service, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(request, service, chat=False)


def _check_model(model: str, name: str, param: str) -> None:
    if model != name:
        raise RequestError(f"the model '{model}' does not exist; this server serves '{name}' (see /v1/models)",
                           status=404, param=param, code="model_not_found")


async def _complete(request: Request, service: Service, *, chat: bool) -> Response:
    """Answer a chat or text completion, whole or streamed."""
    batcher = service.ready()
    parsed = parse(ChatRequest if chat else CompletionRequest, await request.body())
    _check_model(parsed.model, service.name, "model")
    questions = [question_of(parsed.messages)] if chat else prompt_questions(parsed.prompt)
    job = job_of(parsed, questions, service.limits)
    ticket = batcher.submit(job, asyncio.get_running_loop())
    watcher = asyncio.create_task(_cancel_on_disconnect(request, ticket))
    items = ticket.items()
    reply = Reply(job, service.name, chat=chat)
    try:
        first = await anext(items, None)  # admitted (the question fits), failed, or None: the client went away
        if isinstance(first, Failed):
            raise first.error
        if first is None:
            return Response(status_code=CLIENT_GONE)
        if job.stream:
            stream = _stream(reply, items, ticket, watcher)
            watcher = None  # the stream owns it now
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async for item in items:
            if isinstance(item, Failed):
                raise item.error
            reply.add(item)
        return JSONResponse(reply.whole()) if ticket.finished else Response(status_code=CLIENT_GONE)
    finally:
        if watcher is not None:
            _finish(ticket, watcher)


async def _stream(reply: Reply, items: AsyncIterator[Item], ticket: Ticket, watcher: asyncio.Task
                  ) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer; an error after the first chunk comes as an event."""
    try:
        for chunk in reply.opening():
            yield chunk
        async for item in items:
            if isinstance(item, Failed):
                yield sse(request_error_body(item.error))
                return
            if (chunk := reply.streamed(item)) is not None:
                yield chunk
        if ticket.finished:
            for chunk in reply.closing():
                yield chunk
    finally:
        _finish(ticket, watcher)


def _finish(ticket: Ticket, watcher: asyncio.Task) -> None:
    """A request's end: stop watching its connection, and cancel what it left running (if anything)."""
    watcher.cancel()
    ticket.cancel()


async def _cancel_on_disconnect(request: Request, ticket: Ticket) -> None:
    """Cancel the ticket when the client goes away (the body was read: what comes next is the disconnect)."""
    with suppress(asyncio.CancelledError):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        ticket.cancel()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(request_error_body(error), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = (f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions, "
                   "/v1/completions, /health and /metrics" if error.status_code in (404, 405) else str(error.detail))
        return JSONResponse(error_body(message, status=error.status_code), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        logger.error("internal error: %s", type(error).__name__)  # uvicorn logs the traceback; no body is logged
        return JSONResponse(error_body("internal error; see the server's log", status=500), status_code=500)
