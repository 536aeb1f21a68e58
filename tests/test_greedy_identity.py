"""Greedy output is token-identical to plain greedy decoding of the target.

The reference is transformers' own ``generate(do_sample=False)`` on the target alone, on tiny
float64 models built in-process (float64 keeps near-tie argmax flips out of the comparison).
Every case also asserts on the statistics, so no case passes without exercising its path.
"""

from __future__ import annotations

import pytest
import torch

from csdrafting import ConfigError, EngineParams, KMatrix, autoplan
from csdrafting.levels.mag import BigramTable
from csdrafting.schedule import AdaptiveSchedule, ScheduleParams
from tiny import (
    TableLevel,
    copy_model,
    hf_greedy,
    llama_family,
    make_cascade,
    noisy_copy,
    plan_automatically,
    random_table,
    tiny_gpt2,
)

PROMPT = [5, 17, 33, 2, 81, 40, 7]
NUM_NEW = 40
RUNNERS = ["lean", "transformers"]


@pytest.fixture(scope="module")
def llama():
    family = llama_family(PROMPT, NUM_NEW, 0.02)  # its noisy drafter agrees often, not always
    family["noisier"] = noisy_copy(family["target"], 2, 0.1)
    return family


def target_review(result) -> dict:
    return result.stats.levels[0].review


def level(result, name: str) -> dict:
    return next(entry for entry in result.stats.levels if entry.name == name)


def check_common_stats(result, num_new: int = NUM_NEW) -> None:
    stats = result.stats
    assert stats.num_new_tokens == len(result.token_ids) == num_new
    assert sum(entry.num_emitted for entry in stats.levels) == num_new  # every token has one origin
    review = target_review(result)
    assert review.num_reviews <= stats.num_target_steps  # steps with an empty draft are not reviews
    # each target step emits its accepted tokens plus one recovered or bonus token
    assert review.num_accepted + stats.num_target_steps == num_new


