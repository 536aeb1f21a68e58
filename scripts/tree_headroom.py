"""How many more tokens could MaG's alternative branches get accepted per step, compared with
spending the same nodes on a longer chain? An offline replay (issue #10's measurement): the
target's greedy output of every committed prompt is computed once; then at each step of a
replay, MaG drafts a chain of ``L`` tokens after the tokens so far, and the tree adds
``MaG.propose_many``'s alternatives at the root (exactly the candidates the cascade's trees get);
a step accepts the longest root path that matches the target's output, plus one token. This
part measures headroom in accepted tokens, not speed; the price of a node is printed after it:
the target's forward-and-verify time by the number of tokens verified (medians, interleaved),
after the first prompt and its output. Example:

    python scripts/tree_headroom.py --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from csdrafting import Cascade, CascadeConfig  # noqa: E402
from csdrafting.levels.mag import MaG  # noqa: E402
from csdrafting.loading import load_bigram, load_levels  # noqa: E402
from csdrafting.prompts import DEFAULT_PROMPTS_FILE, load_prompts  # noqa: E402
from csdrafting.tree import Branch, DraftTree  # noqa: E402


def accepted_length(tree: DraftTree, reference: list[int]) -> int:
    """Greedy verification against a known output: the longest root path matching it."""
    node, depth = -1, 0
    while depth < len(reference):
        children = [c for c in range(len(tree)) if tree.parents[c] == node and tree.tokens[c] == reference[depth]]
        if not children:
            break
        node, depth = children[0], depth + 1
    return depth


def replay(cases, bigram, chain_length: int, width: int, budget: int) -> tuple[float, float]:
    """(tokens per step, nodes per step) over every case's replay."""
    steps = tokens = nodes = 0
    for prompt, output in cases:
        mag, done = MaG(bigram), 0
        while done < len(output) - 1:
            ids = prompt + output[:done]
            chain = mag.propose(ids, len(ids), chain_length).tokens
            tree = DraftTree(max_nodes=max(budget, chain_length), max_depth=chain_length)
            tree.add_chain(chain, [1] * len(chain), [None] * len(chain))
            if width:
                for rank, branch in enumerate(mag.propose_many(ids, len(ids), chain_length, width)):
                    tree.add_branch(Branch(-1, branch, 1, "mag", rank), frozenset())
            num = min(accepted_length(tree, output[done:]), len(output) - done - 1)
            steps, tokens, nodes = steps + 1, tokens + num + 1, nodes + len(tree)
            done += num + 1
    return tokens / steps, nodes / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=None)
    args = parser.parse_args()
    config = CascadeConfig(target=str(REPO / "models" / "pycode-22m"), drafters=(), mag=False)
    target = Cascade(load_levels(config), config)
    cases = []
    for prompt in load_prompts(DEFAULT_PROMPTS_FILE, args.num_prompts):
        ids = target.encode(prompt["text"])
        cases.append((ids, target.generate(ids, args.max_new_tokens, ignore_eos=True).token_ids))
    bigram = load_bigram(CascadeConfig(target=config.target))
    print(f"{len(cases)} prompts, the target's greedy output ({args.max_new_tokens} tokens), MaG replays")
    print(f"{'draft':34s} {'tokens/step':>11s} {'nodes/step':>10s}")
    for length in (4, 6, 8, 12, 16):
        speed, size = replay(cases, bigram, length, 0, length)
        print(f"{f'chain of {length}':34s} {speed:11.2f} {size:10.1f}")
    for length in (6, 8):
        for width, budget in ((3, 12), (3, 16)):
            speed, size = replay(cases, bigram, length, width, budget)
            name = f"chain of {length} + {width} alternatives, <= {budget}"
            print(f"{name:34s} {speed:11.2f} {size:10.1f}")
    print_verification_costs(target, cases[0][0] + cases[0][1])


def print_verification_costs(cascade: Cascade, context: list[int], repeats: int = 15) -> None:
    """Seconds of one target forward over ``n`` new tokens after ``context`` (cached)."""
    level = cascade.target
    level.prefill(context)
    sizes = (1, 4, 8, 12, 16)
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            started = time.perf_counter()
            level.next_token_logits(context + [context[-1]] * n, n)
            seconds[n].append(time.perf_counter() - started)
    medians = {n: statistics.median(v) for n, v in seconds.items()}
    slope = (medians[16] - medians[4]) / 12
    print(f"target forward after {len(context)} tokens, ms by tokens verified:")
    print("  " + ", ".join(f"{n}: {medians[n] * 1e3:.2f}" for n in sizes))
    print(f"  one more verified token: {slope * 1e3:.3f} ms = {slope / medians[1]:.1%} of a one-token forward")


if __name__ == "__main__":
    main()
