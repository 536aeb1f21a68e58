"""How uvicorn runs the app: ``uvicorn_config(app, ...)`` (imports uvicorn).

A request uvicorn cannot parse as HTTP/1.1 (a negative or doubled Content-Length, headers over
uvicorn's 16 KiB limit, a malformed request line) never reaches the app: uvicorn answers it
itself, in plain text. ``OpenAIErrorsProtocol`` is uvicorn's h11 protocol answering those with
OpenAI's error shape instead, so that every answer a client can get is JSON it can parse.
Always h11 (also where httptools is installed): the parser whose errors this class shapes.

``csdrafting`` loggers (a client leaving mid-upload, generation failures) print next to uvicorn's
own, at the same level.
"""

from __future__ import annotations

import copy
import json

import h11
import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import ApiError


class OpenAIErrorsProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with OpenAI-shaped answers to unparseable requests."""

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


def uvicorn_config(app, log_level: str = "info", timeout_graceful_shutdown: int = 5) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=OpenAIErrorsProtocol,
        log_level=log_level,
        log_config=log_config(log_level),
        timeout_graceful_shutdown=timeout_graceful_shutdown,
        lifespan="on",
    )
