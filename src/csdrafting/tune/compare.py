"""Measured speed of several configurations of one family, side by side, in one process.

Every method is a ``Cascade`` over the same loaded levels (``Cascade.with_config``; a level is
reset at the start of every generation, so sharing is safe when one generation runs at a time).
Timing is ``csdrafting.timing``'s, the same as ``csd bench``'s: one untimed warm-up generation
per method, then for every trial and prompt every method generates once, in an order rotated
from prompt to prompt; the timer is wall time around the whole generation. A method's speed in a trial is its tokens over
its decode seconds summed over the prompts; its speedup in a trial is plain decoding's seconds
over its own in that trial, and the reported figures are medians over trials. Greedy rows are
checked token for token against plain decoding's output on the same prompt.

A method may be ``k_matrix="auto"`` (``Method.auto``): its cascade measures and plans when it is
built, before any timing, and observes its first generations after their decoding to re-plan
(``autoplan.py``). That time (``GenerationStats.plan_seconds``) is taken out of its timed
seconds and reported on its own (``Measured.plan_seconds``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .. import timing
from ..sampling import SamplingParams


@dataclass(frozen=True)
class Method:
    """One configuration to measure: drafting levels used (1-based, MaG last) and its K-matrix
    over them (as a config file holds it)."""

    name: str
    levels: tuple[int, ...]
    k_matrix: tuple[tuple[int, ...], ...]
    lenience: float = 1.0
    adaptive: bool = False
    predicted_speedup: float | None = None
    mag_first: int | None = None
    auto: bool = False  # k_matrix="auto" over these levels (k_matrix, lenience, mag_first unused)


@dataclass
class Measured:
    method: Method
    seconds: list[float] = field(default_factory=list)  # per trial, summed over prompts (planning excluded)
    tokens: list[int] = field(default_factory=list)
    num_target_steps: list[int] = field(default_factory=list)
    mismatches: int = 0
    plan_seconds: list[float] = field(default_factory=list)  # per trial: "auto" observing and re-planning
    decode_seconds: list[float] = field(default_factory=list)  # per trial: prefill excluded

    @property
    def tokens_per_second(self) -> float:
        return statistics.median(t / s for t, s in zip(self.tokens, self.seconds))

    @property
    def tokens_per_step(self) -> float:
        return sum(self.tokens) / max(sum(self.num_target_steps), 1)


def method_config(config, method: Method):
    """``method`` as a ``CascadeConfig`` over the levels ``config`` names (levels are 1-based
    indices into its drafters, MaG last)."""
    from dataclasses import replace

    num_neural = len(config.drafters)
    with_mag = config.mag and (num_neural + 1) in method.levels
    drafters = tuple(config.drafters[v - 1] for v in method.levels if v <= num_neural)
    if method.auto:
        return replace(
            config, drafters=drafters, mag=with_mag, k_matrix="auto", lenience=1.0, adaptive=None, mag_first=None
        )
    return replace(
        config,
        drafters=drafters,
        mag=with_mag,
        k_matrix=method.k_matrix,
        lenience=method.lenience,
        adaptive=method.adaptive,
        mag_first=method.mag_first if with_mag else None,
    )


def build(cascade, method: Method):
    """A ``Cascade`` for ``method`` over ``cascade``'s loaded levels (no reload)."""
    return cascade.with_config(method_config(cascade.config, method))


def compare(
    cascade,
    methods: list[Method],
    prompts_ids: list[list[int]],
    max_new_tokens: int,
    trials: int = 3,
    params: SamplingParams | None = None,
    log=None,
    built: dict | None = None,
) -> dict[str, Measured]:
    """Measure every method (the first must be plain decoding: the baseline) on every prompt,
    with ``csdrafting.timing``'s harness (interleaved, warmed up, wall time). ``built``: the
    methods' cascades by name, when the caller built them (``build``) to look at them."""
    params = params or SamplingParams()
    log = log or (lambda message: None)
    built = built if built is not None else {m.name: build(cascade, m) for m in methods}
    results = {
        m.name: Measured(m, [0.0] * trials, [0] * trials, [0] * trials, 0, [0.0] * trials, [0.0] * trials)
        for m in methods
    }

    def run(method: Method, case: tuple[int, list[int]], trial: int):
        p, ids = case
        seed = None if params.greedy else (params.seed or 0) + 1000 * trial + p
        return built[method.name].generate(
            ids, max_new_tokens, params.temperature, params.top_k, params.top_p, seed=seed, ignore_eos=True
        )

    warm_length = min(16, max_new_tokens)
    timing.warm_up(methods, lambda m: built[m.name].generate(prompts_ids[0], warm_length, seed=0, ignore_eos=True))
    outputs: dict[tuple[int, int], dict[str, list[int]]] = {}
    with timing.frozen_setup_garbage():
        cases = list(enumerate(prompts_ids))
        for timed in timing.interleaved(methods, cases, trials, run, cascade.synchronize):
            entry, result = results[timed.method.name], timed.result
            entry.seconds[timed.trial] += timed.seconds - result.stats.plan_seconds
            entry.plan_seconds[timed.trial] += result.stats.plan_seconds
            entry.decode_seconds[timed.trial] += result.stats.decode_seconds
            entry.tokens[timed.trial] += result.stats.num_new_tokens
            entry.num_target_steps[timed.trial] += result.stats.num_target_steps
            outputs.setdefault((timed.trial, timed.case_index), {})[timed.method.name] = result.token_ids
            if timed.case_index == len(cases) - 1 and len(outputs[timed.trial, timed.case_index]) == len(methods):
                plain = results[methods[0].name]
                log(
                    f"trial {timed.trial + 1}/{trials}: "
                    + ", ".join(
                        f"{m.method.name} {plain.seconds[timed.trial] / m.seconds[timed.trial]:.2f}x"
                        for m in results.values()
                    )
                )
    if params.greedy:
        for by_method in outputs.values():
            reference = by_method[methods[0].name]
            for name, tokens in by_method.items():
                results[name].mismatches += tokens != reference
    return results


def speedups(results: dict[str, Measured], baseline: str) -> dict[str, float]:
    """Median over trials of the baseline's seconds over each method's."""
    base = results[baseline]
    return {name: statistics.median(b / s for b, s in zip(base.seconds, m.seconds)) for name, m in results.items()}
