"""Fixtures of the ``csd serve`` tests (test_server.py, test_server_hardening.py), registered by
conftest.py: one embedded cascade for the session and, per module, a server on it with an
``openai`` client and an ``httpx`` client.

A module that requests ``server`` defines a ``reference`` fixture (the library's outputs it
compares with): the server requests it, so it is computed before the server shares the cascade.
A module may override ``server_settings`` to configure its server.

The server libraries are imported inside the fixtures: without the ``serve`` extra the server
tests skip (``pytest.importorskip``) and nothing else is affected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass(frozen=True)
class ServerSettings:
    """``create_app`` options (besides the cascade and the model name) and uvicorn's log level."""

    app_options: dict = field(default_factory=dict)
    log_level: str = "warning"


@pytest.fixture(scope="session")
def server_cascade():
    """See ``server_helpers.embedded_cascade``: loaded once for every server test module."""
    from server_helpers import embedded_cascade

    return embedded_cascade()


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    return ServerSettings()


@pytest.fixture(scope="module")
def server(server_cascade, reference, server_settings):
    """A ``ServerThread`` (``.url``, ``.port``) serving the session's cascade, stopped after the module."""
    from csdrafting.server.app import create_app
    from server_helpers import MODEL, ServerThread

    thread = ServerThread(create_app(server_cascade, MODEL, **server_settings.app_options), server_settings.log_level)
    with thread:
        yield thread


@pytest.fixture(scope="module")
def client(server):
    from server_helpers import make_client

    with make_client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    from server_helpers import http_client

    with http_client(server.url) as c:
        yield c
