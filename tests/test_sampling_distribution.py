"""Sampling distribution of a whole cascade on tiny table-lookup language models.

The target, the drafters and MaG run through ``Cascade.generate`` exactly as real models do; the
joint law of the generated tokens (3 or 4 tokens over a 3-token vocabulary) is enumerated from
the target's table under the same warping, and thousands of seeded runs are chi-squared against
it. The same machinery, with a broken reviewer patched into the cascade step, must reject.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from csdrafting import KMatrix, autoplan
from csdrafting import step as step_module
from csdrafting.sampling import SamplingParams, warp
from csdrafting.schedule import AdaptiveSchedule, ScheduleParams
from csdrafting.step import EngineParams
from csdrafting.tree import TreeParams
from tiny import (
    FULL_TREES,
    TableLevel,
    broken_reviewer,
    chisquare_pvalue,
    exact_joint,
    plan_automatically,
    random_table,
    sequential_tree_verifier,
)
from tiny import make_cascade as make_any_cascade

VOCAB = 3
PROMPT = [0, 1, 2, 0, 1]  # repeats, so MaG finds matches
ACCEPT_P = 1e-3  # fixed seeds: deterministic; a correct cascade is far above this
REJECT_P = 1e-6


def make_cascade(*args, params=FULL_TREES, **fields):
    """Every candidate in every tree (unless ``params`` say otherwise): the most branches for the
    verifiers to get wrong."""
    return make_any_cascade(*args, params=params, **fields)


def make_levels(mode: str, num_drafters: int, unrelated: bool = False) -> list[TableLevel]:
    """Target, a drafter that partly agrees with it (or, ``unrelated``, one that does not) and an
    unrelated small drafter."""
    target = random_table(10, VOCAB, mode)
    d1 = random_table(13, VOCAB, mode) if unrelated else 0.6 * target + random_table(11, VOCAB, mode)
    tables = [target, d1, random_table(12, VOCAB, mode)]
    names = ["target", "d1", "d2"]
    return [TableLevel(names[i], tables[i], mode) for i in range(num_drafters + 1)]


@dataclass
class Config:
    name: str
    num_drafters: int
    mag: bool
    k_matrix: list
    lenience: float
    params: SamplingParams
    mode: str = "position"
    num_tokens: int = 3
    num_runs: int = 3000
    origins: tuple = field(default_factory=tuple)  # levels whose tokens the target must have reviewed
    reviewers: tuple = field(default_factory=tuple)  # drafters that must have reviewed smaller levels' drafts
    unrelated: bool = False  # d1 unrelated to the target (many rejections: broken reviewers show)
    adaptive: bool = False  # online adaptation of the schedule (deterministic per seed when seeded)
    mag_first: int | str | None = None  # MaG's draft straight to the target after a match this long (or where it pays)
    tree: bool = False  # the target verifies token trees (chain + MaG alternatives)


DEFAULT_K = KMatrix.default(2, True).as_lists()  # passed explicitly: a static schedule, deterministic per seed

CONFIGS = [
    Config("1 drafter, K=[[2]], T=1", 1, False, [[2]], 1.0, SamplingParams(1.0), origins=("d1",)),
    Config(
        "1 drafter, K=[[3]], T=0.7, bigram",
        1,
        False,
        [[3]],
        1.0,
        SamplingParams(0.7),
        mode="bigram",
        num_tokens=4,
        origins=("d1",),
    ),
    Config("MaG alone, K=[[2]], T=1.3", 0, True, [[2]], 1.0, SamplingParams(1.3), origins=("mag",)),
    Config(
        "2 drafters + MaG, l=1, T=1.3",
        2,
        True,
        [[1, 0, 1], [0, 1, 1], [0, 0, 1]],
        1.0,
        SamplingParams(1.3),
        num_tokens=4,
        origins=("d1", "d2", "mag"),
        reviewers=("d1", "d2"),
    ),
    Config(
        "2 drafters + MaG, default K, l=3, T=1",
        2,
        True,
        DEFAULT_K,
        3.0,
        SamplingParams(1.0),
        num_tokens=4,
        origins=("d1", "d2", "mag"),
        reviewers=("d1", "d2"),
    ),
    Config(
        "2 drafters + MaG, l=3, top_k=2, bigram",
        2,
        True,
        [[1, 1, 1], [0, 1, 2], [0, 0, 2]],
        3.0,
        SamplingParams(1.0, top_k=2),
        mode="bigram",
        num_tokens=4,
        origins=("d1", "d2", "mag"),
        reviewers=("d1", "d2"),
    ),
    Config(
        "1 drafter + MaG, l=3, top_p=0.8, T=1.3",
        1,
        True,
        [[1, 2], [0, 2]],
        3.0,
        SamplingParams(1.3, top_p=0.8),
        origins=("d1", "mag"),
        reviewers=("d1",),
    ),
    Config(
        "2 drafters, l=3, T=1.3, top_k=2, top_p=0.8",
        2,
        False,
        [[1, 1], [0, 2]],
        3.0,
        SamplingParams(1.3, top_k=2, top_p=0.8),
        num_tokens=4,
        origins=("d1", "d2"),
        reviewers=("d1",),
    ),
    Config(
        "adaptive: 2 drafters + MaG, l=3, T=1",
        2,
        True,
        [[1, 1, 1], [0, 1, 1], [0, 0, 1]],
        3.0,
        SamplingParams(1.0),
        num_tokens=4,
        origins=("d1", "d2", "mag"),
        reviewers=("d1", "d2"),
        adaptive=True,
    ),
    Config(
        "adaptive: unrelated drafter, K=[[2]], T=1.3",
        1,
        False,
        [[2]],
        1.0,
        SamplingParams(1.3),
        unrelated=True,
        num_tokens=4,
        origins=("d1",),
        adaptive=True,
    ),
    Config(
        "MaG first: 2 drafters + MaG, l=3, T=1",
        2,
        True,
        [[1, 1, 1], [0, 1, 1], [0, 0, 1]],
        3.0,
        SamplingParams(1.0),
        num_tokens=4,
        origins=("d1", "mag"),
        reviewers=("d1",),
        mag_first=2,
    ),
    Config(
        "MaG first where it pays (auto): MaG alone, K=[[0]], T=1",
        0,
        True,
        [[0]],
        1.0,
        SamplingParams(1.0),
        num_tokens=4,
        origins=("mag",),
        mag_first="auto",
    ),
    Config(
        "tree: MaG alone, K=[[2]], T=1.3",
        0,
        True,
        [[2]],
        1.0,
        SamplingParams(1.3),
        num_tokens=4,
        origins=("mag",),
        tree=True,
    ),
    Config(
        "tree: unrelated drafter + MaG, K=[[2, 1], [0, 1]], T=1, top_k=2",
        1,
        True,
        [[2, 1], [0, 1]],
        1.0,
        SamplingParams(1.0, top_k=2),
        unrelated=True,
        num_tokens=4,
        origins=("d1", "mag"),
        tree=True,
    ),
    Config(
        "tree: 2 drafters + MaG, l=3, T=0.7, top_p=0.95",
        2,
        True,
        [[1, 1, 1], [0, 1, 1], [0, 0, 1]],
        3.0,
        SamplingParams(0.7, top_p=0.95),
        num_tokens=4,
        origins=("d1", "d2", "mag"),
        reviewers=("d1", "d2"),
        tree=True,
    ),
    Config(
        "unrelated drafter, K=[[2]], T=1", 1, False, [[2]], 1.0, SamplingParams(1.0), unrelated=True, origins=("d1",)
    ),
    Config(
        "unrelated drafters, l=3, T=1",
        2,
        False,
        [[1, 1], [0, 2]],
        3.0,
        SamplingParams(1.0),
        unrelated=True,
        num_tokens=4,
        origins=("d1", "d2"),
        reviewers=("d1",),
    ),
]


def sample(config: Config, seed_offset: int = 0):
    levels = make_levels(config.mode, config.num_drafters, config.unrelated)
    cascade = make_cascade(
        levels[0],
        levels[1:],
        tokenizer=None,
        mag=config.mag,
        k_matrix=config.k_matrix,
        lenience=config.lenience,
        eos_token_ids=[],
        adaptive=config.adaptive,
        mag_first=config.mag_first,
        tree=config.tree,
    )
    p = config.params
    counts = Counter()
    totals = Counter()
    for run in range(config.num_runs):
        result = cascade.generate(
            PROMPT,
            max_new_tokens=config.num_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            seed=seed_offset + run,
            ignore_eos=True,
        )
        assert len(result.token_ids) == config.num_tokens and result.finish_reason == "length"
        counts[tuple(result.token_ids)] += 1
        target_review = result.stats.levels[0].review
        if config.tree:
            totals["branch_wins"] += result.stats.levels[0].tree.num_branch_wins
        totals["drafted"] += target_review.num_drafted
        totals["accepted"] += target_review.num_accepted
        for origin, n in target_review.drafted_by_origin.items():
            totals["drafted:" + origin] += n
        for level in result.stats.levels[1:]:
            totals["calls:" + level.name] += level.num_forwards
            if level.kind == "drafter":
                totals["reviewed_by:" + level.name] += level.review.num_drafted
    return counts, totals, levels[0]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_cascade_samples_the_target_distribution(config):
    counts, totals, target = sample(config)
    expected = exact_joint(target, PROMPT, config.num_tokens, config.params)
    pvalue = chisquare_pvalue(counts, expected)
    assert pvalue > ACCEPT_P, f"{config.name}: p = {pvalue:.2e}"
    # the drafting paths really ran: the target reviewed tokens from every listed level,
    # accepting some and rejecting some
    assert 0 < totals["accepted"] < totals["drafted"], totals
    for origin in config.origins:
        assert totals["drafted:" + origin] > 0, (origin, totals)
    for reviewer in config.reviewers:  # the vertical cascade ran: drafters reviewed smaller levels' drafts
        assert totals["reviewed_by:" + reviewer] > 0, (reviewer, totals)
    if config.tree:  # alternative branches really won some verifications
        assert totals["branch_wins"] > 0, totals
    # the reference law is not degenerate: many outcomes are likely, so a wrong law would show
    assert sum(prob > 0.01 for prob in expected.values()) >= 6


def test_enumeration_is_a_distribution_and_the_test_discriminates():
    """Sanity of the reference: the joint sums to 1, and a different model's joint is rejected
    by the same chi-square on the same samples."""
    config = CONFIGS[0]
    counts, _, target = sample(config)
    expected = exact_joint(target, PROMPT, config.num_tokens, config.params)
    assert sum(expected.values()) == pytest.approx(1.0, abs=1e-12)
    drafter = make_levels(config.mode, 1)[1]
    assert chisquare_pvalue(counts, exact_joint(drafter, PROMPT, config.num_tokens, config.params)) < REJECT_P
    warmer = SamplingParams(1.3)
    assert chisquare_pvalue(counts, exact_joint(target, PROMPT, config.num_tokens, warmer)) < REJECT_P


CONFIG_BY_NAME = {config.name: config for config in CONFIGS}
MUTANT_CASES = [  # unrelated drafters: many rejections, so a broken reviewer shows
    ("resample_from_p", broken_reviewer(after_reject="p"), CONFIG_BY_NAME["unrelated drafter, K=[[2]], T=1"]),
    (
        "accept_with_p_ignoring_q",
        broken_reviewer(accept_rule="p_only"),
        CONFIG_BY_NAME["unrelated drafter, K=[[2]], T=1"],
    ),
    ("lenient_review_carries_p", broken_reviewer(carry="p"), CONFIG_BY_NAME["unrelated drafters, l=3, T=1"]),
]


@pytest.mark.parametrize("name,reviewer,config", MUTANT_CASES, ids=[m[0] for m in MUTANT_CASES])
def test_whole_cascade_rejects_broken_reviewer(monkeypatch, name, reviewer, config):
    monkeypatch.setattr(step_module.verify, "review_sampled", reviewer)
    counts, totals, target = sample(config)
    assert totals["drafted"] > 0
    expected = exact_joint(target, PROMPT, config.num_tokens, config.params)
    assert chisquare_pvalue(counts, expected) < REJECT_P


# the duplicate-candidate mutant needs merged candidates often enough to show; the verify-level
# test (test_tree_verify.py) builds them on purpose and rejects it there
TREE_MUTANTS = ["p_not_updated", "residual_from_wrong_node"]


@pytest.mark.parametrize("mutant", TREE_MUTANTS)
def test_whole_cascade_with_trees_rejects_broken_tree_verifier(monkeypatch, mutant):
    monkeypatch.setattr(step_module.verify, "verify_tree_sampled", sequential_tree_verifier(mutant))
    config = CONFIG_BY_NAME["tree: unrelated drafter + MaG, K=[[2, 1], [0, 1]], T=1, top_k=2"]
    counts, totals, target = sample(config)
    assert totals["branch_wins"] > 0
    expected = exact_joint(target, PROMPT, config.num_tokens, config.params)
    assert chisquare_pvalue(counts, expected) < REJECT_P


def test_whole_cascade_with_the_sequential_tree_reference_samples_the_target(monkeypatch):
    monkeypatch.setattr(step_module.verify, "verify_tree_sampled", sequential_tree_verifier())
    config = CONFIG_BY_NAME["tree: unrelated drafter + MaG, K=[[2, 1], [0, 1]], T=1, top_k=2"]
    counts, _, target = sample(config)
    assert chisquare_pvalue(counts, exact_joint(target, PROMPT, config.num_tokens, config.params)) > ACCEPT_P


class FakeClock:
    """``time`` for the step: every reading is a millisecond after the previous one."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1e-3
        return self.now


