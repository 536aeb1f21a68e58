"""Compare cascade configuration files head to head, with `csd tune`'s measurement
(`csdrafting.tune.compare`): one process, the levels loaded once and shared, every configuration
generating every prompt in an order rotated from prompt to prompt, wall time of each generation
(prefill included), median over trials of the first configuration's seconds over each one's.

Use it to choose between close configurations, where separate `csd bench` runs differ by more than
the configurations do. The files must share the target, device, dtype and bigram table. A file
with `"k_matrix": "auto"` is planned over its drafters when its cascade is built (before any
timing; `autoplan.py`), and observes its first generations to re-plan: that time is taken out of
its timed seconds and printed on its own. `--check-prediction` then measures the levels' forward
costs again, right after the timed runs, and prints the planner's predicted decode tokens/s for
each `auto` plan next to the measured ones, and the same model's prediction for every explicit
configuration over that plan's levels (where the model is off, and whether the plan is its best). Example (the comparison behind the shipped default,
2026-11-27):

    .venv/bin/python scripts/compare_configs.py --threads 2 --trials 3 \\
        csd-full=models/csd_default.json mag-first=benchmarks/configs/mag-first.json \\
        previous=benchmarks/configs/previous-default.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from csdrafting.errors import ConfigError, CSDraftingError  # noqa: E402
from csdrafting.prompts import DEFAULT_PROMPTS_FILE, load_prompts  # noqa: E402


def methods_over_one_family(named_configs):
    """(family config, Methods): one configuration loading the union of the files' drafters, and
    each file as a ``Method`` over that family's levels (1-based, MaG last)."""
    from dataclasses import replace

    from csdrafting.kmatrix import KMatrix
    from csdrafting.tune.compare import Method

    first = named_configs[0][1]
    shared = ("device", "dtype", "bigram")
    drafters: list[str] = []
    for name, config in named_configs:
        if Path(config.target).resolve() != Path(first.target).resolve():
            raise ConfigError(f"{name}: every configuration must have the same target")
        if any(getattr(config, key) != getattr(first, key) for key in shared):
            raise ConfigError(f"{name}: every configuration must have the same {', '.join(shared)}")
        drafters += [d for d in map(str, (Path(p).resolve() for p in config.drafters)) if d not in drafters]
    mag_level = len(drafters) + 1
    methods = [
        Method(
            name,
            tuple(drafters.index(str(Path(p).resolve())) + 1 for p in config.drafters)
            + ((mag_level,) if config.mag else ()),
            () if config.is_auto else tuple(tuple(row) for row in config.k_matrix),
            config.lenience,
            bool(config.adaptive),
            mag_first=config.mag_first if config.mag else None,
            auto=config.is_auto,
        )
        for name, config in named_configs
    ]
    # the family only holds the levels: its own K-matrix is never used (explicit, so that
    # "auto" does not measure and plan the family itself)
    with_mag = any(c.mag for _, c in named_configs)
    family = replace(
        first,
        drafters=tuple(drafters),
        mag=with_mag,
        k_matrix=KMatrix.default(len(drafters), with_mag).as_lists(),
        adaptive=False,
        mag_first=None,
    )
    return family, methods


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "configs", nargs="+", metavar="NAME=CONFIG.json", help="configuration files; the first is the reference"
    )
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS_FILE), help="prompts JSONL")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--check-prediction",
        action="store_true",
        help="after the timed runs, re-measure forward costs and compare each auto plan's predicted speed",
    )
    args = parser.parse_args()
    if any("=" not in spec for spec in args.configs):
        parser.error("configurations are given as NAME=CONFIG.json")

    import time

    import torch

    from csdrafting import Cascade
    from csdrafting.autoplan import cpu_model
    from csdrafting.config import CascadeConfig
    from csdrafting.sampling import SamplingParams
    from csdrafting.tune.compare import build, compare, speedups

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        named = [(name, CascadeConfig.load(path)) for name, path in (spec.split("=", 1) for spec in args.configs)]
        family_config, methods = methods_over_one_family(named)
        family = Cascade.from_config(family_config)
        params = SamplingParams(args.temperature, top_p=args.top_p)
        prompts_ids = [family.encode(p["text"]) for p in load_prompts(args.prompts, args.num_prompts)]
        for ids in prompts_ids:
            family.validate_request(ids, args.max_new_tokens)
    except CSDraftingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    built = {}
    for method in methods:
        started = time.perf_counter()
        built[method.name] = build(family, method)
        if method.auto:
            print(f"{method.name}: planned in {time.perf_counter() - started:.2f} s: {_plan_line(built[method.name])}")
    costs_before = {}
    if args.check_prediction:  # forward costs measured right before the timed runs (and again after)
        costs_before = {m.name: built[m.name].planner.calibrate(rounds=9) for m in methods if built[m.name].plan}
    results = compare(family, methods, prompts_ids, args.max_new_tokens, args.trials, params, log=print, built=built)
    relative = speedups(results, methods[0].name)
    print(
        f"{len(prompts_ids)} prompts x {args.trials} trials, {args.max_new_tokens} new tokens, temperature "
        f"{args.temperature}, {torch.get_num_threads()} threads; speed relative to {methods[0].name} "
        "(per trial: " + ", ".join(f"trial {t + 1}" for t in range(args.trials)) + "):"
    )
    for method in methods:
        measured = results[method.name]
        identical = "" if not params.greedy else f", greedy outputs differing from the first: {measured.mismatches}"
        per_trial = [b / m for b, m in zip(results[methods[0].name].seconds, measured.seconds)]
        planning = f", planning during the trials {sum(measured.plan_seconds):.2f} s (excluded)" if method.auto else ""
        print(
            f"  {method.name:16s} {measured.tokens_per_second:7.1f} tokens/s  relative speed {relative[method.name]:.3f} "
            f"({', '.join(f'{x:.3f}' for x in per_trial)})  ({measured.tokens_per_step:.2f} tokens per target step"
            f"{identical}{planning})"
        )
    for method in methods:
        if method.auto:
            print(f"{method.name}: final plan {_plan_line(built[method.name])}")
    if args.check_prediction:
        check_predictions(methods, built, results, costs_before)
    return 0


