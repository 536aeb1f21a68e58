"""``WindowedLevel``: a drafter that reads only the end of the prompt changes speed, never the
output. Greedy output equals transformers' greedy decoding of the target with windowed drafters
that agree (the target's weights) and partly agree (noisy weights), the drafter really reads
fewer tokens, and its logits are those of the cut sequence."""

from __future__ import annotations

import dataclasses
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


# -- the configuration field: drafter_window ------------------------------------------------------


def windowless_levels(target):
    """Target and a noisy drafter, loaded once, with no window: the configuration adds it."""
    drafter = model_level("drafter1", noisy_copy(target, 1, 0.05), "transformers")
    return Levels.from_models(model_level("target", target, "transformers"), [drafter], names=["target", "drafter1"])


def test_config_validates_drafter_window(tmp_path):
    assert CascadeConfig().drafter_window is None
    assert CascadeConfig(drafter_window=64).drafter_window == 64
    for bad in (0, -1, 2.5, True, "64"):
        with pytest.raises(ConfigError, match="drafter_window must be a positive integer"):
            CascadeConfig(drafter_window=bad)
    path = tmp_path / "csd.json"
    CascadeConfig(drafters=("d",), drafter_window=16).save(path)
    assert CascadeConfig.load(path).drafter_window == 16  # a config file round trip


def test_config_window_keeps_greedy_output(target):
    levels = windowless_levels(target)
    config = CascadeConfig(drafters=("drafter1",), mag=True, k_matrix=[[3, 1], [0, 2]], drafter_window=WINDOW)
    cascade = Cascade(levels, config)
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == hf_greedy(target, PROMPT, NUM_NEW)
    assert all(isinstance(d, WindowedLevel) and d.window == WINDOW for d in cascade.drafters)
    assert cascade.target is levels.target  # never the target
    review = result.stats.levels[0].review
    assert 0 < review.num_accepted < review.num_drafted  # the noisy drafter's path ran
    assert cascade.describe()["drafter_window"] == WINDOW
    whole = cascade.with_config(dataclasses.replace(config, drafter_window=None))
    whole_result = whole.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert whole_result.token_ids == result.token_ids
    assert cascade.drafters[0]._cut == len(PROMPT) - 1 - WINDOW  # it prefilled the window only


def test_with_config_adds_and_removes_the_window(target):
    """One loaded drafter serves configurations with and without a window (wrapped per
    configuration, never at load): same output, fewer drafter tokens with the window."""
    config = CascadeConfig(drafters=("drafter1",), mag=False, k_matrix=[[3]], adaptive=False)
    plain = Cascade(windowless_levels(target), config)
    windowed = plain.with_config(dataclasses.replace(config, drafter_window=WINDOW))
    back = windowed.with_config(config)
    assert windowed.levels is plain.levels and windowed.drafters[0].level is plain.levels.drafters[0]
    assert back.drafters[0] is plain.levels.drafters[0] and back.describe()["drafter_window"] is None
    expected = hf_greedy(target, PROMPT, NUM_NEW)
    runs = [c.generate(PROMPT, NUM_NEW, ignore_eos=True) for c in (plain, windowed, back)]
    assert [r.token_ids for r in runs] == [expected] * 3
    tokens_run = [r.stats.levels[1].num_tokens_run for r in runs]
    assert tokens_run[1] < len(PROMPT) - WINDOW + NUM_NEW < tokens_run[0] == tokens_run[2]
