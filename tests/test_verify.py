"""Exact accept / reject math of ``csdrafting.verify`` and ``csdrafting.sampling.warp``.

p = the reviewer's (target's) law, q = the law the draft token was drawn from (verify.py's notation).
Three layers of checks:
1. algebra (float64, many seeds): the law implied by ``accepted_mass`` / ``residual`` is p for
   lenience 1 and ``induced_probs`` (checked against an independent numpy formula) for lenience > 1;
2. sampling: chi-square of the token ``review_sampled`` emits against that law;
3. teeth: deliberately broken reviewers run through the same chi-square machinery and are rejected.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from csdrafting import verify
from csdrafting.errors import GenerationInputError
from csdrafting.sampling import SamplingParams, warp
from tiny import broken_reviewer, chisquare_pvalue

ACCEPT_P = 1e-3  # a correct reviewer must not be rejected at this level (fixed seeds: deterministic)
REJECT_P = 1e-8  # a broken reviewer must be rejected at least this strongly


def random_law(rng: np.random.Generator, vocab_size: int, zeros: bool) -> torch.Tensor:
    law = rng.dirichlet(np.full(vocab_size, 0.7))
    if zeros and vocab_size > 2:
        drop = rng.choice(vocab_size, size=rng.integers(1, vocab_size - 1), replace=False)
        law[drop] = 0.0
        law /= law.sum()
    return torch.tensor(law, dtype=torch.float64)


def implied_law(p: torch.Tensor, q: torch.Tensor, lenience: float, accepted=None, resid=None) -> torch.Tensor:
    """The law of the emitted token: draw x ~ q, accept with a(x) = min(1, l p(x) / q(x)),
    else draw from the residual. ``accepted`` / ``resid`` default to the library's functions."""
    accepted = verify.accepted_mass(p, q, lenience) if accepted is None else accepted
    resid = verify.residual(p, q, lenience) if resid is None else resid
    a = torch.where(q > 0, torch.clamp(lenience * p / torch.where(q > 0, q, 1.0), max=1.0), 0.0)
    # accepted_mass must be exactly q * a: the mass of "drawn and accepted"
    torch.testing.assert_close(accepted, q * a, rtol=0, atol=1e-15)
    reject = (q * (1 - a)).sum()
    return q * a + reject * resid


def numpy_induced(p: np.ndarray, q: np.ndarray, lenience: float) -> np.ndarray:
    """Independent formula for the emitted law of a lenient review."""
    accepted = np.minimum(q, lenience * p)
    leftover = np.maximum(0.0, p - q)  # where q < l p and q < p; elsewhere nothing is left
    reject = 1.0 - accepted.sum()
    if leftover.sum() == 0:
        return accepted
    return accepted + reject * leftover / leftover.sum()


CASES = [(seed, v) for v in (2, 3, 5, 8, 17) for seed in range(40)]


