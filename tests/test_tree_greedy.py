"""Greedy token identity with token trees (``tree=True``): the target verifies the chain merged
with MaG's alternatives, and the output is still exactly plain greedy decoding of the target.
Every case asserts on the tree statistics too, so no case passes without trees being verified."""

from __future__ import annotations

import pytest

from csdrafting import CascadeConfig, ConfigError
from tiny import (
    FULL_TREES,
    TableLevel,
    hf_greedy,
    llama_family,
    noisy_copy,
    random_table,
    tiny_gpt2,
    tiny_llama,
)
from tiny import make_cascade as make_any_cascade

# repeats with different continuations: MaG finds several earlier occurrences of a suffix
PROMPT = [5, 17, 33, 2, 81, 5, 17, 40, 7, 5, 17, 33, 9, 5, 17, 2, 81, 5]
NUM_NEW = 40
RUNNERS = ["lean", "transformers"]


def make_cascade(*args, **fields):
    """Every candidate in every tree: the clock-driven sizing (test_tree_sizer.py) would make the
    tree counts vary and could leave the branches these tests are about out."""
    return make_any_cascade(*args, params=FULL_TREES, **fields)


@pytest.fixture(scope="module")
def llama():
    return llama_family(PROMPT, NUM_NEW, 0.05)


def check_tree_stats(result) -> None:
    target = result.stats.levels[0]
    tree = target.tree
    assert tree is not None and tree.num_trees > 0
    assert tree.num_nodes >= tree.num_chain_nodes
    assert tree.num_unbranched <= tree.num_trees
    assert tree.num_accepted == target.review.num_accepted  # the review counters saw the path
    assert target.review.num_accepted + result.stats.num_target_steps == NUM_NEW
    assert sum(entry.num_emitted for entry in result.stats.levels) == NUM_NEW


CASES = {  # name: (drafters, K-matrix)
    "mag only": ([], [[3]]),
    "copy + mag": (["copy"], [[2, 4], [0, 3]]),
    "random + mag": (["random"], [[2, 4], [0, 3]]),
    "noisy + mag": (["noisy"], [[2, 4], [0, 3]]),
    "copy + noisy + mag, l=2": (["copy", "noisy"], [[1, 1, 2], [0, 1, 2], [0, 0, 2]]),
}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("case", list(CASES))
def test_tree_greedy_equals_plain_greedy(llama, runner, case):
    drafters, k_matrix = CASES[case]
    lenience = 2.0 if "l=2" in case else 1.0
    cascade = make_cascade(
        llama["target"],
        [llama[d] for d in drafters],
        runner=runner,
        k_matrix=k_matrix,
        lenience=lenience,
        tree=True,
        tree_budget=12,
        eos_token_ids=[],
    )
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == llama["reference"]
    check_tree_stats(result)
    tree = result.stats.levels[0].tree
    assert tree.num_nodes > tree.num_chain_nodes  # alternatives were verified
    if case == "copy + mag":
        # the copy's chain is always right: alternatives never win beyond it
        assert result.stats.acceptance_rate is not None
    if case == "random + mag":
        assert tree.num_chain_nodes > 0 and tree.num_accepted < tree.num_chain_nodes


def test_alternatives_win_where_the_chain_is_wrong():
    """A bigram-table target (its output repeats, so MaG's continuations are right) and an
    unrelated drafter filling the target's chain: the chain is rejected and MaG's branches win."""
    target = TableLevel("target", random_table(0, 12, "bigram", scale=3.0), "bigram", max_positions=256)
    drafter = TableLevel("d1", random_table(1, 12, "bigram", scale=3.0), "bigram", max_positions=256)
    prompt = [1, 2, 3, 4, 5, 1, 2, 6, 7]
    plain = make_cascade(target, [], mag=False, eos_token_ids=[])
    reference = plain.generate(prompt, NUM_NEW, ignore_eos=True).token_ids
    cascade = make_cascade(target, [drafter], k_matrix=[[3, 0], [0, 1]], tree=True, eos_token_ids=[])
    result = cascade.generate(prompt, NUM_NEW, ignore_eos=True)
    assert result.token_ids == reference
    tree = result.stats.levels[0].tree
    assert tree.num_branch_wins > 0 and tree.num_branch_tokens > tree.num_branch_wins  # deep branches won
    check_tree_stats(result)


