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

    temperature: 0 means greedy (argmax); > 0 (any finite value, however small) divides the logits
        before the softmax.
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


# float32 cannot hold every temperature SamplingParams accepts: 1e-300 rounds to 0.0, 1e-40 to a
# subnormal with few significant bits, 1e300 to inf. Such warps run in float64, which holds them all.
_FLOAT32 = torch.finfo(torch.float32)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits (N, V) -> probabilities (N, V) after temperature, top-k and top-p, in that order.

    The result is softmax(logits / temperature) over the tokens top-k and top-p keep, for any
    finite temperature > 0 and top_p in (0, 1]: as the temperature goes to 0 it tends to a point
    mass on the most likely token (a uniform law over tied maxima) and reaches it, never NaN.
    Computed in at least float32 (float64 for a temperature outside float32's range) so that
    drafter and target probabilities are comparable whatever dtype the models run in.
    """
    if params.greedy:
        raise ValueError("warp() is for sampling; greedy decoding uses argmax on raw logits")
    in_float32_range = _FLOAT32.tiny <= params.temperature <= _FLOAT32.max
    dtype = torch.float32 if logits.dtype != torch.float64 and in_float32_range else torch.float64
    logits = logits.to(dtype)
    # Shift each row so its maximum is 0: softmax does not change, and after the division every row
    # still holds an exact 0 with everything else <= 0, so a tiny temperature sends the others to
    # -inf (probability 0) instead of overflowing to +inf, and no softmax sees inf - inf.
    # (In place below, on tensors this function made: a second (N, V) temporary per op cost ~1 ms
    # per call at V = 8192 on 2 cores, each allocation a fresh mmap.)
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # (N, V)
    # Which tokens top-k and top-p keep depends only on the order of the logits, which dividing by a
    # temperature keeps; they rank the unscaled logits, whose order survives any temperature (a huge
    # one rounds all scaled logits to the same value).
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth_largest = torch.topk(shifted, params.top_k, dim=-1).values[..., -1:]  # (N, 1)
        shifted.masked_fill_(shifted < kth_largest, float("-inf"))
    if params.top_p is None or params.top_p == 1.0:
        return torch.softmax(shifted.div_(params.temperature), dim=-1)
    scaled = shifted / params.temperature  # (N, V)
    keep = _top_p_mask(torch.softmax(scaled, dim=-1), shifted, params.top_p)  # (N, V)
    return torch.softmax(scaled.masked_fill_(~keep, float("-inf")), dim=-1)


def _top_p_mask(probs: torch.Tensor, ranking: torch.Tensor, top_p: float) -> torch.Tensor:
    """(N, V) booleans: the smallest set of most likely tokens (by ``ranking``, in the order of
    ``probs``) whose mass in ``probs`` reaches ``top_p``."""
    vocab_size = probs.shape[-1]
    # The kept set lies among the most likely tokens: look at the top 64 first and widen only
    # if their mass falls short of top_p (sorting all V tokens per row costs ~0.5 ms).
    width = min(64, vocab_size)
    while True:
        top_ids = torch.topk(ranking, width, dim=-1).indices  # (N, W), most likely first
        top_probs = probs.gather(-1, top_ids)  # (N, W), descending
        cumulative = torch.cumsum(top_probs, dim=-1)
        if width == vocab_size or bool((cumulative[:, -1] >= top_p).all()):
            break
        width = min(vocab_size, width * 8)
    # keep a token while the mass of the more likely ones is still short of top_p
    keep_top = (cumulative - top_probs) < top_p  # (N, W)
    # the most likely token is always kept (the mass before it is 0 < top_p), also when top_p is so
    # small that it rounds to 0 in the comparison's dtype (1e-300 in float32)
    keep_top[:, 0] = True
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_ids, keep_top)