@pytest.mark.parametrize("zeros", [False, True])
def test_implied_law_is_p_for_lenience_one(zeros):
    for seed, vocab_size in CASES:
        rng = np.random.default_rng(seed * 31 + vocab_size)
        p = random_law(rng, vocab_size, zeros)
        q = random_law(rng, vocab_size, zeros)
        resid = verify.residual(p, q)
        assert torch.isfinite(resid).all() and (resid >= 0).all()
        torch.testing.assert_close(resid.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(implied_law(p, q, 1.0), p, rtol=0, atol=1e-12)
        torch.testing.assert_close(verify.induced_probs(p, q, 1.0), p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lenience", [1.5, 3.0, 10.0])
@pytest.mark.parametrize("zeros", [False, True])
def test_implied_law_is_induced_probs_for_lenient_review(lenience, zeros):
    num_different = 0
    for seed, vocab_size in CASES:
        rng = np.random.default_rng(seed * 17 + vocab_size)
        p = random_law(rng, vocab_size, zeros)
        q = random_law(rng, vocab_size, zeros)
        pi = verify.induced_probs(p, q, lenience)
        assert (pi >= 0).all()
        torch.testing.assert_close(pi.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(implied_law(p, q, lenience), pi, rtol=0, atol=1e-12)
        np.testing.assert_allclose(pi.numpy(), numpy_induced(p.numpy(), q.numpy(), lenience), rtol=0, atol=1e-12)
        num_different += float((pi - p).abs().max()) > 1e-3
    # lenience really changes the law (otherwise "carry pi" would be untestable)
    assert num_different > len(CASES) // 2


@pytest.mark.parametrize("lenience", [1.0, 3.0])
def test_edge_cases(lenience):
    p = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    one_hot = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    cases = {
        "q == p": p.clone(),  # residual is 0/0
        "one-hot q (MaG point mass)": one_hot,
        "one-hot q on a token p gives 0": torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64),
        "disjoint supports": torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64),
        "q with zeros": torch.tensor([0.0, 0.6, 0.4, 0.0], dtype=torch.float64),
    }
    p_zero = torch.tensor([0.6, 0.4, 0.0, 0.0], dtype=torch.float64)
    for name, q in cases.items():
        reviewer = p_zero if "disjoint" in name or "gives 0" in name else p
        resid = verify.residual(reviewer, q, lenience)
        pi = verify.induced_probs(reviewer, q, lenience)
        assert torch.isfinite(resid).all(), name
        assert torch.isfinite(pi).all(), name
        torch.testing.assert_close(pi.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(implied_law(reviewer, q, lenience), pi, rtol=0, atol=1e-12)
        np.testing.assert_allclose(pi.numpy(), numpy_induced(reviewer.numpy(), q.numpy(), lenience), atol=1e-12)
        if lenience == 1.0:
            torch.testing.assert_close(pi, reviewer, rtol=0, atol=1e-12)
    # point mass: accept x with probability min(1, l p(x)); on rejection p with x removed, renormalised
    resid = verify.residual(p, one_hot, lenience)
    torch.testing.assert_close(resid, torch.tensor([4 / 7, 2 / 7, 0, 1 / 7], dtype=torch.float64))
    pi = verify.induced_probs(p, one_hot, lenience)
    accept = min(1.0, lenience * 0.125)
    expected = torch.tensor([4 / 7, 2 / 7, 0, 1 / 7], dtype=torch.float64) * (1 - accept)
    expected[2] = accept
    torch.testing.assert_close(pi, expected)
    # q == p: a rejection never happens and the residual is p itself, not NaN
    torch.testing.assert_close(verify.residual(p, p.clone(), lenience), p)
    # batched rows (..., V) work too and match row by row
    q_rows = torch.stack(list(cases.values()))
    p_rows = p.expand_as(q_rows)
    batched = verify.induced_probs(p_rows, q_rows, lenience)
    for i, q in enumerate(q_rows):
        torch.testing.assert_close(batched[i], verify.induced_probs(p, q, lenience))


@pytest.mark.parametrize("lenience", [2.0, 3.0])
def test_algebra_rejects_broken_bookkeeping(lenience):
    """The law checks have teeth: plausible mistakes in the law a lenient review carries upward
    are caught by the same comparison that accepts ``induced_probs``.

    (Forgetting the min(1, .) in the *acceptance test* itself is not a mistake: ``uniform < l p / q``
    accepts with probability min(1, l p / q) anyway. The min matters in the carried law.)"""
    broken = {"forgot the min: l p as accepted mass": 0, "forgot lenience": 0, "carried p": 0}
    for seed, vocab_size in CASES:
        rng = np.random.default_rng(seed + 1000 * vocab_size)
        p = random_law(rng, vocab_size, False)
        q = random_law(rng, vocab_size, False)
        expected = numpy_induced(p.numpy(), q.numpy(), lenience)
        resid = verify.residual(p, q, lenience)
        candidates = {
            "forgot the min: l p as accepted mass": lenience * p + (1 - lenience) * resid,
            "forgot lenience": verify.induced_probs(p, q, 1.0),
            "carried p": p,
        }
        for name, law in candidates.items():
            broken[name] += not np.allclose(law.numpy(), expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(verify.induced_probs(p, q, lenience).numpy(), expected, rtol=0, atol=1e-12)
    for name, count in broken.items():
        assert count > len(CASES) * 0.8, name


# -- review_greedy -----------------------------------------------------------------------------


def test_review_greedy_accepts_while_equal_to_argmax():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        logits = torch.randn(6, 11, generator=g, dtype=torch.float64)  # (K + 1, V)
        top = logits.argmax(-1).tolist()
        num_draft = trial % 6
        cut = int(torch.randint(0, num_draft + 1, (1,), generator=g))
        draft = top[:cut] + [(t + 1 + trial % 10) % 11 for t in top[cut:num_draft]]  # wrong from `cut` on
        outcome = verify.review_greedy(logits[: num_draft + 1], draft)
        assert outcome.num_accepted == cut
        assert outcome.next_token == top[cut]  # recovered (cut < K) or bonus (cut == K)
        assert outcome.token_probs is None


def test_review_greedy_empty_draft_is_plain_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0]])
    assert verify.review_greedy(logits, []) == verify.ReviewOutcome(0, 1)
    assert verify.review_greedy(logits, [], lenience=5.0) == verify.ReviewOutcome(0, 1)


