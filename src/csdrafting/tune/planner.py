"""The planner: expected walltime of one cascade configuration, and a search for the fastest.

This is the paper's expected-walltime-improvement model (vertical + horizontal cascade),
generalised to any number of levels, per-position acceptance and the exact drafting procedure of
``step.py`` (overshoot and KV-cache catch-up included), with measured costs instead of
parameter counts.

Levels are indexed as in ``step.py``: ``0`` the target, ``1 .. m`` the neural drafters (largest
first), ``m + 1`` MaG when on; column ``c`` of the K-matrix belongs to level ``c + 1``, row ``r``
to level ``r`` as a reviewer. ``n`` is the number of drafting levels (the K-matrix is n x n).

Inputs (measured by ``measure.py``)
-----------------------------------
* ``cost_v(T)``: seconds of one forward-and-review of neural level ``v`` running ``T`` new
  tokens (at the reference context; other contexts by a two-parameter linear fit,
  ``LevelCost``); ``m_s``: one MaG proposal; ``o``: per target step;
  ``o_r``: bookkeeping per drafter review. Plain decoding costs ``cost_0(1) + o`` per token.
* ``alpha_{r,v,k}(i)``: the probability that reviewer ``r`` accepts the ``i``-th token of a run
  of draft positions filled by level ``v``, given it accepted the ones before, when ``v`` fills
  ``k`` positions at a time. Runs matter (MaG copies whole lines; a drafter is right in easy
  stretches), and so does where drafts start: they start where the previous one failed, so the
  rates are measured on drafts replayed that way along the target's own output, for each draft
  length ``k`` (``measure.renewal_counts``). ``k`` is the K entry, or for a neural level that
  reviews sub-drafts, its longest extension (``nominal_share``). Greedy: 0/1 agreement of argmaxes;
  sampling: ``sum_x min(p_r, q_v)`` (``p_r(x)`` for MaG's point mass).
* lenience ``l > 1`` (greedy): drafter reviewers use their lenient rates, and a token of level
  ``u`` that drafter ``v`` accepted passes the target ``rho^l_{v,u} / rho^1_{v,u}`` times as often
  as at lenience 1 (``rho^l``: measured rate at which the target takes what ``v`` accepted from
  ``u``, over ``v``'s own rate). With ``f_u`` the share of ``v``'s emitted tokens that came from
  ``u`` (from the sub-draft model below; ``f_v = 1 / E[t]`` its own), a position filled by ``v``
  is accepted at ``min(alpha_{r,v,k}(i) * sum_u f_u rho^l_{v,u} / rho^1_{v,u}, 0.995)``. (The
  ratio ``rho^1`` itself is not applied: the run-conditional rates already hold the evidence that
  a drafter agreeing with MaG is in an easy stretch; applying both made the model over-predict
  its favourite configurations by up to 60% on real traces.)
* Positions are independent Bernoulli trials given these rates (the paper's assumption).

Filling one reviewer's draft (``_fill(r, L)`` in ``step.py``)
------------------------------------------------------------
Row ``r`` with limit ``L`` has goals ``g_c = min(K[r][r] + ... + K[r][c], L)``. Columns are
filled in order; the state is the draft length ``ell`` and the start ``s`` of the current
column's segment. While ``ell < g_c``, column ``c`` (level ``v = c + 1``) extends the draft:

* MaG appends exactly ``g_c - ell`` tokens (one proposal, cost ``m_s``);
* a neural level builds a sub-draft ``F = fill(v, L - ell - 1)``, reviews it in one forward of
  ``len(F) + 1`` tokens and appends its accepted prefix plus one token, ``t = A_v + 1`` tokens
  (``A_v``: how many of ``F`` it accepts), so ``P(t = a + 1) = Q_v(a) - Q_v(a + 1)`` and the
  extension costs ``cost(F) + o_r + sum_s P(len F = s) cost_v(s + 1)``. It may overshoot
  ``g_c`` (never ``L``). A level without a row (or an empty one) decodes: ``t = 1``, ``cost_v(1)``.

With ``Q_r(j) = P(A_r >= j)`` (the reviewer accepts at least ``j`` tokens) and
``W(ell)`` = P(the draft reaches length ``ell`` with all ``ell`` positions accepted)::

    W(ell + t) += W(ell) P(t) prod_{i=ell+1}^{ell+t} a(i)
    Q_r(j)     += W(ell) P(t >= j - ell) prod_{i=ell+1}^{j} a(i)      for ell < j <= ell + t

where ``a(i)`` is the acceptance of position ``i`` (run index ``i - s``), summed over the
reachable states: a dynamic programme over ``(c, s, ell)``, sub-drafts memoised by
``(level, limit)``. ``E[A_r] = sum_j Q_r(j)``.

Catch-up: a drafter's KV cache lacks the tokens accepted at and after its segment's last
position ``b_v``. After ``r`` reviews, ``v``'s next forward re-runs
``E[max(0, A_r - b_v + 1)] = P(A_r >= b_v) + sum_{c' > c} E[accepted positions of column c']``
extra tokens, charged at ``v``'s per-token cost. The target always runs ``len(draft) + 1``.

One target step and the speed
-----------------------------
``T_step = o + cost(fill(0, L)) + sum_k P(len = k) cost_0(k + 1)`` (catch-up included) and
``N_step = E[A_0] + 1`` (accepted plus the recovered or bonus token). By the renewal-reward
theorem the speed is ``N_step / T_step`` tokens/s and the predicted speedup over plain
decoding ``(cost_0(1) + o) N_step / T_step``. With one drafter of constant cost ``c`` (the
target's cost 1 whatever ``T``), MaG off, a constant rate ``alpha`` and ``K = [[k]]``, this is
the paper's ``(1 - alpha^(k+1)) / ((1 - alpha)(k c + 1))``.

``tests/simulate.py`` runs the same algorithm as a Monte Carlo simulation with independent Bernoulli
acceptances at these rates (KV caches tracked token by token); ``tests/test_planner.py`` checks
the model against it.

Independence is the model's limit: on real text acceptances are correlated across levels and
steps in ways no per-position rate captures. For greedy decoding, ``replay.py`` runs the real
``step.py`` on the recorded predictions of every level along the target's output, which gives
the exact target steps and forward shapes of any configuration on the sample prompts; its
speed (the same cost tables, plus the cascade's own overhead measured during the replay) is the
prediction the search trusts when it is available.

The search
----------
Every K-matrix over all levels with bounded entries is a candidate; zero entries switch a
drafter off for a reviewer, and a level no used reviewer drafts from is left out of the
cascade (``reduce``). A coarse grid over all entries is evaluated by the model, then coordinate
descent (each entry +-1, +-2) from the best candidates and from the best of each set of levels,
then lenience values where a drafter reviews a smaller one. With a replay: the model's best
candidates and the best three of every level set are replayed, and the best replayed ones are
refined by coordinate descent on the replayed speed (a budget of replays). The result is the
fastest configuration and every explored (configuration, prediction) pair.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from dataclasses import dataclass, field, replace

from ..kmatrix import KMatrix
from .gate import GateModel

MAX_RATE = 0.995  # no measured rate is trusted to be 1: runs of identical text end eventually


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelCost:
    """Seconds of one forward (and review) of a neural level, by the number of tokens it runs.

    In the context length the cost is linear with two parameters (``fit_context``):
    ``t(n, ctx) = a(n) + (context_forward + context_slope * n) * (ctx - reference)``, ``a`` the
    measured table. One forward pays the context once whatever its width (the KV cache is read,
    the mask built), and each of its ``n`` tokens pays it again (attention scores)."""

    name: str
    tokens: tuple[int, ...]  # increasing token counts that were measured
    seconds: tuple[float, ...]  # non-decreasing seconds per forward at those counts
    context_slope: float = 0.0  # extra seconds per (token x context position) past the reference
    context_forward: float = 0.0  # and per (forward x context position), whatever its token count

    def __call__(self, num_tokens: float) -> float:
        """Linear interpolation; beyond the last measured count, the last segment's slope."""
        xs, ys = self.tokens, self.seconds
        if len(xs) == 1:
            return ys[0]
        if num_tokens <= xs[0]:
            return ys[0]
        i = bisect_left(xs, num_tokens)
        if i >= len(xs):
            i = len(xs) - 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0)

    @property
    def per_token(self) -> float:
        """Average cost of one more token over 1..8 tokens (what catch-up tokens cost)."""
        return max(0.0, (self(8) - self(1)) / 7)

    def shifted(self, shift: int) -> LevelCost:
        """This level's costs ``shift`` context positions past its reference."""
        seconds = tuple(
            max(s + (self.context_forward + self.context_slope * t) * shift, 0.0)
            for t, s in zip(self.tokens, self.seconds)
        )
        return replace(self, seconds=seconds)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "tokens": list(self.tokens),
            "seconds": list(self.seconds),
            "context_slope": self.context_slope,
            "context_forward": self.context_forward,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LevelCost:
        return cls(
            data["name"],
            tuple(data["tokens"]),
            tuple(data["seconds"]),
            data.get("context_slope", 0.0),
            data.get("context_forward", 0.0),
        )


