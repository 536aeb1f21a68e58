"""MaG first in the planner: which steps the gate sends to the target alone, and what they yield.

With ``mag_first = N`` a step whose MaG proposal continues a suffix match of at least ``N``
tokens is a **gated** step: MaG's draft alone goes to the target. Whether a step is gated
depends on where it starts, and where a step starts depends on the steps before, so the planner
does not treat the gate as an independent per-step coin. It walks each recorded trajectory
(the target's own output) the way a run would:

* at output position ``i``, if MaG's match there is at least ``N`` tokens, the step is gated: its
  draft has ``L`` tokens (the schedule's MaG-first length: fixed for a static schedule; for an
  adaptive one ``L0`` at the start of a generation, then about twice what the previous gated
  draft got accepted, within bounds, as ``schedule.py`` does; ``L0`` and the fixed length are
  the schedule's start, 8 adaptive or 24 static, or row 0's total of K when that is longer),
  the target accepts the first
  ``a = min(run_i, L)`` of them (``run_i``: how many of MaG's proposed tokens continue the
  output), and the walk moves on ``a + 1`` positions;
* otherwise the cascade drafts as the K-matrix says, and the walk moves on the cascade's expected
  tokens per step (the model's ``E[A_0] + 1``, interpolated between whole strides).

Per output position this gives the number of gated steps, the tokens they emit and the lengths
of their drafts (so the target's cost of verifying them); the positions left over are covered by
ordinary cascade steps, whose speed the expected-walltime model predicts with acceptance measured
**only on drafts that start where the gate did not fire** (``measure.py`` walks the same gate
when counting): MaG is right less often exactly where its match is short, and averaging over
all positions would credit the cascade with MaG's easy stretches twice.

The whole step is then a mixture (renewal-reward over the walk): tokens per position are 1;
seconds per position are the gated steps' seconds plus the ordinary steps' share,
``(1 - gated tokens) / N_step * T_step``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..schedule import ScheduleParams

# the schedules' MaG-first draft lengths, read from schedule.py so the model follows it
STATIC_START = ScheduleParams().static_mag_first_tokens
ADAPTIVE_START = ScheduleParams().mag_first_start
ADAPTIVE_MIN_TOKENS = ScheduleParams().mag_first_min_tokens
ADAPTIVE_MAX_TOKENS = ScheduleParams().mag_first_max_tokens
MAX_STRIDE = 16  # ordinary steps emitting more tokens than this on average are walked at this stride


@dataclass(frozen=True)
class MagRuns:
    """Per recorded trajectory and output position ``i``: the length of MaG's suffix match at
    ``i`` (the gate's input) and how many of its proposed tokens from ``i`` on equal the output
    (what a gated draft would get accepted: greedy exactly; for a sampled trajectory, the
    tokens the target happened to emit, an unbiased stand-in for ``p(x)`` per token)."""

    match_lengths: tuple[np.ndarray, ...]  # per trajectory (N,) int
    runs: tuple[np.ndarray, ...]  # per trajectory (N,) int, capped at the measured proposal length

    @property
    def num_positions(self) -> int:
        return int(sum(len(m) for m in self.match_lengths))

    def as_dict(self) -> dict:
        return {
            "match_lengths": [m.astype(int).tolist() for m in self.match_lengths],
            "runs": [r.astype(int).tolist() for r in self.runs],
        }

    @classmethod
    def from_dict(cls, data: dict) -> MagRuns:
        return cls(
            tuple(np.asarray(m, dtype=np.int64) for m in data["match_lengths"]),
            tuple(np.asarray(r, dtype=np.int64) for r in data["runs"]),
        )

    @classmethod
    def concat(cls, parts: list[MagRuns]) -> MagRuns:
        return cls(
            tuple(m for part in parts for m in part.match_lengths), tuple(r for part in parts for r in part.runs)
        )


class GateLengths:
    """The MaG-first draft length along a walk, as the schedule chooses it: ``fixed`` tokens
    (static schedule) or adaptive (``first`` at a generation's start, then ``2 (a + 1)`` within
    ``ADAPTIVE_MIN_TOKENS .. ADAPTIVE_MAX_TOKENS`` after ``a`` accepted)."""

    def __init__(self, adaptive: bool, first: int | None = None) -> None:
        self.adaptive = adaptive
        self.first = first if first is not None else (ADAPTIVE_START if adaptive else STATIC_START)
        self.current = first

    def start(self) -> None:
        self.current = self.first

    def after(self, num_accepted: int) -> None:
        if self.adaptive:
            self.current = min(ADAPTIVE_MAX_TOKENS, max(ADAPTIVE_MIN_TOKENS, 2 * (num_accepted + 1)))


class GateWalker:
    """Skips the gated steps of one trajectory in a renewal walk (``measure.renewal_counts``):
    ``jump(i)`` is how far a gated step at ``i`` moves the walk, 0 when the gate does not fire."""

    def __init__(self, match_lengths: np.ndarray, runs: np.ndarray, threshold: int, lengths: GateLengths) -> None:
        self.match_lengths = match_lengths
        self.runs = runs
        self.threshold = threshold
        self.lengths = lengths
        self.num = len(match_lengths)
        lengths.start()

    def jump(self, i: int) -> int:
        room = self.num - i - 1  # the step's own token must fit: the draft limit
        if room <= 0 or self.match_lengths[i] < self.threshold:
            return 0
        accepted = min(int(self.runs[i]), self.lengths.current, room)
        self.lengths.after(accepted)
        return accepted + 1


@dataclass(frozen=True)
class GateStats:
    """One walk of every trajectory at a whole stride, per output position."""

    gated_steps: float  # gated steps per position
    gated_tokens: float  # tokens gated steps emit per position (the rest come from ordinary steps)
    draft_lengths: dict[int, float]  # gated draft length -> gated steps of that length per position


@dataclass
class GateModel:
    """MaG first at ``threshold`` over recorded MaG runs (module docstring)."""

    runs: MagRuns
    threshold: int
    adaptive: bool = True
    first_length: int | None = None  # the first gated draft of a generation (static: every one);
    # None: the schedule's own start
    _stats: dict[int, GateStats] = field(default_factory=dict, repr=False)
    _variants: dict[int, GateModel] = field(default_factory=dict, repr=False)  # by first length

    def stats(self, stride: int) -> GateStats:
        """The walk with ordinary steps moving ``stride`` positions (memoised)."""
        cached = self._stats.get(stride)
        if cached is not None:
            return cached
        lengths = GateLengths(self.adaptive, self.first_length)
        steps = tokens = 0
        histogram: dict[int, int] = {}
        total = 0
        for match_lengths, runs in zip(self.runs.match_lengths, self.runs.runs):
            num = len(match_lengths)
            total += num
            lengths.start()
            i = 0
            while i < num:
                room = num - i - 1
                if room > 0 and match_lengths[i] >= self.threshold:
                    length = min(lengths.current, room)
                    accepted = min(int(runs[i]), length)
                    lengths.after(accepted)
                    steps += 1
                    tokens += min(accepted + 1, num - i)
                    histogram[length] = histogram.get(length, 0) + 1
                    i += accepted + 1
                else:
                    i += stride
        total = max(total, 1)
        result = GateStats(steps / total, tokens / total, {k: v / total for k, v in sorted(histogram.items())})
        self._stats[stride] = result
        return result

    def for_rows(self, rows) -> GateModel:
        """This gate as the schedule runs it over K ``rows``: its first MaG-first draft (every
        one, static) is the schedule's start or row 0's total of K, whichever is longer
        (``StaticSchedule.__init__``). A ``first_length`` given explicitly is kept."""
        if self.first_length is not None:
            return self
        start = ADAPTIVE_START if self.adaptive else STATIC_START
        first = max(start, sum(rows[0]) if rows else 0)
        if first == start:
            return self
        variant = self._variants.get(first)
        if variant is None:
            variant = self._variants[first] = GateModel(self.runs, self.threshold, self.adaptive, first)
        return variant

    def mixture(self, tokens_per_step: float) -> tuple[float, float, dict[int, float]]:
        """(gated steps, gated tokens, draft-length histogram) per position when ordinary steps
        emit ``tokens_per_step`` on average: linear between the two nearest whole strides."""
        stride = min(max(tokens_per_step, 1.0), float(MAX_STRIDE))
        low = int(stride)
        high = min(low + 1, MAX_STRIDE)
        w = stride - low
        a, b = self.stats(low), self.stats(high)
        if w == 0.0 or low == high:
            return a.gated_steps, a.gated_tokens, dict(a.draft_lengths)
        histogram = {k: (1 - w) * v for k, v in a.draft_lengths.items()}
        for k, v in b.draft_lengths.items():
            histogram[k] = histogram.get(k, 0.0) + w * v
        return (
            (1 - w) * a.gated_steps + w * b.gated_steps,
            (1 - w) * a.gated_tokens + w * b.gated_tokens,
            histogram,
        )
