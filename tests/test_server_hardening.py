"""``csd serve`` against an adversarial client: the defects an adversarial probe found, each with
its test, and the checks that the server is still healthy and unchanged afterwards.

Raw sockets on 127.0.0.1 send what HTTP clients never do (a body that never arrives, a foreign
Host, ``Content-Length: -1``, a 1 MB header); every socket has a timeout and every loop a bound.
The server answers each with a 2xx or with a 4xx in OpenAI's error shape, never a 5xx.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from csdrafting.server.app import create_app  # noqa: E402
from csdrafting.server.guard import LOOPBACK_HOSTS, allowed_hosts, host_name  # noqa: E402
from server_fixtures import ServerSettings  # noqa: E402
from server_helpers import (  # noqa: E402
    MODEL,
    ServerThread,
    connect,
    exchange,
    http_client,
    json_post,
    metric,
    openai_error,
    parse_response,
    read_until_closed,
    request_head,
    wait_until,
)

BODY_TIMEOUT = 1.5  # seconds: short, so the stalled-body tests take seconds
PROMPT = "def f("
CHAT = [{"role": "user", "content": "def add(a, b):"}]
MAX_TOKENS = 8
COMPLETIONS, CHAT_PATH = "/v1/completions", "/v1/chat/completions"
VALID = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}).encode()


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    """A server logging at info level (as ``csd serve`` does by default), with a short body timeout."""
    return ServerSettings({"body_timeout": BODY_TIMEOUT}, log_level="info")


@pytest.fixture(scope="module")
def reference(server_cascade):
    """The library's greedy outputs, computed before the module's server shares the cascade."""
    from csdrafting.server.protocol import chat_prompt_text

    return {
        "completion": server_cascade.generate(PROMPT, max_new_tokens=MAX_TOKENS).text,
        "chat": server_cascade.generate(
            chat_prompt_text(server_cascade.tokenizer, CHAT), max_new_tokens=MAX_TOKENS
        ).text,
    }


# -- 1. temperatures and top_p anywhere in the documented ranges -----------------------------------

VANISHING = [
    {"temperature": 1e-300},
    {"temperature": 1e-40},
    {"temperature": 5e-324, "seed": 3},
    {"temperature": 1, "top_p": 1e-300, "seed": 1},
    {"temperature": 2, "top_p": 1e-40},
]


@pytest.mark.parametrize("params", VANISHING, ids=str)
@pytest.mark.parametrize("stream", [False, True])
def test_vanishing_temperature_or_top_p_answers_the_greedy_text(client, reference, params, stream):
    """Once a 500 (NaN probabilities). The warped law is a point mass on the target's most likely
    token, so the sampled answer is the greedy one, on both endpoints, streamed or not."""
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=stream, **params)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, stream=stream, **params)
    if stream:
        assert "".join(c.choices[0].text for c in completion) == reference["completion"]
        assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == reference["chat"]
    else:
        assert completion.choices[0].text == reference["completion"]
        assert chat.choices[0].message.content == reference["chat"]


# -- 2. a client that leaves while sending its body ---------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _abort_uploads(port: int, count: int) -> None:
    """Connections that declare a 100-byte body, send 2 bytes of it and close."""
    head = request_head("POST", COMPLETIONS, "127.0.0.1", {"Content-Type": "application/json", "Content-Length": "100"})
    for _ in range(count):
        with connect(port) as sock:
            sock.sendall(head + b"{}")


def test_aborted_uploads_are_not_logged_at_info_and_one_debug_line_each(server, http):
    """Each used to log an "unexpected error" and two tracebacks (~110 lines)."""
    loggers = [logging.getLogger(name) for name in ("csdrafting", "uvicorn", "uvicorn.access")]
    records = _Records()
    for logger in loggers:
        logger.addHandler(records)
    aborted = lambda: metric(http, "csd_http_requests_total", 0, method="POST", endpoint=COMPLETIONS, status="499")  # noqa: E731
    try:
        _abort_uploads(server.port, 10)  # the server logs at info, as csd serve does by default
        wait_until(lambda: aborted() == 10)
        at_info = list(records.records)
        logging.getLogger("csdrafting").setLevel(logging.DEBUG)
        _abort_uploads(server.port, 10)
        wait_until(lambda: aborted() == 20)
    finally:
        logging.getLogger("csdrafting").setLevel(logging.INFO)
        for logger in loggers:
            logger.removeHandler(records)

    def uploads(logged: list[logging.LogRecord]) -> list[logging.LogRecord]:
        return [record for record in logged if "GET /metrics" not in record.getMessage()]  # the test's own reads

    assert uploads(at_info) == []
    at_debug = uploads(records.records)
    assert len(at_debug) == 10, [record.getMessage() for record in at_debug]
    for record in at_debug:
        assert record.levelno == logging.DEBUG and record.exc_info is None
        assert record.getMessage().endswith("disconnected while sending its request body (2 bytes received)")
    assert http.post(COMPLETIONS, content=VALID, headers={"Content-Type": "application/json"}).status_code == 200


# -- 3. bodies that never arrive -----------------------------------------------------------------------


def _stalled(port: int) -> socket.socket:
    """A connection that declares a 100-byte body and sends 2 bytes of it."""
    sock = connect(port, timeout=BODY_TIMEOUT + 10)
    sock.sendall(request_head("POST", COMPLETIONS, "127.0.0.1", {"Content-Type": "application/json", "Content-Length": "100"}) + b"{}")  # fmt: skip
    return sock


def _assert_timed_out(raw: bytes) -> None:
    status, error = openai_error(raw)
    assert status == 408 and error["code"] == "request_timeout" and "--body-timeout" in error["message"]
    assert parse_response(raw)[1]["connection"] == "close"


def test_stalled_body_gets_408_and_the_connection_closed(server):
    started = time.monotonic()
    with _stalled(server.port) as sock:
        raw = read_until_closed(sock)  # returns once the server has closed the connection
    assert BODY_TIMEOUT <= time.monotonic() - started < BODY_TIMEOUT + 5
    _assert_timed_out(raw)


def test_dripping_body_gets_408_at_the_timeout(server):
    """1 byte every 0.2 s keeps the connection busy, not alive: the limit is on the whole body."""
    started = time.monotonic()
    with _stalled(server.port) as sock:
        for _ in range(int((BODY_TIMEOUT + 5) / 0.2)):  # bounded: stops by itself
            if select.select([sock], [], [], 0.2)[0]:
                break
            sock.sendall(b" ")
        raw = read_until_closed(sock)
    assert BODY_TIMEOUT <= time.monotonic() - started < BODY_TIMEOUT + 5
    _assert_timed_out(raw)


def test_many_stalled_bodies_are_all_answered_within_the_timeout(server, http):
    started = time.monotonic()
    sockets = [_stalled(server.port) for _ in range(30)]
    assert http.get("/health").status_code == 200  # stalled uploads do not block other requests
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(read_until_closed, sockets))
    for sock in sockets:
        sock.close()
    assert time.monotonic() - started < BODY_TIMEOUT + 10
    for raw in answers:
        _assert_timed_out(raw)


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"], ids=["idle", "partial head"])  # fmt: skip
def test_slow_request_head_is_closed_at_the_timeout(server_cascade, sent):
    """uvicorn itself would wait forever for a request line and headers, even sent 1 byte at a time.
    (Its own server: a short head timeout also closes idle keep-alive connections of the clients.)"""
    server = ServerThread(create_app(server_cascade, MODEL), head_timeout=BODY_TIMEOUT)
    with server:
        started = time.monotonic()
        with connect(server.port, timeout=BODY_TIMEOUT + 10) as sock:
            sock.sendall(sent)
            for _ in range(int((BODY_TIMEOUT + 5) / 0.2)):  # bounded: stops by itself
                if select.select([sock], [], [], 0.2)[0]:
                    break
                sock.sendall(b"X")  # never a complete header line
            assert read_until_closed(sock) == b""  # closed without an answer: no request arrived
        assert BODY_TIMEOUT <= time.monotonic() - started < BODY_TIMEOUT + 5


def test_head_timeout_does_not_cut_a_long_answer(server_cascade):
    """The head timer stops once the head is in: a request running well past it gets its own
    answer (here the 504 of --timeout), not a closed connection."""
    app = create_app(server_cascade, MODEL, request_timeout=3 * BODY_TIMEOUT)
    with ServerThread(app, head_timeout=BODY_TIMEOUT) as url, http_client(url) as http:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1800, "temperature": 0, "ignore_eos": True}
        response = http.post(COMPLETIONS, json=body)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"


# -- 4. cross-origin requests: foreign Host names and non-JSON bodies ---------------------------------


@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "127.0.0.1.evil.example", "localhost.evil.example:{port}"])  # fmt: skip
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_foreign_host_is_refused(server, host, method):
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 still sends its own name."""
    host = host.format(port=server.port)
    if method == "POST":
        raw_request = json_post(COMPLETIONS, server.port, VALID, host=host)
    else:
        raw_request = request_head("GET", "/v1/models", host)
    status, error = openai_error(exchange(server.port, raw_request))
    assert status == 400 and error["code"] == "invalid_host" and host in error["message"]


