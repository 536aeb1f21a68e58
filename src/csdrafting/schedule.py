"""Draft schedules: how many positions each drafter fills for each reviewer, step after step.

The schedule owns every length decision of a step, MaG first's included. ``StaticSchedule`` is
the configured K-matrix, unchanged, and MaG-first drafts of a fixed length (row 0's total, at
least ``ScheduleParams.static_mag_first_tokens``). ``AdaptiveSchedule`` starts from them and
follows the running acceptance (online adaptation), learning from one ``StepReport`` per step
(``observe``) with the constants of a ``ScheduleParams``:

* per (reviewer row, drafter column) entry: a decayed count of the drafter's tokens accepted and
  rejected gives a running acceptance rate; the entry is the configured length scaled by how the
  odds of acceptance compare with a prior (long drafts while a drafter is right, short while not);
* an entry that falls to 0 switches that drafter off for that reviewer; it is retried with 1 after
  a back-off measured in reviews of that row, which doubles each time the retry fails;
* a MaG-first draft is about twice what the previous one got accepted (4 to 32 tokens);
* speculation as a whole is switched off (plain autoregressive steps) when its measured time per
  emitted token is worse than plain decoding's, and retried after a back-off that doubles too;
* with a ``LevelJudge`` (``k_matrix="auto"``: ``autoplan.py``), a neural drafter whose time costs
  more than it saves is switched off per level: every so many ordinary (not MaG-first) steps the
  judge predicts the speed of the current lengths with and without each drafter, from the
  running acceptance and the calibrated forward costs scaled by the forward times measured in
  this run; a drafter predicted to slow the cascade down has its column zeroed in every row and
  is retried after a back-off (in ordinary steps) that doubles each time the retry fails.

What the schedule learned carries over from one generation to the next (greedy and unseeded
sampling); a seeded sampling request starts afresh without the clock-driven switch, so it is
reproducible. Every decision depends only on past steps, never on the token being drafted, so the target's
verification stays exact and the output stays the target's: adaptation changes speed only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Protocol

from .kmatrix import KMatrix
from .payoff import PayoffGate, PayoffParams
from .report import Segment, StepReport

__all__ = ["AdaptiveSchedule", "LevelJudge", "ScheduleParams", "Segment", "StaticSchedule"]


@dataclass(frozen=True)
class ScheduleParams:
    """The schedules' tuning constants (module docstring); tests and callers pass their own."""

    # a static MaG-first draft is this long (or row 0's total, if longer). 24 measured on the
    # pycode family (AMD EPYC, greedy, committed prompts, forwards priced at measured costs): as
    # fast as the adaptive rule below for the shipped configurations, where 8 was 7-10% slower
    static_mag_first_tokens: int = 24
    prior_acceptance: float = 0.6  # the acceptance a configured entry is assumed to have been chosen for
    prior_weight: float = 4.0  # pseudo-observations behind the prior
    decay: float = 0.9  # weight of older observations after each new one (recent acceptance matters most)
    max_growth: int = 4  # an entry may grow to this many times its configured value (at least 8)
    first_backoff: int = 8  # reviews before a switched-off drafter is retried
    max_backoff: int = 512
    judge_after: int = 8  # speculative steps before their speed is compared with plain decoding
    slower: float = 1.05  # speculation is switched off when it costs this much more per token than plain
    # an adaptive MaG-first draft starts at this many tokens, then is about twice what the last one
    # got accepted, within the bounds below
    mag_first_start: int = 8
    mag_first_min_tokens: int = 4
    mag_first_max_tokens: int = 32
    # per-level switch (with a judge): how often drafters are judged, and by how much a drafter's
    # absence must be predicted faster before it is switched off
    judge_levels_first: int = 16  # ordinary speculative steps before the first judgement
    first_level_backoff: int = 32  # ordinary steps before a drafter switched off as a level is retried
    judge_levels_max: int = 256  # the interval doubles up to this while every drafter keeps paying
    level_margin: float = 0.03
    long_decay: float = 0.98  # acceptance and cost scales for judging: a longer memory than the lengths'
    payoff: PayoffParams = field(default_factory=PayoffParams)  # mag_first="auto" (payoff.py)


