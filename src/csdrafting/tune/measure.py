"""What the planner needs, measured on the user's device and prompts.

**Costs.** For every neural level, the seconds of one forward-and-review as the cascade runs it
(``level.next_token_logits`` over ``T`` new tokens after a cached context, then the review of
``T - 1`` draft tokens) for every ``T`` in 1..32, at a reference context (the prompts' mean
length plus half the generation), and at a quarter of it for the context fit (``T`` = 1 and 8:
seconds per context position per forward and per token, ``planner.fit_context``).
Calls are interleaved (every level and ``T`` once per round, in shuffled order) after untimed
warm-up rounds; each cell is the median of its rounds. Costs are not smoothed: on a CPU they are
not even monotone in ``T`` (matrix kernels favour some shapes: 16 tokens can cost less than 15).
MaG: the median seconds of one proposal. The review alone, by ``T``. The cascade's own logic
(step bookkeeping, drafting, output): from the wall time of replays (``replay.py``) of plain
decoding (per step) and of the default K-matrix (per drafter review), less their stand-in
forwards and reviews.

**Acceptance.** Along the target's own output on every prompt (greedy, or sampled at the given
temperature), every neural level runs once over prompt + output, which gives its next-token
logits after every true prefix. A run of proposals of level ``v`` starting at output position
``i`` is: for a neural ``v``, its argmax after each true prefix (given the earlier ones were
accepted they *are* the true prefix); for MaG, its proposal of up to 24 tokens from its index
of the true prefix at ``i``. Reviewer ``r`` accepts the ``k``-th when it equals ``r``'s argmax
there (greedy), with probability ``sum_x min(p_r, q_v)`` (sampling; ``p_r(x)`` for MaG).

Rates are counted on drafts that start where the previous one ended, as in a real run
(``renewal_counts``: a draft of length ``k`` at ``i`` accepting ``a`` tokens makes the next start
at ``i + a + 1``), for each draft length ``k``: averaging over every start position instead
would over-weight easy stretches (a long repeated passage holds many start positions but a real
run crosses it in a few steps) and over-predict long drafts. ``alpha_{r,v,k}(j)`` is the number
of drafts whose ``j``-th token was accepted over those that reached it; where fewer than
``MIN_COUNT`` drafts reach ``j``, the remaining positions share one pooled rate.

For a drafter reviewer ``r`` (greedy): lenient rates (``r`` accepts ``x`` when
``l p_r(x) >= max p_r``), and ``rho^l_{r,v}``: how often the target's choice is what ``r``
accepted from ``v`` at lenience ``l``, over how often it is ``r``'s own argmax (the planner uses
``rho^l / rho^1``: what lenience does to the tokens a drafter lets through). Drafter reviewers are measured on
the target's output too (inside a cascade their context can differ from it; an approximation).

**Traces.** The top-8 logits of every level at every output position: what ``replay.py`` needs
to re-run the real cascade on these prompts without the models (greedy only).
"""

from __future__ import annotations

import functools
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .. import verify
from ..levels.mag import MaG
from ..sampling import SamplingParams, warp
from .gate import GateLengths, GateModel, GateWalker, MagRuns
from .planner import Acceptance, CostModel, LevelCost, fit_context
from .replay import Trace, make_trace

COST_TOKENS = tuple(range(1, 33))  # every count: kernels favour some shapes (16 tokens can beat 15)
MAX_RUN = 32  # longest run of proposals whose acceptance is measured (= the longest MaG-first draft)
DRAFT_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24)  # draft lengths whose acceptance is measured
MIN_COUNT = 40  # runs needed to estimate one position's rate on its own
LENIENCE_VALUES = (1.5, 2.0, 3.0)
GATE_THRESHOLDS = (2, 3, 4, 6)  # MaG-first match lengths the planner models