def test_http_1_0_without_host_is_refused(server):
    status, error = openai_error(exchange(server.port, b"GET /v1/models HTTP/1.0\r\n\r\n"))
    assert status == 400 and error["code"] == "invalid_host"


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST", "127.0.0.1"])
def test_this_machines_names_are_answered(server, host):
    raw = exchange(server.port, request_head("GET", "/health", host.format(port=server.port)))
    assert parse_response(raw)[0] == 200


def test_allowed_hosts():
    assert host_name("[::1]:8000") == "[::1]" and host_name("LocalHost:1") == "localhost"
    assert allowed_hosts("127.0.0.1", ["my.box"]) == [*LOOPBACK_HOSTS, "my.box"]
    assert allowed_hosts("::1", []) == list(LOOPBACK_HOSTS)
    assert allowed_hosts("0.0.0.0", []) is None  # not loopback: the names are unknown here
    assert allowed_hosts("0.0.0.0", ["api.example"]) == ["api.example"]


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ],  # fmt: skip
)
def test_post_bodies_must_be_json(server, content_type):
    """The content types a page may POST anywhere without a CORS preflight (or none at all)."""
    status, error = openai_error(exchange(server.port, json_post(COMPLETIONS, server.port, VALID, content_type)))
    assert status == 415 and error["code"] == "unsupported_media_type"