def test_review_greedy_lenience_is_a_logit_margin():
    lenience = 3.0
    margin = math.log(lenience)
    row = [4.0, 4.0 - 0.5 * margin, 4.0 - 2.0 * margin, 4.0 - 0.999 * margin]
    logits = torch.tensor([row, row, row, row, [0.0, 0.0, 9.0, 0.0]], dtype=torch.float64)
    # within the margin: accepted; beyond it: rejected, and the reviewer's argmax is recovered
    assert verify.review_greedy(logits, [1, 3, 0, 1], lenience) == verify.ReviewOutcome(4, 2)
    assert verify.review_greedy(logits[:4], [1, 3, 2], lenience) == verify.ReviewOutcome(2, 0)
    assert verify.review_greedy(logits[:4], [1, 3, 2], 1.0) == verify.ReviewOutcome(0, 0)
    # the same acceptance rule stated on probabilities: l * p(x) >= max p
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        logits = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
        draft = torch.randint(0, 7, (4,), generator=g).tolist()
        probs = torch.softmax(logits, -1)
        ratio = [float(lenience * probs[i, x] / probs[i].max()) for i, x in enumerate(draft)]
        if any(abs(r - 1) < 1e-9 for r in ratio):
            continue
        expected = next((i for i, r in enumerate(ratio) if r < 1), 4)
        outcome = verify.review_greedy(logits, draft, lenience)
        assert outcome.num_accepted == expected
        assert outcome.next_token == int(logits[expected].argmax())


# -- review_sampled: chi-square of the emitted token -------------------------------------------

P_ROWS = torch.tensor(
    [[0.5, 0.3, 0.15, 0.05], [0.1, 0.6, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64
)  # (K + 1, V): reviewer laws at positions 0, 1 and the bonus position
Q_ROWS = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.4, 0.1]], dtype=torch.float64)  # (K, V)


def run_reviews(review, p_rows, q_rows, lenience, num_draws, seed):
    """Draw drafts from q_rows and review them; returns (tokens at position 0, tokens at position 1
    among the draws whose position 0 was accepted, the first outcome of each kind)."""
    g = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(row, num_draws, replacement=True, generator=g) for row in q_rows], 1)
    first, second = Counter(), Counter()
    outcomes = []
    for draft in drafts.tolist():
        outcome = review(p_rows, draft, q_rows, g, lenience)
        emitted = draft[: outcome.num_accepted] + [outcome.next_token]
        first[emitted[0]] += 1
        if outcome.num_accepted >= 1:
            second[emitted[1]] += 1
        outcomes.append((draft, outcome))
    return first, second, outcomes


