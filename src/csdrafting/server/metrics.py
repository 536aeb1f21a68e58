"""Server counters and their Prometheus text exposition (format 0.0.4, written by hand).

Counters only grow; rates (tokens/s over a window) are the scraper's job. Two derived gauges are
given for people reading ``/metrics`` by eye: ``csd_tokens_per_second`` (new tokens over decode
seconds, all requests so far) and, per reviewing level, the acceptance rate and mean acceptance
length (accepted + 1 per review, i.e. counting the recovered or bonus token) so far.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from ..stats import GenerationStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTCOMES = ("completed", "cancelled", "timeout", "rejected", "error")


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class ServerMetrics:
    """Thread-safe counters: the event loop counts HTTP requests, the worker thread generations."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
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

    def count_http(self, method: str, endpoint: str, status: int) -> None:
        with self._lock:
            self.http_requests[(method, endpoint, status)] += 1

    def count_queue_full(self) -> None:
        with self._lock:
            self.queue_full += 1

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

    def render(self, queue_depth: int, running: int, max_queue: int) -> str:
        with self._lock:
            tokens_per_second = self.generation_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
            per_step = self.generation_tokens / self.target_steps if self.target_steps else 0.0
            model_samples = [  # (name, type, help, value), each labelled with the model
                ("csd_queue_full_total", "counter", "Requests refused with 503: queue full.", self.queue_full),
                ("csd_queue_depth", "gauge", "Requests waiting in the queue.", queue_depth),
                ("csd_requests_running", "gauge", "Requests generating now (at most 1 per model).", running),
                ("csd_queue_capacity", "gauge", "Most requests allowed to wait (--max-queue).", max_queue),
                ("csd_prompt_tokens_total", "counter", "Prompt tokens of completed generations.", self.prompt_tokens),
                ("csd_generation_tokens_total", "counter", "New tokens of completed generations.", self.generation_tokens),
                ("csd_target_steps_total", "counter", "Target steps of completed generations.", self.target_steps),
                ("csd_prefill_seconds_total", "counter", "Seconds spent in prefill.", self.prefill_seconds),
                ("csd_decode_seconds_total", "counter", "Seconds spent decoding (after prefill).", self.decode_seconds),
                ("csd_tokens_per_second", "gauge", "New tokens per decode second, so far.", tokens_per_second),
                ("csd_last_tokens_per_second", "gauge", "New tokens per decode second, last generation.", self.last_tokens_per_second),
                ("csd_tokens_per_target_step", "gauge", "New tokens per target step (1.0: plain decoding).", per_step),
            ]  # fmt: skip
            reviewers = [name for name in self.level_order if self.level_reviews.get(name)]
            accepted, drafted, reviews = self.level_accepted, self.level_drafted, self.level_reviews
            level_samples = [  # (name, type, help, {level: value})
                ("csd_level_emitted_tokens_total", "counter", "Output tokens each level proposed first.",
                 {name: self.level_emitted[name] for name in self.level_order}),
                ("csd_level_reviews_total", "counter", "Drafts each level reviewed (the target: verified).",
                 {name: reviews[name] for name in reviewers}),
                ("csd_level_drafted_tokens_total", "counter", "Draft tokens each level reviewed.",
                 {name: drafted[name] for name in reviewers}),
                ("csd_level_accepted_tokens_total", "counter", "Draft tokens each level accepted.",
                 {name: accepted[name] for name in reviewers}),
                ("csd_level_acceptance_rate", "gauge", "Accepted / drafted tokens of each reviewing level, so far.",
                 {name: accepted[name] / drafted[name] if drafted[name] else 0.0 for name in reviewers}),
                ("csd_level_mean_acceptance_length", "gauge",
                 "Tokens per review of each reviewing level, counting the recovered or bonus token, so far.",
                 {name: (accepted[name] + reviews[name]) / reviews[name] for name in reviewers}),
            ]  # fmt: skip
            lines = _family(
                "csd_http_requests_total", "counter", "HTTP requests by method, endpoint and status code.",
                [({"method": m, "endpoint": e, "status": s}, n) for (m, e, s), n in sorted(self.http_requests.items())],
            )  # fmt: skip
            lines += _family(
                "csd_requests_total", "counter",
                "Generation requests that were queued, by outcome (cancelled: the client disconnected).",
                [({"model": self.model_name, "outcome": o}, n) for o, n in self.outcomes.items()],
            )  # fmt: skip
            for name, kind, help_text, value in model_samples:
                lines += _family(name, kind, help_text, [({"model": self.model_name}, value)])
            lines += [
                "# HELP csd_queue_wait_seconds Seconds requests waited in the queue before generating.",
                "# TYPE csd_queue_wait_seconds summary",
                f"csd_queue_wait_seconds_sum{_labels(model=self.model_name)} {_number(self.queue_wait_seconds)}",
                f"csd_queue_wait_seconds_count{_labels(model=self.model_name)} {self.queue_wait_count}",
            ]
            for name, kind, help_text, values in level_samples:
                samples = [({"model": self.model_name, "level": level}, v) for level, v in values.items()]
                lines += _family(name, kind, help_text, samples)
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    return lines + [f"{name}{_labels(**labels)} {_number(value)}" for labels, value in samples]


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