class StaticSchedule:
    """The configured K-matrix for every step, and a fixed length for MaG-first drafts."""

    adaptive = False

    def __init__(self, k_matrix: KMatrix, mag_first: int | None = None, params: ScheduleParams | None = None) -> None:
        self.params = params if params is not None else ScheduleParams()
        self.k_matrix = k_matrix
        self._ends = [k_matrix.cumulative(r) for r in range(k_matrix.size)]
        # MaG first: a MaG proposal continuing a suffix match of at least ``mag_first`` tokens
        # goes to the target alone for that step (None: off; "auto": where it is expected to pay,
        # for as many tokens as pay, payoff.py)
        self.payoff = PayoffGate(self.params.payoff) if mag_first == "auto" else None
        self.mag_first = mag_first
        row0_total = sum(k_matrix.rows[0]) if k_matrix.size else 0
        self.mag_first_start = max(self._first_mag_first_tokens(), row0_total)
        self.mag_first_tokens = self.mag_first_start

    def _first_mag_first_tokens(self) -> int:
        return self.params.static_mag_first_tokens

    @property
    def size(self) -> int:
        return self.k_matrix.size

    def ends(self, reviewer: int) -> list[int]:
        return self._ends[reviewer]

    def begin(self, carry_over: bool) -> None:
        """A new generation starts. ``carry_over``: continue from what earlier generations
        learned (greedy, unseeded sampling); else start afresh without the clock (seeded
        sampling must be reproducible)."""
        self.mag_first_tokens = self.mag_first_start
        if self.payoff is not None:
            self.payoff.begin(use_timing=carry_over)
        if carry_over:
            self.resume()
        else:
            self.reset(use_timing=False)

    def reset(self, use_timing: bool) -> None:
        """Start afresh from the configured K-matrix."""

    def resume(self) -> None:
        """A new generation continues from what earlier ones learned."""

    def speculate(self) -> bool:
        return True

    def mag_first_length(self) -> int:
        """How many tokens a MaG-first draft may have this step."""
        if self.payoff is not None:
            return self.payoff.params.max_depth  # the gate keeps as many as pay
        return self.mag_first_tokens

    def mag_first_tokens_for(self, match_length: int, available: int) -> int:
        """How many of the ``available`` tokens of a MaG proposal that matched ``match_length``
        tokens go to the target alone this step (0: none, the step drafts as configured)."""
        if self.payoff is not None:
            return self.payoff.length(match_length, available)
        return available if match_length >= self.mag_first else 0

    def after_mag_first(self, num_accepted: int) -> None:
        """The target accepted ``num_accepted`` tokens of a MaG-first draft."""

    def after_review(self, reviewer: int, segments: list[Segment], num_accepted: int) -> None:
        pass

    def after_step(self, seconds: float, num_tokens: int, speculative: bool) -> None:
        pass

    def current(self) -> list[list[int]]:
        return self.k_matrix.as_lists()

    def observe(self, report: StepReport) -> None:
        """Learn from a finished step (one call per step; ``report.py``).

        The one policy between token trees and this clock: the schedule judges *speculation*
        against plain decoding, and whether a tree paid is the tree sizer's business, so a tree
        step counts here as its chain alone would have run: the step's seconds less what the
        sizer's fit says the tree's extra nodes cost, and the chain's tokens."""
        for review in report.reviews:
            if review.reviewer < self.size:  # a reviewer row exists (even if its draft came out empty)
                self.after_review(review.reviewer, list(review.segments), review.num_accepted)
        self._observe_forwards(report)
        if self.payoff is not None:
            self.payoff.observe(report)
        if report.mag_first:
            self.after_mag_first(report.num_accepted)
        seconds, num_tokens = report.seconds, len(report.tokens)
        if report.tree is not None and report.tree.tree is not None:
            seconds = max(report.seconds - report.tree.extra_seconds, 0.0)
            num_tokens = report.num_accepted + 1
        self.after_step(seconds, num_tokens, report.speculative)

    def _observe_forwards(self, report: StepReport) -> None:
        """Forward times matter only to a schedule with a judge (``AdaptiveSchedule``)."""


