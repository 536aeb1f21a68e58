"""Configurations of one GGUF family side by side on a workload (issue 18's quick check).

Loads the target (and drafter) once, then runs every configuration on every prompt of a workload
file (``benchmarks/workloads/*.jsonl``), interleaved (prompt by prompt, configurations in turn)
after one warm-up generation each, greedy. Edit and chat records are rendered with the target
GGUF's own chat template and stop at its end of turn; completion runs its fixed length. Prints
end-to-end tokens/s per configuration, its ratio to our plain decoding (median of per-prompt
ratios), and whether every output equals plain decoding's.

    python scripts/compare_real_family.py --workload benchmarks/workloads/completion.jsonl --num-prompts 4
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from csdrafting import Cascade, CascadeConfig
from csdrafting.chat_template import read_gguf_chat_template
from csdrafting.families import qwen_coder_paths
from csdrafting.prompts import load_prompts

METHODS = {
    "plain": dict(drafters=(), mag=False, k_matrix=[]),
    "mag-first-4": dict(drafters=(), mag=True, k_matrix=[[1]], mag_first=4, adaptive=True),
    "mag-payoff": dict(drafters=(), mag=True, k_matrix=[[0]], mag_first="auto"),
    "mag-payoff-k2": dict(drafters=(), mag=True, k_matrix=[[2]], mag_first="auto", adaptive=True),
    "0.5b+mag-payoff": dict(mag=True, k_matrix=[[1, 1], [0, 1]], mag_first="auto", adaptive=True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="benchmarks/workloads/completion.jsonl")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = qwen_coder_paths()
    if paths is None:
        raise SystemExit("the family is not fetched: run `csd fetch qwen2.5-coder`")
    base = CascadeConfig(target=str(paths.target), drafters=(str(paths.drafter),), k_matrix=[[1, 1], [0, 1]])
    loaded = Cascade.from_config(base)
    methods = {name: loaded.with_config(dataclasses.replace(base, **METHODS[name])) for name in args.methods.split(",")}
    template = read_gguf_chat_template(paths.target)
    records = load_prompts(args.workload)[: args.num_prompts]
    requests = []
    for record in records:
        messages = record.get("messages")
        text = template.render(messages) if messages and template is not None else record["text"]
        requests.append((text, int(record.get("max_new_tokens", 128)), bool(record.get("ignore_eos", True))))
    for cascade in methods.values():  # warm-up (and the first thing each schedule learns)
        cascade.generate(requests[0][0], 16, ignore_eos=True)
    seconds = {name: [] for name in methods}
    tokens = {name: [] for name in methods}
    identical = {name: 0 for name in methods}
    for text, max_new, ignore_eos in requests:
        reference = None
        for name, cascade in methods.items():
            started = time.perf_counter()
            result = cascade.generate(text, max_new, ignore_eos=ignore_eos)
            seconds[name].append(time.perf_counter() - started)
            tokens[name].append(len(result.token_ids))
            reference = result.token_ids if reference is None else reference
            identical[name] += result.token_ids == reference
    first = next(iter(methods))
    print(f"{args.workload}: {len(requests)} prompts, {args.threads} threads; ratios over {first}")
    for name in methods:
        speed = sum(tokens[name]) / sum(seconds[name])
        ratios = [
            (n / s) / (n0 / s0) for n, s, n0, s0 in zip(tokens[name], seconds[name], tokens[first], seconds[first])
        ]
        print(
            f"  {name:18s} {speed:6.1f} tok/s  {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f})  identical {identical[name]}/{len(requests)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
