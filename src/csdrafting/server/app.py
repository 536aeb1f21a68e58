"""The FastAPI application: ``create_app(cascade, model_name, ...)``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``,
``GET /metrics``, and the OpenAPI schema at ``/docs`` (``/openapi.json``).

A generation request passes ``guard.RequestGuard`` (Host, content type, body size and time, strict
JSON), FastAPI's validation against ``schema.py``'s models, and the checks that need the model
(``protocol.py``); only then is it queued (``scheduler.py``), so every client mistake is a 4xx
before any model work and a streamed response never starts with an error. Every error the app
sends, including 404/405 and unexpected failures, uses OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import LOOPBACK_HOSTS, PARSED_BODY, RequestGuard
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (
    ApiError,
    GenerationRequest,
    chat_request,
    chunk_body,
    completion_request,
    response_body,
    usage_chunk_body,
    validation_error,
)
from .scheduler import GenerationQueue, Job
from .schema import ChatCompletionRequest, CompletionRequest, ErrorResponse

log = logging.getLogger("csdrafting.server")

DEFAULT_MAX_QUEUE = 16
DEFAULT_TIMEOUT = 300.0  # seconds, queue wait included
DEFAULT_BODY_TIMEOUT = 30.0  # seconds from a request's arrival to the end of its body
DEFAULT_MAX_BODY_BYTES = 1 << 20
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/docs", "/openapi.json")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_ERROR_RESPONSES = {  # documented in /docs for the generation endpoints
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "Invalid request (a field, the context length, or the Host header)"),
        (404, "Unknown model"),
        (408, "The body did not arrive within --body-timeout"),
        (413, "Body over the size limit"),
        (415, "Body not sent as application/json"),
        (503, "Queue full (Retry-After) or shutting down"),
        (504, "Not finished within --timeout"),
    ]
}


class _ParsedBodyRoute(APIRoute):
    """A route whose JSON body the guard has already parsed (strictly): FastAPI validates that
    object rather than parsing the bytes again with the lenient ``json.loads``."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(_ParsedBodyRequest(request.scope, request.receive))

        return route_handler


class _ParsedBodyRequest(Request):
    async def json(self):
        return self.scope[PARSED_BODY]


def create_app(
    cascade,
    model_name: str,
    max_queue: int = DEFAULT_MAX_QUEUE,
    request_timeout: float = DEFAULT_TIMEOUT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
) -> FastAPI:
    """An OpenAI-compatible app serving ``cascade`` under the name ``model_name``.

    max_queue: requests that may wait while one generates; one more gets 503 with Retry-After.
    request_timeout: seconds from arrival to the end of the answer (queue wait included); a
        request past it is stopped at its next cascade step and answered 504 (or, when streaming,
        an error event).
    max_body_bytes: larger request bodies get 413.
    body_timeout: seconds from a request's arrival to the end of its body; then 408.
    allowed_hosts: the Host names answered (any port); others get 400. The default names this
        machine's loopback addresses, right for a server bound to one of them; None answers any
        Host (for a server on another address, behind a proxy that checks Host itself).
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError("model_name must be a non-empty string")
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0, got {request_timeout}")
    if not body_timeout > 0:
        raise ValueError(f"body_timeout must be > 0, got {body_timeout}")
    metrics = ServerMetrics(model_name)
    queues = {model_name: GenerationQueue(cascade, max_queue, metrics)}  # one queue per served model
    metrics.watch_queue(lambda: (queues[model_name].depth, queues[model_name].running, max_queue))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for queue in queues.values():
            await run_in_threadpool(queue.close)

    app = FastAPI(
        title="csd serve",
        summary="Lossless cascade speculative decoding behind the OpenAI API",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.router.route_class = _ParsedBodyRoute
    app.state.metrics = metrics
    app.state.queues = queues
    app.add_middleware(
        RequestGuard, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes, body_timeout=body_timeout
    )
    app.add_middleware(_CountRequests, metrics=metrics)  # outside the guard: its refusals count too
    _add_error_handlers(app)
    _add_information_routes(app, cascade, queues, metrics)
    _add_generation_routes(app, cascade, queues, request_timeout)
    app.openapi = _openapi_without_422(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(list(exc.errors()))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path[:200]}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path[:200]}"
        else:
            message = str(exc.detail)
        body = ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).body()
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        body = ApiError(500, f"internal server error: {type(exc).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)


def _add_information_routes(app: FastAPI, cascade, queues: dict, metrics: ServerMetrics) -> None:
    created = int(time.time())

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "csdrafting", "csd": cascade.describe()}

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "models": {name: {"queue_depth": q.depth, "running": q.running} for name, q in queues.items()},
        }

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(name) for name in queues]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        if model not in queues:
            raise ApiError(
                404, f"the model {model[:200]!r} does not exist on this server", param="model", code="model_not_found"
            )
        return model_card(model)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def _add_generation_routes(app: FastAPI, cascade, queues: dict, request_timeout: float) -> None:
    @app.post("/v1/completions", responses=_ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(request, completion_request, body, "cmpl")

    @app.post("/v1/chat/completions", responses=_ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(request, chat_request, body, "chatcmpl")

    async def generate(request: Request, to_generation_request, body, id_prefix: str) -> Response:
        # tokenizing (and a chat template) can take a moment for long prompts: off the event loop
        gen_request = await run_in_threadpool(to_generation_request, body, cascade, set(queues))
        queue = queues[gen_request.model]
        job = queue.submit(gen_request, request_timeout)
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        if gen_request.stream:
            events = _stream_events(queue, job, gen_request, request_id, int(time.time()))
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        return await _answer(request, queue, job, gen_request, request_id)


def _openapi_without_422(app: FastAPI):
    """``app.openapi`` without FastAPI's stock 422 responses: validation errors here are 400s in
    OpenAI's shape (listed per endpoint)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)  # FastAPI's own, cached on the app
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    return openapi


