"""Monte Carlo simulation of the cascade, to check the planner's expectations.

It runs the algorithm of ``step.py`` line for line on abstract tokens: every proposed token is a
fresh integer, a review accepts each draft position with an independent Bernoulli trial at the
planner's rate for (reviewer, level that filled the position, index in that level's run), and
every neural forward is charged the planner's cost for the number of tokens it really runs —
each level keeps the list of tokens it last ran (its KV cache), and a forward runs what differs
from it, exactly like ``ModelLevel.next_token_logits``. So catch-up, overshoot and the draft limit
are simulated, not modelled: agreement with ``planner.predict`` tests the model's algebra.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from csdrafting.levels.memo import common_prefix_length
from csdrafting.tune.planner import MAX_RATE, Acceptance, CostModel, nominal_share


@dataclass(frozen=True)
class SimulationResult:
    num_tokens: int
    num_steps: int
    seconds: float
    forwards: tuple[int, ...]  # per level (MaG: proposals)
    tokens_run: tuple[int, ...]  # per neural level (0 for MaG)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds

    @property
    def tokens_per_step(self) -> float:
        return self.num_tokens / self.num_steps


class _Draft:
    __slots__ = ("tokens", "origins", "fillers", "starts")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.origins: list[int] = []  # the filler of each token in the sub-draft it was accepted from
        self.fillers: list[int] = []  # level whose segment (column) holds each position
        self.starts: list[int] = []  # first position of that segment

    def __len__(self) -> int:
        return len(self.tokens)


class _Cascade:
    def __init__(self, rows, acceptance: Acceptance, costs: CostModel, lenience: float, rng: random.Random) -> None:
        self.rows = [list(row) for row in rows]
        self.n = len(self.rows)
        self.ends = [list(itertools.accumulate(row)) for row in self.rows]
        self.acceptance = acceptance
        self.costs = costs
        self.lenience = lenience
        self.rng = rng
        self.mag_level = self.n if acceptance.mag else None
        self.memo: list[list[int]] = [[] for _ in range(self.n + 1)]
        self.forwards = [0] * (self.n + 1)
        self.tokens_run = [0] * (self.n + 1)
        self.seconds = 0.0
        self._next_id = itertools.count(1)
        self.committed: list[int] = []

    def new_token(self) -> int:
        return next(self._next_id)

    def start(self, prompt_length: int) -> None:
        """A fresh generation after a prompt: every neural level caches all but its last token."""
        self.committed = [self.new_token() for _ in range(prompt_length)]
        for level in range(self.n + 1):
            if level != self.mag_level:
                self.memo[level] = self.committed[:-1]

    def step(self, max_tokens: int) -> int:
        draft = self.fill(0, self.committed, max_tokens - 1)
        accepted = self.review(0, self.committed, draft, 1.0)
        new = draft.tokens[:accepted] + [self.new_token()]
        new = new[:max_tokens]
        self.committed = self.committed + new
        self.seconds += self.costs.step_seconds
        return len(new)

    def fill(self, reviewer: int, context: list[int], limit: int) -> _Draft:
        draft = _Draft()
        if reviewer >= self.n or limit <= 0:
            return draft
        for column in range(reviewer, self.n):
            goal = min(self.ends[reviewer][column], limit)
            segment_start = len(draft)
            while len(draft) < goal:
                self.extend(
                    column + 1, context + draft.tokens, draft, goal - len(draft), limit - len(draft), segment_start
                )
        return draft

    def extend(self, level: int, context: list[int], draft: _Draft, need: int, room: int, segment_start: int) -> None:
        if level == self.mag_level:
            self.forwards[level] += 1
            self.seconds += self.costs.mag_seconds
            tokens = [self.new_token() for _ in range(need)]
            origins = [level] * need
        else:
            sub = self.fill(level, context, room - 1)
            accepted = self.review(level, context, sub, self.lenience)
            tokens = sub.tokens[:accepted] + [self.new_token()]
            origins = sub.fillers[:accepted] + [level]
        draft.tokens.extend(tokens)
        draft.origins.extend(origins)
        draft.fillers.extend([level] * len(tokens))
        draft.starts.extend([segment_start] * len(tokens))

    def review(self, level: int, context: list[int], draft: _Draft, lenience: float) -> int:
        ids = context + draft.tokens
        start = min(common_prefix_length(self.memo[level], ids), len(ids) - len(draft) - 1)
        num_run = len(ids) - start
        self.memo[level] = ids
        self.forwards[level] += 1
        self.tokens_run[level] += num_run
        self.seconds += self.costs.levels[level](num_run) + (self.costs.review_overhead if level > 0 else 0.0)
        rate = self.acceptance.rate
        for k in range(len(draft)):
            filler = draft.fillers[k]
            share = nominal_share(self.rows, level, filler, self.mag_level)
            p = rate(level, filler, k - draft.starts[k] + 1, share, lenience if level > 0 else 1.0)
            if draft.origins[k] != filler:
                p = min(p * self.acceptance.ratio(filler, draft.origins[k], self.lenience), MAX_RATE)
            if self.rng.random() >= p:
                return k
        return len(draft)


def simulate(
    k_matrix,
    acceptance: Acceptance,
    costs: CostModel,
    lenience: float = 1.0,
    num_tokens: int = 128,
    num_runs: int = 100,
    prompt_length: int = 16,
    seed: int = 0,
) -> SimulationResult:
    """Generate ``num_runs`` times ``num_tokens`` tokens with the cascade's algorithm."""
    rows = k_matrix.rows if hasattr(k_matrix, "rows") else k_matrix
    rng = random.Random(seed)
    cascade = _Cascade(rows, acceptance, costs, lenience, rng)
    total_tokens = total_steps = 0
    for _ in range(num_runs):
        cascade.start(prompt_length)
        produced = 0
        while produced < num_tokens:
            if rows and any(rows[0]):
                produced += cascade.step(num_tokens - produced)
            else:
                cascade.seconds += costs.levels[0](1) + costs.step_seconds
                cascade.forwards[0] += 1
                produced += 1
            total_steps += 1
        total_tokens += produced
    return SimulationResult(
        total_tokens, total_steps, cascade.seconds, tuple(cascade.forwards), tuple(cascade.tokens_run)
    )