def test_planned_auto_and_per_level_switch_sample_the_target_distribution(monkeypatch, tmp_path):
    """k_matrix="auto" with planning on (synthetic costs): the prior plan, the plan remade from
    the runs observed so far, and the per-level switch forced to flip drafters off and on keep
    the target's law. The clock-driven switches normally run for unseeded requests only; here
    they run for the seeded runs too, on a fake clock, so the test stays deterministic."""
    costs = {"target": (10e-3, 1e-3), "d1": (1e-3, 0.05e-3), "d2": (0.5e-3, 0.02e-3)}
    plan_automatically(monkeypatch, tmp_path, costs)
    monkeypatch.setattr(autoplan, "MIN_OBSERVED_TOKENS", 200)  # re-planned after 50 runs
    schedule = ScheduleParams(
        slower=1e9,  # speculation as a whole stays on
        level_margin=-1.0,  # every judgement switches a drafter off
        judge_levels_first=1,
        first_level_backoff=1,
    )
    engine = EngineParams(schedule=schedule, tree=TreeParams(explore_every=1), clock=FakeClock().perf_counter)
    monkeypatch.setattr(AdaptiveSchedule, "begin", lambda self, carry_over: self.resume())
    switched = []
    level_off = AdaptiveSchedule._level_off
    monkeypatch.setattr(
        AdaptiveSchedule, "_level_off", lambda self, column: (switched.append(column), level_off(self, column))
    )
    levels = make_levels("position", 2)
    cascade = make_cascade(
        levels[0], levels[1:], names=["target", "d1", "d2"], mag=True, eos_token_ids=[], params=engine
    )
    params = SamplingParams(1.0)
    counts, drafted = Counter(), Counter()
    for run in range(3000):
        result = cascade.generate(PROMPT, max_new_tokens=4, temperature=1.0, seed=run, ignore_eos=True)
        counts[tuple(result.token_ids)] += 1
        drafted.update(result.stats.levels[0].review.drafted_by_origin)
    # the back-off doubles at every failed retry: switches thin out, but keep happening
    assert cascade.plan.source == "observed" and len(switched) >= 10
    assert any(drafted[d.name] > 0 for d in cascade.drafters), drafted
    expected = exact_joint(levels[0], PROMPT, 4, params)
    assert chisquare_pvalue(counts, expected) > ACCEPT_P


