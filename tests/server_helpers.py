"""Shared helpers of the ``csd serve`` tests: a server thread, clients, /metrics, raw HTTP.

Everything talks to 127.0.0.1 only; every socket has a timeout and every loop a bound.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import httpx
import openai
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from csdrafting import Cascade, CascadeConfig, KMatrix
from csdrafting.cli import DEFAULT_DRAFTERS, DEFAULT_TARGET
from csdrafting.server.cli import bind_socket
from csdrafting.server.transport import uvicorn_config
from tiny import KERNEL

MODEL = "pycode-22m"
TIMEOUT = 30.0  # seconds, every client request


def embedded_cascade() -> Cascade:
    """The embedded family with the default K-matrix held fixed: the automatic schedule adapts
    across requests, which keeps greedy text but changes steps and seeded samples."""
    k_matrix = json.dumps(KMatrix.default(len(DEFAULT_DRAFTERS), True).as_lists())
    drafters = tuple(str(p) for p in DEFAULT_DRAFTERS)
    return Cascade.from_config(CascadeConfig(str(DEFAULT_TARGET), drafters, k_matrix=k_matrix, kernel=KERNEL))


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a daemon thread, configured as
    ``csd serve`` configures it (``uvicorn_config``)."""

    def __init__(self, app, log_level: str = "warning", head_timeout: float = 30.0) -> None:
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(app, log_level=log_level, head_timeout=head_timeout, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not stop"


def make_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key="not-needed",
        max_retries=0,  # a 503 must reach the test, not be retried
        timeout=TIMEOUT,
        http_client=openai.DefaultHttpxClient(trust_env=False),  # never a proxy: loopback only
    )


def http_client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=TIMEOUT, trust_env=False)


def metric(client: httpx.Client, name: str, missing: float | None = None, **labels) -> float:
    """One sample of /metrics, read with prometheus_client's own parser; ``missing``, if given,
    for a labelled series not counted yet."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    assert missing is not None, f"{name}{labels} not in /metrics"
    return missing


def wait_until(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# -- raw HTTP, for what well-behaved clients never send ---------------------------------------------


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def request_head(method: str, path: str, host: str | None, headers: dict[str, str] | None = None) -> bytes:
    """A request line and headers (with ``Connection: close``), ending in the blank line."""
    lines = [f"{method} {path} HTTP/1.1"] + ([f"Host: {host}"] if host is not None else [])
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()] + ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def json_post(path: str, port: int, body: bytes, content_type: str | None = "application/json", host=None) -> bytes:
    headers = {"Content-Length": str(len(body))}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return request_head("POST", path, host or f"127.0.0.1:{port}", headers) + body


def read_until_closed(sock: socket.socket, max_bytes: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes the connection (a reset after the answer,
    as when the server closes with unread request bytes, ends the read too)."""
    received = b""
    while len(received) < max_bytes:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        received += data
    return received


def send_until_answered(sock: socket.socket, data: bytes, chunk: int = 65536) -> None:
    """Send ``data`` in pieces, stopping early once the server answers or closes."""
    for start in range(0, len(data), chunk):
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            return
        try:
            sock.sendall(data[start : start + chunk])
        except (BrokenPipeError, ConnectionResetError):
            return


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send one raw request and return the raw answer."""
    with connect(port, timeout) as sock:
        send_until_answered(sock, data)
        return read_until_closed(sock)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of a raw HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body


def openai_error(raw: bytes) -> tuple[int, dict]:
    """(status, error object) of a raw answer that must be an error in OpenAI's shape."""
    status, headers, body = parse_response(raw)
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and 10 <= len(error["message"]) <= 500
    return status, error
