"""Measured speed of several configurations of one family, side by side, in one process.

Every method is a ``Cascade`` over the same loaded levels (a level is reset at the start of every
generation, so sharing is safe when one generation runs at a time). Each method first runs one
untimed warm-up generation. Then, for every trial and prompt, every method generates once, in an
order rotated from prompt to prompt; the timer is the generation's decode time (prefill
excluded), read after a device synchronisation. A method's speed in a trial is its tokens over
its decode seconds summed over the prompts; its speedup in a trial is plain decoding's seconds
over its own in that trial, and the reported figures are medians over trials. Greedy rows are
checked token for token against plain decoding's output on the same prompt.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

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


@dataclass
class Measured:
    method: Method
    seconds: list[float] = field(default_factory=list)  # per trial, summed over prompts
    tokens: list[int] = field(default_factory=list)
    num_target_steps: list[int] = field(default_factory=list)
    mismatches: int = 0

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
    return replace(
        config,
        drafters=tuple(config.drafters[v - 1] for v in method.levels if v <= num_neural),
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
) -> dict[str, Measured]:
    """Measure every method (the first must be plain decoding: the baseline) on every prompt."""
    params = params or SamplingParams()
    log = log or (lambda message: None)
    built = [(m, build(cascade, m)) for m in methods]
    results = {m.name: Measured(m) for m in methods}
    for _, runner in built:  # warm-up, not recorded
        runner.generate(prompts_ids[0], min(16, max_new_tokens), params.temperature, seed=0, ignore_eos=True)
    for trial in range(trials):
        for m in results.values():
            m.seconds.append(0.0)
            m.tokens.append(0)
            m.num_target_steps.append(0)
        for p, ids in enumerate(prompts_ids):
            shift = (p + trial) % len(built)
            order = built[shift:] + built[:shift]
            reference = None
            outputs = {}
            for method, runner in order:
                seed = None if params.greedy else (params.seed or 0) + 1000 * trial + p
                result = runner.generate(
                    ids, max_new_tokens, params.temperature, params.top_k, params.top_p, seed=seed, ignore_eos=True
                )
                entry = results[method.name]
                entry.seconds[-1] += result.stats.decode_seconds
                entry.tokens[-1] += result.stats.num_new_tokens
                entry.num_target_steps[-1] += result.stats.num_target_steps
                outputs[method.name] = result.token_ids
                if method is methods[0]:
                    reference = result.token_ids
            if params.greedy:
                for name, tokens in outputs.items():
                    if tokens != reference:
                        results[name].mismatches += 1
        plain = results[methods[0].name]
        log(
            f"trial {trial + 1}/{trials}: "
            + ", ".join(f"{m.method.name} {plain.seconds[-1] / m.seconds[-1]:.2f}x" for m in results.values())
        )
    return results


def speedups(results: dict[str, Measured], baseline: str) -> dict[str, float]:
    """Median over trials of the baseline's seconds over each method's."""
    base = results[baseline]
    return {name: statistics.median(b / s for b, s in zip(base.seconds, m.seconds)) for name, m in results.items()}
