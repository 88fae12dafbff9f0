"""Running the app under uvicorn: in the foreground (``lmarch serve``) or on a background
thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from lmarch.errors import LmarchError
from lmarch.serve.app import build_asgi
from lmarch.serve.state import ServerState


def _config(state: ServerState, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        build_asgi(state),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
        lifespan="off",
    )


def serve_forever(state: ServerState, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``state`` until interrupted (Ctrl-C), then stop its scheduler."""
    server = uvicorn.Server(_config(state, host, port))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the signal
        pass
    finally:
        state.close()
    if not server.started:
        raise LmarchError(f"could not listen on {host}:{port}", hint="is the port already taken?")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """``with BackgroundServer(state) as server:`` serves ``state`` on ``server.url`` from a
    daemon thread (a free loopback port unless ``port`` is given); leaving the block stops it
    and the scheduler."""

    def __init__(
        self, state: ServerState, host: str = "127.0.0.1", port: int | None = None
    ) -> None:
        self.state = state
        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(_config(state, self.host, self.port))
        self.thread = threading.Thread(target=self.server.run, name="lmarch-http", daemon=True)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise LmarchError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.close()


__all__ = ["BackgroundServer", "free_port", "serve_forever"]
