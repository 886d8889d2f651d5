"""uvicorn with the timeouts a public server needs: a deadline for each request's head (idle connections and
slowloris clients are closed), keep-alive, and a cap on open connections.

uvicorn itself waits for a request head forever: 200 connections that send half a header each stay open. The
protocol below arms a timer when a connection opens and again after each response; a request head that has not
arrived in full when it fires closes the connection.
"""

from __future__ import annotations

import asyncio
import signal
import threading

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0  # seconds for a request head to arrive in full
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open after a response
MAX_CONNECTIONS = 256  # beyond this uvicorn answers 503


class _TimedH11(H11Protocol):
    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_deadline)

    def _head_deadline(self) -> None:
        self._head_timer = None
        waiting = self.cycle is None or self.cycle.response_complete  # no request in progress
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete and self._head_timer is not None:
            self._head_timer.cancel()  # the head is in; the route has its own limits
            self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)


def config(app, host: str, port: int, *, header_timeout: float = HEADER_TIMEOUT,
           max_connections: int = MAX_CONNECTIONS, **kw) -> uvicorn.Config:  # noqa: ANN001
    """uvicorn.Config for `app` with the head deadline, keep-alive timeout and connection cap."""
    protocol = type("TimedH11", (_TimedH11,), {"header_timeout": float(header_timeout)})
    return uvicorn.Config(app, host=host, port=port, http=protocol, timeout_keep_alive=KEEP_ALIVE,
                          limit_concurrency=max_connections, **kw)


def serve_with_engine(server: uvicorn.Server, engine) -> None:  # noqa: ANN001 - a tianying.engine.Engine
    """HTTP on a thread, the engine's steps on this (the main) thread, until Ctrl-C / SIGTERM or the server
    stops (see `Engine.serve_forever` for why the model computes on the main thread)."""
    http = threading.Thread(target=server.run, name="tianying-http", daemon=True)

    def stop(*_) -> None:  # noqa: ANN002
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)  # uvicorn installs no handlers off the main thread
    signal.signal(signal.SIGINT, stop)
    http.start()
    try:
        engine.serve_forever(stop=lambda: not http.is_alive())
    finally:
        server.should_exit = True
        http.join(15)
        engine.close()
