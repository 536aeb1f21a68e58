"""``PrefixMemoLevel``: a neural level whose KV cache is a memo of the sequence it has run.

``next_token_logits(ids, n)`` runs only the tokens of ``ids`` the level has not seen (or has seen
with different tokens), so the accepted prefix is never recomputed. This class is the only place
that decides which cached positions are kept:
* rollback: positions whose tokens differ from ``ids`` (a rejected draft) are dropped, by asking
  the runner to start there;
* catch-up: a drafter whose whole draft was accepted has not run the last token it proposed nor
  the target's bonus token; the next call feeds them together with the new draft tokens.

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

    def prefill(self, ids: list[int]) -> None:
        """Cache ``ids`` without asking for logits (the prompt, before the first step)."""
        start = common_prefix_length(self._ids, ids)
        if start == len(ids):
            return
        self.runner.forward(ids[start:], start, 0)
        self._ids = list(ids)
        self.counters.num_tokens_run += len(ids) - start
