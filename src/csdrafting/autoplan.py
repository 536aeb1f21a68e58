"""``k_matrix="auto"``: the cascade measures this machine, plans itself, and keeps learning.

``CascadeConfig.resolve`` turns ``"auto"`` into explicit values without looking at anything
(the default K-matrix over every drafter). With loaded levels there is more to go on, and
``Cascade`` asks an ``AutoPlanner`` for an explicit plan instead:

1. **Costs** (at load). Each neural level's seconds per forward-and-review by the number of new
   tokens (12 counts from 1 to 32, 5 interleaved rounds after a warm-up, ``tune/measure.py``'s
   measurement made short) after 192 cached tokens, and at 1, 4 and 16 tokens after three times
   that context, which fits how a forward's cost grows with the context (per forward and per
   token, ``planner.LevelCost``: plans price forwards at the context observed in generations),
   one MaG proposal, the review alone, and the cascade's own overhead
   per step and per drafter review (from replays of a short plain generation). About a second
   on the pycode family; cached as JSON under ``$XDG_CACHE_HOME/csdrafting`` (or
   ``~/.cache/csdrafting``), keyed by the CPU model, torch version, thread count, dtype,
   device, backend, each level's runner and each model's identity (a hash of its config and
   the size and time of its weight files; name, parameter count and class for levels built in
   memory). A cache file that cannot be read or does not parse is ignored and rewritten.
2. **Acceptance** cannot be known before generating. Until it is observed the plan uses flat
   priors (``PRIOR_NEURAL`` for a neural drafter, ``PRIOR_MAG`` for MaG, MaG first at
   ``AUTO_MAG_FIRST`` as before); costs alone already drop a drafter that costs too much for
   any plausible acceptance. Then every generation is **observed**: after it finishes, each
   neural drafter runs one forward over prompt + output (the target is not run again: its
   choices are the output), which gives every drafter's greedy agreement with the target at
   every position, and MaG's proposals and match lengths along the output. These do not
   depend on the plan in use, so a drafter the plan left out is measured too. Once
   ``MIN_OBSERVED_TOKENS`` output tokens have been observed, the planner re-plans from them;
   observing goes on, and once ``FINAL_OBSERVED_TOKENS`` have been observed it re-plans a
   second and last time from all of them (two prompts' worth of acceptance is a small sample
   to rank plans by) and observing stops. Every
   plan is cached beside the costs and the acceptance it was made from; a later process starts
   from the cached plan, and goes on observing only if that plan is not the final one (until
   then the cache also holds the token ids of every generation observed so far, so that
   short-lived processes such as one ``csd generate`` each add their share).
   A sampled output is observed the same way (a drafter's argmax equal to the sampled token has
   the probability the target accepts that token as a point mass).
3. **The plan**: the expected-walltime model of ``csd tune`` (``tune/planner.py``), extended
   to MaG first (``tune/gate.py``: the gate walked along the observed outputs, acceptance
   measured on the drafts it leaves to the cascade), searched over a small grid of K-matrices
   with and without MaG first at match lengths 2, 3, 4 and 6, lenience 1. Its result is an
   explicit ``CascadeConfig``: the drafters that pay (a subset of those given), the K-matrix,
   ``mag_first``, ``adaptive=True``, and for every K entry the acceptance it was planned for
   (the adaptive schedule's prior for that entry, so it keeps the planned lengths while
   acceptance stays as observed and moves them when it does not).
4. **Online**, the adaptive schedule adapts lengths from acceptance, switches speculation off by
   measured time, and with a ``CostJudge`` switches a drafter off per level when the planner's
   model, fed with the running acceptance and the calibrated costs scaled by the forward times
   measured in this run, predicts the cascade faster without it (``schedule.py``).

Every decision depends on finished generations or earlier steps only, never on the token being
drafted: plans change speed, never the output. ``CSDRAFTING_AUTO_PLAN=off`` skips all of this
(``"auto"`` is then ``resolve()``'s fixed start, adapted online): the test suite sets it so that
tiny in-memory models stay deterministic, and tests that exercise the planner turn it back on.

The engine does not import this module: ``csdrafting/__init__.py`` attaches ``planner_for`` as the
default planner factory (``planning.py``), and it is imported the first time an ``"auto"``
configuration is planned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import AUTO_MAG_FIRST, CascadeConfig
from .edge import planning_enabled
from .errors import CSDraftingError
from .files import atomic_write_text, cache_dir
from .levels.mag import MaG
from .sampling import SamplingParams
from .tune.measure import (
    GATE_THRESHOLDS,
    GatedAcceptance,
    Trajectory,
    calibrate_overheads,
    make_trace,
    measure_acceptance,
    measure_costs,
    measure_mag_seconds,
    measure_review_costs,
    output_logits,
)
from .tune.planner import (
    Acceptance,
    CostModel,
    LevelCost,
    Prediction,
    SearchSpace,
    fit_context,
    nominal_share,
    predict,
    reduce,
    search,
    search_gated,
)

# 2: forward costs fitted in the context with two parameters (planner.LevelCost); 3: observing goes
# on after the first re-plan (a cached "observed" plan is final only at FINAL_OBSERVED_TOKENS)
CACHE_VERSION = 3
COST_TOKENS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)  # where forward costs are measured
COST_ROUNDS = 5
COST_CONTEXT = 192  # cached tokens before the timed forwards (a prompt plus part of an output)
# token counts also timed at 3x that context: per context position, what a forward pays once and
# what each of its tokens pays (planner.fit_context)
CONTEXT_TOKENS = (1, 4, 16)
MIN_OBSERVED_TOKENS = 256  # output tokens observed before the plan is first made from them
# and before it is made again, for the last time (then observing stops): observing costs one
# forward of every drafter over each generation, after its decoding, so it is kept bounded
FINAL_OBSERVED_TOKENS = 1024
PRIOR_NEURAL = 0.6  # acceptance assumed for a neural drafter before any is observed
PRIOR_MAG = 0.4  # and for MaG
# a small grid (the model's search runs once per MaG-first threshold, ~1 s in all)
AUTO_SPACE = SearchSpace(
    max_target_neural=8,
    max_target_mag=16,
    max_inner_neural=4,
    max_inner_mag=8,
    grid_target_neural=(0, 1, 2, 4),
    grid_target_mag=(0, 1, 2, 4, 8),
    grid_inner_neural=(0, 1),
    grid_inner_mag=(0, 2, 4),
    descent_starts=4,
)


def planner_for(levels, config: CascadeConfig) -> AutoPlanner | None:
    """The package's default planner (``planning.set_default_planner``): an ``AutoPlanner`` for an
    ``"auto"`` configuration, unless ``CSDRAFTING_AUTO_PLAN`` switches planning off (``edge.py``)."""
    return AutoPlanner(levels, config) if config.is_auto and planning_enabled() else None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Plan:
    """What ``"auto"`` runs: an explicit configuration and where it came from.

    ``source``: ``"prior"`` (costs measured, acceptance assumed) or ``"observed"`` (acceptance
    measured on ``num_observed_tokens`` tokens of earlier generations; the final plan once they
    reach ``FINAL_OBSERVED_TOKENS``). ``priors[r][c]``: the
    acceptance each K entry was planned for. ``prediction``: the planner's expectation.
    """

    config: CascadeConfig
    source: str
    prediction: Prediction
    priors: tuple[tuple[float, ...], ...]
    num_observed_tokens: int = 0
    seconds: float = 0.0  # spent planning (measuring costs included)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "drafters": list(self.config.drafters),
            "mag": self.config.mag,
            "k_matrix": [list(row) for row in self.config.k_matrix],
            "mag_first": self.config.mag_first,
            "priors": [list(row) for row in self.priors],
            "predicted_tokens_per_second": self.prediction.tokens_per_second,
            "predicted_speedup": self.prediction.speedup,
            "predicted_tokens_per_step": self.prediction.tokens_per_step,
            "num_observed_tokens": self.num_observed_tokens,
            "seconds": self.seconds,
        }


class CostJudge:
    """The per-level switch's judge (``schedule.LevelJudge``): the planner's model over the
    running levels, with constant per-pair rates and per-level cost scales."""

    def __init__(self, costs: CostModel, names: tuple[str, ...], mag: bool) -> None:
        self.costs = costs
        self.names = names
        self.mag = mag

    def forward_seconds(self, level: int, num_tokens: int) -> float:
        return self.costs.levels[level](num_tokens)

    def speed(self, rows, rates: dict[tuple[int, int], float], scales: list[float]) -> float:
        levels = tuple(
            dataclasses.replace(cost, seconds=tuple(s * scale for s in cost.seconds))
            for cost, scale in zip(self.costs.levels, scales)
        )
        acceptance = Acceptance.constant(self.names, self.mag, rates)
        return predict(rows, acceptance, dataclasses.replace(self.costs, levels=levels)).tokens_per_second


@dataclass
class Family:
    """The levels an ``"auto"`` configuration may draft with (what ``measure.py`` reads)."""

    target: object
    drafters: list
    mag: MaG | None
    device: torch.device
    max_context: int


class AutoPlanner:
    """Costs, observations and the current plan for one ``"auto"`` configuration over loaded
    levels (module docstring). ``plan`` is always an explicit plan; ``observe`` may replace it."""

    def __init__(self, levels, config: CascadeConfig) -> None:
        started = time.perf_counter()
        self.levels = levels
        self.config = config
        target, drafters = levels.select(config)
        mag = MaG(levels.bigram) if config.mag else None
        device = target.device
        self.family = Family(target, list(drafters), mag, device, min(lv.max_positions for lv in [target, *drafters]))
        self.names = tuple([target.name] + [d.name for d in drafters] + (["mag"] if mag is not None else []))
        self.key = self._key(levels, config)
        self.cache_path = (
            cache_dir() / f"auto-{hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]}.json"
        )
        # every generation observed while observing (kept across the first re-plan: the last one
        # measures all of them), and their output tokens
        self.trajectories: list[Trajectory] = []
        self.num_observed = 0
        self.observed: tuple[Acceptance, GatedAcceptance | None] | None = None
        self.num_measured = 0  # output tokens ``observed`` was measured on
        self.context: int | None = None  # typical cached tokens in observed generations
        cached = self._read_cache()
        self.costs = cached["costs"] if "costs" in cached else self.calibrate()
        if "observed" in cached:
            self.observed, self.num_measured, self.context = cached["observed"]
        if self.observing:  # generations observed by earlier processes, too few for the next plan
            self.trajectories = cached.get("pending", [])
            self.num_observed = sum(len(t.output_ids) for t in self.trajectories)
        else:
            self.num_observed = self.num_measured
        plan = self._cached_plan(cached.get("plan"))
        if plan is None:
            plan = self.make_plan()
        self.plan = dataclasses.replace(plan, seconds=time.perf_counter() - started)
        self._write_cache()

    # -- identity and cache ------------------------------------------------------------------------

    def _key(self, levels, config: CascadeConfig) -> dict:
        family = self.family
        neural = [family.target, *family.drafters]
        runner = getattr(family.target, "runner", None)
        return {
            "version": CACHE_VERSION,
            "cpu": cpu_model(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(family.device),
            "dtype": str(getattr(runner, "dtype", config.dtype)).replace("torch.", ""),
            "backend": config.backend,
            "levels": [_level_identity(level, levels) for level in neural],
            "mag": family.mag is not None,
            "bigram": _bigram_identity(levels.bigram) if family.mag is not None else None,
        }

    def _read_cache(self) -> dict:
        """What the cache holds for this key: ``costs`` (a ``CostModel``), ``observed``
        ((acceptance, gated), tokens, context), ``pending`` (the generations observed so far,
        while observing goes on) and ``plan`` (raw); parts that do not parse, or observations that
        do not fit together (a plan that is not final without the generations it was made from),
        are left out (and rewritten)."""
        try:
            data = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("key") != self.key:
            return {}
        out = {}
        try:
            out["costs"] = CostModel.from_dict(data["costs"])
        except (KeyError, TypeError, ValueError):
            return {}
        try:
            observed = data["observed"]
            gated = GatedAcceptance.from_dict(observed["gated"]) if observed.get("gated") else None
            acceptance = Acceptance.from_dict(observed["acceptance"])
            out["observed"] = ((acceptance, gated), int(observed["num_tokens"]), observed.get("context"))
            out["plan"] = data.get("plan")
        except (KeyError, TypeError, ValueError, AttributeError):
            out["plan"] = data.get("plan") if "observed" not in data else None
        try:
            pending = [Trajectory([int(t) for t in p], [int(t) for t in o]) for p, o in data.get("pending", [])]
            if all(max(t.ids) < self.family.target.vocab_size for t in pending):
                out["pending"] = pending
        except (TypeError, ValueError):
            pass
        if "observed" in out and out["observed"][1] < FINAL_OBSERVED_TOKENS:
            # not final: observing goes on over the generations this plan was made from
            if sum(len(t.output_ids) for t in out.get("pending", [])) < out["observed"][1]:
                del out["observed"]
                out.pop("pending", None)
                out["plan"] = None
        return out

    def _write_cache(self) -> None:
        data = {"key": self.key, "costs": self.costs.as_dict()}
        if self.observing and self.trajectories:
            data["pending"] = [[t.prompt_ids, t.output_ids] for t in self.trajectories]
        if self.observed is not None:
            acceptance, gated = self.observed
            data["observed"] = {
                "acceptance": acceptance.as_dict(),
                "gated": gated.as_dict() if gated is not None else None,
                "num_tokens": self.num_measured,
                "context": self.context,
            }
        plan = self.plan
        data["plan"] = {
            "levels": self._family_levels(plan.config),
            "k_matrix": [list(row) for row in plan.config.k_matrix],
            "mag_first": plan.config.mag_first,
            "priors": [list(row) for row in plan.priors],
            "source": plan.source,
            "num_observed_tokens": plan.num_observed_tokens,
            "summary": plan.as_dict(),  # for people reading the file
        }
        try:
            atomic_write_text(self.cache_path, json.dumps(data))
        except OSError:
            pass  # a read-only home: plan anyway, just without a cache

    def _cached_plan(self, entry) -> Plan | None:
        """The cached plan, if it was made from what is cached (costs and observations)."""
        source = "observed" if self.observed is not None else "prior"
        if not isinstance(entry, dict) or entry.get("source") != source:
            return None
        if entry.get("num_observed_tokens", 0) != self.num_measured:
            return None  # made from other observations than the cached ones
        try:
            config = self._config_for(list(entry["levels"]), entry["k_matrix"], entry["mag_first"])
            prediction = self._predict(self.full_rows(config), config.mag_first)
            priors = tuple(tuple(float(p) for p in row) for row in entry["priors"])
        except (KeyError, TypeError, ValueError, IndexError, CSDraftingError):
            return None
        if len(priors) != len(config.k_matrix):
            return None
        return Plan(config, source, prediction, priors, self.num_measured)

    # -- measuring ---------------------------------------------------------------------------------

    def calibrate(self, rounds: int = COST_ROUNDS, tokens: tuple[int, ...] = COST_TOKENS) -> CostModel:
        """Forward costs, MaG's proposal cost and the cascade's overheads on this machine."""
        family = self.family
        target = family.target
        rng = random.Random(0)
        context = max(1, min(COST_CONTEXT, family.max_context - max(tokens) - 1))
        length = min(family.max_context, 3 * context + max(tokens) + 64)
        sequence = [rng.randrange(target.vocab_size) for _ in range(length)]  # token values barely matter
        params = SamplingParams()
        tables = measure_costs(family, sequence, context, params, tokens=tokens, rounds=rounds, warmup=1)
        # the context fit, from a second, longer context (plans use the observed context)
        longer = min(family.max_context - max(CONTEXT_TOKENS) - 1, len(sequence) - max(CONTEXT_TOKENS), 3 * context)
        far = {}
        if longer > context:
            far = measure_costs(family, sequence, longer, params, tokens=CONTEXT_TOKENS, rounds=rounds, warmup=0)
        level_costs = []
        for level in [target, *family.drafters]:
            table = tables[level.name]
            forward, slope = fit_context(table, far[level.name], longer - context) if far else (0.0, 0.0)
            level_costs.append(LevelCost(level.name, tokens, tuple(table[t] for t in tokens), slope, forward))
        level_costs = tuple(level_costs)
        prompt = sequence[: min(64, family.max_context // 2)]
        mag_seconds = measure_mag_seconds(family, Trajectory(prompt, sequence[len(prompt) : len(prompt) + 64]))
        review = measure_review_costs(target.vocab_size, params, tokens=tokens, repeats=10)
        costs = CostModel(level_costs, mag_seconds, 0.0, context, review, 0.0)
        return self._overheads(costs, prompt)

    def _overheads(self, costs: CostModel, prompt: list[int]) -> CostModel:
        """Per-step and per-drafter-review overheads, from replays of a short plain generation."""
        from .cascade import Cascade
        from .tune.replay import Replayer

        family = self.family
        plain = Cascade(
            self.levels,
            dataclasses.replace(self.config, drafters=(), mag=False, k_matrix=(), adaptive=False, mag_first=None),
            planner=None,
        )
        num_new = max(1, min(48, family.max_context - len(prompt) - 1))
        output = plain.generate(prompt, num_new, ignore_eos=True).token_ids
        trajectory = Trajectory(list(prompt), list(output))
        logits = [output_logits(level, trajectory) for level in [family.target, *family.drafters]]
        trace = make_trace(trajectory.prompt_ids, trajectory.output_ids, logits)
        names = [family.target.name] + [d.name for d in family.drafters]
        bigram = family.mag.bigram if family.mag is not None else None
        replayer = Replayer([trace], names, family.target.vocab_size, bigram, family.mag is not None)
        return calibrate_overheads(costs, replayer, len(family.drafters), family.mag is not None)

    # -- planning ----------------------------------------------------------------------------------

    def planning_costs(self, costs: CostModel | None = None) -> CostModel:
        """``costs`` (default: the calibrated ones) at the observed context, once there is one."""
        costs = costs or self.costs
        return costs.at_context(self.context) if self.context else costs

    @property
    def observing(self) -> bool:
        """Whether generations are still observed: until the plan is made from
        ``FINAL_OBSERVED_TOKENS`` of them."""
        return self.observed is None or self.num_measured < self.replan_at

    @property
    def replan_at(self) -> int:
        """Observed output tokens at which the next plan is made (the last one once observed)."""
        if self.observed is None:
            return MIN_OBSERVED_TOKENS
        return max(MIN_OBSERVED_TOKENS, FINAL_OBSERVED_TOKENS)

    def observe(self, prompt_ids: list[int], output_ids: list[int]) -> Plan | None:
        """Record a finished generation; at ``MIN_OBSERVED_TOKENS`` and again, for the last time,
        at ``FINAL_OBSERVED_TOKENS`` observed, measure over every generation observed and re-plan
        (returns the new plan, else None)."""
        if not self.observing or len(output_ids) < 2:
            return None
        self.trajectories.append(Trajectory(list(prompt_ids), list(output_ids)))
        self.num_observed += len(output_ids)
        if self.num_observed < self.replan_at:
            self._write_cache()  # a short-lived process (one `csd generate`) still adds its share
            return None
        started = time.perf_counter()
        acceptance, _, gated = measure_acceptance(
            self.family,
            self.trajectories,
            SamplingParams(),
            lenience_values=(),
            gates=GATE_THRESHOLDS,
            adaptive_gate=True,
            target_forward=False,
        )
        self.observed = (acceptance, gated)
        self.num_measured = self.num_observed
        # costs are planned at the observed context: a prompt plus half an output, on average
        self.context = round(
            sum(len(t.prompt_ids) + len(t.output_ids) / 2 for t in self.trajectories) / len(self.trajectories)
        )
        if not self.observing:
            self.trajectories = []  # the final plan: nothing more is observed or kept
        self.plan = dataclasses.replace(self.make_plan(), seconds=time.perf_counter() - started)
        self._write_cache()
        return self.plan

    def make_plan(self) -> Plan:
        """The fastest configuration the model predicts from the costs and what is known of
        acceptance (observed, else the priors)."""
        if self.observed is None:
            acceptance = self._prior_acceptance()
            result = search(acceptance, self.planning_costs(), AUTO_SPACE, lenience_values=[1.0])
            best = result.best
            mag_first = AUTO_MAG_FIRST if self.family.mag is not None else None  # not modelled: as before
            source = "prior"
        else:
            acceptance, gated = self.observed
            models = {n: gated.model(n) for n in gated.thresholds} if gated is not None else {}
            best = search_gated(acceptance, models, self.planning_costs(), AUTO_SPACE).best
            mag_first = best.mag_first
            if mag_first is not None:
                acceptance = models[mag_first][0]
            source = "observed"
        config, used = self._config(best.k_matrix, best.keep, mag_first)
        rows = self.full_rows(config)
        priors = _entry_priors(rows, used, acceptance, len(config.k_matrix), self._mag_level)
        return Plan(config, source, self._predict(rows, config.mag_first), priors, self.num_measured)

    def predict(self, config: CascadeConfig, costs: CostModel | None = None) -> Prediction:
        """The model's prediction for an explicit ``config`` over this family's levels (a plan's,
        or any other over a subset of its drafters: MaG-first lengths as its schedule, static or
        adaptive, chooses them), from what is known of acceptance, with ``costs`` (default: the
        calibrated ones)."""
        mag_first = config.mag_first if config.mag else None
        adaptive = config.resolve().adaptive
        return self._predict(self.full_rows(config), mag_first, costs, adaptive=adaptive)

    def _predict(
        self, rows, mag_first: int | None, costs: CostModel | None = None, adaptive: bool = True
    ) -> Prediction:
        """The model's prediction for rows over the family (``full_rows``) with MaG first."""
        costs = self.planning_costs(costs)
        if self.observed is None:
            return predict(rows, self._prior_acceptance(), costs)
        acceptance, gated = self.observed
        if mag_first is not None and gated is not None and mag_first in gated.by_threshold:
            under_gate, gate = gated.model(mag_first, adaptive=adaptive)
            return predict(rows, under_gate, costs, gate=gate)
        return predict(rows, acceptance, costs)

    def _prior_acceptance(self) -> Acceptance:
        mag_level = len(self.names) - 1 if self.family.mag is not None else None
        rates = {
            (r, v): PRIOR_MAG if v == mag_level else PRIOR_NEURAL
            for r in range(len(self.names) - 1)
            for v in range(r + 1, len(self.names))
        }
        return Acceptance.constant(self.names, self.family.mag is not None, rates)

    @property
    def _mag_level(self) -> int | None:
        return len(self.names) - 1 if self.family.mag is not None else None

    def _config(self, rows, keep, mag_first: int | None) -> tuple[CascadeConfig, list[int]]:
        """The explicit configuration for K over every family level (unused ones left out), and
        the family levels it uses (1-based, MaG last)."""
        if not rows or (not any(rows[0]) and not keep):
            used, reduced = [], []
        else:
            used, reduced = reduce(rows, keep)
        return self._config_for(used, reduced, mag_first), used

    def _config_for(self, used: list[int], reduced, mag_first: int | None) -> CascadeConfig:
        """The explicit configuration drafting with family levels ``used`` (1-based, MaG last)."""
        mag_level = self._mag_level
        with_mag = mag_level is not None and mag_level in used
        return dataclasses.replace(
            self.config,
            drafters=tuple(self.config.drafters[v - 1] for v in used if v != mag_level),
            mag=with_mag,
            k_matrix=[list(row) for row in reduced],
            lenience=1.0,
            adaptive=True,
            mag_first=mag_first if with_mag and reduced else None,
            # trees hang MaG's alternatives on the chain: without MaG in the plan, chains
            tree=self.config.tree and with_mag,
            tree_budget=self.config.tree_budget if with_mag else None,
        )

    def _family_levels(self, config: CascadeConfig) -> list[int]:
        """The family levels (1-based, MaG last) an explicit ``config`` over them drafts with."""
        used = [self.config.drafters.index(ref) + 1 for ref in config.drafters]
        return used + ([self._mag_level] if config.mag else [])

    def full_rows(self, config: CascadeConfig) -> tuple[tuple[int, ...], ...]:
        """A plan's K-matrix placed over every level of the family (zeros for unused ones)."""
        from .tune.planner import expand

        num_drafting = len(self.names) - 1
        if not config.k_matrix:
            return tuple((0,) * num_drafting for _ in range(num_drafting))
        return expand(self._family_levels(config), [list(r) for r in config.k_matrix], num_drafting)

    def judge(self, config: CascadeConfig) -> CostJudge:
        """The per-level switch's judge for the running ``config`` (a plan's)."""
        index = {ref: i + 1 for i, ref in enumerate(self.config.drafters)}
        costs = self.planning_costs()
        levels = (costs.levels[0], *[costs.levels[index[ref]] for ref in config.drafters])
        names = tuple(
            [self.names[0]] + [self.names[index[ref]] for ref in config.drafters] + (["mag"] if config.mag else [])
        )
        return CostJudge(dataclasses.replace(costs, levels=levels), names, config.mag)


