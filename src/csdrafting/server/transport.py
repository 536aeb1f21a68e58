"""How uvicorn runs the app: ``uvicorn_config(app, ...)`` (imports uvicorn).

``OpenAIErrorsProtocol`` is uvicorn's h11 protocol with two changes:

- A request uvicorn cannot parse as HTTP/1.1 (a negative or doubled Content-Length, headers over
  uvicorn's 16 KiB limit, no Host, a malformed request line) never reaches the app, and uvicorn
  answers it itself in plain text; here the answer is a 400 in OpenAI's error shape, so that every
  answer a client can get is JSON it can parse.
- uvicorn waits forever for a request's line and headers (a client can hold a connection by
  sending one header byte at a time, or nothing); here a connection that has not sent a complete
  request head within ``head_timeout`` seconds (of connecting, or of the previous answer) is
  closed. From the head on, the app's body timeout applies (``guard.py``).

Always h11 (also where httptools is installed): the parser whose errors this class shapes. No
WebSocket upgrades: the app has no WebSocket endpoint. ``csdrafting``'s loggers print next to
uvicorn's own, at the same level.
"""

from __future__ import annotations

import copy
import json
import logging

import h11
import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import ApiError

log = logging.getLogger("csdrafting.server")

DEFAULT_HEAD_TIMEOUT = 30.0  # seconds


class OpenAIErrorsProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with OpenAI-shaped answers to unparseable requests and a
    time limit on request heads (see the module's docstring)."""

    head_timeout = DEFAULT_HEAD_TIMEOUT  # uvicorn_config sets it per server, in a subclass

    def connection_made(self, transport) -> None:
        self._head_timer = None
        super().connection_made(transport)
        self._await_head()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head arrived: its body is the app's to time
            self._stop_head_timer()

    def on_response_complete(self) -> None:
        self._await_head()  # first: a pipelined request handled inside the call stops it again
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        if not self.transport.is_closing():  # nobody to answer: no request arrived
            log.debug("closed a connection with no complete request head after %g s", self.head_timeout)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        message = (
            "invalid HTTP request: a malformed request line or header, an invalid Content-Length, "
            "or headers larger than the server accepts"
        )
        body = json.dumps(ApiError(400, message, code="invalid_http_request").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body)):
            self.transport.write(self.conn.send(event))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


def log_config(level: str) -> dict:
    """uvicorn's logging configuration, with ``csdrafting``'s loggers on its default handler."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["csdrafting"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def uvicorn_config(
    app, log_level: str = "info", head_timeout: float = DEFAULT_HEAD_TIMEOUT, timeout_graceful_shutdown: int = 5
) -> uvicorn.Config:
    """How ``csd serve`` (and the tests) run ``app``."""
    protocol = type("OpenAIErrorsProtocol", (OpenAIErrorsProtocol,), {"head_timeout": head_timeout})
    return uvicorn.Config(
        app,
        http=protocol,
        ws="none",
        log_level=log_level,
        log_config=log_config(log_level),
        timeout_graceful_shutdown=timeout_graceful_shutdown,
        lifespan="on",
    )