def fit_context(near: dict[int, float], far: dict[int, float], distance: int) -> tuple[float, float]:
    """``(context_forward, context_slope)`` of ``LevelCost`` from seconds per forward by token
    count measured at two contexts ``distance`` positions apart (``far`` the longer): the
    least-squares line of (far - near) / distance against the token count, both coefficients
    kept non-negative (a cost does not fall as the context grows; timing noise can say so)."""
    counts = sorted(set(near) & set(far))
    if distance <= 0 or not counts:
        return 0.0, 0.0
    xs = [float(n) for n in counts]
    ys = [(far[n] - near[n]) / distance for n in counts]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0
    forward = mean_y - slope * mean_x
    if slope < 0:  # all per forward
        return max(mean_y, 0.0), 0.0
    if forward < 0:  # all per token: the line through the origin
        return 0.0, max(sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), 0.0)
    return forward, slope


@dataclass(frozen=True)
class CostModel:
    """Forward costs of the neural levels (target first), MaG's proposal cost, step overhead."""

    levels: tuple[LevelCost, ...]
    mag_seconds: float = 0.0
    step_seconds: float = 0.0
    reference_context: int = 0
    review: LevelCost | None = None  # the review alone (part of every level's cost), by draft + 1
    review_overhead: float = 0.0  # bookkeeping per drafter review beyond forward and review

    @property
    def plain_seconds_per_token(self) -> float:
        return self.levels[0](1) + self.step_seconds

    def at_context(self, context: int) -> CostModel:
        """The costs at ``context`` cached tokens instead of the reference context (each level's
        two-parameter context fit, ``LevelCost``)."""
        shift = context - self.reference_context
        if not shift or not self.reference_context:
            return self
        levels = tuple(level.shifted(shift) for level in self.levels)
        return replace(self, levels=levels, reference_context=context)

    def as_dict(self) -> dict:
        return {
            "levels": [level.as_dict() for level in self.levels],
            "mag_seconds": self.mag_seconds,
            "step_seconds": self.step_seconds,
            "reference_context": self.reference_context,
            "review": self.review.as_dict() if self.review else None,
            "review_overhead": self.review_overhead,
        }

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        return cls(
            tuple(LevelCost.from_dict(d) for d in data["levels"]),
            data.get("mag_seconds", 0.0),
            data.get("step_seconds", 0.0),
            data.get("reference_context", 0),
            LevelCost.from_dict(data["review"]) if data.get("review") else None,
            data.get("review_overhead", 0.0),
        )


