"""Server counters, exposed through ``prometheus_client``.

``ServerMetrics`` keeps the counters under one lock (the event loop counts HTTP requests, the
worker thread generations) and is a ``prometheus_client`` collector: each scrape reads one
consistent snapshot, and ``render()`` is ``prometheus_client.generate_latest`` over the app's own
registry (never the process-wide default, so several apps can live in one process).

Counters only grow; rates (tokens/s over a window) are the scraper's job. Two derived gauges are
given for people reading ``/metrics`` by eye: ``csd_tokens_per_second`` (new tokens over decode
seconds, all requests so far) and, per reviewing level, the acceptance rate and mean acceptance
length (accepted + 1 per review, i.e. counting the recovered or bonus token) so far.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from ..stats import GenerationStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
# queued requests by outcome; "rejected": refused at the queue (full, shutting down) or by the library's checks
OUTCOMES = ("completed", "cancelled", "timeout", "rejected", "error")


class ServerMetrics:
    """Thread-safe counters of one served model, and their Prometheus collector."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self._queue_state: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)
        self.http_requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (method, endpoint, status)
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.queue_full = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.target_steps = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.last_tokens_per_second = 0.0
        self.queue_wait_seconds = 0.0
        self.queue_wait_count = 0
        self.generation_seconds = 0.0  # from leaving the queue to the end, completed generations
        self.level_emitted: dict[str, int] = defaultdict(int)
        self.level_reviews: dict[str, int] = defaultdict(int)
        self.level_drafted: dict[str, int] = defaultdict(int)
        self.level_accepted: dict[str, int] = defaultdict(int)
        self.level_order: list[str] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def watch_queue(self, queue_state: Callable[[], tuple[int, int, int]]) -> None:
        """Where scrapes read (queue depth, running requests, queue capacity)."""
        self._queue_state = queue_state

    # -- counting ---------------------------------------------------------------------------------

    def count_http(self, method: str, endpoint: str, status: int) -> None:
        with self._lock:
            self.http_requests[(method, endpoint, status)] += 1

    def count_queue_full(self) -> None:
        """A request refused because the queue is full: a rejected outcome too."""
        with self._lock:
            self.queue_full += 1
            self.outcomes["rejected"] += 1

    def record_outcome(self, outcome: str, queue_seconds: float | None) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if queue_seconds is not None:
                self.queue_wait_seconds += queue_seconds
                self.queue_wait_count += 1

    def record_generation(self, stats: GenerationStats, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += stats.num_prompt_tokens
            self.generation_tokens += stats.num_new_tokens
            self.target_steps += stats.num_target_steps
            self.prefill_seconds += stats.prefill_seconds
            self.decode_seconds += stats.decode_seconds
            self.last_tokens_per_second = stats.tokens_per_second
            self.generation_seconds += seconds
            for level in stats.levels:
                name = level.name
                if name not in self.level_order:
                    self.level_order.append(name)
                self.level_emitted[name] += level.num_emitted
                review = level.review
                if review is not None:
                    self.level_reviews[name] += review.num_reviews
                    self.level_drafted[name] += review.num_drafted
                    self.level_accepted[name] += review.num_accepted

    def mean_generation_seconds(self) -> float | None:
        with self._lock:
            done = self.outcomes["completed"]
            return self.generation_seconds / done if done else None

    # -- exposition -------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of this model's metrics."""
        return generate_latest(self.registry)

    def collect(self) -> list[Metric]:
        """The prometheus_client collector protocol: every metric family, from one snapshot."""
        depth, running, capacity = self._queue_state()
        with self._lock:
            return [
                self._http_family(),
                self._outcome_family(),
                *self._model_families(depth, running, capacity),
                *self._level_families(),
            ]

    def _http_family(self) -> Metric:
        labels = ["method", "endpoint", "status"]
        family = CounterMetricFamily(
            "csd_http_requests", "HTTP requests by method, endpoint and status code.", labels=labels
        )
        for (method, endpoint, status), count in sorted(self.http_requests.items()):
            family.add_metric([method, endpoint, str(status)], count)
        return family

    def _outcome_family(self) -> Metric:
        family = CounterMetricFamily(
            "csd_requests",
            "Generation requests by outcome (cancelled: the client disconnected; rejected: queue full, "
            "shutting down, or refused by the library).",
            labels=["model", "outcome"],
        )
        for outcome, count in self.outcomes.items():
            family.add_metric([self.model_name, outcome], count)
        return family

    def _model_families(self, depth: int, running: int, capacity: int) -> Iterator[Metric]:
        tokens_per_second = self.generation_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
        per_step = self.generation_tokens / self.target_steps if self.target_steps else 0.0
        samples = [  # (family type, name, help, value), each labelled with the model
            (CounterMetricFamily, "csd_queue_full", "Requests refused with 503: queue full.", self.queue_full),
            (GaugeMetricFamily, "csd_queue_depth", "Requests waiting in the queue.", depth),
            (GaugeMetricFamily, "csd_requests_running", "Requests generating now (at most 1 per model).", running),
            (GaugeMetricFamily, "csd_queue_capacity", "Most requests allowed to wait (--max-queue).", capacity),
            (CounterMetricFamily, "csd_prompt_tokens", "Prompt tokens of completed generations.", self.prompt_tokens),
            (CounterMetricFamily, "csd_generation_tokens", "New tokens of completed generations.", self.generation_tokens),
            (CounterMetricFamily, "csd_target_steps", "Target steps of completed generations.", self.target_steps),
            (CounterMetricFamily, "csd_prefill_seconds", "Seconds spent in prefill.", self.prefill_seconds),
            (CounterMetricFamily, "csd_decode_seconds", "Seconds spent decoding (after prefill).", self.decode_seconds),
            (GaugeMetricFamily, "csd_tokens_per_second", "New tokens per decode second, so far.", tokens_per_second),
            (GaugeMetricFamily, "csd_last_tokens_per_second", "New tokens per decode second, last generation.", self.last_tokens_per_second),
            (GaugeMetricFamily, "csd_tokens_per_target_step", "New tokens per target step (1.0: plain decoding).", per_step),
        ]  # fmt: skip
        for kind, name, help_text, value in samples:
            family = kind(name, help_text, labels=["model"])
            family.add_metric([self.model_name], value)
            yield family
        wait = SummaryMetricFamily(
            "csd_queue_wait_seconds", "Seconds requests waited in the queue before generating.", labels=["model"]
        )
        wait.add_metric([self.model_name], self.queue_wait_count, self.queue_wait_seconds)
        yield wait

    def _level_families(self) -> Iterator[Metric]:
        reviewers = [name for name in self.level_order if self.level_reviews.get(name)]
        accepted, drafted, reviews = self.level_accepted, self.level_drafted, self.level_reviews
        families = [  # (family type, name, help, {level: value})
            (CounterMetricFamily, "csd_level_emitted_tokens", "Output tokens each level proposed first.",
             {name: self.level_emitted[name] for name in self.level_order}),
            (CounterMetricFamily, "csd_level_reviews", "Drafts each level reviewed (the target: verified).",
             {name: reviews[name] for name in reviewers}),
            (CounterMetricFamily, "csd_level_drafted_tokens", "Draft tokens each level reviewed.",
             {name: drafted[name] for name in reviewers}),
            (CounterMetricFamily, "csd_level_accepted_tokens", "Draft tokens each level accepted.",
             {name: accepted[name] for name in reviewers}),
            (GaugeMetricFamily, "csd_level_acceptance_rate", "Accepted / drafted tokens of each reviewing level, so far.",
             {name: accepted[name] / drafted[name] if drafted[name] else 0.0 for name in reviewers}),
            (GaugeMetricFamily, "csd_level_mean_acceptance_length",
             "Tokens per review of each reviewing level, counting the recovered or bonus token, so far.",
             {name: (accepted[name] + reviews[name]) / reviews[name] for name in reviewers}),
        ]  # fmt: skip
        for kind, name, help_text, values in families:
            family = kind(name, help_text, labels=["model", "level"])
            for level, value in values.items():
                family.add_metric([self.model_name, level], value)
            yield family