def test_json_with_a_charset_is_json(server):
    raw = exchange(server.port, json_post(COMPLETIONS, server.port, VALID, "application/json; charset=utf-8"))
    assert parse_response(raw)[0] == 200


# -- 5. requests uvicorn cannot parse, in OpenAI's shape -----------------------------------------------

UNPARSEABLE = {
    "Content-Length -1": request_head("POST", COMPLETIONS, "127.0.0.1", {"Content-Length": "-1"}),
    "Content-Length not a number": request_head("POST", COMPLETIONS, "127.0.0.1", {"Content-Length": "ten"}),
    "two Content-Lengths": request_head(
        "POST", COMPLETIONS, "127.0.0.1", {"Content-Length": "2", "content-length": "3"}
    ),  # fmt: skip
    "1 MB header": request_head("GET", "/health", "127.0.0.1", {"X-Filler": "a" * (1 << 20)}),
    "no Host in HTTP/1.1": request_head("GET", "/health", None),
    "malformed request line": b"GET /health HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n",
}


@pytest.mark.parametrize("name", list(UNPARSEABLE))
def test_unparseable_http_gets_an_openai_error(server, name):
    status, error = openai_error(exchange(server.port, UNPARSEABLE[name]))
    assert status == 400 and error["code"] == "invalid_http_request"


# -- 6. the schema and the metrics come from the ecosystem's libraries -------------------------------------

DOCUMENTED_METRICS = {  # docs/server.md, Metrics: the names /metrics had before prometheus_client
    "csd_http_requests", "csd_requests", "csd_queue_depth", "csd_requests_running", "csd_queue_capacity",
    "csd_queue_full", "csd_queue_wait_seconds", "csd_prompt_tokens", "csd_generation_tokens",
    "csd_target_steps", "csd_prefill_seconds", "csd_decode_seconds", "csd_tokens_per_second",
    "csd_last_tokens_per_second", "csd_tokens_per_target_step", "csd_level_acceptance_rate",
    "csd_level_mean_acceptance_length", "csd_level_reviews", "csd_level_drafted_tokens",
    "csd_level_accepted_tokens", "csd_level_emitted_tokens",
}  # fmt: skip


def test_metrics_are_prometheus_clients_exposition(http):
    response = http.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    assert set(families) == DOCUMENTED_METRICS
    assert families["csd_requests"].type == "counter" and families["csd_queue_wait_seconds"].type == "summary"


def test_docs_show_the_request_schemas(http):
    assert http.get("/docs").status_code == 200 and "swagger" in http.get("/docs").text.lower()
    schema = http.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "ChatMessage", "ErrorResponse"} <= set(components)
    completions = schema["paths"][COMPLETIONS]["post"]
    assert completions["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    assert {"400", "408", "413", "415", "503"} <= set(completions["responses"])
    assert "422" not in json.dumps(schema["paths"])  # validation errors are OpenAI-shaped 400s here
    properties = components["CompletionRequest"]["properties"]
    assert properties["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 2.0}
    assert components["CompletionRequest"]["additionalProperties"] is False


# -- afterwards ----------------------------------------------------------------------------------------


def test_healthy_and_unchanged_after_everything(client, http, reference):
    """Runs last in this module: no 5xx was ever sent, and greedy answers are the library's."""
    assert http.get("/health").json()["status"] == "ok"
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert response.choices[0].text == reference["completion"]
    families = text_string_to_metric_families(http.get("/metrics").text)
    statuses = [s.labels["status"] for f in families if f.name == "csd_http_requests" for s in f.samples]
    assert statuses and not [status for status in statuses if status.startswith("5")]
    assert metric(http, "csd_requests_total", model=MODEL, outcome="error") == 0
