"""Exactness of tree verification (``verify.verify_tree_greedy`` / ``verify_tree_sampled``).

An enumerable setting: a 4-token vocabulary, a target given by tables (root law, law after one
token), a drafter's chain of two tokens drawn at random from its own laws, and MaG-like point-mass
alternatives that depend on the drawn chain (merged into the trie exactly as ``DraftTree`` does,
so some nodes carry two candidates). The first two emitted tokens (the second drawn from the
target when the verification emitted one) must follow the target's warped joint law; chi-square
over many seeded trials. Deliberately broken verifiers must be rejected by the same test.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from csdrafting import verify
from csdrafting.sampling import SamplingParams, warp
from csdrafting.tree import Branch, DraftTree
from tiny import chisquare_pvalue
from tiny import sequential_tree_verifier as sequential

VOCAB = 4
ACCEPT_P = 1e-3
REJECT_P = 1e-6
NUM_TRIALS = 12000


def tables(seed: int, scale: float = 1.2):
    g = torch.Generator().manual_seed(seed)
    root = torch.randn(VOCAB, generator=g, dtype=torch.float64) * scale  # (V,)
    after = torch.randn(VOCAB, VOCAB, generator=g, dtype=torch.float64) * scale  # (V, V) after token a
    return root, after


TARGET = tables(0)
DRAFTER = tables(1)  # an unrelated drafter: many rejections, so broken verifiers show


def laws(logits, params):
    root, after = logits
    return warp(root.unsqueeze(0), params)[0], warp(after, params)  # (V,), (V, V)


def build_tree(params, generator) -> tuple[DraftTree, torch.Tensor]:
    """A chain of two drafter tokens (random, with their laws), point-mass alternatives at the root
    and under the chain's first node (some equal to chain tokens: merged candidates)."""
    q_root, q_after = laws(DRAFTER, params)
    x1 = int(torch.multinomial(q_root, 1, generator=generator))
    x2 = int(torch.multinomial(q_after[x1], 1, generator=generator))
    tree = DraftTree(max_nodes=12, max_depth=3)
    tree.add_chain([x1, x2], [1, 1], [q_root, q_after[x1]])
    tree.add_branch(Branch(-1, [2, 1, 0], 2, "mag"), frozenset())  # a fixed alternative (may merge with the chain)
    tree.add_branch(Branch(-1, [(x1 + 1) % VOCAB, x2], 2, "mag"), frozenset())  # one that depends on the drawn chain
    tree.add_branch(Branch(0, [(x2 + 3) % VOCAB, 1], 2, "mag"), frozenset())  # under the chain's first node
    tree.add_branch(Branch(0, [x2], 2, "mag"), frozenset())  # a duplicate of the chain's token: a second candidate
    p_root, p_after = laws(TARGET, params)
    rows = [p_root] + [p_after[token] for token in tree.tokens]
    # rows deeper than one token after the context: the target is a bigram table on the last token
    return tree, torch.stack(rows)  # (N + 1, V)


def first_two(verifier, params, seed: int) -> tuple[int, int]:
    generator = torch.Generator().manual_seed(seed)
    tree, probs = build_tree(params, generator)
    outcome = verifier(probs, tree.tokens, tree.parents, tree.laws, generator)
    emitted = [tree.tokens[n] for n in outcome.path] + [outcome.next_token]
    if len(emitted) == 1:  # continue with plain sampling from the target: the law the pair must follow
        _, p_after = laws(TARGET, params)
        emitted.append(int(torch.multinomial(p_after[emitted[0]], 1, generator=generator)))
    return emitted[0], emitted[1]


def exact_pairs(params) -> dict:
    p_root, p_after = laws(TARGET, params)
    return {(a, b): float(p_root[a] * p_after[a, b]) for a in range(VOCAB) for b in range(VOCAB)}


def pvalue(verifier, params, num_trials: int = NUM_TRIALS) -> float:
    counts = Counter(first_two(verifier, params, seed) for seed in range(num_trials))
    return chisquare_pvalue(counts, exact_pairs(params))