def as_dict(law: torch.Tensor) -> dict:
    return {i: float(x) for i, x in enumerate(law)}


def test_review_sampled_emits_p_at_lenience_one():
    first, second, outcomes = run_reviews(verify.review_sampled, P_ROWS, Q_ROWS, 1.0, 8000, seed=0)
    assert chisquare_pvalue(first, as_dict(P_ROWS[0])) > ACCEPT_P
    # given position 0 was accepted, position 1 (accepted or recovered) follows p too
    assert chisquare_pvalue(second, as_dict(P_ROWS[1])) > ACCEPT_P
    kinds = set()
    for _draft, outcome in outcomes:
        n = outcome.num_accepted
        kinds.add(n)
        # each emitted token carries the law it follows: the reviewer's own rows
        torch.testing.assert_close(outcome.token_probs, P_ROWS[: n + 1])
    assert kinds == {0, 1, 2}  # rejections at both positions and full acceptance (bonus) all happened


@pytest.mark.parametrize("lenience", [2.0, 4.0])
def test_review_sampled_emits_induced_law_when_lenient(lenience):
    first, second, outcomes = run_reviews(verify.review_sampled, P_ROWS, Q_ROWS, lenience, 8000, seed=1)
    pi0 = verify.induced_probs(P_ROWS[0], Q_ROWS[0], lenience)
    pi1 = verify.induced_probs(P_ROWS[1], Q_ROWS[1], lenience)
    assert float((pi0 - P_ROWS[0]).abs().max()) > 0.05  # lenience matters for these laws
    assert chisquare_pvalue(first, as_dict(pi0)) > ACCEPT_P
    assert chisquare_pvalue(second, as_dict(pi1)) > ACCEPT_P
    assert chisquare_pvalue(first, as_dict(P_ROWS[0])) < REJECT_P  # and it is not p
    for _draft, outcome in outcomes:
        n = outcome.num_accepted
        expected = [pi0, pi1][: min(n + 1, 2)]
        if n == 2:
            expected.append(P_ROWS[2])  # the bonus token follows the reviewer itself
        torch.testing.assert_close(outcome.token_probs, torch.stack(expected))


def test_review_sampled_point_mass_draft():
    """A MaG token x (q = one-hot): accepted with probability p(x), else p with x removed."""
    p = P_ROWS[:2]
    one_hot = torch.zeros(1, 4, dtype=torch.float64)
    one_hot[0, 1] = 1
    g = torch.Generator().manual_seed(2)
    counts, accepted = Counter(), 0
    for _ in range(6000):
        outcome = verify.review_sampled(p, [1], one_hot, g)
        counts[[1, outcome.next_token][outcome.num_accepted == 0]] += 1
        accepted += outcome.num_accepted
        if outcome.num_accepted == 0:
            assert outcome.next_token != 1
    assert chisquare_pvalue(counts, as_dict(p[0])) > ACCEPT_P
    assert abs(accepted / 6000 - 0.3) < 0.03


def test_review_sampled_never_accepts_a_token_the_reviewer_excludes():
    p = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    for lenience in (1.0, 100.0):
        for _ in range(200):
            outcome = verify.review_sampled(p, [2], q, g, lenience)
            assert outcome.num_accepted == 0 and outcome.next_token in (0, 1)


def test_review_sampled_empty_draft_samples_the_reviewer():
    g = torch.Generator().manual_seed(4)
    counts = Counter(verify.review_sampled(P_ROWS[:1], [], None, g).next_token for _ in range(4000))
    assert chisquare_pvalue(counts, as_dict(P_ROWS[0])) > ACCEPT_P


# -- broken reviewers: the same machinery must reject them -------------------------------------


MUTANTS = {
    "resample_from_p": broken_reviewer(after_reject="p"),
    "accept_with_p_ignoring_q": broken_reviewer(accept_rule="p_only"),
    "point_mass_rule_for_neural_q": broken_reviewer(after_reject="p_without_x"),
    "swapped_residual": broken_reviewer(after_reject="swapped"),
}