@dataclass(frozen=True)
class Profile:
    """Everything measured: costs, acceptance and how they were obtained."""

    costs: CostModel
    acceptance: Acceptance
    traces: list[Trace] = field(default_factory=list)  # greedy only: what replay.py replays
    info: dict = field(default_factory=dict)
    gated: GatedAcceptance | None = None  # MaG first, for the model (gate.py); None: MaG off

    def as_dict(self) -> dict:
        return {
            "costs": self.costs.as_dict(),
            "acceptance": self.acceptance.as_dict(),
            "traces": [trace.as_dict() for trace in self.traces],
            "info": self.info,
            "gated": self.gated.as_dict() if self.gated is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        return cls(
            CostModel.from_dict(data["costs"]),
            Acceptance.from_dict(data["acceptance"]),
            [Trace.from_dict(t) for t in data.get("traces", [])],
            data.get("info", {}),
            GatedAcceptance.from_dict(data["gated"]) if data.get("gated") else None,
        )


@dataclass
class Trajectory:
    prompt_ids: list[int]
    output_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


# -- trajectories and logits ---------------------------------------------------------------------


def plain_cascade(cascade):
    """A cascade over the same target level with no drafting: plain decoding on our runner."""
    from dataclasses import replace

    plain = replace(cascade.config, drafters=(), mag=False, k_matrix=(), adaptive=False, mag_first=None)
    return cascade.with_config(plain)


def trajectories(
    cascade, prompts_ids: list[list[int]], max_new_tokens: int, params: SamplingParams
) -> list[Trajectory]:
    """The target's own output (fixed length) on every prompt."""
    plain = plain_cascade(cascade)
    out = []
    for number, ids in enumerate(prompts_ids):
        seed = None if params.greedy else (params.seed or 0) + number
        result = plain.generate(
            ids, max_new_tokens, params.temperature, params.top_k, params.top_p, seed=seed, ignore_eos=True
        )
        out.append(Trajectory(list(ids), list(result.token_ids)))
    return out


def output_logits(level, trajectory: Trajectory) -> torch.Tensor:
    """(N + 1, V) logits of ``level`` after every true prefix from the prompt to the whole output
    (row i predicts output token i; the last row what would follow the output)."""
    level.reset()
    ids = trajectory.ids
    num = len(trajectory.output_ids)
    logits = level.next_token_logits(ids, num + 1).float()  # (N + 1, V)
    level.reset()  # the cache now holds this sequence; the next generation starts clean anyway
    return logits


def mag_proposals(mag: MaG, trajectory: Trajectory, run: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, run) MaG's proposal of ``run`` tokens from its index of the true prefix at each output
    position (-1 past the end of the output), and (N,) the suffix match length each proposal
    continues (what MaG first's gate compares with its threshold)."""
    ids = trajectory.ids
    start = len(trajectory.prompt_ids)
    num = len(trajectory.output_ids)
    mag.reset()
    out = np.full((num, run), -1, dtype=np.int64)
    match_lengths = np.zeros(num, dtype=np.int64)
    for i in range(num):
        committed = start + i
        proposal = mag.propose(ids[:committed], committed, min(run, num - i))
        out[i, : len(proposal.tokens)] = proposal.tokens
        match_lengths[i] = proposal.match_length
    mag.reset()
    return out, match_lengths


# -- acceptance ----------------------------------------------------------------------------------


def renewal_counts(
    accept: np.ndarray,
    valid: np.ndarray,
    draft_length: int,
    rng: random.Random | None,
    passes: int = 1,
    gate: Callable[[], GateWalker] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Numerators and denominators of alpha(j) for drafts of ``draft_length`` tokens that start
    where the previous draft ended, as in a real run (module docstring).

    ``accept[i, k]``: acceptance (0/1 greedy, a probability when sampling) of the ``k + 1``-th
    token of a run of proposals starting at output position ``i``; ``valid`` marks existing ones.
    Sampling: continuation is drawn from ``rng``, the counts use the probabilities themselves.
    ``gate``: a fresh ``GateWalker`` per pass; the steps MaG first takes (``gate.py``) are
    skipped, so the rates are those of the drafts the gate leaves to the cascade.
    """
    num_positions, run = accept.shape
    num = np.zeros(run)
    den = np.zeros(run)
    for _ in range(passes):
        walker = gate() if gate is not None else None
        i = 0
        while i < num_positions:
            if walker is not None:
                jump = walker.jump(i)
                if jump:
                    i += jump
                    continue
            k = 0
            while k < draft_length and valid[i, k]:
                p = float(accept[i, k])
                den[k] += 1
                num[k] += p
                if (p < 0.5) if rng is None else (rng.random() >= p):
                    break
                k += 1
            i += k + 1  # the accepted tokens and the reviewer's own one
    return num, den


def pooled(num: np.ndarray, den: np.ndarray) -> tuple[float, ...]:
    """alpha(j) = num/den; positions with fewer than MIN_COUNT runs share a pooled rate."""
    rates = []
    for j in range(len(num)):
        if den[j] >= MIN_COUNT:
            rates.append(float(num[j] / den[j]))
        else:
            tail_den = den[j:].sum()
            rate = float(num[j:].sum() / tail_den) if tail_den > 0 else (rates[-1] if rates else 0.0)
            rates.extend([rate] * (len(num) - j))
            break
    return tuple(rates)


@dataclass(frozen=True)
class GatedAcceptance:
    """What the planner needs to model MaG first (``gate.py``): MaG's match lengths and runs
    along the trajectories, and for each gate threshold the acceptance measured on the drafts
    that gate leaves to the cascade (same tables as ``Acceptance``, counted by walks that skip
    the gated steps; lenience 1 only)."""

    runs: MagRuns
    by_threshold: dict[int, Acceptance]
    adaptive: bool  # the walks used the adaptive schedule's MaG-first lengths (else fixed ones)

    @property
    def thresholds(self) -> list[int]:
        return sorted(self.by_threshold)

    def model(
        self, threshold: int, first_length: int | None = None, adaptive: bool | None = None
    ) -> tuple[Acceptance, GateModel]:
        """The acceptance and gate model for MaG first at ``threshold`` (``adaptive``: the
        schedule whose MaG-first lengths the gate walks; default: the one the rates were
        counted under, which is otherwise an approximation)."""
        adaptive = self.adaptive if adaptive is None else adaptive
        gate = GateModel(self.runs, threshold, adaptive, first_length)
        return self.by_threshold[threshold], gate

    def as_dict(self) -> dict:
        return {
            "runs": self.runs.as_dict(),
            "adaptive": self.adaptive,
            "by_threshold": [{"threshold": n, "acceptance": a.as_dict()} for n, a in sorted(self.by_threshold.items())],
        }

    @classmethod
    def from_dict(cls, data: dict) -> GatedAcceptance:
        return cls(
            MagRuns.from_dict(data["runs"]),
            {d["threshold"]: Acceptance.from_dict(d["acceptance"]) for d in data["by_threshold"]},
            bool(data["adaptive"]),
        )


def measure_acceptance(
    cascade,
    trajectories_: list[Trajectory],
    params: SamplingParams,
    lenience_values: tuple[float, ...] = LENIENCE_VALUES,
    run: int = MAX_RUN,
    seed: int = 0,
    gates: tuple[int, ...] = (),
    adaptive_gate: bool = False,
    target_forward: bool = True,
) -> tuple[Acceptance, list[Trace], GatedAcceptance | None]:
    """Per-run-position acceptance for every (reviewer, drafting level) pair and draft length
    (module docstring), the traces ``replay.py`` replays (greedy only; empty when sampling), and
    with ``gates`` (MaG-first thresholds; MaG on) the same rates on the drafts each gate leaves
    to the cascade (``GatedAcceptance``; ``adaptive_gate``: walk the adaptive schedule's
    MaG-first lengths). ``cascade``: anything with ``target``, ``drafters`` and ``mag``.

    ``target_forward=False`` (greedy only): the target is not run; its choices are the
    trajectory's tokens, and no traces are made (``autoplan.py`` measures a finished generation
    with the drafters' forwards alone)."""
    if not target_forward and not params.greedy:
        raise ValueError("sampled acceptance needs the target's probabilities (target_forward=True)")
    counter = _AcceptanceCounter(cascade, params, lenience_values, run, seed, gates, adaptive_gate, target_forward)
    for trajectory in trajectories_:
        counter.observe(trajectory)
    return counter.acceptance(), counter.traces, counter.gated()


@dataclass
class _Along:
    """One trajectory as the acceptance counts see it: ``N`` output positions, and a run of
    ``run`` proposals starting at each."""

    output: np.ndarray  # (N,) the target's output tokens
    inside: np.ndarray  # (N, run) whether a run's position lies inside the output
    position: np.ndarray  # (N, run) that output position (the last one past the end)
    logits: list  # per neural level (N, V) predictions of the output tokens; None: the target, not run
    top: list | None = None  # greedy: per neural level (N,) its argmax (the target's: the output)
    top_logit: list | None = None  # greedy: per neural level (N,) its largest logit
    probs: list | None = None  # sampling: per neural level (N, V) warped probabilities
    proposals: dict = field(default_factory=dict)  # level -> (N, run) its proposals in a run from each position


class _AcceptanceCounter:
    """``measure_acceptance``'s sums over the trajectories: renewal counts per (gate, lenience,
    reviewer, drafting level, draft length), the counts behind ``rho`` (lenient carry), the
    traces and MaG's match lengths and runs."""

    def __init__(self, cascade, params, lenience_values, run, seed, gates, adaptive_gate, target_forward) -> None:
        self.neural = [cascade.target, *cascade.drafters]
        self.names = [level.name for level in self.neural] + (["mag"] if cascade.mag is not None else [])
        self.num_levels = len(self.names)
        self.mag = cascade.mag
        self.mag_level = self.num_levels - 1 if cascade.mag is not None else None
        self.params = params
        self.greedy = params.greedy
        self.lenience_values = lenience_values if self.greedy else ()  # lenience is only modelled for greedy
        self.run = run
        self.gates = tuple(gates) if self.mag_level is not None else ()
        self.adaptive_gate = adaptive_gate
        self.target_forward = target_forward
        self.rng = None if self.greedy else random.Random(seed)
        self.passes = 1 if self.greedy else 8
        self.sums: dict = {}  # (gate or None, lenience, reviewer, drafter, draft length) -> [num, den]
        self.carry_counts: dict = {}  # (l, r, v) -> [taken by r and right, taken by r, expected right if r's own]
        self.traces: list[Trace] = []
        self.match_parts: list[np.ndarray] = []
        self.run_parts: list[np.ndarray] = []

    def add(self, key, accept, valid, walkers=None) -> None:
        for gate in (None, *(self.gates if walkers else ())):
            walker = walkers[gate] if gate is not None else None
            for draft_length in DRAFT_LENGTHS:
                num, den = renewal_counts(accept, valid, min(draft_length, self.run), self.rng, self.passes, walker)
                slot = self.sums.setdefault((gate, *key, draft_length), [np.zeros(self.run), np.zeros(self.run)])
                slot[0] += num
                slot[1] += den

    def observe(self, trajectory: Trajectory) -> None:
        along = self._along(trajectory)
        walkers = self._observe_mag(trajectory, along) if self.mag_level is not None else None
        for r in range(len(self.neural)):
            for v in range(r + 1, self.num_levels):
                tokens, valid, accept = self._acceptance(along, r, v)
                self.add((1.0, r, v), accept, valid, walkers)
                if r > 0 and self.greedy:
                    self._observe_lenient(along, r, v, tokens, valid)

    def _along(self, trajectory: Trajectory) -> _Along:
        """Every neural level's predictions along ``trajectory`` (and its trace, greedy)."""
        if self.target_forward:
            full = [output_logits(level, trajectory) for level in self.neural]  # each (N + 1, V)
        else:
            full = [None] + [output_logits(level, trajectory) for level in self.neural[1:]]
        if self.greedy and self.target_forward:
            self.traces.append(make_trace(trajectory.prompt_ids, trajectory.output_ids, full))
        logits = [x[:-1] if x is not None else None for x in full]  # (N, V): predictions of the output tokens
        num = len(trajectory.output_ids)
        output = np.array(trajectory.output_ids)
        index = np.arange(num)[:, None] + np.arange(self.run)[None, :]  # (N, run) output position
        along = _Along(output, index < num, np.minimum(index, num - 1), logits)
        if not self.greedy:
            along.probs = [warp(x, self.params).numpy() for x in logits]
            return along
        along.top = [x.argmax(dim=-1).numpy() if x is not None else output for x in logits]  # (N,)
        along.top[0] = output  # the target's choice is the trajectory
        along.top_logit = [x.max(dim=-1).values.numpy() if x is not None else None for x in logits]
        for v in range(1, len(self.neural)):
            along.proposals[v] = along.top[v][along.position]  # given the run so far was right, its argmax
        return along

    def _observe_mag(self, trajectory: Trajectory, along: _Along) -> dict:
        """MaG's proposals along ``trajectory``; returns a fresh-``GateWalker`` factory per gate."""
        mag = MaG(self.mag.bigram, self.mag.max_ngram)
        along.proposals[self.mag_level], match_lengths = mag_proposals(mag, trajectory, self.run)
        # how many of MaG's tokens from each position continue the output: a gated draft's yield
        same = (along.proposals[self.mag_level] == along.output[along.position]) & along.inside  # (N, run)
        runs = np.cumprod(same, axis=1).sum(axis=1)  # (N,)
        self.match_parts.append(match_lengths)
        self.run_parts.append(runs)
        return {
            n: functools.partial(GateWalker, match_lengths, runs, n, GateLengths(self.adaptive_gate))
            for n in self.gates
        }

    def _acceptance(self, along: _Along, r: int, v: int):
        """(tokens, valid, accept): reviewer ``r``'s acceptance of level ``v``'s runs, (N, run) each."""
        tokens = along.proposals.get(v)
        if self.greedy:
            valid = along.inside & (tokens >= 0)
            tokens = np.where(valid, tokens, 0)
            accept = (tokens == along.top[r][along.position]).astype(float)
        elif v == self.mag_level:
            valid = along.inside & (tokens >= 0)
            accept = along.probs[r][along.position, np.where(valid, tokens, 0)]  # p_r(x) of a point mass
        else:
            overlap = np.minimum(along.probs[r], along.probs[v]).sum(axis=-1)  # (N,) sum_x min(p, q)
            valid = along.inside
            accept = overlap[along.position]
        return tokens, valid, accept

    def _observe_lenient(self, along: _Along, r: int, v: int, tokens, valid) -> None:
        """Drafter ``r`` reviewing ``v`` (greedy): lenient rates, and how the target takes what ``r`` accepted."""
        position, top = along.position, along.top
        gap = along.logits[r].numpy()[position, tokens] - along.top_logit[r][position]  # (N, run), <= 0
        first = valid[:, 0]
        right = (tokens[:, 0] == top[0])[first]  # v's token is the target's choice
        own_right = (top[r] == top[0]).mean()  # r's own token is the target's choice
        for lenience in (1.0, *self.lenience_values):
            within = gap >= -math.log(lenience) - 1e-6
            if lenience != 1.0:
                self.add((lenience, r, v), within.astype(float), valid)
            taken = within[first, 0]
            counts = self.carry_counts.setdefault((lenience, r, v), np.zeros(3))
            counts += [(right & taken).sum(), taken.sum(), own_right * taken.sum()]

    def _tables(self, gate):
        sums = self.sums
        strict = {key[2:]: pooled(*value) for key, value in sums.items() if key[0] == gate and key[1] == 1.0}
        loose = {key[1:]: pooled(*value) for key, value in sums.items() if key[0] == gate and key[1] != 1.0}
        return strict, loose

    def acceptance(self) -> Acceptance:
        rates, lenient_rates = self._tables(None)
        carry = {}
        for key, (right, taken, own) in self.carry_counts.items():
            if taken >= MIN_COUNT and own > 0:
                carry[key] = float(right / own)  # P(right | r took it) / P(r's own token right)
        mag = self.mag_level is not None
        return Acceptance(tuple(self.names), mag, rates, lenient_rates, carry, self.params.temperature)

    def gated(self) -> GatedAcceptance | None:
        if not self.gates:
            return None
        temperature = self.params.temperature
        by_threshold = {
            n: Acceptance(tuple(self.names), True, self._tables(n)[0], temperature=temperature) for n in self.gates
        }
        runs = MagRuns(tuple(self.match_parts), tuple(self.run_parts))
        return GatedAcceptance(runs, by_threshold, self.adaptive_gate)


# -- costs -------------------------------------------------------------------------------------


def isotonic(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence (pool adjacent violators, equal weights)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean2, count2 = blocks.pop()
            mean1, count1 = blocks.pop()
            blocks.append([(mean1 * count1 + mean2 * count2) / (count1 + count2), count1 + count2])
    out = []
    for mean, count in blocks:
        out.extend([mean] * count)
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _review_call(level, ids: list[int], context: int, num_tokens: int, params: SamplingParams, generator):
    """One forward over ``num_tokens`` new tokens after ``context`` cached ones, then its review."""
    logits = level.next_token_logits(ids[: context + num_tokens], num_tokens)  # (T, V)
    draft = ids[context + 1 : context + num_tokens]
    if params.greedy:
        return verify.review_greedy(logits, draft, 1.0)
    probs = warp(logits, params)
    draft_probs = probs[: len(draft)] if draft else None
    return verify.review_sampled(probs, draft, draft_probs, generator, 1.0)


def measure_costs(
    cascade,
    sequence: list[int],
    context: int,
    params: SamplingParams,
    tokens: tuple[int, ...] = COST_TOKENS,
    rounds: int = 9,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, dict[int, float]]:
    """Median seconds per forward-and-review for every neural level and token count, at
    ``context`` cached tokens of ``sequence`` (which must be at least context + max(tokens) long)."""
    neural = [cascade.target, *cascade.drafters]
    device = cascade.device
    generator = None if params.greedy else torch.Generator(device=device).manual_seed(seed)
    rng = random.Random(seed)
    times: dict[tuple[int, int], list[float]] = {}
    for level in neural:
        level.reset()
        level.prefill(sequence[:context])
    cells = [(i, t) for i in range(len(neural)) for t in tokens]
    for round_number in range(warmup + rounds):
        rng.shuffle(cells)
        for i, t in cells:
            _synchronize(device)
            started = time.perf_counter()
            _review_call(neural[i], sequence, context, t, params, generator)
            _synchronize(device)
            if round_number >= warmup:
                times.setdefault((i, t), []).append(time.perf_counter() - started)
    for level in neural:
        level.reset()
    return {neural[i].name: {t: statistics.median(times[(i, t)]) for t in tokens} for i in range(len(neural))}


def measure_mag_seconds(cascade, trajectory: Trajectory, repeats: int = 200) -> float:
    """Median seconds of one MaG proposal (with the list building an extension does)."""
    if cascade.mag is None:
        return 0.0
    mag = MaG(cascade.mag.bigram, cascade.mag.max_ngram)
    ids = trajectory.ids
    committed = len(trajectory.prompt_ids) + len(trajectory.output_ids) // 2
    mag.observe(ids, committed)
    times = []
    for k in range(repeats):
        need = 1 + k % 8
        context = ids[: committed + k % 4]
        started = time.perf_counter()
        mag.propose(context + [], committed, need)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_review_costs(
    vocab_size: int, params: SamplingParams, tokens: tuple[int, ...] = COST_TOKENS, repeats: int = 30, seed: int = 0
) -> LevelCost:
    """Median seconds of the review alone (accept/reject of T - 1 draft tokens against (T, V)
    reviewer logits, every token accepted), by T."""
    generator = torch.Generator().manual_seed(seed)
    seconds = []
    for t in tokens:
        logits = torch.randn(t, vocab_size, generator=generator)  # (T, V)
        draft = logits[: t - 1].argmax(dim=-1).tolist()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            if params.greedy:
                verify.review_greedy(logits, draft, 1.0)
            else:
                probs = warp(logits, params)
                verify.review_sampled(probs, draft, probs[: len(draft)] if draft else None, generator, 1.0)
            times.append(time.perf_counter() - started)
        seconds.append(statistics.median(times))
    return LevelCost("review", tokens, tuple(isotonic(seconds)))


def calibrate_overheads(costs: CostModel, replayer, num_neural: int, mag: bool) -> CostModel:
    """Per-step and per-drafter-review overheads of the cascade's own logic, from the wall time
    of replays (which run the real ``step.py`` with stand-in forwards): plain decoding gives the
    step overhead, the default K-matrix the overhead of each drafter review beyond it."""
    from dataclasses import replace

    from ..kmatrix import KMatrix
    from .planner import expand

    replayer.run(())  # warm-up
    plain = replayer.run(())
    step_seconds = plain.overhead_seconds(costs) / plain.num_steps
    review_overhead = 0.0
    if num_neural:
        default = KMatrix.default(num_neural, mag).as_lists()
        num_drafting = num_neural + int(mag)
        rows = expand(list(range(1, num_drafting + 1)), default, num_drafting)
        run = replayer.run(rows)
        drafter_forwards = sum(len(calls) for calls in run.forward_tokens[1:])
        rest = run.overhead_seconds(costs) - run.num_steps * step_seconds - run.mag_calls * costs.mag_seconds
        review_overhead = max(0.0, rest / drafter_forwards) if drafter_forwards else 0.0
    return replace(costs, step_seconds=step_seconds, review_overhead=review_overhead)


def measure_step_seconds(cascade, trajectory: Trajectory, target_one: float, num_tokens: int = 32) -> float:
    """Plain decoding's seconds per token beyond the target's one-token forward (sampling,
    where there are no traces to replay)."""
    plain = plain_cascade(cascade)
    prompt = trajectory.prompt_ids
    plain.generate(prompt, 4, ignore_eos=True)  # warm-up
    per_token = []
    for _ in range(3):
        result = plain.generate(prompt, num_tokens, ignore_eos=True)
        per_token.append(result.stats.decode_seconds / result.stats.num_new_tokens)
    return max(0.0, statistics.median(per_token) - target_one)


def replayer_for(cascade, traces: list[Trace]):
    """A ``Replayer`` of these traces for ``cascade``'s levels (and its MaG bigram table)."""
    from .replay import Replayer

    names = [cascade.target.name] + [d.name for d in cascade.drafters]
    bigram = cascade.mag.bigram if cascade.mag is not None else None
    return Replayer(traces, names, cascade.target.vocab_size, bigram, cascade.mag is not None)


# -- everything ------------------------------------------------------------------------------------


def measure(
    cascade,
    prompts_ids: list[list[int]],
    max_new_tokens: int = 128,
    params: SamplingParams | None = None,
    cost_rounds: int = 11,
    lenience_values: tuple[float, ...] = LENIENCE_VALUES,
    log=None,
    gates: tuple[int, ...] = GATE_THRESHOLDS,
) -> Profile:
    """Costs and acceptance of ``cascade``'s levels on these prompts (module docstring)."""
    params = params or SamplingParams()
    log = log or (lambda message: None)
    started = time.perf_counter()
    trajs = trajectories(cascade, prompts_ids, max_new_tokens, params)
    log(f"target trajectories: {len(trajs)} prompts x {max_new_tokens} tokens ({time.perf_counter() - started:.1f} s)")
    acceptance, traces, gated = measure_acceptance(cascade, trajs, params, lenience_values, gates=gates)
    log(f"acceptance measured ({time.perf_counter() - started:.1f} s)")

    # the reference context: a typical prompt plus half the generation
    longest = max(trajs, key=lambda t: len(t.ids))
    mean_prompt = sum(len(t.prompt_ids) for t in trajs) / len(trajs)
    context = int(mean_prompt + max_new_tokens / 2)
    context = max(1, min(context, cascade.max_context - max(COST_TOKENS)))
    sequence = list(longest.ids)
    while len(sequence) < context + max(COST_TOKENS):  # real tokens; their values barely matter
        sequence += longest.ids
    tables = measure_costs(cascade, sequence, context, params, rounds=cost_rounds)
    short = max(1, context // 4)
    slopes_at = measure_costs(cascade, sequence, short, params, tokens=(1, 8), rounds=max(3, cost_rounds // 3))
    log(f"forward costs measured ({time.perf_counter() - started:.1f} s)")
    levels = []
    for level in [cascade.target, *cascade.drafters]:
        table = tables[level.name]
        seconds = [table[t] for t in COST_TOKENS]  # not smoothed: the cost is not monotone in T
        forward, slope = fit_context(slopes_at[level.name], table, context - short)
        levels.append(LevelCost(level.name, COST_TOKENS, tuple(seconds), slope, forward))
    mag_seconds = measure_mag_seconds(cascade, longest)
    review = measure_review_costs(cascade.target.vocab_size, params)
    costs = CostModel(tuple(levels), mag_seconds, 0.0, context, review, 0.0)
    if traces:
        costs = calibrate_overheads(
            costs, replayer_for(cascade, traces), len(cascade.drafters), cascade.mag is not None
        )
    else:
        costs = replace(costs, step_seconds=measure_step_seconds(cascade, trajs[0], levels[0](1)))
    log(
        f"overheads: {costs.step_seconds * 1e6:.0f} us per step, {costs.review_overhead * 1e6:.0f} us per "
        f"drafter review, {mag_seconds * 1e6:.0f} us per MaG proposal"
    )
    info = {
        "num_prompts": len(prompts_ids),
        "max_new_tokens": max_new_tokens,
        "sampling": params.as_dict(),
        "reference_context": context,
        "threads": torch.get_num_threads(),
        "device": str(cascade.device),
        "seconds": time.perf_counter() - started,
    }
    log(f"profile done ({info['seconds']:.1f} s)")
    return Profile(costs, acceptance, traces, info, gated)
