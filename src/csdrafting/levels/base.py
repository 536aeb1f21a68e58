"""What the cascade needs from a neural level. ``ModelLevel`` (transformers models) is the one
the library builds; tests and custom backends can pass any object of this shape to ``Cascade``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class NeuralLevel(Protocol):
    name: str
    vocab_size: int
    max_positions: int
    num_params: int
    runner_name: str
    device: torch.device
    counters: object  # has forward_calls and tokens_run

    def reset(self) -> None:
        """Forget the sequence: a new generation starts."""

    def prefill(self, ids: list[int]) -> None:
        """Cache ``ids`` without producing logits."""

    def next_token_logits(self, ids: list[int], num_positions: int) -> torch.Tensor:
        """Logits (num_positions, V) for the last ``num_positions`` positions of ``ids``."""
