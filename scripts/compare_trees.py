"""Token trees against chains (issue #10's measurement): one process, the levels loaded once,
every configuration generating every prompt interleaved (``timing.interleaved``), greedy and
sampling. Prints, per configuration, the summed wall seconds of one trial (median over trials),
tokens/s (re-planning time of "auto" taken out), the speed-up of ``tree`` over the same
configuration with chains, greedy identity with the target alone, and the trees' mean size,
accepted path, branch wins and the share of steps where no candidate paid for a tree (TreeSizer).
Sampling is seeded (reproducible), so trees are sized without the clock there. Example:

    flock -x /tmp/csd-cpu.lock .venv/bin/python scripts/compare_trees.py --threads 2 --trials 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from csdrafting import Cascade, CascadeConfig  # noqa: E402
from csdrafting.loading import load_levels  # noqa: E402
from csdrafting.prompts import DEFAULT_PROMPTS_FILE, load_prompts  # noqa: E402
from csdrafting.timing import frozen_setup_garbage, interleaved, warm_up  # noqa: E402

MODELS = REPO / "models"


def configurations(budgets: list[int], backend: str) -> dict[str, CascadeConfig]:
    base = CascadeConfig(target=str(MODELS / "pycode-22m"), drafters=(), mag=False, backend=backend)
    small, mid = str(MODELS / "pycode-1m"), str(MODELS / "pycode-5m")
    chains = {
        "mag-only": replace(base, mag=True),
        "1m+mag K=[[2,4],[0,3]]": replace(base, drafters=(small,), mag=True, k_matrix=((2, 4), (0, 3))),
        "auto 5m+1m+mag": replace(base, drafters=(mid, small), mag=True),
    }
    out = {"target": base}
    for name, config in chains.items():
        out[name] = config
        for budget in budgets:
            out[f"{name} tree{budget}"] = replace(config, tree=True, tree_budget=budget)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS_FILE))
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", default="16", help="comma-separated tree budgets")
    parser.add_argument("--modes", default="greedy,sample", help="greedy and/or sample (T=0.7, top-p 0.95)")
    parser.add_argument("--backend", default="torch", help="torch or llama.cpp (levels converted to GGUF once)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    configs = configurations(budgets, args.backend)
    family = CascadeConfig(
        target=str(MODELS / "pycode-22m"),
        drafters=(str(MODELS / "pycode-5m"), str(MODELS / "pycode-1m")),
        backend=args.backend,
    )
    levels = load_levels(family)
    cascades = {name: Cascade(levels, config) for name, config in configs.items()}  # "auto" plans here
    prompts = load_prompts(args.prompts, args.num_prompts)
    prompt_ids = [cascades["target"].encode(p["text"]) for p in prompts]
    print(
        f"torch {torch.__version__}, backend {args.backend}, {args.threads} threads, float32 target, "
        f"{len(prompts)} prompts, {args.max_new_tokens} tokens"
    )
    for mode in args.modes.split(","):
        sampling = dict(temperature=0.7, top_p=0.95) if mode == "sample" else {}

        def run(name, case, trial, sampling=sampling):
            seed = 1000 * trial + case if sampling else None
            return cascades[name].generate(
                prompt_ids[case], args.max_new_tokens, ignore_eos=True, seed=seed, **sampling
            )

        with frozen_setup_garbage():
            warm_up(list(configs), lambda name: run(name, 0, 0))
            seconds = defaultdict(lambda: defaultdict(float))
            tokens, identical, trees = defaultdict(int), defaultdict(lambda: True), defaultdict(list)
            reference = {}
            timed = list(interleaved(list(configs), range(len(prompts)), args.trials, run))
        for t in sorted(timed, key=lambda t: t.method != "target"):
            # "auto" re-plans after observing its first generations: not decoding time (compare_configs.py)
            seconds[t.method][t.trial] += t.seconds - t.result.stats.plan_seconds
            tokens[t.method] += len(t.result.token_ids)
            if t.method == "target":
                reference[(t.case, t.trial)] = t.result.token_ids
            elif mode == "greedy":
                identical[t.method] &= t.result.token_ids == reference[(t.case, t.trial)]
            tree = t.result.stats.levels[0].tree
            if tree is not None:
                trees[t.method].append(
                    (
                        tree.num_nodes / max(tree.num_trees, 1),
                        tree.num_accepted / max(tree.num_trees, 1),
                        tree.num_branch_wins / max(tree.num_trees, 1),
                        tree.num_unbranched / max(tree.num_trees, 1),
                    )
                )
        print(f"\n== {mode} ==")
        median = {name: statistics.median(seconds[name].values()) for name in configs}
        for name in configs:
            chain = name.split(" tree")[0]
            line = f"{name:32s} {median[name]:7.2f} s  {tokens[name] / args.trials / median[name]:7.1f} tok/s"
            line += f"  x{median['target'] / median[name]:.2f} vs target"
            if " tree" in name:
                size, path, wins, chains = (statistics.mean(v) for v in zip(*trees[name]))
                line += (
                    f"  x{median[chain] / median[name]:.3f} vs chain  tree {size:.1f} nodes, path {path:.2f}, "
                    f"branch wins {wins:.3f}/step, chain alone {chains:.2f}/step"
                )
            if mode == "greedy" and name != "target":
                line += "  identical" if identical[name] else "  DIFFERENT"
            print(line, flush=True)


if __name__ == "__main__":
    main()
