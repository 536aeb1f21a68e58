"""The FastAPI application: ``create_app(cascade, model_name, ...)``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``, ``GET /metrics``.

A generation request is read (at most ``max_body_bytes``), validated (``protocol.py``) and only
then queued (``scheduler.py``), so every client mistake is a 4xx before any model work and a
streamed response never starts with an error. Every error, including 404/405 and unexpected
failures, uses OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (
    ApiError,
    GenerationRequest,
    chunk_body,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
    response_body,
    usage_chunk_body,
)
from .scheduler import GenerationQueue, Job

log = logging.getLogger("csdrafting.server")

DEFAULT_MAX_QUEUE = 16
DEFAULT_TIMEOUT = 300.0  # seconds, queue wait included
DEFAULT_MAX_BODY_BYTES = 1 << 20
_DRAIN_FACTOR = 8
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(
    cascade,
    model_name: str,
    max_queue: int = DEFAULT_MAX_QUEUE,
    request_timeout: float = DEFAULT_TIMEOUT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """An OpenAI-compatible app serving ``cascade`` under the name ``model_name``.

    max_queue: requests that may wait while one generates; one more gets 503 with Retry-After.
    request_timeout: seconds from arrival to the end of the answer (queue wait included); a
        request past it is stopped at its next cascade step and answered 504 (or, when streaming,
        an error event).
    max_body_bytes: larger request bodies get 413.
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError("model_name must be a non-empty string")
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0, got {request_timeout}")
    metrics = ServerMetrics(model_name)
    queues = {model_name: GenerationQueue(cascade, max_queue, metrics)}  # one queue per served model
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for queue in queues.values():
            await run_in_threadpool(queue.close)

    app = FastAPI(title="csd serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    app.state.queues = queues
    app.add_middleware(_CountRequests, metrics=metrics)

    # -- errors -----------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

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

    # -- information ------------------------------------------------------------------------------

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
        queue = queues[model_name]
        return Response(metrics.render(queue.depth, queue.running, queue.max_queue), media_type=CONTENT_TYPE)

    # -- generation -------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, parse_completion_request, "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, parse_chat_request, "chatcmpl")

    async def generate(request: Request, parse, id_prefix: str) -> Response:
        body = parse_json_body(await _read_body(request, max_body_bytes))
        # tokenizing (and a chat template) can take a moment for long prompts: off the event loop
        gen_request = await run_in_threadpool(parse, body, cascade, set(queues))
        job = queues[gen_request.model].submit(gen_request, request_timeout)
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        if gen_request.stream:
            events = _stream_events(queues[gen_request.model], job, gen_request, request_id, int(time.time()))
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        return await _answer(request, queues[gen_request.model], job, gen_request, request_id)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 when it exceeds ``limit`` bytes. A body somewhat over the limit is read
    and dropped before answering, so the client (still sending) gets the 413 rather than a reset
    connection; one declared or found to be over ``_DRAIN_FACTOR`` times the limit is not read."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    drain_limit = _DRAIN_FACTOR * limit
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > drain_limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > drain_limit:
            raise too_large
        if size <= limit:
            parts.append(part)
    if size > limit:
        raise too_large
    return b"".join(parts)


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
        status = 500

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_http(method, endpoint, status)