# -- helpers -----------------------------------------------------------------------------------------


def _entry_priors(rows, used: list[int], acceptance: Acceptance, size: int, mag_level: int | None) -> tuple:
    """For every entry of the plan's (reduced, ``size`` x ``size``) K-matrix, the per-token
    acceptance the adaptive schedule's estimate converges to under the planned rates:
    E[accepted] / (E[accepted] + P(rejection)) over drafts of the entry's share."""
    reviewers = [0] + list(used)
    priors = []
    for i in range(size):
        row = []
        for j in range(size):
            reviewer, level = reviewers[i], used[j]
            if reviewer >= level or not rows[reviewer][level - 1]:
                row.append(PRIOR_NEURAL)  # an empty entry: never lengthened, any prior will do
                continue
            share = nominal_share(rows, reviewer, level, mag_level)
            product, accepted = 1.0, 0.0
            for position in range(1, share + 1):
                product *= acceptance.rate(reviewer, level, position, share)
                accepted += product
            row.append(accepted / (accepted + 1.0 - product) if accepted + 1.0 - product > 0 else PRIOR_NEURAL)
        priors.append(tuple(row))
    return tuple(priors)


def _level_identity(level, levels) -> dict:
    """What makes a level's costs and predictions its own: its files (loaded from a folder) or
    its name, size and class (built in memory)."""
    runner = getattr(level, "runner", None)
    identity = {
        "name": level.name,
        "runner": level.runner_name,
        "num_params": int(level.num_params),
        "vocab_size": int(level.vocab_size),
        "class": type(runner if runner is not None else level).__name__,
    }
    source = None
    for ref, candidate in zip(levels.sources, [levels.target, *levels.drafters]):
        if candidate is level:
            source = ref
    if levels.loaded_with is not None and source is not None and Path(source).is_dir():
        folder = Path(source).resolve()
        digest = hashlib.sha256()
        config_file = folder / "config.json"
        if config_file.is_file():
            digest.update(config_file.read_bytes())
        for path in sorted(folder.iterdir()):
            if path.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        identity["files"] = digest.hexdigest()[:16]
    return identity


def _bigram_identity(bigram) -> str | None:
    if bigram is None:
        return None
    return hashlib.sha256(bigram.next_token.tobytes()).hexdigest()[:16]