def truncated_joint(full: dict, eos: int) -> dict:
    """The law of the output when generation stops at the first EOS."""
    out: dict = {}
    for seq, prob in full.items():
        cut = seq[: seq.index(eos) + 1] if eos in seq else seq
        out[cut] = out.get(cut, 0.0) + prob
    return out


def test_cascade_with_eos_samples_the_truncated_target_law():
    """EOS on: drafts are cut after an EOS, the output stops there; the law of the (variable-length)
    output is the target's law truncated at its first EOS."""
    eos = 2
    levels = make_levels("bigram", 2)
    cascade = make_cascade(
        levels[0], levels[1:], mag=True, k_matrix=[[2, 1, 2], [0, 1, 2], [0, 0, 2]], lenience=2.0, eos_token_ids=[eos]
    )
    params = SamplingParams(1.0)
    counts, finishes = Counter(), Counter()
    for run in range(3000):
        result = cascade.generate(PROMPT, max_new_tokens=4, temperature=1.0, seed=run)
        counts[tuple(result.token_ids)] += 1
        finishes[result.finish_reason] += 1
    expected = truncated_joint(exact_joint(levels[0], PROMPT, 4, params), eos)
    assert finishes["eos"] > 300 and finishes["length"] > 300
    assert chisquare_pvalue(counts, expected) > ACCEPT_P


