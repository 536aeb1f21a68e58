"""Compare cascade configurations head to head: every configuration generates every prompt, in one
process, interleaved (the order rotates each trial), so drift of the machine's speed hits all of
them alike. Prints, per configuration, the median over prompts of its speed relative to the first
configuration (per prompt: the first's median time / its median time).

Use it to choose between close configurations, where separate `csd bench` runs differ by more than
the configurations do. Example (the comparison behind the shipped default, 2026-11-27):

    .venv/bin/python scripts/compare_configs.py --threads 2 --trials 3 \\
        csd-full=models/csd_default.json mag-first=benchmarks/configs/mag-first.json \\
        previous=benchmarks/configs/previous-default.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from csdrafting.errors import CSDraftingError  # noqa: E402
from csdrafting.prompts import DEFAULT_PROMPTS_FILE, load_prompts  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "configs", nargs="+", metavar="NAME=CONFIG.json", help="configurations; the first is the reference"
    )
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS_FILE), help="prompts JSONL")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from csdrafting import Cascade

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        named = [spec.split("=", 1) for spec in args.configs]
        if any(len(pair) != 2 for pair in named):
            parser.error("configurations are given as NAME=CONFIG.json")
        prompts = [p["text"] for p in load_prompts(args.prompts, args.num_prompts)]
        cascades = {name: Cascade.from_config(path) for name, path in named}
    except CSDraftingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = {"max_new_tokens": args.max_new_tokens, "ignore_eos": True, "temperature": args.temperature}
    if args.top_p is not None:
        options["top_p"] = args.top_p
    names = list(cascades)
    for cascade in cascades.values():  # warm-up
        cascade.generate(prompts[0], **{**options, "max_new_tokens": 16})
    seconds = {name: [[] for _ in prompts] for name in names}
    for trial in range(args.trials):
        order = names[trial % len(names) :] + names[: trial % len(names)]
        for i, prompt in enumerate(prompts):
            for name in order:
                started = time.perf_counter()
                cascades[name].generate(prompt, **options)
                seconds[name][i].append(time.perf_counter() - started)
    reference = [statistics.median(t) for t in seconds[names[0]]]
    print(
        f"{len(prompts)} prompts x {args.trials} trials, {args.max_new_tokens} new tokens, "
        f"temperature {args.temperature}, {torch.get_num_threads()} threads; speed relative to {names[0]}"
    )
    for name in names:
        medians = [statistics.median(t) for t in seconds[name]]
        ratios = [r / m for r, m in zip(reference, medians)]
        print(
            f"  {name:16s} median time {statistics.median(medians) * 1000:7.1f} ms   "
            f"relative speed {statistics.median(ratios):.3f} (per prompt {min(ratios):.2f}-{max(ratios):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
