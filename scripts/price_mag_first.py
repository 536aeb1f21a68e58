"""Price MaG-first draft lengths for a configuration: the adaptive doubling rule against fixed
lengths (what a static schedule uses).

Deterministic counts (every neural forward and the tokens it ran, over the committed prompts,
128 new tokens) are priced with per-forward costs measured interleaved (medians of 15 rounds): a
cost model, robust to a noisy machine. Python overhead per step is left out (it favours fewer
steps, so it would only add to the longer drafts' lead).

    python scripts/price_mag_first.py models/csd_default.json [--temperature 0.7] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from csdrafting import Cascade
from csdrafting.prompts import DEFAULT_PROMPTS_FILE, load_prompts
from csdrafting.schedule import AdaptiveSchedule

FIXED_LENGTHS = (8, 12, 16, 24, 32)
NUM_NEW = 128


def variants(base: Cascade) -> dict[str, Cascade]:
    """The same configuration over the same levels with each MaG-first length rule."""
    out = {}
    doubling = base.with_config(base.config)
    schedule = doubling._step.schedule
    schedule.mag_first_start = schedule.params.mag_first_start  # the doubling rule's bounds are params too
    schedule.after_mag_first = AdaptiveSchedule.after_mag_first.__get__(schedule)
    out["doubling"] = doubling
    for length in FIXED_LENGTHS:
        fixed = base.with_config(base.config)
        fixed._step.schedule.mag_first_start = length
        out[f"fixed-{length}"] = fixed
    return out


def forward_sizes(cascade: Cascade, prompts: list[list[int]], temperature: float) -> tuple[dict, int]:
    """Tokens run by every logits-producing forward of each neural level, and the target steps."""
    sizes = {level.name: [] for level in [cascade.target, *cascade.drafters]}
    originals = {}
    for level in [cascade.target, *cascade.drafters]:
        originals[level.name] = original = level.runner.forward

        def recorded(ids, start, num_logits, original=original, sink=sizes[level.name]):
            if num_logits:
                sink.append(len(ids))
            return original(ids, start, num_logits)

        level.runner.forward = recorded
    steps = 0
    try:
        for ids in prompts:
            top_p = 0.95 if temperature else None
            result = cascade.generate(ids, NUM_NEW, temperature, top_p=top_p, seed=7, ignore_eos=True)
            steps += result.stats.num_target_steps
    finally:
        for level in [cascade.target, *cascade.drafters]:
            level.runner.forward = originals[level.name]
    return sizes, steps


def forward_costs(level, context: list[int], sizes: set[int], rounds: int = 15) -> dict[int, float]:
    """Median seconds of a forward over T new tokens after a cached context, T interleaved."""
    samples = {t: [] for t in sizes}
    for number in range(rounds):
        order = sorted(sizes)
        random.Random(number).shuffle(order)
        for t in order:
            level.reset()
            level.prefill(context[:-t])
            started = time.perf_counter()
            level.next_token_logits(context, t)
            samples[t].append(time.perf_counter() - started)
    return {t: statistics.median(v) for t, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="cascade configuration file with mag_first set")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = Cascade.from_config(args.config)
    prompts = [base.encode(p["text"]) for p in load_prompts(DEFAULT_PROMPTS_FILE)]
    counted = {name: forward_sizes(c, prompts, args.temperature) for name, c in variants(base).items()}
    context = prompts[0] + prompts[1][:60]
    costs = {}
    for level in [base.target, *base.drafters]:
        used = {t for sizes, _ in counted.values() for t in sizes[level.name]}
        costs[level.name] = forward_costs(level, context, used)
    num_tokens = NUM_NEW * len(prompts)
    for name, (sizes, steps) in counted.items():
        seconds = sum(costs[level][t] for level, runs in sizes.items() for t in runs)
        print(
            f"{name:10s} target forwards {len(sizes[base.target.name]):5d}  tokens/step {num_tokens / steps:.2f}  "
            f"priced model time {seconds:.3f} s  ({num_tokens / seconds:.1f} tok/s)"
        )


if __name__ == "__main__":
    main()