def test_real_models_cascade_samples_the_target_distribution():
    """The same check through ModelLevel on tiny float64 Llamas (lean runner, KV caches, rollback):
    top_k=3 keeps the joint law of 3 tokens enumerable (27 outcomes)."""
    from tiny import noisy_copy, tiny_llama

    target = tiny_llama(0, init=0.1)
    drafters = [noisy_copy(target, 1, 0.3), tiny_llama(7, init=0.1)]
    prompt = [5, 17, 33, 2, 81, 40, 5, 17]
    params = SamplingParams(1.0, top_k=3)
    cascade = make_cascade(
        target, drafters, mag=True, k_matrix=[[1, 1, 1], [0, 1, 2], [0, 0, 2]], lenience=2.0, eos_token_ids=[]
    )
    counts, drafted, accepted = Counter(), 0, 0
    for run in range(1500):
        result = cascade.generate(prompt, 3, temperature=1.0, top_k=3, seed=run, ignore_eos=True)
        counts[tuple(result.token_ids)] += 1
        drafted += result.stats.levels[0].review.num_drafted
        accepted += result.stats.levels[0].review.num_accepted
    expected = {}
    with torch.no_grad():
        first = warp(target(torch.tensor([prompt])).logits[0, -1:], params)[0]
        for a in first.nonzero().flatten().tolist():
            second = warp(target(torch.tensor([prompt + [a]])).logits[0, -1:], params)[0]
            for b in second.nonzero().flatten().tolist():
                third = warp(target(torch.tensor([prompt + [a, b]])).logits[0, -1:], params)[0]
                for c in third.nonzero().flatten().tolist():
                    expected[(a, b, c)] = float(first[a] * second[b] * third[c])
    assert sum(prob > 0.01 for prob in expected.values()) >= 6
    assert 0 < accepted < drafted
    assert chisquare_pvalue(counts, expected) > ACCEPT_P


def test_same_seed_same_output():
    config = CONFIGS[4]
    levels = make_levels(config.mode, config.num_drafters)
    cascade = make_cascade(levels[0], levels[1:], mag=True, k_matrix=DEFAULT_K, lenience=3.0, eos_token_ids=[])
    runs = [
        cascade.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=s, ignore_eos=True).token_ids
        for s in (5, 6, 5)
    ]
    assert runs[0] == runs[2]
    outputs = {
        tuple(cascade.generate(PROMPT, 6, temperature=1.0, seed=s, ignore_eos=True).token_ids) for s in range(20)
    }
    assert len(outputs) > 5  # the seed does drive the sampling
    torch.testing.assert_close(levels[0].table, make_levels(config.mode, 0)[0].table)