@pytest.mark.parametrize("runner", RUNNERS)
def test_plain_cascade_matches_transformers_generate(llama, runner):
    cascade = make_cascade(llama["target"], [], mag=False, runner=runner, eos_token_ids=[])
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == llama["reference"]
    assert result.stats.levels[0].runner == runner
    assert result.stats.levels[0].num_forwards == NUM_NEW  # one forward per token
    assert result.stats.num_target_steps == NUM_NEW
    check_common_stats(result)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_copy_drafter_is_always_accepted(llama, runner, k):
    cascade = make_cascade(llama["target"], [llama["copy"]], mag=False, k_matrix=[[k]], runner=runner, eos_token_ids=[])
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == llama["reference"]
    review = target_review(result)
    assert review.num_drafted > 0 and review.acceptance_rate == 1.0
    assert result.stats.num_target_steps == -(-NUM_NEW // (k + 1))  # k accepted + 1 bonus per step
    assert level(result, "drafter1").num_forwards > 0
    check_common_stats(result)


@pytest.mark.parametrize("runner", RUNNERS)
def test_random_drafter_is_rarely_accepted(llama, runner):
    cascade = make_cascade(
        llama["target"], [llama["random"]], mag=False, k_matrix=[[3]], runner=runner, eos_token_ids=[]
    )
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == llama["reference"]
    review = target_review(result)
    assert review.num_drafted >= 3 * (NUM_NEW - 5) and review.num_accepted <= review.num_drafted * 0.1
    check_common_stats(result)


@pytest.mark.parametrize("runner", RUNNERS)
def test_noisy_drafter_is_partly_accepted(llama, runner):
    cascade = make_cascade(
        llama["target"], [llama["noisy"]], mag=False, k_matrix=[[4]], runner=runner, eos_token_ids=[]
    )
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == llama["reference"]
    review = target_review(result)
    assert 0 < review.num_accepted < review.num_drafted
    # rejections happen at several draft positions, acceptances at more than the first
    assert review.accepted_by_position[1] > 0
    check_common_stats(result)


@pytest.mark.parametrize("with_bigram", [False, True])
def test_mag_alone(llama, with_bigram):
    # a bigram table built from the reference output makes MaG's guesses often right
    bigram = BigramTable.from_token_ids([PROMPT + llama["reference"]], 96) if with_bigram else None
    cascade = make_cascade(llama["target"], [], mag=True, bigram=bigram, k_matrix=[[4]], eos_token_ids=[])
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == llama["reference"]
    review = target_review(result)
    assert level(result, "mag").num_forwards > 0 and review.drafted_by_origin["mag"] == review.num_drafted > 0
    if with_bigram:
        assert 0 < review.num_accepted < review.num_drafted
        assert level(result, "mag").num_emitted == review.num_accepted
    check_common_stats(result)


FULL_K = [
    KMatrix.default(2, True).as_lists(),
    [[2, 1, 3], [0, 1, 2], [0, 0, 3]],
    [[1, 1, 1], [0, 2, 2], [0, 0, 4]],
    [[3, 0, 2], [0, 2, 1], [0, 0, 2]],  # the target sees d1 and MaG; d2 only drafts for d1
]


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("lenience", [1.0, 3.0])
@pytest.mark.parametrize("k_matrix", FULL_K, ids=[str(k) for k in FULL_K])
def test_full_cascade(llama, runner, lenience, k_matrix):
    cascade = make_cascade(
        llama["target"],
        [llama["noisy"], llama["noisier"]],
        mag=True,
        k_matrix=k_matrix,
        lenience=lenience,
        runner=runner,
        eos_token_ids=[],
    )
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == llama["reference"]
    review = target_review(result)
    assert review.num_drafted > 0 and review.drafted_by_origin.get("drafter1", 0) > 0
    d1, d2 = level(result, "drafter1"), level(result, "drafter2")
    assert d1.num_forwards > 0 and d2.num_forwards > 0 and level(result, "mag").num_forwards > 0
    assert d1.review.num_drafted > 0  # d1 reviewed drafts from below (vertical cascade)
    check_common_stats(result)


def test_lenience_makes_drafters_accept_more_but_not_the_target(llama):
    accepted = {}
    for lenience in (1.0, 3.0):
        cascade = make_cascade(
            llama["target"],
            [llama["noisy"], llama["noisier"]],
            mag=True,
            k_matrix=FULL_K[1],
            lenience=lenience,
            eos_token_ids=[],
        )
        result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
        assert result.token_ids == llama["reference"]
        accepted[lenience] = level(result, "drafter1").review.num_accepted
    assert accepted[3.0] > accepted[1.0]


def test_lenient_cascade_with_copy_and_random_drafters(llama):
    """d1 is an exact copy of the target but reviews the random d2 leniently (l = 5): it lets through
    tokens that are not its argmax, and the target, reviewing exactly, must reject those."""
    cascade = make_cascade(
        llama["target"],
        [llama["copy"], llama["random"]],
        mag=True,
        k_matrix=[[2, 2, 2], [0, 1, 2], [0, 0, 2]],
        lenience=5.0,
        eos_token_ids=[],
    )
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == llama["reference"]
    d1_review = level(result, "drafter1").review
    assert d1_review.num_accepted > 0
    review = target_review(result)
    assert review.accepted_by_origin.get("drafter2", 0) < review.drafted_by_origin.get("drafter2", 0)
    check_common_stats(result)


def test_automatic_schedule_is_lossless(llama):
    """k_matrix=None: the default (possibly adaptive) schedule; output must not depend on it."""
    cascade = make_cascade(llama["target"], [llama["noisy"], llama["noisier"]], mag=True, eos_token_ids=[])
    for _ in range(2):  # a second generation reuses whatever the schedule learned
        result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
        assert result.token_ids == llama["reference"]
        check_common_stats(result)


@pytest.mark.parametrize("runner", RUNNERS)
def test_planned_auto_and_per_level_switch_are_lossless(llama, runner, monkeypatch, tmp_path):
    """k_matrix="auto" with planning on (autoplan.py; synthetic costs, so the plan is fixed):
    the prior plan, the plan remade from observed generations, and the per-level switch forced
    to flip drafters off and on in the middle of generations all emit the target's tokens."""
    costs = {"target": (10e-3, 1e-3), "drafter1": (1e-3, 0.05e-3), "drafter2": (0.5e-3, 0.02e-3)}
    plan_automatically(monkeypatch, tmp_path, costs)
    monkeypatch.setattr(autoplan, "MIN_OBSERVED_TOKENS", 2 * NUM_NEW)
    schedule = ScheduleParams(
        slower=1e9,  # tiny models: keep speculating whatever the clock says
        level_margin=-1.0,  # every judgement switches a drafter off
        judge_levels_first=1,
        first_level_backoff=2,
    )
    switched = []
    level_off = AdaptiveSchedule._level_off
    monkeypatch.setattr(
        AdaptiveSchedule, "_level_off", lambda self, column: (switched.append(column), level_off(self, column))
    )
    cascade = make_cascade(
        llama["target"],
        [llama["noisy"], llama["noisier"]],
        mag=True,
        runner=runner,
        eos_token_ids=[],
        params=EngineParams(schedule=schedule),
    )
    assert cascade.plan.source == "prior" and cascade.drafters
    drafted = 0
    for _ in range(4):
        result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
        assert result.token_ids == llama["reference"]
        check_common_stats(result)
        drafted += sum(target_review(result).drafted_by_origin.get(d.name, 0) for d in cascade.drafters)
    assert cascade.plan.source == "observed"
    assert switched and drafted > 0  # drafters drafted, and were switched off in between


def test_generations_do_not_leak_into_each_other(llama):
    """One Cascade, several prompts in a row, in both orders: caches and MaG's index are reset."""
    other = [9, 9, 3, 60, 61]
    other_reference = hf_greedy(llama["target"], other, 20)
    for runner in RUNNERS:
        cascade = make_cascade(
            llama["target"], [llama["noisy"]], mag=True, k_matrix=[[2, 2], [0, 2]], runner=runner, eos_token_ids=[]
        )
        for _ in range(2):
            assert cascade.generate(PROMPT, NUM_NEW, ignore_eos=True).token_ids == llama["reference"]
            assert cascade.generate(other, 20, ignore_eos=True).token_ids == other_reference
            assert cascade.generate(PROMPT[:3], 10, ignore_eos=True).token_ids == hf_greedy(
                llama["target"], PROMPT[:3], 10
            )


def test_single_token_prompt(llama):
    reference = hf_greedy(llama["target"], [42], 12)
    for runner in RUNNERS:
        cascade = make_cascade(
            llama["target"], [llama["copy"]], mag=True, runner=runner, k_matrix=[[2, 2], [0, 2]], eos_token_ids=[]
        )
        assert cascade.generate([42], 12, ignore_eos=True).token_ids == reference


def test_gpt2_target_and_drafters_use_the_generic_path():
    target = tiny_gpt2(0)
    reference = hf_greedy(target, PROMPT, NUM_NEW)
    drafters = [noisy_copy(target, 3, 0.03), copy_model(target)]
    cascade = make_cascade(
        target, drafters, mag=True, k_matrix=[[2, 1, 2], [0, 1, 2], [0, 0, 2]], lenience=2.0, eos_token_ids=[]
    )
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == reference
    assert {entry.runner for entry in result.stats.levels[:3]} == {"transformers"}
    assert target_review(result).num_drafted > 0 and target_review(result).num_accepted > 0
    check_common_stats(result)
    plain = make_cascade(target, [], mag=False, eos_token_ids=[]).generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert plain.token_ids == reference


def test_describe_reports_the_dtype_for_the_transformers_runner():
    assert make_cascade(tiny_gpt2(0), [], mag=False).describe()["dtype"] == "float64"


def test_describe_reports_the_dtype_for_the_lean_runner(llama):
    assert make_cascade(llama["target"], [], mag=False, runner="lean").describe()["dtype"] == "float64"


def test_lean_runner_refuses_other_architectures():
    with pytest.raises(ConfigError, match="lean runner"):
        make_cascade(tiny_gpt2(0), [], mag=False, runner="lean")


# -- table-lookup models: many cascade shapes, exact reference by argmax ------------------------


def table_greedy(table_level: TableLevel, prompt: list[int], num_new: int) -> list[int]:
    ids = list(prompt)
    for _ in range(num_new):
        ids.append(int(table_level.logits_after(ids).argmax()))
    return ids[len(prompt) :]


TABLE_K = [
    [[1, 1, 1], [0, 1, 1], [0, 0, 1]],
    [[2, 1, 3], [0, 1, 2], [0, 0, 3]],
    [[0, 2, 0], [0, 1, 0], [0, 0, 0]],  # MaG configured but never used; d2 drafts for the target
    [[4, 0, 0], [0, 3, 0], [0, 0, 2]],  # d2 drafts for d1 autoregressively (its MaG row is used by no one)
]


@pytest.mark.parametrize("k_matrix", TABLE_K, ids=[str(k) for k in TABLE_K])
@pytest.mark.parametrize("lenience", [1.0, 2.0, 10.0])
def test_table_models_greedy_identity(k_matrix, lenience):
    drafted = 0
    for seed in range(6):
        vocab = 5
        target_table = random_table(100 + seed, vocab, "bigram")
        target = TableLevel("target", target_table, "bigram")
        d1 = TableLevel("d1", target_table + random_table(200 + seed, vocab, "bigram", scale=0.8), "bigram")
        d2 = TableLevel("d2", random_table(300 + seed, vocab, "bigram"), "bigram")
        cascade = make_cascade(target, [d1, d2], mag=True, k_matrix=k_matrix, lenience=lenience, eos_token_ids=[])
        prompt = [seed % vocab, 1, 2, 1, 2]
        result = cascade.generate(prompt, 30, ignore_eos=True)
        expected = table_greedy(TableLevel("ref", target_table, "bigram"), prompt, 30)
        assert result.token_ids == expected
        check_common_stats(result, 30)
        drafted += target_review(result).num_drafted
    assert drafted > 0


def test_mag_alone_over_a_table_target():
    target_table = random_table(7, 4, "bigram")
    cascade = make_cascade(TableLevel("t", target_table, "bigram"), [], mag=True, k_matrix=[[3]], eos_token_ids=[])
    result = cascade.generate([0, 1, 2, 0, 1], 20, ignore_eos=True)
    assert result.token_ids == table_greedy(TableLevel("r", target_table, "bigram"), [0, 1, 2, 0, 1], 20)
    assert cascade.mag.counters.num_forwards > 0
    torch.testing.assert_close(target_table, random_table(7, 4, "bigram"))


@pytest.mark.parametrize("mag_first", [1, 2])
@pytest.mark.parametrize("adaptive", [False, True])
def test_mag_first_gating(llama, mag_first, adaptive):
    """MaG's draft goes straight to the target when its match is long enough; otherwise the full
    cascade drafts. Both kinds of step must happen, and the output must not change."""
    prompt = PROMPT + PROMPT[:4]  # a repeat, so MaG finds long matches from the start
    reference = hf_greedy(llama["target"], prompt, NUM_NEW)
    cascade = make_cascade(
        llama["target"],
        [llama["noisy"], llama["noisier"]],
        mag=True,
        k_matrix=[[1, 1, 2], [0, 1, 2], [0, 0, 2]],
        runner="lean",
        eos_token_ids=[],
        adaptive=adaptive,
        mag_first=mag_first,
    )
    result = cascade.generate(prompt, NUM_NEW, ignore_eos=True)
    assert result.token_ids == reference
    review = target_review(result)
    assert review.drafted_by_origin.get("mag", 0) > 0  # gated steps ran
    assert level(result, "drafter1").num_forwards > 0  # and cascade steps ran
    check_common_stats(result)
