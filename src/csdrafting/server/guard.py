"""``RequestGuard``: what a request must pass before FastAPI routes it (an ASGI middleware).

- **Host.** A web page can point its own DNS name at 127.0.0.1 (DNS rebinding) and then send
  requests to a server on this machine *and read the answers*, since the browser believes it talks
  to the page's own origin. Those requests still carry the page's name in ``Host``, so a server
  given ``allowed_hosts`` (``csd serve`` on a loopback address: ``localhost``, ``127.0.0.1``,
  ``[::1]``) answers only requests whose Host is one of them (any port), others get a 400.
- **Content type.** Any page may POST ``text/plain``, a form, or no content type at all to any
  address without asking first (a CORS "simple" request); only other types, such as
  ``application/json``, need a preflight, which this server never grants. So a POST body must be
  ``application/json`` (else 415), and no page can make this server generate.
- **The body** is read here: at most ``max_body_bytes`` (else 413), within ``body_timeout`` seconds
  of the request's arrival (else 408 and the connection is closed), and parsed as strict JSON (else
  400). A client that disconnects while sending it is not answered; it is logged once at debug
  level (a client going away is not the server's problem, and anyone can do it in a loop) and
  counted as status 499 in ``/metrics``.

Refusals use OpenAI's error shape; those sent before the body was read close the connection, so a
client that keeps sending cannot hold it. The parsed body goes to FastAPI's validation through the
ASGI scope (``PARSED_BODY``); the bytes are replayed to the app, whose later ``receive`` calls
reach the client again (a disconnect while generating cancels the generation).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from .protocol import ApiError, parse_json_body

log = logging.getLogger("csdrafting.server")

PARSED_BODY = "csd.parsed_body"  # the ASGI scope key holding a POST's decoded JSON body
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_DRAIN_FACTOR = 8  # a body up to this many times the limit is read to the end before its 413
_CLOSE = {"Connection": "close"}


class _ClientGone(Exception):
    """The client disconnected before its body was complete."""

    def __init__(self, num_received: int) -> None:
        super().__init__(num_received)
        self.num_received = num_received


def host_name(host: str) -> str:
    """A Host header's name, lower case and without the port: ``[::1]:8000`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] or host
    return host.split(":", 1)[0]


def is_loopback(address: str) -> bool:
    """Whether a listening address (``--host``) serves this machine only."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def allowed_hosts(address: str, extra: Iterable[str]) -> list[str] | None:
    """The Host names a server listening on ``address`` answers: on a loopback address its own
    names plus ``extra``; elsewhere its names are unknown here, so ``extra``, or any if none."""
    if is_loopback(address):
        return [*LOOPBACK_HOSTS, *extra]
    return list(extra) or None


def _is_json(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "application/json"


class RequestGuard:
    """The ASGI middleware described above. ``allowed_hosts`` None (or containing ``*``): any Host."""

    def __init__(self, app, allowed_hosts: Iterable[str] | None, max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
        self.allowed_hosts = None if hosts is None or "*" in hosts else frozenset(hosts)
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            receive_body = await self._admit(scope, receive)
        except ApiError as exc:
            await JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)(scope, receive, send)
            return
        except _ClientGone as gone:
            client = "{}:{}".format(*scope["client"]) if scope.get("client") else "a client"
            log.debug("%s disconnected while sending its request body (%d bytes received)", client, gone.num_received)
            return
        await self.app(scope, receive_body, send)

    async def _admit(self, scope, receive):
        """The checks; returns the ``receive`` the app gets (a POST's body replayed) or raises."""
        headers = Headers(scope=scope)
        self._check_host(headers.get("host"))
        if scope["method"] != "POST":
            return receive
        if not _is_json(headers.get("content-type")):
            raise _unsupported_media_type(headers.get("content-type"))
        raw = await self._read_body(receive, headers.get("content-length"))
        scope[PARSED_BODY] = parse_json_body(raw)
        return _replay(raw, receive)

    def _check_host(self, host: str | None) -> None:
        if self.allowed_hosts is None or (host is not None and host_name(host) in self.allowed_hosts):
            return
        shown = "no Host header" if host is None else f"the Host {host[:100]!r}"
        accepted = ", ".join(sorted(self.allowed_hosts))
        message = (
            f"{shown} does not name this server, which answers only to {accepted} "
            "(a page from another site could be reading this; csd serve --allowed-host adds names)"
        )
        raise ApiError(400, message, code="invalid_host", headers=_CLOSE)

    async def _read_body(self, receive, declared: str | None) -> bytes:
        """The whole body, or a 413 (over the limit), 408 (too slow) or ``_ClientGone``. A body
        somewhat over the limit is read and dropped before the 413, so that a client still sending
        gets the answer rather than a reset connection."""
        limit, drain_limit = self.max_body_bytes, _DRAIN_FACTOR * self.max_body_bytes
        too_large = f"the request body is larger than {limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > drain_limit:
            raise ApiError(413, too_large, code="request_too_large", headers=_CLOSE)
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        parts, size, more_body = [], 0, True
        while more_body:
            message = await self._receive_by(receive, deadline)
            if message["type"] == "http.disconnect":
                raise _ClientGone(size)
            part = message.get("body", b"")
            size += len(part)
            if size > drain_limit:
                raise ApiError(413, too_large, code="request_too_large", headers=_CLOSE)
            if size <= limit:
                parts.append(part)
            more_body = message.get("more_body", False)
        if size > limit:
            raise ApiError(413, too_large, code="request_too_large")
        return b"".join(parts)

    async def _receive_by(self, receive, deadline: float) -> dict:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(receive(), max(remaining, 0.001))
        except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11 on
            message = f"the request body did not arrive within {self.body_timeout:g} s (csd serve --body-timeout)"
            raise ApiError(408, message, code="request_timeout", headers=_CLOSE) from None


def _unsupported_media_type(content_type: str | None) -> ApiError:
    shown = "none" if content_type is None else repr(content_type[:100])
    message = f"the request body must be JSON sent with Content-Type: application/json, got {shown}"
    return ApiError(415, message, code="unsupported_media_type", headers=_CLOSE)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that returns ``body`` once, then the client's own messages."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
