"""Draft schedules on their own: the static schedule keeps every length, the adaptive one backs
off a drafter that keeps failing (doubling), retries it, and switches speculation off and on by
measured time, fed here by hand (a fake clock: ``after_step`` gets the seconds)."""

from __future__ import annotations

import pytest

from csdrafting.kmatrix import KMatrix
from csdrafting.schedule import AdaptiveSchedule, ScheduleParams, StaticSchedule

PARAMS = ScheduleParams()  # the defaults every schedule below runs with

ONE_DRAFTER = KMatrix(((4,),))


def adaptive(k_matrix: KMatrix = ONE_DRAFTER, mag_first: int | None = None) -> AdaptiveSchedule:
    schedule = AdaptiveSchedule(k_matrix, mag_first)
    schedule.reset(use_timing=False)  # length tests: no clock-driven plain steps at the start
    return schedule


def reject_until_off(schedule: AdaptiveSchedule) -> int:
    """Reject the drafter's first token until its entry falls to 0; returns how many reviews."""
    for reviews in range(1, 100):
        length = schedule.rows[0][0]
        schedule.after_review(0, [(0, 0, length)], num_accepted=0)
        if schedule.rows[0][0] == 0:
            return reviews
    raise AssertionError("the entry never switched off")


def reviews_until_back(schedule: AdaptiveSchedule) -> int:
    """Reviews of the row (with nothing from the switched-off drafter) until it is retried."""
    for reviews in range(1, 2000):
        schedule.after_review(0, [], num_accepted=0)
        if schedule.rows[0][0] > 0:
            assert schedule.rows[0][0] == 1  # retried with a single token
            return reviews
    raise AssertionError("the entry never came back")


def test_static_schedule_keeps_every_length():
    schedule = StaticSchedule(KMatrix(((2, 3), (0, 1))), mag_first=4)
    for _ in range(5):
        schedule.after_review(0, [(0, 0, 2), (1, 2, 5)], num_accepted=0)
        schedule.after_mag_first(num_accepted=20)
        schedule.after_step(1.0, 1, speculative=True)
    assert schedule.current() == [[2, 3], [0, 1]] and schedule.ends(0) == [2, 5]
    assert schedule.mag_first_length() == PARAMS.static_mag_first_tokens == 24  # adaptive=False: fixed
    assert schedule.speculate()


def test_adaptive_lengths_follow_acceptance():
    schedule = adaptive()
    for _ in range(10):
        length = schedule.rows[0][0]
        schedule.after_review(0, [(0, 0, length)], num_accepted=length)
    assert schedule.rows[0][0] > 4  # always right: longer drafts
    assert schedule.rows[0][0] <= max(8, PARAMS.max_growth * 4)  # within its cap


def test_backoff_doubles_after_each_failed_retry_and_resets_after_a_success():
    schedule = adaptive()
    reject_until_off(schedule)
    first = reviews_until_back(schedule)
    assert first + 1 == PARAMS.first_backoff
    schedule.after_review(0, [(0, 0, 1)], num_accepted=0)  # the retry fails
    assert schedule.rows[0][0] == 0
    second = reviews_until_back(schedule)
    assert second + 1 == 2 * (first + 1)
    schedule.after_review(0, [(0, 0, 1)], num_accepted=0)  # fails again: doubles again
    third = reviews_until_back(schedule)
    assert third + 1 == 4 * (first + 1)
    for _ in range(6):  # the retried drafter is right from now on
        length = schedule.rows[0][0]
        schedule.after_review(0, [(0, 0, length)], num_accepted=length)
    assert schedule.backoff[0][0] == PARAMS.first_backoff


def test_backoff_is_capped():
    schedule = adaptive()
    reject_until_off(schedule)
    for _ in range(12):
        reviews_until_back(schedule)
        schedule.after_review(0, [(0, 0, 1)], num_accepted=0)
    assert reviews_until_back(schedule) + 1 == PARAMS.max_backoff


