"""``mag_first="auto"`` (payoff.py): MaG drafts first only where its measured acceptance and the
target's measured cost curve say it pays, for as many tokens as pay; lossless like every schedule."""

from __future__ import annotations

import pytest

from csdrafting.payoff import PayoffGate, PayoffParams, match_bucket
from csdrafting.report import ForwardRecord, StepReport
from tiny import hf_greedy, llama_family, make_cascade

PROMPT = [5, 17, 33, 2, 81, 5, 17, 40, 7, 5, 17, 33, 9, 5, 17, 2, 81, 5]
NUM_NEW = 40


def timed(gate: PayoffGate, seconds_by_tokens: dict[int, float], repeats: int = 3) -> None:
    """Feed the gate plain steps whose target forwards took these seconds."""
    for _ in range(repeats):
        for num_tokens, seconds in seconds_by_tokens.items():
            gate.observe(StepReport(forwards=[ForwardRecord(0, num_tokens, seconds)]))


def gated_step(gate: PayoffGate, match_length: int, available: int, num_accepted: int) -> int:
    """One MaG-first step: the gate chooses, the target accepts ``num_accepted`` of what it got."""
    k = gate.length(match_length, available)
    if k:
        gate.observe(StepReport(mag_first=True, num_drafted=k, num_accepted=min(num_accepted, k)))
    return k


def test_cost_curve_is_measured_interpolated_and_extrapolated():
    gate = PayoffGate()
    assert gate.seconds(5) == pytest.approx(1 + 0.3 * 4)  # the prior, in units of one forward
    timed(gate, {1: 0.034})
    assert gate.seconds(1) == pytest.approx(0.034) and gate.seconds(3) == pytest.approx(0.034 * 1.6)
    timed(gate, {1: 0.034, 8: 0.126, 16: 0.147})
    assert gate.seconds(8) == pytest.approx(0.126)
    assert gate.seconds(12) == pytest.approx((0.126 + 0.147) / 2)  # between measured sizes
    assert gate.seconds(24) == pytest.approx(0.147 + 8 * (0.147 - 0.126) / 8)  # past the largest


def test_a_compute_bound_target_gets_no_draft_from_an_unreliable_match():
    gate = PayoffGate(PayoffParams(probe_every=10**6))
    timed(gate, {1: 0.034, 2: 0.046, 4: 0.076, 8: 0.126, 16: 0.147, 32: 0.257})  # Qwen 1.5B, 2 threads
    for _ in range(60):
        gated_step(gate, match_length=1, available=32, num_accepted=0)  # short matches are always wrong
    assert gate.length(1, 32) == 0
    for _ in range(60):
        gated_step(gate, match_length=20, available=32, num_accepted=32)  # long matches copy
    assert gate.length(20, 32) >= 15  # confident: long drafts, where t(T) grows slowly
    gate.whole = False  # (after a rejected draft, as in the first loop)
    assert gate.length(1, 32) == 0  # the short-match bucket is still declined


def test_declined_buckets_are_probed_now_and_then():
    gate = PayoffGate(PayoffParams(probe_every=4, probe_tokens=3))
    timed(gate, {1: 1.0, 2: 2.0, 4: 4.0})  # every token costs a forward: nothing pays
    lengths = [gate.length(2, 10) for _ in range(8)]
    assert lengths == [0, 0, 0, 3, 0, 0, 0, 3]


def test_acceptance_is_learned_per_depth_given_the_ones_before():
    gate = PayoffGate()
    key = (match_bucket(4), False)
    for _ in range(20):
        gated_step(gate, match_length=4, available=4, num_accepted=2)
        gate.whole = False  # stay in one bucket
    assert gate.rate(key, 1) > 0.9 and gate.rate(key, 2) > 0.9 and gate.rate(key, 3) < gate.params.prior_acceptance
    assert gate.rate(key, 4) == gate.rate(key, 3)  # never tried (always after a rejection): as the deepest tried


def test_without_the_clock_costs_stay_the_prior_and_learning_restarts():
    gate = PayoffGate()
    gate.begin(use_timing=False)
    timed(gate, {1: 5.0, 4: 50.0})
    assert gate.seconds(4) == pytest.approx(1 + 0.3 * 3)  # seeded sampling: no clock in decisions
    gated_step(gate, match_length=4, available=4, num_accepted=4)
    gate.begin(use_timing=False)
    assert gate.rate((match_bucket(4), True), 1) == gate.params.prior_acceptance


@pytest.fixture(scope="module")
def llama():
    return llama_family(PROMPT, NUM_NEW, 0.05)


@pytest.mark.parametrize("k_matrix", [[[0]], [[2]]])
def test_payoff_gated_mag_first_is_lossless(llama, k_matrix):
    """MaG alone with the payoff gate (K [[0]]: plain steps where it declines) and with ordinary
    MaG drafts: greedy output equals plain decoding, and gated steps ran."""
    prompt = PROMPT + PROMPT[:4]
    reference = hf_greedy(llama["target"], prompt, NUM_NEW)
    cascade = make_cascade(llama["target"], [], mag=True, k_matrix=k_matrix, eos_token_ids=[], mag_first="auto")
    for _ in range(2):  # the second generation starts from what the first learned
        result = cascade.generate(prompt, NUM_NEW, ignore_eos=True)
        assert result.token_ids == reference
        assert result.stats.levels[0].review.drafted_by_origin.get("mag", 0) > 0