class LevelJudge(Protocol):
    """Predicts the speed (tokens/s) of a K-matrix from per-pair acceptance rates and per-level
    cost scales; ``AdaptiveSchedule`` asks it whether a drafter pays (``autoplan.py``)."""

    def speed(self, rows: list[list[int]], rates: dict[tuple[int, int], float], scales: list[float]) -> float: ...

    def forward_seconds(self, level: int, num_tokens: int) -> float:
        """Calibrated seconds of one forward-and-review of neural level ``level`` (0 = target)."""


class AdaptiveSchedule(StaticSchedule):
    """Starts from a K-matrix and adapts it online (see the module docstring)."""

    adaptive = True

    def __init__(
        self,
        k_matrix: KMatrix,
        mag_first: int | None = None,
        priors: list[list[float]] | None = None,
        judge: LevelJudge | None = None,
        num_neural: int | None = None,
        params: ScheduleParams | None = None,
    ) -> None:
        """``priors[r][c]``: the acceptance entry (r, c) was chosen for (default
        ``params.prior_acceptance``); ``judge`` turns on the per-level switch for the first
        ``num_neural`` columns (the neural drafters; MaG, when on, is the last column)."""
        super().__init__(k_matrix, mag_first, params)
        self.priors = [
            [min(max(p, 0.02), 0.98) for p in row]
            for row in (priors or [[self.params.prior_acceptance] * k_matrix.size] * k_matrix.size)
        ]
        self.judge = judge
        self.num_neural = num_neural if num_neural is not None else k_matrix.size
        self.gated_step = False
        self.reset(use_timing=True)

    def _first_mag_first_tokens(self) -> int:
        return self.params.mag_first_start

    def _observe_forwards(self, report: StepReport) -> None:
        if self.judge is not None:  # forward times scale the judge's calibrated costs
            for forward in report.forwards:
                self.after_forward(forward.level, forward.num_tokens, forward.seconds)

    def after_mag_first(self, num_accepted: int) -> None:
        # the next gated draft follows past acceptance only, never the token being drafted
        doubled = 2 * (num_accepted + 1)
        self.mag_first_tokens = min(self.params.mag_first_max_tokens, max(self.params.mag_first_min_tokens, doubled))
        self.gated_step = True

    def resume(self) -> None:
        if not self.use_timing:
            self.reset(use_timing=True)

    def reset(self, use_timing: bool) -> None:
        """Start afresh from the configured K-matrix. ``use_timing=False`` turns off the speed-based
        switch (whose decisions depend on the clock): seeded sampling then draws the same tokens
        every run."""
        self.use_timing = use_timing
        self.configured = self.k_matrix.as_lists()
        self.rows = [row[:] for row in self.configured]
        self.caps = [[max(8, self.params.max_growth * k) for k in row] for row in self.configured]
        weight = self.params.prior_weight
        self.successes = [[p * weight for p in row] for row in self.priors]
        self.failures = [[(1 - p) * weight for p in row] for row in self.priors]
        self.retry_in = [[0] * len(row) for row in self.rows]  # reviews left while an entry is off
        self.backoff = [[self.params.first_backoff] * len(row) for row in self.rows]
        # per-level switch: long-memory acceptance, measured / calibrated forward seconds per level
        self.long_successes = [[p * weight for p in row] for row in self.priors]
        self.long_failures = [[(1 - p) * weight for p in row] for row in self.priors]
        self.measured_seconds = [0.0] * (self.num_neural + 1)
        self.calibrated_seconds = [0.0] * (self.num_neural + 1)
        self.level_off = [False] * self.num_neural
        self.level_retry_in = [0] * self.num_neural  # ordinary steps left while a drafter is off
        self.level_backoff = [self.params.first_level_backoff] * self.num_neural
        self.judge_every = self.params.judge_levels_first
        self.steps_to_judge = self.params.judge_levels_first
        # whole-speculation switch: decayed seconds and tokens of speculative and of plain steps
        self.spec_time = self.spec_tokens = 0.0
        self.plain_time = self.plain_tokens = 0.0
        self.plain_steps_left = 2 if use_timing else 0  # first plain steps measure plain decoding's cost
        self.spec_backoff = self.params.first_backoff * 4
        self.spec_steps_judged = 0

    def ends(self, reviewer: int) -> list[int]:
        return list(accumulate(self.rows[reviewer]))

    def current(self) -> list[list[int]]:
        return [row[:] for row in self.rows]

    def acceptance(self, reviewer: int, column: int) -> float:
        """The running estimate of how often a token of this drafter is accepted by this reviewer."""
        s, f = self.successes[reviewer][column], self.failures[reviewer][column]
        return s / (s + f)

    def after_review(self, reviewer: int, segments: list[Segment], num_accepted: int) -> None:
        row = self.rows[reviewer]
        for column, start, end in segments:
            if num_accepted < start:
                continue  # an earlier token was rejected: this share was never judged
            accepted = min(num_accepted, end) - start
            rejected = 1 if num_accepted < end else 0
            self.successes[reviewer][column] = self.params.decay * self.successes[reviewer][column] + accepted
            self.failures[reviewer][column] = self.params.decay * self.failures[reviewer][column] + rejected
            if self.judge is not None:
                long_s, long_f = self.long_successes[reviewer], self.long_failures[reviewer]
                long_s[column] = self.params.long_decay * long_s[column] + accepted
                long_f[column] = self.params.long_decay * long_f[column] + rejected
            if column < self.num_neural and self.level_off[column]:
                continue  # switched off as a level: only its retry brings it back
            row[column] = self._length(reviewer, column)
            if row[column] == 0:
                self.retry_in[reviewer][column] = self.backoff[reviewer][column]
                self.backoff[reviewer][column] = min(2 * self.backoff[reviewer][column], self.params.max_backoff)
            elif accepted == end - start:
                self.backoff[reviewer][column] = self.params.first_backoff
        # switched-off entries count down one review of this row, then come back with 1
        retry = self.retry_in[reviewer]
        for column, left in enumerate(retry):
            if column < self.num_neural and self.level_off[column]:
                continue
            if row[column] == 0 and self.configured[reviewer][column] > 0:
                if left <= 1:
                    row[column] = 1
                    retry[column] = 0
                else:
                    retry[column] = left - 1

    def _length(self, reviewer: int, column: int) -> int:
        """Draft length for the running acceptance: the configured length scaled by how the odds of
        acceptance compare with the prior's (the expected accepted run of a geometric draft)."""
        alpha = min(self.acceptance(reviewer, column), 0.99)
        prior = self.priors[reviewer][column]
        scale = (alpha / (1 - alpha)) / (prior / (1 - prior))
        return min(self.caps[reviewer][column], round(self.configured[reviewer][column] * scale))

    def speculate(self) -> bool:
        return self.plain_steps_left == 0

    def after_forward(self, level: int, num_tokens: int, seconds: float) -> None:
        """A neural level (0 = target) ran ``num_tokens`` tokens and its review in ``seconds``
        (with a judge): how its calibrated costs compare with now."""
        decay = self.params.long_decay
        self.measured_seconds[level] = decay * self.measured_seconds[level] + seconds
        self.calibrated_seconds[level] = decay * self.calibrated_seconds[level] + self.judge.forward_seconds(
            level, num_tokens
        )

    def after_step(self, seconds: float, num_tokens: int, speculative: bool) -> None:
        gated, self.gated_step = self.gated_step, False
        if speculative and not gated and self.judge is not None and self.use_timing:
            self._count_down_levels()
        if not self.use_timing:
            return
        # decayed sums of time and tokens: their ratio is the recent cost per token, weighted by
        # tokens (an average of per-step ratios would overweight one-token steps)
        if not speculative:
            self.plain_time = self.params.decay * self.plain_time + seconds
            self.plain_tokens = self.params.decay * self.plain_tokens + num_tokens
            self.plain_steps_left = max(self.plain_steps_left - 1, 0)
            if self.plain_steps_left == 0:
                self.spec_time = self.spec_tokens = 0.0
                self.spec_steps_judged = 0
            return
        self.spec_time = self.params.decay * self.spec_time + seconds
        self.spec_tokens = self.params.decay * self.spec_tokens + num_tokens
        self.spec_steps_judged += 1
        if self.spec_steps_judged < self.params.judge_after or self.plain_tokens == 0:
            return
        if self.spec_time / self.spec_tokens > self.params.slower * self.plain_time / self.plain_tokens:
            # speculating costs more per token than not: decode plainly for a while, then retry
            self.plain_steps_left = self.spec_backoff
            self.spec_backoff = min(2 * self.spec_backoff, self.params.max_backoff)
        else:
            self.spec_backoff = self.params.first_backoff * 4

    # -- the per-level switch ----------------------------------------------------------------------

    def _count_down_levels(self) -> None:
        """One ordinary speculative step: judge every drafter that is on when the judging
        interval is over, and bring back drafters whose back-off ran out (judged after a full
        first interval)."""
        self.steps_to_judge -= 1
        switched: list[int] = []
        if self.steps_to_judge <= 0:
            switched = self._judge_levels()
            # while every drafter keeps paying, judge less and less often
            longer = min(2 * self.judge_every, self.params.judge_levels_max)
            self.judge_every = self.params.judge_levels_first if switched else longer
            self.steps_to_judge = self.judge_every
        for column in range(self.num_neural):
            if self.level_off[column] and column not in switched:
                self.level_retry_in[column] -= 1
                if self.level_retry_in[column] <= 0:
                    self._level_on(column)

    def _judge_levels(self) -> list[int]:
        """Switch off each drafter that the judge predicts the cascade is faster without; returns
        their columns."""
        rates = {
            (r, c + 1): s / (s + f)
            for r, (row_s, row_f) in enumerate(zip(self.long_successes, self.long_failures))
            for c, (s, f) in enumerate(zip(row_s, row_f))
            if c >= r
        }
        scales = [m / c if c > 0 else 1.0 for m, c in zip(self.measured_seconds, self.calibrated_seconds)]
        switched = []
        for column in range(self.num_neural):
            if self.level_off[column] or not any(row[column] for row in self.rows):
                continue
            with_it = self.judge.speed(self.rows, rates, scales)
            without = [row[:] for row in self.rows]
            for row in without:
                row[column] = 0
            # (without any drafter left in row 0, ordinary steps decode plainly; MaG first still drafts)
            if self.judge.speed(without, rates, scales) > (1 + self.params.level_margin) * with_it:
                self._level_off(column)
                switched.append(column)
            else:
                self.level_backoff[column] = self.params.first_level_backoff  # it pays: a later failure starts afresh
        return switched

    def _level_off(self, column: int) -> None:
        self.level_off[column] = True
        for row in self.rows:
            row[column] = 0
        self.level_retry_in[column] = self.level_backoff[column]
        self.level_backoff[column] = min(2 * self.level_backoff[column], self.params.max_backoff)

    def _level_on(self, column: int) -> None:
        """Retry a drafter: its configured lengths, and its long-memory acceptance back at the
        prior (the evidence that switched it off is old by now)."""
        self.level_off[column] = False
        weight = self.params.prior_weight
        for r, row in enumerate(self.rows):
            row[column] = self.configured[r][column]
            p = self.priors[r][column]
            self.long_successes[r][column], self.long_failures[r][column] = p * weight, (1 - p) * weight
        self.steps_to_judge = min(self.steps_to_judge, self.params.judge_levels_first)