def test_reference_reviewer_passes():
    """The mutant factory with no rule swapped is a correct reviewer: the rejections below are
    due to the swapped rule, not to the test scaffolding."""
    first, _, _ = run_reviews(broken_reviewer(), P_ROWS, Q_ROWS, 1.0, 6000, seed=5)
    assert chisquare_pvalue(first, as_dict(P_ROWS[0])) > ACCEPT_P


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_chi_square_rejects_broken_reviewer(name):
    first, _, _ = run_reviews(MUTANTS[name], P_ROWS, Q_ROWS, 1.0, 6000, seed=5)
    assert chisquare_pvalue(first, as_dict(P_ROWS[0])) < REJECT_P


def two_stage(review_drafter, p0, p1, q2, lenience, num_draws, seed):
    """One position through a two-level cascade: x ~ q2, a drafter (p1) reviews it leniently and
    emits y with its carried law, the target (p0) reviews y exactly. Returns counts of the target's token."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.multinomial(q2, num_draws, replacement=True, generator=g).tolist()
    counts = Counter()
    for x in xs:
        drafter = review_drafter(torch.stack([p1, p1]), [x], q2.unsqueeze(0), g, lenience)
        y = [x, drafter.next_token][drafter.num_accepted == 0]
        target = verify.review_sampled(torch.stack([p0, p0]), [y], drafter.token_probs[:1], g, 1.0)
        counts[[y, target.next_token][target.num_accepted == 0]] += 1
    return counts


def test_lenient_drafter_then_exact_target_is_lossless_and_carrying_p_is_not():
    p0 = torch.tensor([0.05, 0.15, 0.3, 0.5], dtype=torch.float64)  # target
    p1 = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)  # larger drafter, reviewing leniently
    q2 = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)  # smaller drafter
    real = two_stage(verify.review_sampled, p0, p1, q2, 3.0, 6000, seed=6)
    assert chisquare_pvalue(real, as_dict(p0)) > ACCEPT_P
    broken = two_stage(broken_reviewer(carry="p"), p0, p1, q2, 3.0, 6000, seed=6)
    assert chisquare_pvalue(broken, as_dict(p0)) < REJECT_P


# -- warp ----------------------------------------------------------------------------------------


def reference_warp(logits: np.ndarray, temperature: float, top_k, top_p) -> np.ndarray:
    z = logits / temperature
    keep = np.ones_like(z, dtype=bool)
    if top_k is not None:
        keep &= z >= np.sort(z)[::-1][min(top_k, len(z)) - 1]
    probs = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    probs /= probs.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        num_keep = int(np.searchsorted(cum, top_p - 1e-12) + 1)  # smallest prefix reaching top_p
        mask = np.zeros_like(keep)
        mask[order[:num_keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, None, None), (0.7, None, None), (1.3, 2, None), (1.0, None, 0.8), (0.5, 3, 0.6)]
)
def test_warp_matches_reference(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(50, 6, generator=g, dtype=torch.float64) * 2  # (N, V)
    probs = warp(logits, SamplingParams(temperature, top_k, top_p))
    assert probs.dtype == torch.float64
    for row, out in zip(logits.numpy(), probs.numpy()):
        np.testing.assert_allclose(out, reference_warp(row, temperature, top_k, top_p), atol=1e-12)
    if top_k is not None:
        assert int((probs > 0).sum(-1).max()) <= top_k
    if top_p is not None:
        assert int((probs > 0).sum(-1).min()) >= 1


def test_warp_refuses_greedy_and_params_are_validated():
    with pytest.raises(ValueError):
        warp(torch.zeros(1, 3), SamplingParams(0.0))
    for bad in [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_k=0),
        dict(top_k=True),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(seed=-1),
    ]:
        with pytest.raises(GenerationInputError):
            SamplingParams(**bad)
