"""Compare cascade configuration files head to head, with `csd tune`'s measurement
(`csdrafting.tune.compare`): one process, the levels loaded once and shared, every configuration
generating every prompt in an order rotated from prompt to prompt, decode time (prefill excluded),
median over trials of the first configuration's seconds over each one's.

Use it to choose between close configurations, where separate `csd bench` runs differ by more than
the configurations do. The files must share the target, device, dtype and bigram table and give
explicit K-matrices. Example (the comparison behind the shipped default, 2026-11-27):

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

    from csdrafting.tune.compare import Method

    first = named_configs[0][1]
    shared = ("device", "dtype", "bigram")
    drafters: list[str] = []
    for name, config in named_configs:
        if Path(config.target).resolve() != Path(first.target).resolve():
            raise ConfigError(f"{name}: every configuration must have the same target")
        if any(getattr(config, key) != getattr(first, key) for key in shared):
            raise ConfigError(f"{name}: every configuration must have the same {', '.join(shared)}")
        if config.is_auto:
            raise ConfigError(f"{name}: give an explicit K-matrix (this script measures configurations as written)")
        drafters += [d for d in map(str, (Path(p).resolve() for p in config.drafters)) if d not in drafters]
    mag_level = len(drafters) + 1
    methods = [
        Method(
            name,
            tuple(drafters.index(str(Path(p).resolve())) + 1 for p in config.drafters)
            + ((mag_level,) if config.mag else ()),
            tuple(tuple(row) for row in config.k_matrix),
            config.lenience,
            bool(config.adaptive),
            mag_first=config.mag_first if config.mag else None,
        )
        for name, config in named_configs
    ]
    # the family only holds the levels: its own K-matrix is never used
    family = replace(
        first, drafters=tuple(drafters), mag=any(c.mag for _, c in named_configs), k_matrix="auto", mag_first=None
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
    args = parser.parse_args()
    if any("=" not in spec for spec in args.configs):
        parser.error("configurations are given as NAME=CONFIG.json")

    import torch

    from csdrafting import Cascade
    from csdrafting.config import CascadeConfig
    from csdrafting.sampling import SamplingParams
    from csdrafting.tune.compare import compare, speedups

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
    results = compare(family, methods, prompts_ids, args.max_new_tokens, args.trials, params, log=print)
    relative = speedups(results, methods[0].name)
    print(
        f"{len(prompts_ids)} prompts x {args.trials} trials, {args.max_new_tokens} new tokens, temperature "
        f"{args.temperature}, {torch.get_num_threads()} threads; decode speed relative to {methods[0].name}:"
    )
    for method in methods:
        measured = results[method.name]
        identical = "" if not params.greedy else f", greedy outputs differing from the first: {measured.mismatches}"
        print(
            f"  {method.name:16s} {measured.tokens_per_second:7.1f} tokens/s  "
            f"relative speed {relative[method.name]:.3f}  ({measured.tokens_per_step:.2f} tokens per target step{identical})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