@pytest.mark.parametrize("budget", [1, 2, 40])
def test_tree_budget_bounds_the_tree(llama, budget):
    cascade = make_cascade(llama["target"], [], k_matrix=[[3]], tree=True, tree_budget=budget, eos_token_ids=[])
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == llama["reference"]
    tree = result.stats.levels[0].tree
    # a tree never exceeds the budget, except that the chain is always kept whole
    assert tree.num_nodes <= tree.num_trees * max(budget, 3)


def test_tree_greedy_gpt2_transformers_runner():
    model = tiny_gpt2(3)
    reference = hf_greedy(model, PROMPT, NUM_NEW)
    cascade = make_cascade(model, [noisy_copy(model, 4, 0.05)], k_matrix=[[2, 4], [0, 3]], tree=True, eos_token_ids=[])
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == reference
    check_tree_stats(result)


@pytest.mark.parametrize("runner", RUNNERS)
def test_eos_inside_a_tree_stops_where_plain_decoding_stops(llama, runner):
    eos = llama["reference"][12]
    plain = make_cascade(llama["target"], [], mag=False, runner=runner, eos_token_ids=[eos])
    expected = plain.generate(PROMPT, NUM_NEW).token_ids
    assert expected[-1] == eos and len(expected) < NUM_NEW
    tree = make_cascade(
        llama["target"], [llama["noisy"]], k_matrix=[[2, 4], [0, 3]], runner=runner, tree=True, eos_token_ids=[eos]
    )
    result = tree.generate(PROMPT, NUM_NEW)
    assert result.token_ids == expected and result.finish_reason == "eos"


def test_auto_with_tree_equals_plain_greedy(llama):
    cascade = make_cascade(llama["target"], [llama["noisy"]], tree=True, eos_token_ids=[])
    assert cascade.config.is_auto
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == llama["reference"]


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"tree": "yes"}, "tree must be"),
        ({"tree": True, "tree_budget": 0}, "tree_budget must be"),
        ({"tree": True, "tree_budget": True}, "tree_budget must be"),
        ({"tree_budget": 8}, "needs tree"),
        ({"tree": True, "mag": False}, "needs MaG"),
    ],
)
def test_tree_config_is_validated(fields, message):
    with pytest.raises(ConfigError, match=message):
        CascadeConfig(target="t", **fields)


def test_tree_config_round_trips_through_a_file(tmp_path):
    config = CascadeConfig(target="t", tree=True, tree_budget=9)
    path = tmp_path / "c.json"
    config.save(path)
    loaded = CascadeConfig.load(path)
    assert loaded.tree and loaded.tree_budget == 9 and loaded.resolve().tree_budget == 9
    assert CascadeConfig(target="t", tree=True).resolve().tree_budget > 0
    assert CascadeConfig(target="t").resolve().tree_budget is None


@pytest.mark.parametrize("runner", RUNNERS)
def test_tree_stays_inside_the_context(runner):
    """Near the end of the context a tree holds no more nodes than the positions left."""
    model = tiny_llama(4, max_positions=32)
    prompt = [10, 11, 12, 10, 11, 13, 10, 11, 12, 10]  # repeats: MaG has alternatives
    reference = hf_greedy(model, prompt, 22)
    cascade = make_cascade(
        model, [noisy_copy(model, 5, 0.05)], k_matrix=[[2, 4], [0, 3]], runner=runner, tree=True, eos_token_ids=[]
    )
    assert cascade.generate(prompt, 22, ignore_eos=True).token_ids == reference  # fills the context exactly