async def _collect(job: Job) -> tuple[str, object]:
    """Wait for a whole generation: (text, stats)."""
    pieces = []
    while True:
        kind, payload = await job.next_event()
        if kind == "error":
            raise payload
        pieces.append(payload.text)
        if payload.stats is not None:
            return "".join(pieces), payload.stats


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _answer(
    request: Request, queue: GenerationQueue, job: Job, gen_request: GenerationRequest, request_id: str
) -> Response:
    """A non-streamed answer; a client that disconnects while waiting cancels its generation."""
    created = int(time.time())
    result = asyncio.ensure_future(_collect(job))
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not result.done():
            return Response(status_code=499)  # the client is gone: nobody reads this
        text, stats = result.result()  # raises the request's ApiError
        return JSONResponse(response_body(gen_request, request_id, created, text, stats))
    finally:
        result.cancel()
        gone.cancel()
        queue.cancel(job)


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream_events(
    queue: GenerationQueue, job: Job, gen_request: GenerationRequest, request_id: str, created: int
):
    """Server-sent events. A client that disconnects cancels this generator (Starlette listens for
    the disconnect), and ``finally`` stops the generation at its next step."""
    try:
        if gen_request.kind == "chat":
            yield _sse(chunk_body(gen_request, request_id, created, None, role=True))
        while True:
            try:
                kind, payload = await job.next_event()
            except ApiError as exc:  # the deadline passed
                yield _sse(exc.body())
                break
            if kind == "error":
                yield _sse(payload.body())
                break
            if payload.text:
                yield _sse(chunk_body(gen_request, request_id, created, payload.text, level=payload.level))
            if payload.stats is not None:
                yield _sse(chunk_body(gen_request, request_id, created, None, stats=payload.stats))
                if gen_request.include_usage:
                    yield _sse(usage_chunk_body(gen_request, request_id, created, payload.stats))
                break
        yield "data: [DONE]\n\n"
    finally:
        queue.cancel(job)


class _CountRequests:
    """ASGI middleware counting HTTP requests by method, endpoint and status (unknown paths: "other")."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        method = scope.get("method", "") if scope.get("method") in ("GET", "POST", "HEAD") else "other"
        status = None

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            status = status or 500  # answered by Starlette's outermost error handler
            raise
        finally:
            # no answer at all: the client left first (nginx's "client closed request")
            self.metrics.count_http(method, endpoint, status or 499)
