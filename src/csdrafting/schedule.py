"""Draft schedules: how many positions each drafter fills for each reviewer, step after step.

``StaticSchedule`` is the configured K-matrix, unchanged. ``AdaptiveSchedule`` starts from it and
follows the running acceptance (online adaptation):

* per (reviewer row, drafter column) entry: +1 when the drafter's whole share was accepted, -1 when
  its first token was rejected (the rule transformers uses for its assistant's draft length);
* an entry that falls to 0 switches that drafter off for that reviewer; it is retried with 1 after
  a back-off measured in reviews of that row, which doubles each time the retry fails;
* speculation as a whole is switched off (plain autoregressive steps) when its measured time per
  emitted token is worse than plain decoding's, and retried after a back-off that doubles too.

Each generation starts again from the configured K-matrix. Every decision depends only on past steps, never on the token being drafted, so the target's
verification stays exact and the output stays the target's: adaptation changes speed only.
"""

from __future__ import annotations

from itertools import accumulate

from .kmatrix import KMatrix

Segment = tuple[int, int, int]  # (column, first draft position, end position) one drafter filled


class StaticSchedule:
    """The configured K-matrix for every step."""

    adaptive = False

    def __init__(self, k_matrix: KMatrix) -> None:
        self.k_matrix = k_matrix
        self._ends = [k_matrix.cumulative(r) for r in range(k_matrix.size)]

    @property
    def size(self) -> int:
        return self.k_matrix.size

    def ends(self, reviewer: int) -> list[int]:
        return self._ends[reviewer]

    def reset(self, use_timing: bool) -> None:
        """A new generation starts."""

    def speculate(self) -> bool:
        return True

    def after_review(self, reviewer: int, segments: list[Segment], num_accepted: int) -> None:
        pass

    def after_step(self, seconds: float, num_tokens: int, speculative: bool) -> None:
        pass

    def current(self) -> list[list[int]]:
        return self.k_matrix.as_lists()


class AdaptiveSchedule(StaticSchedule):
    """Starts from a K-matrix and adapts it online (see the module docstring)."""

    adaptive = True
    MAX_GROWTH = 4  # an entry may grow to this many times its configured value (at least 8)
    FIRST_BACKOFF = 8  # reviews (or target steps) before a switched-off drafter is retried
    MAX_BACKOFF = 512
    JUDGE_AFTER = 3  # speculative steps before their speed is compared with plain decoding
    EMA = 0.3  # weight of the newest step in the running speed estimates

    def __init__(self, k_matrix: KMatrix) -> None:
        super().__init__(k_matrix)
        self.reset(use_timing=True)

    def reset(self, use_timing: bool) -> None:
        """Start each generation from the configured K-matrix, so one request's history never
        changes another's behaviour. ``use_timing=False`` turns off the speed-based switch (whose
        decisions depend on the clock): seeded sampling then draws the same tokens every run."""
        k_matrix = self.k_matrix
        self.use_timing = use_timing
        self.rows = k_matrix.as_lists()
        self.caps = [[max(8, self.MAX_GROWTH * k) for k in row] for row in self.rows]
        self.retry_in = [[0] * len(row) for row in self.rows]  # reviews left while an entry is off
        self.backoff = [[self.FIRST_BACKOFF] * len(row) for row in self.rows]
        self.configured = [row[:] for row in self.rows]
        # whole-speculation switch: seconds per emitted token, speculative vs plain steps
        self.spec_cost: float | None = None
        self.plain_cost: float | None = None
        self.plain_steps_left = 1 if use_timing else 0  # a first plain step measures plain decoding's cost
        self.spec_backoff = self.FIRST_BACKOFF * 4
        self.spec_steps_judged = 0

    def ends(self, reviewer: int) -> list[int]:
        return list(accumulate(self.rows[reviewer]))

    def current(self) -> list[list[int]]:
        return [row[:] for row in self.rows]

    def after_review(self, reviewer: int, segments: list[Segment], num_accepted: int) -> None:
        row = self.rows[reviewer]
        for column, start, end in segments:
            if num_accepted >= end:
                row[column] = min(row[column] + 1, self.caps[reviewer][column])
                self.backoff[reviewer][column] = self.FIRST_BACKOFF
            elif num_accepted == start:
                row[column] = max(row[column] - 1, 0)
                if row[column] == 0:
                    self.retry_in[reviewer][column] = self.backoff[reviewer][column]
                    self.backoff[reviewer][column] = min(2 * self.backoff[reviewer][column], self.MAX_BACKOFF)
        # switched-off entries count down one review of this row, then come back with 1
        retry = self.retry_in[reviewer]
        for column, left in enumerate(retry):
            if row[column] == 0 and self.configured[reviewer][column] > 0:
                if left <= 1:
                    row[column] = 1
                    retry[column] = 0
                else:
                    retry[column] = left - 1

    def speculate(self) -> bool:
        return self.plain_steps_left == 0

    def after_step(self, seconds: float, num_tokens: int, speculative: bool) -> None:
        if not self.use_timing:
            return
        cost = seconds / max(num_tokens, 1)
        if not speculative:
            self.plain_cost = cost if self.plain_cost is None else (1 - self.EMA) * self.plain_cost + self.EMA * cost
            self.plain_steps_left = max(self.plain_steps_left - 1, 0)
            if self.plain_steps_left == 0:
                self.spec_cost, self.spec_steps_judged = None, 0
            return
        self.spec_cost = cost if self.spec_cost is None else (1 - self.EMA) * self.spec_cost + self.EMA * cost
        self.spec_steps_judged += 1
        if self.spec_steps_judged < self.JUDGE_AFTER or self.plain_cost is None:
            return
        if self.spec_cost > self.plain_cost:
            # speculating costs more per token than not: decode plainly for a while, then retry
            self.plain_steps_left = self.spec_backoff
            self.spec_backoff = min(2 * self.spec_backoff, self.MAX_BACKOFF)
        else:
            self.spec_backoff = self.FIRST_BACKOFF * 4
