"""``WindowedLevel``: a drafter that reads only the end of the prompt changes speed, never the
output. Greedy output equals transformers' greedy decoding of the target with windowed drafters
that agree (the target's weights) and partly agree (noisy weights), the drafter really reads
fewer tokens, and its logits are those of the cut sequence."""

from __future__ import annotations

import random

import pytest
import torch

from csdrafting import Cascade, CascadeConfig, ConfigError, Levels
from csdrafting.levels.model import model_level
from csdrafting.levels.window import WindowedLevel
from tiny import copy_model, hf_greedy, noisy_copy, tiny_llama

PROMPT = [random.Random(5).randrange(96) for _ in range(40)]
NUM_NEW = 24
WINDOW = 8


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


@pytest.mark.parametrize("kind", ["copy", "noisy"])
def test_windowed_drafter_keeps_greedy_output(target, kind):
    drafter = copy_model(target) if kind == "copy" else noisy_copy(target, 1, 0.05)
    windowed = WindowedLevel(model_level("drafter1", drafter, "transformers"), WINDOW)
    levels = Levels.from_models(model_level("target", target, "transformers"), [windowed], names=["target", "drafter1"])
    config = CascadeConfig(drafters=("drafter1",), mag=False, k_matrix=[[3]], adaptive=False)
    result = Cascade(levels, config).generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == hf_greedy(target, PROMPT, NUM_NEW)
    drafter_stats = result.stats.levels[1]
    # the drafter read the window, not the prompt: fewer tokens than the prompt plus the output
    assert 0 < drafter_stats.num_tokens_run < len(PROMPT) - WINDOW + NUM_NEW
    review = result.stats.levels[0].review
    accepted = review.num_accepted
    if kind == "copy":
        assert accepted > 0  # a copy reading a cut prompt still agrees often: the path ran
    else:
        assert 0 < accepted < review.num_drafted


def test_windowed_logits_are_the_cut_sequence(target):
    windowed = WindowedLevel(model_level("d", copy_model(target), "transformers"), WINDOW)
    fresh = model_level("fresh", copy_model(target), "transformers")
    windowed.prefill(PROMPT[:-1])
    ids = PROMPT + [3, 4, 5]
    got = windowed.next_token_logits(ids, 4)  # (4, V)
    cut = len(PROMPT) - 1 - WINDOW
    expected = fresh.next_token_logits(ids[cut:], 4)
    torch.testing.assert_close(got, expected)
    windowed.reset()  # a new generation picks a new cut
    short = PROMPT[:5]
    got = windowed.next_token_logits(short, 2)
    torch.testing.assert_close(got, fresh.next_token_logits(short, 2))


def test_window_must_be_positive(target):
    level = model_level("d", copy_model(target), "transformers")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="window"):
            WindowedLevel(level, bad)
