"""Sampling parameters and logit warping: the one place temperature, top-k and top-p live.

Every level of the cascade (target and drafters alike) turns logits into probabilities through
`warp`, so "lossless" means: the emitted tokens follow the target's *warped* distribution.
Greedy decoding (temperature 0) never goes through here: it is argmax on raw logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import GenerationInputError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from a distribution.

    temperature: 0 means greedy (argmax); > 0 divides the logits before the softmax.
    top_k: keep only the k most likely tokens (None: all).
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p (None or 1: all).
    seed: seeds the generator that drives every random choice of one generation.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise GenerationInputError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature < 0:
            raise GenerationInputError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise GenerationInputError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0)):
            raise GenerationInputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise GenerationInputError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits (N, V) -> probabilities (N, V) after temperature, top-k and top-p, in that order.

    Computed in at least float32 so that drafter and target probabilities are comparable
    whatever dtype the models run in.
    """
    if params.greedy:
        raise ValueError("warp() is for sampling; greedy decoding uses argmax on raw logits")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype) / params.temperature  # (N, V)
    vocab_size = logits.shape[-1]
    if params.top_k is not None and params.top_k < vocab_size:
        kth_largest = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)  # (N, V)
        # The kept set lies among the most likely tokens: look at the top 64 first and widen only
        # if their mass falls short of top_p (sorting all V tokens per row costs ~0.5 ms).
        width = min(64, vocab_size)
        while True:
            top_probs, top_ids = torch.topk(probs, width, dim=-1)  # (N, W), descending
            cumulative = torch.cumsum(top_probs, dim=-1)
            if width == vocab_size or bool((cumulative[:, -1] >= params.top_p).all()):
                break
            width = min(vocab_size, width * 8)
        # keep a token while the mass of the more likely ones is still short of top_p;
        # the most likely token is always kept (mass before it is 0 < top_p)
        keep_top = (cumulative - top_probs) < params.top_p
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_ids, keep_top)
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, dim=-1)
