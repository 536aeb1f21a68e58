"""``warp`` at the edges of its documented domain: any temperature > 0, any top_p in (0, 1].

A temperature of 1e-300 rounds to 0.0 in float32 and a top_p of 1e-300 does too; both once turned
every probability into NaN. The law warp must return is softmax(logits / temperature) restricted to
the kept tokens, which for a vanishing temperature (or top_p) is a point mass on the most likely
token, or a uniform law over tied maxima. Each grid below checks that law against a float64
reference computed in log space, in every dtype a model may produce; the cascade tests check that
a sampled generation at such settings is exactly the target's greedy decoding.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from csdrafting.sampling import SamplingParams, warp
from tiny import hf_greedy, make_cascade, noisy_copy, tiny_llama

TEMPERATURES = [5e-324, 1e-300, 1e-40, 1.2e-38, 1e-30, 1e-12, 1e-3, 0.7, 2.0, 1e3, 1e300]
TINY_VALUES = [5e-324, 1e-300, 1e-40, 1e-12]  # each one a point mass at these logit gaps
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def reference_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) in float64, shifted first so nothing overflows. (V,)"""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scaled = (logits - logits.max()) / temperature  # <= 0; -inf where the gap overflows
    probs = np.exp(scaled)
    return probs / probs.sum()


def random_logits(seed: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 50, generator=g, dtype=torch.float64) * scale  # (N, V)
    logits[0, :3] = logits[0].max() + 1  # a row with a three-way tie at the top
    return logits.to(dtype)


def assert_distributions(probs: torch.Tensor) -> None:
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0], dtype=probs.dtype), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_any_temperature_gives_the_exact_tempered_law(temperature, dtype, scale):
    logits = random_logits(0, dtype, scale)
    probs = warp(logits, SamplingParams(temperature))
    assert_distributions(probs)
    # float32 arithmetic: compare at float32 precision (the input dtype's rounding is in both sides)
    atol = 1e-12 if probs.dtype == torch.float64 else 2e-5
    for row, out in zip(logits.double().numpy(), probs.double().numpy()):
        np.testing.assert_allclose(out, reference_probs(row, temperature), atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TINY_VALUES)
def test_vanishing_temperature_is_a_point_mass_or_uniform_over_ties(temperature, dtype):
    logits = random_logits(1, dtype, 3.0)
    probs = warp(logits, SamplingParams(temperature)).double()
    maxima = logits == logits.max(dim=-1, keepdim=True).values  # (N, V)
    expected = maxima.double() / maxima.sum(-1, keepdim=True)
    assert maxima[0].sum() == 3  # the tie row is in the grid
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_p", TINY_VALUES)
@pytest.mark.parametrize("temperature", [1e-300, 1.0, 2.0])
def test_vanishing_top_p_keeps_only_the_most_likely_token(top_p, temperature, dtype):
    logits = random_logits(2, dtype, 3.0)[1:]  # rows without ties: the most likely token is unique
    probs = warp(logits, SamplingParams(temperature, top_p=top_p)).double()
    expected = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    torch.testing.assert_close(probs, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    list(itertools.product([1e-300, 1e-40, 0.5, 1e300], [None, 1, 5], [1e-300, 0.3, 1.0 - 1e-12, 1.0])),
)
def test_extreme_combinations_are_distributions_on_the_kept_tokens(temperature, top_k, top_p):
    logits = random_logits(3, torch.float32, 3.0)
    probs = warp(logits, SamplingParams(temperature, top_k=top_k, top_p=top_p))
    assert_distributions(probs)
    if top_k is not None:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        assert not (probs[logits < kth_largest] > 0).any()
    # a most likely token always keeps a positive probability (with a tie at the top, top-p keeps
    # one of the tied tokens when top_p is below their mass)
    maxima = logits == logits.max(dim=-1, keepdim=True).values  # (N, V)
    assert ((probs * maxima).sum(-1) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("params", [dict(temperature=1e-300), dict(temperature=1.0, top_p=1e-300)], ids=str)
def test_cascade_at_a_vanishing_temperature_or_top_p_is_greedy(dtype, params):
    """Through every level's warp and the exact rejection test: the sampled output is the target's
    greedy decoding token for token (its warped law is a point mass), with the drafters drafting."""
    prompt, num_new = [5, 17, 33, 2, 81, 40, 7], 24
    target = tiny_llama(0)
    reference = hf_greedy(target, prompt, num_new)
    target = target.to(dtype)
    drafter = noisy_copy(tiny_llama(0), 1, 0.02).to(dtype)
    cascade = make_cascade(target, [drafter], mag=True, k_matrix=[[2, 2], [0, 2]], eos_token_ids=[])
    for seed in (0, 1):
        result = cascade.generate(prompt, num_new, seed=seed, ignore_eos=True, **params)
        assert result.token_ids == reference
        review = result.stats.levels[0].review
        assert 0 < review.num_accepted <= review.num_drafted
