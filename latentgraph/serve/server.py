"""Running the app with uvicorn: where it listens, and who may reach it.

The server binds its socket itself (so that the address, the port a ``--port 0`` got included, is known
before it starts), refuses an address other machines can reach unless requests need an API key or the user
said that none is needed, and stops cleanly on Ctrl-C (uvicorn finishes the requests in flight).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from ..core.system import System
from ..errors import InputError
from .app import create_app
from .limits import API_KEY_VARIABLE, Limits

BACKLOG = 2048  # connections waiting to be accepted, as uvicorn's default


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, api_key: str | None, allow_no_key: bool) -> None:
    """Refuse to serve, without a key, on an address that other machines can reach."""
    if not (api_key or allow_no_key or is_loopback(host)):
        raise InputError(f"refusing to serve on {host} without an API key: anyone who can reach this address could "
                         f"use the system; pass --api-key KEY (or set {API_KEY_VARIABLE}), or --allow-no-key if "
                         "every client on this network may use it")


def model_id(style: str) -> str:
    """The model id a system is served under: a style's name, or a folder's or file's name."""
    path = Path(style)
    return path.stem if path.suffix.lower() in (".json", ".yaml", ".yml") else path.name or style


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (port 0: a free one), or an error saying why it cannot."""
    host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)  # now: a client that connects before uvicorn starts waits instead of being refused
    except OSError as e:
        sock.close()  # not left to the garbage collector, which warns about it
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


class Server:
    """``app`` served by uvicorn on ``sock``: :meth:`run` in the main thread (Ctrl-C stops it), or
    :meth:`start` in a thread and :meth:`stop` it."""

    def __init__(self, app: Any, sock: socket.socket, *, log_level: str = "info"):
        self.sock = sock
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10, lifespan="on")
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def run(self) -> None:
        """Serve until Ctrl-C (or :meth:`stop`)."""
        try:
            self.uvicorn.run(sockets=[self.sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
            pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)


def serve_system(load_system: Callable[[], System], *, name: str, host: str, port: int, limits: Limits,
          api_key: str | None = None, allow_no_key: bool = False, cors_origins: Sequence[str] = (),
          say: Callable[[str], None] = print) -> None:
    """Serve the system ``load_system`` loads (in the background) until Ctrl-C; ``say`` tells the user where and
    how to call it. An error ``load_system`` raises stops the server and is raised here."""
    check_exposure(host, api_key, allow_no_key)
    failure: list[BaseException] = []

    def load_or_stop() -> System:
        try:
            return load_system()
        except BaseException as e:
            failure.append(e)
            server.stop()
            raise

    app = create_app(load_or_stop, name=name, limits=limits, api_key=api_key, cors_origins=cors_origins)
    server = Server(app, listen(host, port))
    example = {"model": name, "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    key = ' -H "Authorization: Bearer $LATENTGRAPH_API_KEY"' if api_key else ""
    say(f"serving '{name}' at {server.url}/v1 (OpenAI-compatible); it answers once the system is loaded "
        f"({server.url}/health says when). Ctrl-C stops it. Try:\n  curl {server.url}/v1/chat/completions{key} "
        f"-H 'Content-Type: application/json' -d '{json.dumps(example)}'")
    server.run()
    if failure:
        raise failure[0]
    say("stopped")