PARAMS = [
    SamplingParams(1.0),
    SamplingParams(0.7, top_p=0.95),
    SamplingParams(1.3, top_k=3),
    SamplingParams(1.0, top_k=3, top_p=0.8),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_tree_sampling_follows_the_target(params):
    assert pvalue(verify.verify_tree_sampled, params) > ACCEPT_P


def test_sequential_reference_follows_the_target():
    """The literal reference the mutants are made from is itself exact (so a mutant's rejection
    comes from its one broken rule)."""
    assert pvalue(sequential(), SamplingParams(1.0)) > ACCEPT_P


@pytest.mark.parametrize("mutant", ["p_not_updated", "duplicate_tried_twice", "residual_from_wrong_node"])
def test_tree_sampling_test_rejects_broken_verifiers(mutant):
    assert pvalue(sequential(mutant), SamplingParams(1.0)) < REJECT_P


def test_retrying_a_rejected_draw_on_the_residual_is_a_no_op():
    """Why the duplicate mutant is not "the same random draw retried": a draw x from q is rejected
    only where p(x) < q(x), and there the residual max(p - q, 0) is 0, so a retry never accepts."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = torch.softmax(torch.randn(VOCAB, generator=g, dtype=torch.float64), -1)
        q = torch.softmax(torch.randn(VOCAB, generator=g, dtype=torch.float64), -1)
        rejectable = p < q
        assert torch.all(verify.residual(p, q)[rejectable] == 0)


def test_the_setting_exercises_every_rule():
    """Merged candidates, alternatives that win, rejected chains: all happen in these trials."""
    stats = Counter()
    for seed in range(400):
        generator = torch.Generator().manual_seed(seed)
        tree, probs = build_tree(SamplingParams(1.0), generator)
        stats["merged"] += any(len(c) > 1 for c in tree.laws)
        outcome = verify.verify_tree_sampled(probs, tree.tokens, tree.parents, tree.laws, generator)
        stats["alternative_won"] += tree.chain_prefix(outcome.path) < len(outcome.path)
        stats["chain_rejected"] += tree.chain_prefix(outcome.path) == 0
        stats["deep"] += len(outcome.path) >= 2
    assert all(stats[key] > 20 for key in ("merged", "alternative_won", "chain_rejected", "deep")), stats


def test_tree_greedy_follows_the_argmax_child():
    #          root
    #        /   |   \
    #   0:t1   3:t2   4:t3       (3 is the argmax at the root)
    #    |      |
    #  1:t2   5:t0               (under 3 the argmax is t0: accepted; under 5 no child: bonus)
    #    |
    #  2:t3
    tokens, parents = [1, 2, 3, 2, 3, 0], [-1, 0, 1, -1, -1, 3]
    logits = torch.zeros(len(tokens) + 1, VOCAB)
    logits[0, 2] = 1  # root: argmax t2 -> node 3
    logits[4, 0] = 1  # after node 3: argmax t0 -> node 5
    logits[6, 3] = 1  # after node 5: bonus t3
    outcome = verify.verify_tree_greedy(logits, tokens, parents)
    assert outcome.path == [3, 5] and outcome.next_token == 3
    logits[0] = 0
    logits[0, 0] = 1  # no child has t0: nothing accepted, recovered t0
    assert verify.verify_tree_greedy(logits, tokens, parents) == verify.TreeOutcome([], 0)


def test_children_must_follow_their_parents():
    with pytest.raises(ValueError):
        verify.tree_children([1, -1])


def test_point_mass_settling_matches_sequential_tries():
    """Point-mass children in one draw (``_settle_point_masses``) have the sequential law: the
    probability of descending into each child and of each recovered token, exactly."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    tokens, parents, laws_ = [2, 0], [-1, -1], [[None], [None]]
    counts = Counter()
    for seed in range(20000):
        g = torch.Generator().manual_seed(seed)
        outcome = verify.verify_tree_sampled(torch.stack([p, p, p]), tokens, parents, laws_, g)
        counts[("child", outcome.path[0]) if outcome.path else ("token", outcome.next_token)] += 1
    expected = {("child", 0): 0.3, ("child", 1): 0.1, ("token", 1): 0.2, ("token", 3): 0.4}
    assert chisquare_pvalue(counts, expected) > ACCEPT_P