def test_mag_first_length_follows_acceptance_within_bounds():
    schedule = adaptive(KMatrix(((1,),)), mag_first=3)
    assert schedule.mag_first_length() == PARAMS.mag_first_start
    schedule.after_mag_first(num_accepted=5)
    assert schedule.mag_first_length() == 12  # about twice what was accepted
    schedule.after_mag_first(num_accepted=100)
    assert schedule.mag_first_length() == PARAMS.mag_first_max_tokens
    schedule.after_mag_first(num_accepted=0)
    assert schedule.mag_first_length() == PARAMS.mag_first_min_tokens
    schedule.begin(carry_over=True)  # a new generation starts from the initial length
    assert schedule.mag_first_length() == PARAMS.mag_first_start


def run_steps(schedule: AdaptiveSchedule, num_steps: int, spec_seconds_per_token: float) -> list[bool]:
    """Steps with a fake clock: plain steps cost 10 ms a token, speculative ones as given (2 tokens)."""
    decisions = []
    for _ in range(num_steps):
        speculative = schedule.speculate()
        decisions.append(speculative)
        if speculative:
            schedule.after_step(2 * spec_seconds_per_token, 2, speculative=True)
        else:
            schedule.after_step(0.010, 1, speculative=False)
    return decisions


def test_time_switch_turns_slow_speculation_off_and_retries_with_doubling_backoff():
    schedule = AdaptiveSchedule(ONE_DRAFTER)  # use_timing=True: it starts with plain steps to measure
    decisions = run_steps(schedule, 2, 0.020)
    assert decisions == [False, False]
    decisions = run_steps(schedule, PARAMS.judge_after, 0.020)  # twice plain's cost per token
    assert all(decisions) and not schedule.speculate()  # judged slower: plain decoding for a while
    off = run_steps(schedule, 200, 0.020)
    first_pause = off.index(True)
    assert first_pause == PARAMS.first_backoff * 4
    later = off[first_pause:]
    second_pause = later[PARAMS.judge_after :].index(True)
    assert second_pause == 2 * first_pause  # the retry failed: twice as long off


def test_time_switch_keeps_fast_speculation_and_never_runs_for_seeded_sampling():
    schedule = AdaptiveSchedule(ONE_DRAFTER)
    decisions = run_steps(schedule, 100, 0.004)  # faster than plain per token
    assert decisions[:2] == [False, False] and all(decisions[2:])
    seeded = AdaptiveSchedule(ONE_DRAFTER)
    seeded.begin(carry_over=False)  # seeded sampling: reproducible, no clock
    assert all(run_steps(seeded, 100, 0.050))


# -- the per-level switch (k_matrix="auto": a judge predicts whether each drafter pays) ------------

TWO_LEVELS = KMatrix(((2, 2), (0, 3)))  # a neural drafter (column 0) and MaG (column 1)


class FakeJudge:
    """Predicts a fixed speed with and without the drafter of column 0; records what it saw."""

    def __init__(self, drafter_pays: bool) -> None:
        self.drafter_pays = drafter_pays
        self.scales: list[list[float]] = []
        self.rates: list[dict] = []

    def forward_seconds(self, level: int, num_tokens: int) -> float:
        return 0.001 * (1 + num_tokens)

    def speed(self, rows, rates, scales) -> float:
        self.scales.append(list(scales))
        self.rates.append(dict(rates))
        uses_drafter = any(row[0] for row in rows)
        return 2.0 if uses_drafter == self.drafter_pays else 1.0


def judged(judge: FakeJudge, k_matrix: KMatrix = TWO_LEVELS) -> AdaptiveSchedule:
    schedule = AdaptiveSchedule(k_matrix, mag_first=3, judge=judge, num_neural=1)
    while not schedule.speculate():  # the whole-speculation switch first times plain steps
        schedule.after_step(0.010, 1, speculative=False)
    return schedule