def _plan_line(cascade) -> str:
    plan = cascade.plan
    if plan is None:
        return "none (CSDRAFTING_AUTO_PLAN=off: the fixed start of resolve())"
    names = [cascade.target.name] + [d.name for d in cascade.drafters] + (["mag"] if cascade.mag else [])
    return (
        f"{plan.source}, levels {' <- '.join(names)}, K {[list(r) for r in plan.config.k_matrix]}, "
        f"mag_first {plan.config.mag_first}, predicted {plan.prediction.tokens_per_second:.1f} tokens/s "
        f"({plan.prediction.speedup:.2f}x plain decoding, {plan.prediction.tokens_per_step:.2f} tokens per step)"
    )


def check_predictions(methods, built, results, costs_before) -> None:
    """Each auto plan's predicted decode speed, with forward costs measured right before and
    right after the timed runs, against the decode speed measured in them (median over trials);
    then, with the same model and costs, every explicit configuration over the auto family's
    levels (is the plan's choice the one the model ranks first, and where is the model off?)."""
    for method in methods:
        cascade = built[method.name]
        if not method.auto or cascade.plan is None:
            continue
        planner = cascade.planner
        after_costs = planner.calibrate(rounds=9)
        _print_check(
            method.name, cascade, planner, cascade.plan.config, costs_before[method.name], after_costs, results
        )
        print(f"  the same model and costs on the other configurations ({method.name}'s acceptance):")
        for other in methods:
            config = built[other.name].config
            if (
                other.auto
                or not set(config.drafters) <= set(planner.config.drafters)
                or config.mag > planner.config.mag
            ):
                continue
            _print_check(
                f"  {other.name}", cascade, planner, config, costs_before[method.name], after_costs, results, other.name
            )


def _print_check(label, cascade, planner, config, costs_before, costs_after, results, name=None) -> None:
    import statistics

    before = planner.predict(config, costs_before)
    after = planner.predict(config, costs_after)
    predicted = (before.tokens_per_second + after.tokens_per_second) / 2
    measured = results[name or label]
    per_trial = [t / d for t, d in zip(measured.tokens, measured.decode_seconds)]
    decode = statistics.median(per_trial)
    planned = "" if name else f"; with the costs it planned with: {cascade.plan.prediction.tokens_per_second:.1f}"
    print(
        f"{label}: predicted {predicted:.1f} tokens/s (costs measured before the runs: "
        f"{before.tokens_per_second:.1f}, after: {after.tokens_per_second:.1f}{planned}), measured {decode:.1f} "
        f"decode tokens/s (per trial {', '.join(f'{x:.1f}' for x in per_trial)}): predicted / measured "
        f"{predicted / decode:.3f}; tokens per step predicted {before.tokens_per_step:.2f}, measured "
        f"{measured.tokens_per_step:.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
