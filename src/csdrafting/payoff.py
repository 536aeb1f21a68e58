"""``mag_first="auto"``: MaG goes first only where its draft is expected to pay, for as many
tokens as pay.

Where a target forward over T tokens costs nearly T times one (a compute-bound CPU: Qwen2.5-Coder
1.5B on 2 cores verifies 8 tokens in 3.7x the time of one), a draft that is usually wrong slows
decoding down, and a fixed match-length threshold cannot tell. ``PayoffGate`` decides from two
things it measures as the generation goes:

* **Acceptance by what is known before drafting**: for MaG's proposal, the length of the suffix
  it matched (bucketed) and whether the previous MaG-first draft was accepted whole (copying
  tends to go on), the chance that the token at each depth is accepted given the ones before it.
  Counts start from an optimistic prior and decay (recent steps weigh most).
* **The target's cost curve** ``t(T)``: the seconds of its forward-and-verify over T tokens,
  averaged per T from the steps' reports (linear between measured sizes, extrapolated beyond).

Given a proposal of match length m with L tokens available, it drafts the k <= L that maximise
the expected tokens per second ``(1 + E[accepted of k]) / t(k + 1)``, and nothing (k = 0: the step
goes on as configured) unless that beats plain decoding's ``1 / t(1)``. Every so many declined
opportunities it drafts a short probe anyway, so a bucket that looks bad stays measured.

It reads only past steps and the committed tokens (the proposal, not what the target will say),
so it changes speed, never output. Without the clock (a seeded sampling request must be
reproducible) it prices forwards by the prior cost curve and learns within the request only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .report import StepReport


@dataclass(frozen=True)
class PayoffParams:
    prior_acceptance: float = 0.5  # per-depth acceptance before any count (optimistic enough to try)
    prior_weight: float = 2.0  # pseudo-tries behind the prior
    decay: float = 0.98  # of the acceptance counts and the cost averages
    max_depth: int = 32  # longest draft it considers
    probe_every: int = 16  # declined opportunities between two probes
    probe_tokens: int = 4
    prior_token_share: float = 0.3  # t(T) = t(1) * (1 + share * (T - 1)) until two sizes are measured


def match_bucket(match_length: int) -> int:
    """1, 2-3, 4-7, 8-15, 16-31, 32+ matched tokens (0: no match, a bigram guess)."""
    return min(match_length, 32).bit_length()


class PayoffGate:
    """Chooses MaG-first draft lengths by expected payoff (module docstring); learns from reports."""

    def __init__(self, params: PayoffParams | None = None) -> None:
        self.params = params if params is not None else PayoffParams()
        self.use_timing = True
        self._forget()

    def begin(self, use_timing: bool) -> None:
        """A new generation: what was learned carries over while timed, else it starts afresh."""
        if not use_timing or not self.use_timing:
            self._forget()
        self.use_timing = use_timing

    def _forget(self) -> None:
        self._tries: dict[tuple, list[float]] = {}
        self._hits: dict[tuple, list[float]] = {}
        self._seconds: dict[int, float] = {}  # T -> decayed seconds sum
        self._weights: dict[int, float] = {}  # T -> decayed count
        self.whole = False  # the last MaG-first draft was accepted whole
        self._declined = 0
        self._pending: tuple | None = None  # the key of the draft just proposed, until its report

    # -- deciding ------------------------------------------------------------------------------

    def length(self, match_length: int, available: int) -> int:
        """Tokens to draft from a proposal that matched ``match_length`` tokens (0: none)."""
        key = (match_bucket(match_length), self.whole)
        limit = min(available, self.params.max_depth)
        seconds = self.curve(limit + 1)  # computed once per decision: this runs every step
        best_k, best_speed = 0, 1.0 / seconds[0]
        reach, expected = 1.0, 0.0
        for k, rate in enumerate(self.rates(key, limit), start=1):
            reach *= rate
            expected += reach
            speed = (1.0 + expected) / seconds[k]
            if speed > best_speed:
                best_k, best_speed = k, speed
        if best_k == 0 and limit > 0:
            self._declined += 1
            if self._declined % self.params.probe_every == 0:
                best_k = min(self.params.probe_tokens, limit)  # keep the bucket measured
        self._pending = key if best_k else None
        return best_k

    def rates(self, key: tuple, max_depth: int) -> list[float]:
        """For depths 1..``max_depth``, the chance the token there is accepted given the ones before
        were. Each depth's counts are shrunk toward the depth above it (the first toward the prior):
        copying goes on or does not, so a depth seldom tried goes as the ones before it, and drafts
        grow while they are right."""
        weight = self.params.prior_weight
        rate = self.params.prior_acceptance
        tries, hits = self._tries.get(key, ()), self._hits.get(key, ())
        out = []
        for d in range(max_depth):
            if d < len(tries):
                rate = (hits[d] + rate * weight) / (tries[d] + weight)
            out.append(rate)
        return out

    def rate(self, key: tuple, depth: int) -> float:
        """The chance the token at ``depth`` (1-based) is accepted, given the ones before were."""
        return self.rates(key, depth)[-1]

    def seconds(self, num_tokens: int) -> float:
        """The target's expected seconds over ``num_tokens`` tokens (``curve``)."""
        return self.curve(num_tokens)[-1]

    def curve(self, max_tokens: int) -> list[float]:
        """The target's expected seconds over 1..``max_tokens`` tokens: measured, interpolated
        between measured sizes or extrapolated past them; in units of one forward, rising by
        ``prior_token_share`` a token, before anything is measured (or scaled to the one size
        measured)."""
        sizes = sorted(self._weights)
        mean = {t: self._seconds[t] / self._weights[t] for t in sizes}
        share = self.params.prior_token_share
        unit = mean[sizes[0]] / (1 + share * (sizes[0] - 1)) if len(sizes) == 1 else 1.0
        out = []
        for num_tokens in range(1, max_tokens + 1):
            if num_tokens in mean:
                out.append(mean[num_tokens])
            elif len(sizes) < 2:
                out.append(unit * (1 + share * (num_tokens - 1)))
            else:
                out.append(_line(mean, sizes, num_tokens))
        return out

    # -- learning ------------------------------------------------------------------------------

    def observe(self, report: StepReport) -> None:
        decay = self.params.decay
        for forward in report.forwards if self.use_timing else ():
            if forward.level == 0 and not forward.tree:
                t = forward.num_tokens
                self._seconds[t] = decay * self._seconds.get(t, 0.0) + forward.seconds
                self._weights[t] = decay * self._weights.get(t, 0.0) + 1.0
        key, self._pending = self._pending, None
        if not report.mag_first or key is None:
            return
        num_drafted = report.num_drafted
        tries = self._tries.setdefault(key, [])
        hits = self._hits.setdefault(key, [])
        for depth in range(
            min(report.num_accepted + 1, num_drafted)
        ):  # tried: the accepted ones and the first rejected
            while len(tries) <= depth:
                tries.append(0.0)
                hits.append(0.0)
            tries[depth] = decay * tries[depth] + 1
            hits[depth] = decay * hits[depth] + (depth < report.num_accepted)
        self.whole = report.num_accepted == num_drafted


def _line(mean: dict[int, float], sizes: list[int], num_tokens: int) -> float:
    """Seconds at ``num_tokens`` on the line through the nearest measured sizes."""
    below = [t for t in sizes if t < num_tokens]
    above = [t for t in sizes if t > num_tokens]
    if below and above:
        lo, hi = below[-1], above[0]  # interpolate
    else:
        lo, hi = (sizes[-2], sizes[-1]) if below else (sizes[0], sizes[1])  # extrapolate
    slope = (mean[hi] - mean[lo]) / (hi - lo)
    return max(mean[lo] + slope * (num_tokens - lo), 1e-9)
