"""Tree forwards and cache compaction: every runner's tree logits equal linear forwards of each
node's path, and after ``commit_path`` the cache gives the logits of a fresh forward of the
committed sequence."""

from __future__ import annotations

import pytest
import torch

from csdrafting.levels.model import model_level
from tiny import KERNEL, TableLevel, copy_model, random_table, tiny_gpt2, tiny_llama

PROMPT = [5, 17, 3, 9, 41, 5, 17, 60, 2]
# a root with three children; a chain of four under the first; a branch under node 1
TOKENS = [11, 12, 13, 14, 21, 22, 31, 32]
PARENTS = [-1, 0, 1, 2, -1, 4, 1, 6]


def fresh_logits(model, runner, ids):
    return model_level("fresh", copy_model(model), runner, kernel=KERNEL).next_token_logits(ids, 1)[0]


def path_ids(node):
    path = [node]
    while PARENTS[path[-1]] >= 0:
        path.append(PARENTS[path[-1]])
    return [TOKENS[n] for n in reversed(path)]


MODELS = {
    "llama-lean": (lambda: tiny_llama(0), "lean"),
    "llama-transformers": (lambda: tiny_llama(0), "transformers"),
    "gpt2-transformers": (lambda: tiny_gpt2(0), "auto"),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("path", [[0, 1, 2, 3], [4, 5], [0, 1, 6, 7], [0], []])
def test_tree_logits_and_compaction_equal_fresh_forwards(name, path):
    make, runner = MODELS[name]
    model = make()
    level = model_level("t", copy_model(model), runner, kernel=KERNEL)
    level.prefill(PROMPT[:-1])
    context = PROMPT + [7, 8]  # two tokens of catch-up before the tree
    logits = level.tree_logits(context, TOKENS, PARENTS)  # (N + 1, V)
    assert logits.shape == (len(TOKENS) + 1, 96)
    torch.testing.assert_close(logits[0], fresh_logits(model, runner, context), rtol=1e-9, atol=1e-9)
    for node in range(len(TOKENS)):
        expected = fresh_logits(model, runner, context + path_ids(node))
        torch.testing.assert_close(logits[node + 1], expected, rtol=1e-9, atol=1e-9)
    level.commit_path(path)
    committed = context + [TOKENS[n] for n in path]
    assert level.num_cached == len(committed)  # the path was compacted, not dropped
    # the next step runs one new token on top of the compacted cache
    after = level.next_token_logits(committed + [50], 1)[0]
    assert level.counters.num_tokens_run == len(PROMPT[:-1]) + 3 + len(TOKENS) + 1
    torch.testing.assert_close(after, fresh_logits(model, runner, committed + [50]), rtol=1e-9, atol=1e-9)


def test_table_runner_without_tree_forward_uses_one_forward_per_path():
    level = TableLevel("t", random_table(0, 96, "bigram"), "bigram", max_positions=64)
    context = PROMPT
    logits = level.tree_logits(context, TOKENS, PARENTS)
    assert torch.equal(logits[0], level.logits_after(context))
    for node in range(len(TOKENS)):
        assert torch.equal(logits[node + 1], level.logits_after(context + path_ids(node)))
    level.commit_path([0, 1])
    assert torch.equal(
        level.next_token_logits(context + [11, 12, 50], 1)[0], level.logits_after(context + [11, 12, 50])
    )
