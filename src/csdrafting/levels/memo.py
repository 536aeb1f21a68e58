"""``PrefixMemoLevel``: a neural level whose KV cache is a memo of the sequence it has run.

``next_token_logits(ids, n)`` runs only the tokens of ``ids`` the level has not seen (or has seen
with different tokens), so the accepted prefix is never recomputed. This class is the only place
that decides which cached positions are kept:
* rollback: positions whose tokens differ from ``ids`` (a rejected draft) are dropped, by asking
  the runner to start there;
* catch-up: a drafter whose whole draft was accepted has not run the last token it proposed nor
  the target's bonus token; the next call feeds them together with the new draft tokens.

Token trees (``tree_logits`` then ``commit_path``): the target runs a draft tree in one forward;
afterwards the cache holds the context in order and the tree's nodes after it, so ``_ids`` is the
context alone until ``commit_path`` moves the accepted path's keys and values into place (runners
with ``keep``) and extends ``_ids`` by the path. Runners without ``forward_tree`` (llama.cpp: it
would need one sequence id per branch) get the tree's logits from one forward per root-to-leaf
path, exact and slower.

Any ``Runner`` (the lean torch runner, transformers, llama.cpp, a replay of recorded logits, a
lookup table in the tests) gets this bookkeeping by being wrapped in this class.
"""

from __future__ import annotations

import torch

from .base import NEURAL, LevelCounters, Runner


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists.

    Sequences here share long prefixes and differ near the end, so compare a long head in one
    C-level list comparison and walk the short tail in Python.
    """
    limit = min(len(a), len(b))
    head = max(0, limit - 64)
    if a[:head] != b[:head]:
        head = 0
    i = head
    while i < limit and a[i] == b[i]:
        i += 1
    return i


class PrefixMemoLevel:
    """One neural level of the cascade over a runner."""

    kind = NEURAL

    def __init__(self, name: str, runner: Runner) -> None:
        self.name = name
        self.runner = runner
        self.runner_name = runner.runner_name
        self.device = runner.device
        self.vocab_size = int(runner.vocab_size)
        self.max_positions = int(runner.max_positions)
        self.num_params = int(runner.num_params)
        self._ids: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self._tree_base: int | None = None  # after tree_logits: the slot of node 0 (runners with trees)
        self._tree_tokens: list[int] = []
        self.counters = LevelCounters()

    def reset(self) -> None:
        """Forget the sequence (a new generation starts). The runner keeps its buffers for reuse."""
        self._ids = []
        self.counters = LevelCounters()

    @property
    def num_cached(self) -> int:
        return len(self._ids)

    def next_token_logits(self, ids: list[int], num_positions: int) -> torch.Tensor:
        """Logits (num_positions, V): row i predicts the token after ``ids[:len(ids) - num_positions + i + 1]``.

        Runs the tokens this level has not cached (the catch-up) plus those it must re-run to
        produce the requested rows; rolls back anything cached beyond the common prefix.
        """
        start = min(common_prefix_length(self._ids, ids), len(ids) - num_positions)
        logits = self.runner.forward(ids[start:], start, num_positions)
        self._ids = list(ids)
        self.counters.num_forwards += 1
        self.counters.num_tokens_run += len(ids) - start
        return logits

    def tree_logits(self, context: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
        """Logits (N + 1, V) for a draft tree after ``context``: row 0 after the context, row
        i + 1 after node i's path (``tokens``, ``parents`` as in ``verify.py``)."""
        start = min(common_prefix_length(self._ids, context), len(context) - 1)
        catch_up = context[start:]  # at least the last context token, whose logits are row 0
        num_catch_up = len(catch_up)
        # one block: the catch-up as a chain, then the nodes (a root child hangs off its last token)
        block_parents = list(range(-1, num_catch_up - 1)) + [
            num_catch_up - 1 if parent < 0 else num_catch_up + parent for parent in parents
        ]
        num_logits = len(tokens) + 1
        forward_tree = getattr(self.runner, "forward_tree", None)
        num_leaves = len(tokens) - len(set(parents) - {-1})
        if forward_tree is not None and num_leaves <= getattr(self.runner, "max_tree_leaves", num_leaves):
            logits = forward_tree(catch_up + tokens, block_parents, start, num_logits)
            self.counters.num_tokens_run += num_catch_up + len(tokens)
            self._tree_base = len(context)
        else:
            logits = self._tree_by_paths(context, start, tokens, parents)
            self._tree_base = None
        self._ids = list(context)  # in order in the cache; the nodes sit after it until committed
        self._tree_tokens = tokens
        self.counters.num_forwards += 1
        return logits

    def _tree_by_paths(self, context: list[int], start: int, tokens: list[int], parents: list[int]) -> torch.Tensor:
        """Tree logits from one linear forward per root-to-leaf path (runners without tree attention)."""
        rows: list[torch.Tensor | None] = [None] * (len(tokens) + 1)
        is_parent = set(parents)
        for leaf in (node for node in range(len(tokens)) if node not in is_parent):
            path = [leaf]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            path.reverse()
            ids = context + [tokens[n] for n in path]
            begin = min(common_prefix_length(self._ids, ids), len(context) - 1, start)
            logits = self.runner.forward(ids[begin:], begin, len(path) + 1)  # (len(path) + 1, V)
            self._ids = ids
            self.counters.num_tokens_run += len(ids) - begin
            for i, row in enumerate([-1] + path):
                rows[row + 1] = logits[i]
        if len(tokens) == 0:
            rows[0] = self.next_token_logits(context, 1)[0]
            self.counters.num_forwards -= 1  # counted by the caller
        return torch.stack(rows)  # (N + 1, V)

    def commit_path(self, path: list[int]) -> None:
        """After ``tree_logits``: the accepted nodes ``path`` become the cached continuation of the
        context (moved into place where the runner can), the other nodes are forgotten."""
        if self._tree_base is None:
            return
        keep = getattr(self.runner, "keep", None)
        if keep is None:
            return  # the context stays cached; the path is run again in the next forward
        keep(self._tree_base, path)  # node i's entries sit in slot len(context) + i
        self._ids = self._ids + [self._tree_tokens[n] for n in path]

    def prefill(self, ids: list[int]) -> None:
        """Cache ``ids`` without asking for logits (the prompt, before the first step)."""
        start = common_prefix_length(self._ids, ids)
        if start == len(ids):
            return
        self.runner.forward(ids[start:], start, 0)
        self._ids = list(ids)
        self.counters.num_tokens_run += len(ids) - start
