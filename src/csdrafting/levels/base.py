"""What the cascade needs from its levels.

Two kinds of level draft: a **neural** level (the target or a drafter) returns next-token logits
over a sequence, and **MaG** proposes tokens directly. Every neural level the library builds is
a ``PrefixMemoLevel`` (``memo.py``) over a ``Runner`` (a backend's forward pass); tests and custom
backends can pass any object of the ``NeuralLevel`` shape to ``Levels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

NEURAL = "neural"
MAG = "mag"


def tree_layout(parents: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth (T,) and ancestor visibility (T, T) of a token tree given in topological order;
    ``parents[i]`` is token i's parent (-1: the cached position before the tree). A runner's tree
    forward puts token i at position start + depth and lets it attend to ``visible[i]`` only."""
    num_tokens = len(parents)
    depths: list[int] = []
    visible = [[False] * num_tokens for _ in range(num_tokens)]  # visible[i][j]: token i sees token j
    for i, parent in enumerate(parents):
        depths.append(depths[parent] + 1 if parent >= 0 else 0)
        if parent >= 0:
            visible[i][:i] = visible[parent][:i]
        visible[i][i] = True
    return torch.tensor(depths, dtype=torch.long, device=device), torch.tensor(visible, device=device)


@dataclass
class LevelCounters:
    """Work one level did in a generation."""

    num_forwards: int = 0  # forward passes that produced logits (MaG: proposals)
    num_tokens_run: int = 0  # positions pushed through the model (catch-up + draft + prefill)


@runtime_checkable
class Runner(Protocol):
    """A backend's forward pass over one sequence with a KV cache indexed by position."""

    runner_name: str
    device: torch.device
    dtype: torch.dtype
    max_positions: int
    vocab_size: int
    num_params: int

    def forward(self, token_ids: list[int], start: int, num_logits: int) -> torch.Tensor:
        """Run ``token_ids`` at positions ``start..``, forgetting cached positions ``>= start``;
        return logits (num_logits, V) for the last ``num_logits`` of them."""

    # Optional, for token trees (``memo.py`` falls back to one forward per branch without them):
    # ``forward_tree(token_ids, parents, start, num_logits)``: token i attends to the cache before
    # ``start`` and its ancestors, at position start + depth, its keys and values in slot start + i;
    # ``keep(base, slots)``: move slots base + slots[j] to base + j (an accepted path into place).


@runtime_checkable
class NeuralLevel(Protocol):
    kind: str  # NEURAL
    name: str
    vocab_size: int
    max_positions: int
    num_params: int
    runner_name: str
    device: torch.device
    counters: LevelCounters

    def reset(self) -> None:
        """Forget the sequence: a new generation starts."""

    def prefill(self, ids: list[int]) -> None:
        """Cache ``ids`` without producing logits."""

    def next_token_logits(self, ids: list[int], num_positions: int) -> torch.Tensor:
        """Logits (num_positions, V) for the last ``num_positions`` positions of ``ids``."""
