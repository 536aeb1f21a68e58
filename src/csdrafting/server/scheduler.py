"""One model's requests: a bounded FIFO served one at a time by a worker thread.

The Cascade runs one generation at a time, so requests queue in arrival order. The worker
iterates ``cascade.stream()``, which yields after every cascade step (each step emits at least one
token), and checks between steps whether the request was cancelled (its client disconnected) or
passed its deadline; if so it closes the stream, which stops the generation before its next step
and releases the cascade. Each generation starts from a reset cascade (``Cascade`` resets every
level), so a cancelled or failed request cannot change the next request's output.

Events go to the request's asyncio queue on the server's event loop: ``("chunk", StreamChunk)``
(the last chunk carries ``stats``) or ``("error", ApiError)``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque

from ..errors import CSDraftingError
from .metrics import ServerMetrics
from .protocol import ApiError, GenerationRequest

log = logging.getLogger("csdrafting.server")


def timeout_error(seconds: float) -> ApiError:
    return ApiError(
        504,
        f"the request did not finish within the server's timeout of {seconds:g} s (csd serve --timeout)",
        type="server_error",
        code="timeout",
    )


def shutting_down_error() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


class Job:
    """A queued request: what to generate, its deadline, and where its events go."""

    def __init__(self, request: GenerationRequest, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.timeout = timeout
        self.created = time.monotonic()
        self.deadline = self.created + timeout
        self.started: float | None = None
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    def emit(self, kind: str, payload) -> None:
        """From the worker thread: hand an event to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()

    async def next_event(self) -> tuple[str, object]:
        """The next event; raises the timeout ``ApiError`` once the deadline has passed."""
        if not self._events.empty():
            return self._events.get_nowait()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise timeout_error(self.timeout)
        try:
            return await asyncio.wait_for(self._events.get(), remaining)
        except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11 on
            raise timeout_error(self.timeout) from None


class GenerationQueue:
    """At most one running and ``max_queue`` waiting requests for one Cascade."""

    def __init__(self, cascade, max_queue: int, metrics: ServerMetrics) -> None:
        self.cascade = cascade
        self.max_queue = max_queue
        self.metrics = metrics
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="csd-generation", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return int(self._running is not None)

    def submit(self, request: GenerationRequest, timeout: float) -> Job:
        """Queue a request, or raise the 503 ``ApiError`` when the queue is full."""
        job = Job(request, timeout, asyncio.get_running_loop())
        with self._cv:
            if self._closed:
                self.metrics.record_outcome("rejected", None)
                raise shutting_down_error()
            busy = self._running is not None or self._waiting
            if busy and len(self._waiting) >= self.max_queue:
                self.metrics.count_queue_full()
                raise ApiError(
                    503,
                    f"the server is busy: {len(self._waiting)} requests are waiting (csd serve --max-queue "
                    f"{self.max_queue}); retry later",
                    type="server_error",
                    code="queue_full",
                    headers={"Retry-After": str(self._retry_after(len(self._waiting)))},
                )
            self._waiting.append(job)
            self._cv.notify()
        return job

    def _retry_after(self, waiting: int) -> int:
        mean = self.metrics.mean_generation_seconds() or 1.0
        return max(1, min(60, math.ceil(mean * (waiting + 1))))

    def cancel(self, job: Job) -> None:
        """The client is gone (or the answer is sent): drop it from the queue or stop it at the next step."""
        job.cancelled.set()
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # running (the worker sees the flag) or finished
        self.metrics.record_outcome("cancelled", None)

    def close(self, wait: float = 5.0) -> None:
        """Stop the worker: the running request stops at its next step, waiting ones get a 503."""
        with self._cv:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            if self._running is not None:
                self._running.cancelled.set()
            self._cv.notify_all()
        for job in waiting:
            job.emit("error", shutting_down_error())
        self._thread.join(wait)

    # -- the worker thread ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
            try:
                self._serve(job)
            except Exception:  # never let one request end the worker
                log.exception("generation worker failed")
            finally:
                with self._cv:
                    self._running = None

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.metrics.record_outcome("cancelled", None)
            return
        job.started = time.monotonic()
        queue_seconds = job.started - job.created
        if job.started >= job.deadline:
            job.emit("error", timeout_error(job.timeout))
            self.metrics.record_outcome("timeout", queue_seconds)
            return
        request = job.request
        outcome = "error"
        try:
            chunks = self.cascade.stream(request.prompt_ids, **request.generation_options())
            try:
                for chunk in chunks:
                    job.emit("chunk", chunk)
                    if chunk.stats is not None:
                        outcome = "completed"
                        self.metrics.record_generation(chunk.stats, time.monotonic() - job.started)
                        break
                    if job.cancelled.is_set():  # the client left, its deadline passed, or the server stops
                        outcome = "timeout" if time.monotonic() >= job.deadline else "cancelled"
                        if self._closed:  # a client may still be listening: end its stream now
                            job.emit("error", shutting_down_error())
                        break
                    if time.monotonic() >= job.deadline:
                        job.emit("error", timeout_error(job.timeout))
                        outcome = "timeout"
                        break
            finally:
                chunks.close()  # a generation stopped early ends here, before its next step
        except CSDraftingError as exc:  # the request checks mirror the library's, so this is rare
            outcome = "rejected"
            job.emit("error", ApiError(400, str(exc)))
        except Exception as exc:
            log.exception("generation failed")
            job.emit("error", ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error"))
        finally:
            self.metrics.record_outcome(outcome, queue_seconds)