def ordinary_steps(schedule: AdaptiveSchedule, num_steps: int, gated: bool = False) -> list[bool]:
    """Speculative steps (fast: speculation stays on); returns whether the drafter was on in each."""
    on = []
    for _ in range(num_steps):
        on.append(schedule.rows[0][0] > 0)
        if gated:
            schedule.after_mag_first(num_accepted=3)
        schedule.after_step(0.002, 2, speculative=True)
    return on


def test_level_switch_turns_a_drafter_off_and_retries_it_with_doubling_backoff():
    schedule = judged(FakeJudge(drafter_pays=False))
    on = ordinary_steps(schedule, PARAMS.judge_levels_first)
    assert all(on)
    assert schedule.level_off == [True] and all(row[0] == 0 for row in schedule.rows)
    assert schedule.rows[0][1] > 0  # MaG still drafts
    # a switched-off drafter is not brought back by the per-entry back-off
    for _ in range(3 * PARAMS.first_backoff):
        schedule.after_review(0, [(1, 0, 2)], num_accepted=2)
    assert schedule.rows[0][0] == 0
    off = ordinary_steps(schedule, 400)
    first_pause = off.index(True)
    assert first_pause == PARAMS.first_level_backoff
    later = off[first_pause:]
    assert later[: PARAMS.judge_levels_first] == [True] * PARAMS.judge_levels_first
    second_pause = later[PARAMS.judge_levels_first :].index(True)
    assert second_pause == 2 * first_pause  # the retry failed: twice as long off


def test_level_switch_keeps_a_drafter_that_pays_and_judges_it_less_often():
    judge = FakeJudge(drafter_pays=True)
    schedule = judged(judge)
    assert all(ordinary_steps(schedule, 500))
    assert schedule.level_off == [False]
    assert schedule.judge_every > PARAMS.judge_levels_first  # the interval doubled
    assert 2 * len(judge.scales) < 500 / PARAMS.judge_levels_first  # two predictions per judgement


def test_level_switch_ignores_mag_first_steps_and_seeded_sampling():
    schedule = judged(FakeJudge(drafter_pays=False))
    assert all(ordinary_steps(schedule, 200, gated=True))  # MaG-first steps say nothing about a drafter
    assert schedule.level_off == [False]
    seeded = judged(FakeJudge(drafter_pays=False))
    seeded.begin(carry_over=False)  # seeded sampling: no clock-driven decisions
    assert all(ordinary_steps(seeded, 200))


def test_level_switch_sees_measured_forward_times_and_running_acceptance():
    judge = FakeJudge(drafter_pays=True)
    schedule = judged(judge)
    for _ in range(20):
        schedule.after_forward(0, 3, 2 * judge.forward_seconds(0, 3))  # the target runs twice as slow
        schedule.after_forward(1, 1, judge.forward_seconds(1, 1))
        schedule.after_review(0, [(0, 0, 2), (1, 2, 5)], num_accepted=1)  # half the drafter's tokens
    ordinary_steps(schedule, PARAMS.judge_levels_first)
    assert judge.scales[-1] == [pytest.approx(2.0), pytest.approx(1.0)]
    rates = judge.rates[-1]
    assert rates[(0, 1)] < PARAMS.prior_acceptance  # the drafter: 1 of 2, rejections
    assert rates[(0, 2)] == pytest.approx(PARAMS.prior_acceptance)  # MaG's share was never reached


def test_entry_priors_set_the_acceptance_a_length_was_chosen_for():
    """A K entry planned for 90% acceptance keeps its length while 90% is what it gets; with
    the generic prior (60%) the same acceptance would lengthen it."""
    k_matrix = KMatrix(((4,),))
    planned = AdaptiveSchedule(k_matrix, priors=[[0.9]])
    generic = AdaptiveSchedule(k_matrix)
    for schedule in (planned, generic):
        schedule.reset(use_timing=False)
        schedule.successes[0][0], schedule.failures[0][0] = 36.0, 4.0  # a running acceptance of 90%
    assert planned._length(0, 0) == 4
    assert generic._length(0, 0) > 4