@dataclass(frozen=True)
class Acceptance:
    """Per-run-position acceptance rates between every reviewer and every smaller level.

    ``rates[(r, v, k)][i - 1]`` is ``alpha_{r,v}(i)`` for drafts in which ``v`` fills ``k``
    positions at a time (see the module docstring); runs longer than the table use its last
    entry, and a share between two measured lengths uses the next longer one.
    ``lenient[(l, r, v, k)]`` the same for a drafter reviewer at lenience ``l``;
    ``carry[(l, v, u)]`` is ``rho^l_{v,u}``: how much likelier the target is to accept a token of
    level ``u`` that drafter ``v`` accepted (at lenience ``l``) than ``v``'s own token.
    """

    names: tuple[str, ...]  # level names, target first; MaG last when ``mag``
    mag: bool
    rates: dict[tuple[int, int, int], tuple[float, ...]]
    lenient: dict[tuple[float, int, int, int], tuple[float, ...]] = field(default_factory=dict)
    carry: dict[tuple[float, int, int], float] = field(default_factory=dict)
    temperature: float = 0.0

    def __post_init__(self) -> None:
        lengths: dict[tuple, list[int]] = {}
        for r, v, k in self.rates:
            lengths.setdefault((1.0, r, v), []).append(k)
        for lenience, r, v, k in self.lenient:
            lengths.setdefault((lenience, r, v), []).append(k)
        object.__setattr__(self, "_lengths", {key: sorted(ks) for key, ks in lengths.items()})
        object.__setattr__(self, "_run_rates", {})  # memo of ``run_rates`` (searches ask thousands of times)

    @property
    def num_drafting(self) -> int:
        return len(self.names) - 1

    @property
    def lenience_values(self) -> list[float]:
        return sorted({1.0} | {key[0] for key in self.lenient})

    def rate(self, reviewer: int, drafter: int, index: int, share: int = 1, lenience: float = 1.0) -> float:
        """``alpha_{reviewer, drafter}(index)`` (index >= 1) for a share of ``share`` positions."""
        key = (lenience if reviewer > 0 else 1.0, reviewer, drafter)
        lengths = self._lengths.get(key)
        if lengths is None:
            key = (1.0, reviewer, drafter)
            lengths = self._lengths[key]
        i = bisect_left(lengths, share)
        k = lengths[min(i, len(lengths) - 1)]
        table = self.rates[(reviewer, drafter, k)] if key[0] == 1.0 else self.lenient[(key[0], reviewer, drafter, k)]
        return min(table[min(index, len(table)) - 1], MAX_RATE)

    def run_rates(self, reviewer: int, drafter: int, share: int, lenience: float, length: int) -> list[float]:
        """``rate(reviewer, drafter, i, share, lenience)`` for ``i = 1 .. >= length`` (memoised)."""
        key = (reviewer, drafter, share, lenience if reviewer > 0 else 1.0)
        table = self._run_rates.get(key)
        if table is None or len(table) < length:
            table = [self.rate(reviewer, drafter, i, share, lenience) for i in range(1, max(length, 64) + 1)]
            self._run_rates[key] = table
        return table

    def ratio(self, level: int, origin: int, lenience: float = 1.0) -> float:
        """How lenience changes the target's acceptance of the tokens ``level`` took from
        ``origin``: ``rho^l / rho^1`` (1 at lenience 1 or where not measured).

        ``rho^1`` itself is not applied: the run-conditional rates already carry the evidence
        that a drafter agreeing with a smaller level is in an easy stretch, and multiplying
        both in counted it twice (the model then over-predicted by up to 60% on real traces).
        """
        if lenience == 1.0:
            return 1.0
        strict = self.carry.get((1.0, level, origin))
        loose = self.carry.get((lenience, level, origin))
        return loose / strict if strict and loose else 1.0

    def as_dict(self) -> dict:
        return {
            "names": list(self.names),
            "mag": self.mag,
            "temperature": self.temperature,
            "rates": [
                {"reviewer": r, "drafter": v, "draft_length": k, "alpha": list(a)}
                for (r, v, k), a in sorted(self.rates.items())
            ],
            "lenient": [
                {"lenience": x, "reviewer": r, "drafter": v, "draft_length": k, "alpha": list(a)}
                for (x, r, v, k), a in sorted(self.lenient.items())
            ],
            "carry": [
                {"lenience": x, "level": v, "origin": u, "rho": rho} for (x, v, u), rho in sorted(self.carry.items())
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Acceptance:
        return cls(
            tuple(data["names"]),
            bool(data["mag"]),
            {(d["reviewer"], d["drafter"], d["draft_length"]): tuple(d["alpha"]) for d in data["rates"]},
            {
                (d["lenience"], d["reviewer"], d["drafter"], d["draft_length"]): tuple(d["alpha"])
                for d in data.get("lenient", [])
            },
            {(d["lenience"], d["level"], d["origin"]): d["rho"] for d in data.get("carry", [])},
            data.get("temperature", 0.0),
        )

    @classmethod
    def constant(cls, names, mag: bool, rates: dict[tuple[int, int], object]) -> Acceptance:
        """Rates that do not depend on the draft length: ``{(r, v): alpha or (alpha(1), ...)}``."""
        table = {}
        for (r, v), value in rates.items():
            table[(r, v, 1)] = tuple(value) if isinstance(value, (list, tuple)) else (float(value),)
        return cls(tuple(names), mag, table)


# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """The model's expectation for one configuration (K over all levels; zero = unused)."""

    k_matrix: tuple[tuple[int, ...], ...]  # over all drafting levels; () = plain decoding
    lenience: float
    tokens_per_step: float  # E[A_0] + 1
    seconds_per_step: float
    plain_seconds_per_token: float
    forwards_per_step: tuple[float, ...]  # per level (MaG: proposals)
    draft_length: float  # E[len of the target's draft]
    mag_first: int | None = None  # MaG first's threshold this prediction modelled (None: off)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.seconds_per_step

    @property
    def speedup(self) -> float:
        """Predicted speed over plain decoding of the target on the same device."""
        return self.plain_seconds_per_token * self.tokens_per_step / self.seconds_per_step

    def as_dict(self, names: tuple[str, ...] | None = None) -> dict:
        out = {
            "k_matrix": [list(row) for row in self.k_matrix],
            "lenience": self.lenience,
            "tokens_per_step": self.tokens_per_step,
            "seconds_per_step": self.seconds_per_step,
            "tokens_per_second": self.tokens_per_second,
            "speedup": self.speedup,
            "forwards_per_step": list(self.forwards_per_step),
            "draft_length": self.draft_length,
            "mag_first": self.mag_first,
        }
        if names is not None:
            out["levels"] = [names[0]] + [names[v] for v in used_levels(self.k_matrix)]
        return out


@dataclass
class _Fill:
    """Outcome of filling one reviewer's draft: ``at_least[j] = P(A >= j)`` (``at_least[0] = 1``),
    ``length[k] = P(len = k)``, expected seconds and forwards per level."""

    at_least: list[float]
    length: list[float]
    seconds: float
    forwards: list[float]
    accepted_by_column: list[float]  # expected accepted positions filled by each column


@dataclass
class _FillSums:
    """What ``_Model.fill`` sums over the reachable states while it fills a draft."""

    at_least: list[float]  # P(A >= j)
    forwards: list[float]  # expected forwards per level
    accepted_in: list[float]  # expected accepted positions filled by each column
    accepted_to_end: list[float]  # P(column non-empty and its last position accepted)
    seconds: float = 0.0

    @classmethod
    def empty(cls, limit: int, num_levels: int, num_columns: int) -> _FillSums:
        at_least = [0.0] * (limit + 1)
        at_least[0] = 1.0
        return cls(at_least, [0.0] * num_levels, [0.0] * num_columns, [0.0] * num_columns)


@dataclass
class _Extension:
    """One extension by a neural level: ``steps[t] = P(appends t tokens)``, its cost, the
    forwards it takes and the fraction of its tokens that are its own (not from below)."""

    steps: dict[int, float]
    seconds: float
    forwards: list[float]
    origins: dict[int, float]  # fraction of its tokens first proposed by each level (itself included)


class _Model:
    """Expected cost and acceptance of one K-matrix (see the module docstring)."""

    def __init__(self, rows, lenience: float, acceptance: Acceptance, costs: CostModel) -> None:
        self.rows = [list(row) for row in rows]
        self.n = len(self.rows)
        self.lenience = lenience
        self.acceptance = acceptance
        self.costs = costs
        self.num_levels = self.n + 1
        self.mag_level = self.n if acceptance.mag else None
        self.ends = [list(itertools.accumulate(row)) for row in self.rows]
        self._fills: dict[tuple[int, int], _Fill] = {}
        self._extensions: dict[tuple[int, int], _Extension] = {}

    def is_mag(self, level: int) -> bool:
        return level == self.mag_level

    def has_row(self, level: int) -> bool:
        return level < self.n and any(self.rows[level][level:])

    def fill(self, reviewer: int, limit: int) -> _Fill:
        key = (reviewer, limit)
        cached = self._fills.get(key)
        if cached is not None:
            return cached
        if limit <= 0 or not self.has_row(reviewer):
            result = _Fill([1.0], [1.0], 0.0, [0.0] * self.num_levels, [0.0] * self.n)
            self._fills[key] = result
            return result
        sums = _FillSums.empty(limit, self.num_levels, self.n)
        starts = {0: (1.0, 1.0)}  # draft length at a column's start -> (P(reach), P(reach, all accepted))
        for column in range(reviewer, self.n):
            goal = min(self.ends[reviewer][column], limit)
            following: dict[int, list[float]] = {}
            for start, (reach_start, weight_start) in starts.items():
                if start >= goal:
                    slot = following.setdefault(start, [0.0, 0.0])
                    slot[0] += reach_start
                    slot[1] += weight_start
                    continue
                self._fill_segment(reviewer, column, start, (reach_start, weight_start), goal, limit, sums, following)
            starts = {k: (v[0], v[1]) for k, v in following.items()}
        length = [0.0] * (limit + 1)
        for ell, (reach_end, _) in starts.items():
            length[ell] += reach_end
        # catch-up: tokens accepted at and after a neural level's last position, re-run by it later
        for column in range(reviewer, self.n):
            level = column + 1
            if self.is_mag(level) or not self.rows[reviewer][column]:
                continue
            extra = sums.accepted_to_end[column] + sum(sums.accepted_in[column + 1 :])
            sums.seconds += extra * self.costs.levels[level].per_token
        result = _Fill(sums.at_least, length, sums.seconds, sums.forwards, sums.accepted_in)
        self._fills[key] = result
        return result

    def _fill_segment(self, reviewer, column, start, start_state, goal, limit, sums: _FillSums, following) -> None:
        """Column ``column`` extends the draft from length ``start`` (reached with probabilities
        ``start_state``: (P(reach), P(reach, all accepted))) to ``goal`` or past it: adds its cost,
        forwards and acceptance to ``sums`` and the lengths it ends at to ``following``."""
        level = column + 1
        share = nominal_share(self.rows, reviewer, level, self.mag_level)
        rates = self.acceptance.run_rates(reviewer, level, share, self.lenience, limit - start)
        reach = [0.0] * (limit + 1)
        weight = [0.0] * (limit + 1)
        reach[start], weight[start] = start_state
        forwards = sums.forwards
        for ell in range(start, goal):
            if reach[ell] == 0.0:
                continue
            if self.is_mag(level):
                steps = {goal - ell: 1.0}
                sums.seconds += reach[ell] * self.costs.mag_seconds
                forwards[level] += reach[ell]
                factor = 1.0
            else:
                ext = self.extension(level, limit - ell)
                steps = ext.steps
                sums.seconds += reach[ell] * ext.seconds
                for v, f in enumerate(ext.forwards):
                    forwards[v] += reach[ell] * f
                factor = sum(
                    share * (1.0 if u == level else self.acceptance.ratio(level, u, self.lenience))
                    for u, share in ext.origins.items()
                )
            longest = max(steps)
            # P(t >= j - ell) for the Q_r update, as a running tail
            tail = sum(steps.values())
            product = weight[ell]
            for t in range(1, longest + 1):
                j = ell + t
                product *= min(rates[j - start - 1] * factor, MAX_RATE)
                sums.at_least[j] += product * tail
                sums.accepted_in[column] += product * tail
                p_t = steps.get(t, 0.0)
                if p_t:
                    reach[j] += reach[ell] * p_t
                    weight[j] += product * p_t
                    tail -= p_t
        for end in range(goal, limit + 1):
            if reach[end]:
                slot = following.setdefault(end, [0.0, 0.0])
                slot[0] += reach[end]
                slot[1] += weight[end]
                sums.accepted_to_end[column] += weight[end]

    def extension(self, level: int, room: int) -> _Extension:
        key = (level, room)
        cached = self._extensions.get(key)
        if cached is not None:
            return cached
        cost = self.costs.levels[level]
        forwards = [0.0] * self.num_levels
        forwards[level] = 1.0
        overhead = self.costs.review_overhead
        if room - 1 <= 0 or not self.has_row(level):
            result = _Extension({1: 1.0}, cost(1) + overhead, forwards, {level: 1.0})  # autoregressive
        else:
            sub = self.fill(level, room - 1)
            at_least = sub.at_least
            steps = {}
            for a in range(len(at_least)):
                p = at_least[a] - (at_least[a + 1] if a + 1 < len(at_least) else 0.0)
                if p > 0:
                    steps[a + 1] = p
            seconds = sub.seconds + overhead + sum(p * cost(s + 1) for s, p in enumerate(sub.length) if p)
            for v, f in enumerate(sub.forwards):
                forwards[v] += f
            mean_tokens = sum(t * p for t, p in steps.items())
            origins = {level: 1.0 / mean_tokens}
            for column, accepted in enumerate(sub.accepted_by_column):
                if accepted > 0:
                    origins[column + 1] = accepted / mean_tokens
            result = _Extension(steps, seconds, forwards, origins)
        self._extensions[key] = result
        return result


def nominal_share(rows, reviewer: int, level: int, mag_level: int | None) -> int:
    """How many positions ``level`` typically fills at a time in ``reviewer``'s draft, which
    picks the acceptance table measured for drafts of that length: its K entry, or, for a neural
    level that reviews drafts of its own, what one extension appends at most (its overshoot)."""
    share = rows[reviewer][level - 1]
    if level != mag_level and level < len(rows) and any(rows[level][level:]):
        share = max(share, sum(rows[level]) + 1)
    return share


def draft_bound(rows, mag_last: bool) -> int:
    """Longest draft the target can receive under this K-matrix (overshoot included);
    ``mag_last``: the last column is MaG (which fills exactly, never overshoots)."""
    n = len(rows)

    def longest(reviewer: int, mag: bool) -> int:
        if reviewer >= n or not any(rows[reviewer][reviewer:]):
            return 0
        ends = list(itertools.accumulate(rows[reviewer]))
        bound = 0
        for c in range(reviewer, n):
            if not rows[reviewer][c]:
                continue
            if mag and c == n - 1:
                bound = max(bound, ends[c])  # MaG fills exactly to its goal
            else:
                # a neural extension starts below the goal and appends up to its sub-draft + 1
                bound = max(bound, ends[c] - 1 + longest(c + 1, mag) + 1)
        return bound

    return longest(0, mag_last)


def predict(
    k_matrix,
    acceptance: Acceptance,
    costs: CostModel,
    lenience: float = 1.0,
    max_draft: int | None = None,
    gate: GateModel | None = None,
) -> Prediction:
    """The model's speed for K (over all of ``acceptance``'s levels; an empty K = plain decoding).

    ``gate``: MaG first at ``gate.threshold`` (``gate.py``); ``acceptance`` must then be the
    rates measured on the drafts that gate leaves to the cascade. K may be all zeros then:
    plain decoding except where MaG's match is long enough."""
    rows = tuple(tuple(row) for row in (k_matrix.rows if isinstance(k_matrix, KMatrix) else k_matrix))
    if gate is not None:
        gate = gate.for_rows(rows)  # the schedule's first MaG-first length depends on row 0
    num_levels = len(acceptance.names)
    plain = costs.plain_seconds_per_token
    if not rows or not any(rows[0]):
        forwards = [1.0] + [0.0] * (num_levels - 1)
        base = Prediction(rows, lenience, 1.0, plain, plain, tuple(forwards), 0.0)
        return with_gate(base, gate, costs) if gate is not None and rows and acceptance.mag else base
    if len(rows) != acceptance.num_drafting:
        raise ValueError(
            f"K-matrix is {len(rows)}x{len(rows)}, the profile has {acceptance.num_drafting} drafting levels"
        )
    limit = draft_bound(rows, acceptance.mag)
    if max_draft is not None:
        limit = min(limit, max_draft)
    model = _Model(rows, lenience, acceptance, costs)
    row = model.fill(0, limit)
    target = costs.levels[0]
    seconds = costs.step_seconds + row.seconds + sum(p * target(k + 1) for k, p in enumerate(row.length) if p)
    tokens = 1.0 + sum(row.at_least[1:])
    forwards = list(row.forwards)
    forwards[0] = 1.0
    draft_length = sum(k * p for k, p in enumerate(row.length))
    base = Prediction(rows, lenience, tokens, seconds, plain, tuple(forwards), draft_length)
    return with_gate(base, gate, costs) if gate is not None and acceptance.mag else base


def with_gate(base: Prediction, gate: GateModel, costs: CostModel) -> Prediction:
    """``base`` (the cascade's ordinary steps) mixed with MaG first's gated steps, per output
    position of the gate's walk (``gate.py``): every step also pays one MaG proposal (the
    gate's check); a gated step costs the step overhead and the target's forward over its draft."""
    gated_steps, gated_tokens, lengths = gate.mixture(base.tokens_per_step)
    target = costs.levels[0]
    gated_seconds = gated_steps * (costs.step_seconds + costs.mag_seconds)
    gated_seconds += sum(share * target(length + 1) for length, share in lengths.items())
    ordinary_steps = max(0.0, 1.0 - gated_tokens) / base.tokens_per_step
    seconds = gated_seconds + ordinary_steps * (base.seconds_per_step + costs.mag_seconds)
    steps = gated_steps + ordinary_steps
    if steps <= 0:
        return base
    forwards = [f * ordinary_steps for f in base.forwards_per_step]
    forwards[0] += gated_steps
    forwards[-1] += gated_steps + ordinary_steps  # MaG proposes at every step (the gate's check)
    draft = base.draft_length * ordinary_steps + sum(share * length for length, share in lengths.items())
    return Prediction(
        base.k_matrix,
        base.lenience,
        1.0 / steps,
        seconds / steps,
        base.plain_seconds_per_token,
        tuple(f / steps for f in forwards),
        draft / steps,
        gate.threshold,
    )


# -- which levels a K-matrix uses ----------------------------------------------------------------


def used_levels(rows) -> list[int]:
    """Drafting levels (1-based) that some used reviewer drafts from, in order."""
    n = len(rows)
    used = {0}
    for r in range(n):
        if r in used:
            used.update(c + 1 for c in range(r, n) if rows[r][c])
    return sorted(used - {0})


def canonical(rows) -> tuple[tuple[int, ...], ...]:
    """Zero the rows of levels that are not used (they are never read): one key per behaviour."""
    n = len(rows)
    used = set(used_levels(rows)) | {0}
    return tuple(tuple(rows[r]) if r in used else (0,) * n for r in range(n))


def reduce(rows, keep=()) -> tuple[list[int], list[list[int]]]:
    """(used drafting levels, the K-matrix restricted to them) — what a config file holds.
    ``keep``: levels to keep even if unused (MaG for MaG-first gating: a zero column)."""
    used = sorted(set(used_levels(rows)) | set(keep))
    keep_rows = [0] + used  # reviewer rows: the target and the used levels (their rows)
    reduced = []
    for r in keep_rows:
        if r >= len(rows):
            continue  # the last level (MaG or an autoregressive drafter) has no row
        reduced.append([rows[r][v - 1] for v in used])
    # a used level with no row of its own (the last one) still needs its square row of zeros
    while len(reduced) < len(used):
        reduced.append([0] * len(used))
    return used, reduced[: len(used)]


def expand(used: list[int], reduced, num_drafting: int) -> tuple[tuple[int, ...], ...]:
    """Inverse of ``reduce``: a K-matrix over the used levels placed into the full level set."""
    rows = [[0] * num_drafting for _ in range(num_drafting)]
    reviewers = [0] + list(used)
    for i, r in enumerate(reviewers[: len(reduced)]):
        if r >= num_drafting:
            continue
        for j, v in enumerate(used):
            rows[r][v - 1] = reduced[i][j]
    return tuple(tuple(row) for row in rows)


# -- the search --------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One explored configuration: the model's prediction and, when replayed, the replay's."""

    k_matrix: tuple[tuple[int, ...], ...]
    lenience: float
    model: Prediction
    replay: Prediction | None = None
    mag_first: int | None = None  # MaG-first gating (modelled by gate.py, or replayed)
    mag_level: int | None = None

    @property
    def prediction(self) -> Prediction:
        """The best estimate available: the replay's (greedy traces) or else the model's."""
        return self.replay if self.replay is not None else self.model

    @property
    def keep(self) -> tuple[int, ...]:
        """Levels a config needs beyond those K uses: MaG, when it gates."""
        return (self.mag_level,) if self.mag_first is not None and self.mag_level is not None else ()

    @property
    def levels(self) -> list[int]:
        return sorted(set(used_levels(self.k_matrix)) | set(self.keep))

    def as_dict(self, names: tuple[str, ...] | None = None) -> dict:
        return {
            "k_matrix": [list(row) for row in self.k_matrix],
            "lenience": self.lenience,
            "mag_first": self.mag_first,
            "levels": [names[v] for v in self.levels] if names else self.levels,
            "model": self.model.as_dict(),
            "replay": self.replay.as_dict() if self.replay is not None else None,
        }


@dataclass(frozen=True)
class SearchResult:
    best: Candidate
    explored: list[Candidate]  # replayed ones first (by replayed speed), then by modelled speed
    plain: Candidate

    def best_with_levels(self, levels: set[int]) -> Candidate | None:
        """The best explored configuration using exactly these drafting levels."""
        for c in self.explored:
            if set(c.levels) == set(levels):
                return c
        return None


@dataclass(frozen=True)
class SearchSpace:
    """Bounds and coarse grid values of K entries: target row vs drafter rows, neural vs MaG."""

    max_target_neural: int = 12
    max_target_mag: int = 24
    max_inner_neural: int = 6
    max_inner_mag: int = 12
    grid_target_neural: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8)
    grid_target_mag: tuple[int, ...] = (0, 2, 4, 8, 12)
    grid_inner_neural: tuple[int, ...] = (0, 1, 2)
    grid_inner_mag: tuple[int, ...] = (0, 2, 4, 8)
    max_grid: int = 4000  # above this many grid points, a random sample of them
    descent_starts: int = 8
    replay_shortlist: int = 24  # best modelled candidates to replay (plus the best few per level set)
    replay_budget: int = 200  # most replays in all
    mag_first_values: tuple[int, ...] = (2, 3, 4, 6)  # MaG-first match lengths tried by replay

    def bound(self, row: int, level: int, mag_level: int | None) -> int:
        mag = level == mag_level
        if row == 0:
            return self.max_target_mag if mag else self.max_target_neural
        return self.max_inner_mag if mag else self.max_inner_neural

    def grid(self, row: int, level: int, mag_level: int | None) -> tuple[int, ...]:
        mag = level == mag_level
        if row == 0:
            return self.grid_target_mag if mag else self.grid_target_neural
        return self.grid_inner_mag if mag else self.grid_inner_neural


def _neighbours(rows, space: SearchSpace, mag_level: int | None, deltas=(1, -1, 2, -2)):
    """K-matrices one entry away (within bounds, the target row never empty)."""
    n = len(rows)
    for r in range(n):
        for c in range(r, n):
            for delta in deltas:
                value = rows[r][c] + delta
                if value < 0 or value > space.bound(r, c + 1, mag_level):
                    continue
                changed = [list(row) for row in rows]
                changed[r][c] = value
                if any(changed[0]):
                    yield canonical(changed)


def _reviews_a_drafter(rows) -> bool:
    """Whether some used drafter reviews a smaller one (only then does lenience matter)."""
    used = used_levels(rows)
    return any(any(rows[r][r:]) for r in used if r < len(rows))


def search(
    acceptance: Acceptance,
    costs: CostModel,
    space: SearchSpace | None = None,
    lenience_values: list[float] | None = None,
    max_draft: int | None = None,
    replay=None,
    seed: int = 0,
    gate: GateModel | None = None,
) -> SearchResult:
    """The configuration with the best predicted tokens/s (see the module docstring).

    ``replay(rows, lenience, mag_first) -> Prediction``, when given (greedy traces), re-ranks the
    model's best candidates, tries MaG-first gating on the best of them, and refines the best by
    coordinate descent on the replayed speed.

    ``gate``: every candidate of the model stage has MaG first at ``gate.threshold``, modelled
    by ``gate.py`` (``acceptance``: the rates measured under that gate); K = 0 (MaG first over
    plain decoding) is a candidate too.
    """
    space = space or SearchSpace()
    lenience_values = lenience_values if lenience_values is not None else acceptance.lenience_values
    plain_prediction = predict((), acceptance, costs)
    plain = Candidate((), 1.0, plain_prediction, plain_prediction if replay is not None else None)
    n = acceptance.num_drafting
    if n == 0:
        return SearchResult(plain, [plain], plain)
    state = _Search(acceptance, costs, space, max_draft, replay, gate)
    if state.gate is not None:
        state.evaluate([[0] * n for _ in range(n)])  # MaG first over plain decoding
    # 1. a coarse grid over every entry
    state.evaluate_grid(seed)
    # 2. coordinate descent on the model from the best candidates and the best of each level set
    state.descend_on_model()
    # 3. lenience, where a drafter reviews a smaller drafter
    for c in state.ranked_by_model()[: space.descent_starts]:
        if _reviews_a_drafter(c.k_matrix):
            for lenience in lenience_values:
                if lenience != 1.0:
                    state.evaluate(c.k_matrix, lenience)
    if replay is None:
        explored = sorted([plain, *state.seen.values()], key=_model_speed, reverse=True)
        return SearchResult(explored[0], explored, plain)

    # 4. replay the shortlist, then refine the best replayed ones by coordinate descent
    state.replay_shortlist()
    # MaG first (a long MaG match drafts alone for the target): only the replay can judge it
    if state.mag_level is not None:
        for c in state.ranked_by_replay()[: space.descent_starts]:
            for mag_first in space.mag_first_values:
                state.replayed(state.candidate(c.k_matrix, c.lenience, mag_first))
    for start in state.ranked_by_replay()[:3]:
        state.refine_by_replay(start, lenience_values)
    rest = sorted((c for c in state.seen.values() if c.replay is None), key=_model_speed, reverse=True)
    explored = sorted([plain, *state.ranked_by_replay()], key=_replay_speed, reverse=True) + rest
    return SearchResult(explored[0], explored, plain)


def _model_speed(c: Candidate) -> float:
    return c.model.tokens_per_second


def _replay_speed(c: Candidate) -> float:
    return c.replay.tokens_per_second if c.replay is not None else 0.0


class _Search:
    """One search's state: every configuration evaluated so far (by K-matrix, lenience and MaG
    first; each evaluated once) and the replays left in the budget."""

    def __init__(self, acceptance: Acceptance, costs: CostModel, space: SearchSpace, max_draft, replay, gate) -> None:
        self.acceptance = acceptance
        self.costs = costs
        self.space = space
        self.max_draft = max_draft
        self.replay = replay
        self.n = acceptance.num_drafting
        self.mag_level = self.n if acceptance.mag else None
        self.gate = gate if self.mag_level is not None else None
        self.gate_threshold = self.gate.threshold if self.gate is not None else None
        self.seen: dict[tuple, Candidate] = {}
        self.replays_left = space.replay_budget

    def evaluate(self, rows, lenience: float = 1.0) -> Candidate:
        """The model's candidate, with MaG first at the modelled gate's threshold when there is one."""
        return self.candidate(rows, lenience, self.gate_threshold)

    def candidate(self, rows, lenience: float, mag_first: int | None) -> Candidate:
        key = (canonical(rows), lenience, mag_first)
        found = self.seen.get(key)
        if found is None:
            modelled = self.gate if mag_first is not None and mag_first == self.gate_threshold else None
            model = predict(key[0], self.acceptance, self.costs, lenience, self.max_draft, modelled)
            found = Candidate(key[0], lenience, model, mag_first=mag_first, mag_level=self.mag_level)
            self.seen[key] = found
        return found

    def replayed(self, c: Candidate) -> Candidate:
        """``c``, replayed if it was not yet and the budget allows."""
        if c.replay is None and self.replays_left > 0:
            c.replay = self.replay(c.k_matrix, c.lenience, c.mag_first)
            self.replays_left -= 1
        return c

    def ranked_by_model(self) -> list[Candidate]:
        return sorted(self.seen.values(), key=_model_speed, reverse=True)

    def ranked_by_replay(self) -> list[Candidate]:
        """The replayed candidates, fastest first."""
        return sorted((c for c in self.seen.values() if c.replay is not None), key=_replay_speed, reverse=True)

    def evaluate_grid(self, seed: int) -> None:
        """Every point of the space's coarse grid (a random sample of ``max_grid`` when larger)."""
        import random

        n, space = self.n, self.space
        cells = [(r, c) for r in range(n) for c in range(r, n)]
        choices = [space.grid(r, c + 1, self.mag_level) for r, c in cells]
        if math.prod(len(x) for x in choices) <= space.max_grid:
            points = itertools.product(*choices)
        else:
            rng = random.Random(seed)
            points = (tuple(rng.choice(x) for x in choices) for _ in range(space.max_grid))
        for point in points:
            rows = [[0] * n for _ in range(n)]
            for (r, c), value in zip(cells, point):
                rows[r][c] = value
            if any(rows[0]):
                self.evaluate(rows)

    def descend_on_model(self) -> None:
        """Coordinate descent on the model's speed from the best candidates and the best of each level set."""
        ranked = self.ranked_by_model()
        starts = ranked[: self.space.descent_starts]
        best_per_set: dict[tuple, Candidate] = {}
        for c in ranked:
            best_per_set.setdefault(tuple(c.levels), c)
        starts += [c for c in best_per_set.values() if c not in starts]
        for start in starts:
            current, improved = start, True
            while improved:
                improved = False
                for rows in _neighbours(current.k_matrix, self.space, self.mag_level):
                    candidate = self.evaluate(rows, current.lenience)
                    if _model_speed(candidate) > _model_speed(current) * (1 + 1e-9):
                        current, improved = candidate, True

    def replay_shortlist(self) -> None:
        """Replay the model's best candidates and the best three of each level set."""
        ranked = self.ranked_by_model()
        shortlist = ranked[: self.space.replay_shortlist]
        per_set: dict[tuple, list[Candidate]] = {}
        for c in ranked:
            per_set.setdefault(tuple(c.levels), []).append(c)
        for group in per_set.values():
            shortlist += [c for c in group[:3] if c not in shortlist]
        for c in shortlist:
            self.replayed(c)

    def refine_by_replay(self, start: Candidate, lenience_values) -> None:
        """Coordinate descent on the replayed speed from ``start`` (first improvement, while the
        budget lasts), then the lenience values and MaG-first lengths at the point it reached."""
        current, improved = start, True
        while improved and self.replays_left > 0:
            improved = False
            for rows in _neighbours(current.k_matrix, self.space, self.mag_level, deltas=(1, -1)):
                candidate = self.replayed(self.candidate(rows, current.lenience, current.mag_first))
                if _replay_speed(candidate) > _replay_speed(current) * (1 + 1e-9):
                    current, improved = candidate, True
                    break
        if _reviews_a_drafter(current.k_matrix):
            for lenience in lenience_values:
                if lenience != current.lenience:
                    self.replayed(self.candidate(current.k_matrix, lenience, current.mag_first))
        if self.mag_level is not None:
            for mag_first in (None, *self.space.mag_first_values):
                self.replayed(self.candidate(current.k_matrix, current.lenience, mag_first))


def search_gated(
    acceptance: Acceptance,
    gated: dict[int, tuple[Acceptance, GateModel]],
    costs: CostModel,
    space: SearchSpace | None = None,
    max_draft: int | None = None,
) -> SearchResult:
    """The model's search (no replay) without MaG first and with it at each modelled threshold
    (``gated``: threshold -> the acceptance under that gate and its ``GateModel``); the fastest
    of all, every candidate explored."""
    results = [search(acceptance, costs, space, lenience_values=[1.0], max_draft=max_draft)]
    for threshold in sorted(gated):
        under_gate, gate = gated[threshold]
        results.append(search(under_gate, costs, space, lenience_values=[1.0], max_draft=max_draft, gate=gate))
    explored = sorted(
        (c for result in results for c in result.explored),
        key=lambda c: c.prediction.tokens_per_second,
        reverse=True,
    )
    return SearchResult(explored[0], explored, results[0].plain)


def best_plain_speculative(acceptance: Acceptance, costs: CostModel, replay=None, max_k: int = 12) -> Candidate | None:
    """Plain speculative decoding (one neural drafter, MaG off, ``K = [[k]]``) with the drafter
    and draft length predicted fastest — the baseline the tuned cascade is compared with."""
    n = acceptance.num_drafting
    num_neural = n - int(acceptance.mag)
    candidates = []
    for level in range(1, num_neural + 1):
        options = []
        for k in range(1, max_k + 1):
            rows = [[0] * n for _ in range(n)]
            rows[0][level - 1] = k
            rows = tuple(tuple(row) for row in rows)
            options.append(Candidate(rows, 1.0, predict(rows, acceptance, costs)))
        options.sort(key=lambda c: c.model.tokens_per_second, reverse=True)
        if replay is not None:
            best_k = options[0].k_matrix[0][level - 1]
            options = [c for c in options if abs(c.k_matrix[0][level - 1] - best_k) <= 2]
            for c in options:
                c.replay = replay(c.k_matrix, 1.0, None)
        candidates += options
    if not candidates:
        return None
    return max(candidates, key=lambda c: c.prediction.tokens_per_second)
