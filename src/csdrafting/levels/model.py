"""A neural level (the target or a drafter): next-token logits over a sequence, with a KV cache.

The cache is a memo of the sequence this level has already run: ``next_token_logits(ids, n)``
runs only the tokens of ``ids`` the level has not seen (or has seen with different tokens), so
the accepted prefix is never recomputed. This class is the only place cache lengths change:
* rollback: positions whose tokens differ from ``ids`` (a rejected draft) are cropped;
* catch-up: a drafter whose whole draft was accepted has not run the last tokens it proposed
  nor the target's bonus token; the next call feeds them together with the new draft tokens.

Two backends compute the forward passes: the lean ``LlamaRunner`` for Llama weights, and the
generic transformers path (``DynamicCache``) for any other causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .llama import LlamaRunner
from .llama import supports as lean_supports


class TransformersRunner:
    """Forward passes through a transformers model and its ``DynamicCache``: works for any
    architecture whose cache can be cropped."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import DynamicCache

        self.model = model
        self._new_cache = lambda: DynamicCache(config=model.config)
        self.cache = self._new_cache()
        self.length = 0
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", 1 << 30
        )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start: int, num_logits: int) -> torch.Tensor:
        if start < self.length:
            self.cache.crop(start - self.length)  # negative: drop that many trailing positions
        elif start > self.length:
            raise RuntimeError(f"cache holds {self.length} positions, cannot start at {start}")
        positions = torch.arange(start, start + input_ids.shape[0], device=self.device)
        out = self.model(
            input_ids=input_ids.unsqueeze(0),
            cache=self.cache,
            use_cache=True,
            position_ids=positions.unsqueeze(0),
            logits_to_keep=max(num_logits, 1),
        )
        self.length = start + input_ids.shape[0]
        return out.logits[0, out.logits.shape[1] - num_logits :]  # (N, V)


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


@dataclass
class LevelCounters:
    forward_calls: int = 0
    tokens_run: int = 0  # positions pushed through the model (catch-up + draft + prefill)


class ModelLevel:
    """One neural level of the cascade."""

    def __init__(self, name: str, model: torch.nn.Module, runner: str = "auto") -> None:
        if runner not in ("auto", "lean", "transformers"):
            raise ValueError(f"runner must be 'auto', 'lean' or 'transformers', got {runner!r}")
        self.name = name
        self.model = model
        self.config = model.config
        self.num_params = sum(p.numel() for p in model.parameters())
        use_lean = runner == "lean" or (runner == "auto" and lean_supports(model.config))
        self.backend = LlamaRunner(model) if use_lean else TransformersRunner(model)
        self.runner_name = "lean" if use_lean else "transformers"
        self.device = self.backend.device
        self.vocab_size = int(model.config.vocab_size)
        self.max_positions = int(self.backend.max_positions)
        self._ids: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self.counters = LevelCounters()

    def reset(self) -> None:
        """Forget the sequence (a new generation starts). Buffers are kept for reuse."""
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
        new_ids = ids[start:]
        logits = self.backend.forward(torch.tensor(new_ids, dtype=torch.long, device=self.device), start, num_positions)
        self._ids = list(ids)
        self.counters.forward_calls += 1
        self.counters.tokens_run += len(new_ids)
        return logits

    def prefill(self, ids: list[int]) -> None:
        """Cache ``ids`` without asking for logits (the prompt, before the first step)."""
        if not ids:
            return
        start = common_prefix_length(self._ids, ids)
        if start == len(ids):
            return
        self.backend.forward(torch.tensor(ids[start:], dtype=torch.long, device=self.device), start, 0)
        self._ids = list(ids)
        self.counters.tokens_run += len(ids) - start
