"""``csd tune``: the planner's expected-walltime model, its search, the trace replay, and the
command end to end.

* The model against a Monte Carlo run of the same algorithm (``simulate.py``: step.py's
  drafting on abstract tokens, KV caches tracked token by token) for several K-matrices, with
  1 to 3 drafters, with and without MaG, and different acceptance profiles.
* The paper's closed form for one drafter with constant rate and costs.
* The search: valid K-matrices, a drafter that costs as much as a larger one is left out,
  useless drafters leave plain decoding.
* ``csd tune`` on the real pycode models (one prompt, few tokens): the written configuration
  loads with ``Cascade.from_config`` and generates the target's greedy tokens; the trace replay
  reproduces a real run's target steps exactly.

No timing assertions: costs here are synthetic, and the end-to-end run only checks plumbing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from csdrafting.kmatrix import KMatrix
from csdrafting.tune.gate import GateModel, MagRuns
from csdrafting.tune.measure import isotonic, pooled, renewal_counts
from csdrafting.tune.planner import (
    Acceptance,
    CostModel,
    LevelCost,
    SearchSpace,
    best_plain_speculative,
    canonical,
    draft_bound,
    expand,
    fit_context,
    predict,
    reduce,
    search,
    used_levels,
)
from simulate import simulate
from tiny import KERNEL

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
TOKENS = (1, 2, 4, 8, 16, 32, 64)


def linear(name: str, base: float, per_token: float) -> LevelCost:
    return LevelCost(name, TOKENS, tuple(base + per_token * t for t in TOKENS))


def rising(first: float, last: float, length: int = 16) -> tuple[float, ...]:
    """A run profile: acceptance rising from ``first`` towards ``last`` along a run."""
    return tuple(first + (last - first) * (1 - 0.5**i) for i in range(length))


COSTS = CostModel(
    (linear("target", 12e-3, 1.5e-3), linear("d1", 4e-3, 0.4e-3), linear("d2", 1.2e-3, 0.05e-3)),
    mag_seconds=50e-6,
    step_seconds=200e-6,
    review_overhead=30e-6,
)
RUNS = {  # (reviewer, level) -> per-run-position rates; levels: 0 target, 1 d1, 2 d2, 3 MaG
    (0, 1): rising(0.9, 0.97),
    (0, 2): rising(0.77, 0.93),
    (0, 3): rising(0.6, 0.98),
    (1, 2): rising(0.8, 0.9),
    (1, 3): rising(0.7, 0.95),
    (2, 3): rising(0.65, 0.95),
}
FULL = Acceptance.constant(("target", "d1", "d2", "mag"), True, RUNS)
FLAT = Acceptance.constant(("target", "d1", "d2", "mag"), True, {key: 0.7 for key in RUNS})
NO_MAG = Acceptance.constant(("target", "d1", "d2"), False, {k: v for k, v in RUNS.items() if 3 not in k})
ONE = Acceptance.constant(("target", "d1"), False, {(0, 1): rising(0.6, 0.9)})


CASES = [
    (FULL, [[2, 1, 4], [0, 1, 3], [0, 0, 3]]),  # the README's example: vertical + horizontal
    (FULL, [[4, 0, 0], [0, 2, 0], [0, 0, 3]]),  # vertical only
    (FULL, [[2, 1, 4], [0, 0, 0], [0, 0, 0]]),  # horizontal only: drafters decode on their own
    (FULL, [[6, 0, 2], [0, 2, 2], [0, 0, 2]]),  # a neural column that overshoots its share
    (FULL, [[0, 1, 0], [0, 0, 0], [0, 0, 12]]),  # the small drafter reviews long MaG drafts
    (FULL, [[0, 0, 8], [0, 0, 0], [0, 0, 0]]),  # MaG alone (prompt lookup)
    (FLAT, [[3, 1, 6], [0, 1, 4], [0, 0, 2]]),  # constant rates
    (NO_MAG, [[3, 2], [0, 3]]),  # two drafters, the smaller one autoregressive
    (NO_MAG, [[5, 0], [0, 2]]),
    (ONE, [[4]]),  # plain speculative decoding
    (ONE, [[1]]),
]


@pytest.mark.parametrize("acceptance, k_matrix", CASES)
def test_model_matches_monte_carlo(acceptance, k_matrix):
    predicted = predict(k_matrix, acceptance, COSTS)
    simulated = simulate(k_matrix, acceptance, COSTS, num_tokens=2000, num_runs=16, seed=1)
    assert predicted.tokens_per_step == pytest.approx(simulated.tokens_per_step, rel=0.03)
    assert predicted.tokens_per_second == pytest.approx(simulated.tokens_per_second, rel=0.03)
    forwards = [f / simulated.num_steps for f in simulated.forwards]
    assert predicted.forwards_per_step == pytest.approx(forwards, rel=0.03, abs=0.02)


def test_lenient_rates_are_used_by_drafter_reviews_only():
    """A lenient drafter accepts more from below (its own rates), and what it accepts leniently
    passes the target less often (``rho^l / rho^1``); the model averages over where a drafter's
    tokens came from, the simulation does not, hence the wider tolerance."""
    lenient = {(2.0, r, v, 1): tuple(min(0.99, a + 0.1) for a in rates) for (r, v), rates in RUNS.items() if r > 0}
    carry = {(lenience, v, u): rho for v, u in ((1, 2), (1, 3), (2, 3)) for lenience, rho in ((1.0, 1.1), (2.0, 0.99))}
    acceptance = replace(FULL, lenient=lenient, carry=carry)
    assert acceptance.ratio(1, 3, 1.0) == 1.0 and acceptance.ratio(1, 3, 2.0) == pytest.approx(0.9)
    k = [[2, 1, 4], [0, 1, 3], [0, 0, 3]]
    strict, loose = predict(k, acceptance, COSTS, 1.0), predict(k, acceptance, COSTS, 2.0)
    assert strict.tokens_per_step != loose.tokens_per_step
    simulated = simulate(k, acceptance, COSTS, lenience=2.0, num_tokens=2000, num_runs=8, seed=3)
    assert loose.tokens_per_second == pytest.approx(simulated.tokens_per_second, rel=0.05)
    only_target = [[4, 0, 0], [0, 0, 0], [0, 0, 0]]  # no drafter reviews: lenience is irrelevant
    assert predict(only_target, acceptance, COSTS, 2.0) == replace(
        predict(only_target, acceptance, COSTS), lenience=2.0
    )


def test_paper_closed_form_for_one_drafter():
    """Constant rate alpha, target cost 1 per forward whatever its length, drafter cost c:
    speedup = (1 - alpha^(k+1)) / ((1 - alpha) (k c + 1))  (Leviathan et al., the paper's EWIF)."""
    alpha, c = 0.8, 0.1
    costs = CostModel((LevelCost("target", (1,), (1.0,)), LevelCost("d1", (1,), (c,))))
    acceptance = Acceptance.constant(("target", "d1"), False, {(0, 1): alpha})
    for k in (1, 2, 4, 7):
        expected = (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1))
        assert predict([[k]], acceptance, costs).speedup == pytest.approx(expected, rel=1e-9)


def test_plain_decoding_prediction():
    p = predict((), FULL, COSTS)
    assert p.tokens_per_step == 1.0 and p.speedup == 1.0
    assert p.seconds_per_step == pytest.approx(COSTS.levels[0](1) + COSTS.step_seconds)


def test_used_levels_reduce_and_expand():
    rows = ((0, 3, 0), (5, 7, 9), (0, 0, 4))  # d1 unused: its row is never read
    assert used_levels(rows) == [2, 3]
    assert canonical(rows) == ((0, 3, 0), (0, 0, 0), (0, 0, 4))
    used, reduced = reduce(rows)
    assert used == [2, 3] and reduced == [[3, 0], [0, 4]]
    KMatrix.parse(reduced, len(used))
    assert expand(used, reduced, 3) == canonical(rows)
    assert reduce(((2, 0, 0), (0, 0, 0), (0, 0, 0))) == ([1], [[2]])


def test_draft_bound_counts_overshoot():
    # d1 fills 6 but one extension may append its whole 2 + 2 token sub-draft plus its own
    assert draft_bound([[6, 0, 2], [0, 2, 2], [0, 0, 2]], mag_last=True) == 6 - 1 + 4 + 1
    assert draft_bound([[0, 0, 8], [0, 0, 0], [0, 0, 0]], mag_last=True) == 8
    assert draft_bound([[3, 2], [0, 3]], mag_last=False) == 3 - 1 + 3 + 1


SMALL_SPACE = SearchSpace(
    grid_target_neural=(0, 1, 2, 4),
    grid_target_mag=(0, 4, 8),
    grid_inner_neural=(0, 1),
    grid_inner_mag=(0, 4),
    descent_starts=3,
)


def test_search_returns_valid_k_matrices():
    result = search(FULL, COSTS, SMALL_SPACE)
    assert result.best.prediction.tokens_per_second >= max(c.prediction.tokens_per_second for c in result.explored)
    assert result.best.prediction.speedup > 1.0
    for candidate in result.explored[:50]:
        if not candidate.levels:
            continue
        used, reduced = reduce(candidate.k_matrix)
        assert KMatrix.parse(reduced, len(used)).as_lists() == reduced
    assert result.plain in result.explored


def test_search_leaves_out_a_drafter_that_costs_as_much_as_a_larger_one():
    """On a CPU a small model's per-call overhead can rival a larger one's: d2 then costs what
    d1 costs and accepts less, and the planner must not use it. With d2 cheap, the same
    acceptance profile makes d2 worth using."""
    costly = replace(COSTS, levels=(COSTS.levels[0], COSTS.levels[1], linear("d2", 4e-3, 0.35e-3)))
    assert search(NO_MAG, costly, SMALL_SPACE).best.levels == [1]
    assert 2 in search(NO_MAG, COSTS, SMALL_SPACE).best.levels


def test_search_falls_back_to_plain_decoding_when_nothing_pays():
    useless = Acceptance.constant(("target", "d1", "mag"), True, {(0, 1): 0.01, (0, 2): 0.01, (1, 2): 0.01})
    result = search(useless, replace(COSTS, levels=COSTS.levels[:2]), SMALL_SPACE)
    assert result.best.levels == [] and result.best.k_matrix == ()


def test_best_plain_speculative_picks_drafter_and_length():
    best = best_plain_speculative(NO_MAG, COSTS)
    assert len(best.levels) == 1 and best.k_matrix[0][best.levels[0] - 1] >= 1
    for level in (1, 2):
        for k in range(1, 13):
            rows = [[0, 0], [0, 0]]
            rows[0][level - 1] = k
            assert predict(rows, NO_MAG, COSTS).tokens_per_second <= best.prediction.tokens_per_second + 1e-12


def test_renewal_counts_start_where_the_last_draft_ended():
    # greedy: row i = a run of proposals starting at output position i. The draft at 0 accepts
    # 2 of 3; the next starts at 3 (2 accepted + the reviewer's own token) and fails at once;
    # the next at 4 accepts 1. Rows 1 and 2 (inside an accepted draft) are never draft starts.
    accept = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 0, 0]], dtype=float)
    valid = np.ones_like(accept, dtype=bool)
    num, den = renewal_counts(accept, valid, 3, rng=None)
    assert den.tolist() == [3, 2, 1] and num.tolist() == [2, 1, 0]
    assert pooled(np.array([50.0, 10.0, 1.0]), np.array([100.0, 20.0, 2.0])) == (0.5, 0.5, 0.5)
    assert isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]


# -- end to end on the real models ------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One small ``csd tune`` run: one prompt, 64 new tokens, one trial."""
    from csdrafting.cli import main

    folder = tmp_path_factory.mktemp("tune")
    prompts = folder / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p", "text": "def parse(text):\n    lines = text.split('\\n')\n"}) + "\n")
    output, report, plot = folder / "tuned.json", folder / "report.json", folder / "tune.png"
    code = main(
        [
            "tune", "--prompts", str(prompts), "--max-new-tokens", "64", "--trials", "1", "--cost-rounds", "3",
            "--output", str(output), "--report", str(report), "--plot", str(plot),
        ]
    )  # fmt: skip
    assert code == 0
    return output, json.loads(report.read_text()), plot, prompts


def test_tune_writes_a_config_that_generates_the_targets_tokens(tuned):
    from csdrafting import Cascade, CascadeConfig

    output, report, plot, _ = tuned
    assert plot.stat().st_size > 0
    config = json.loads(output.read_text())
    assert config["adaptive"] is False
    cascade = Cascade.from_config(output)
    plain = Cascade.from_config(CascadeConfig(str(MODELS_DIR / "pycode-22m"), mag=False, k_matrix=[], kernel=KERNEL))
    prompt = "import os\n\ndef main("
    assert cascade.generate(prompt, 24).token_ids == plain.generate(prompt, 24).token_ids
    assert cascade.describe()["k_matrix"] == config["k_matrix"]
    names = {m["name"]: m for m in report["methods"]}
    assert {"plain", "tuned"} <= set(names)
    assert all(m["mismatches"] == 0 for m in report["methods"])
    assert names["tuned"]["predicted_speedup"] > 0 and names["tuned"]["measured_speedup"] > 0


def test_replay_reproduces_a_real_run(tuned):
    """Greedy: the replay's target steps and forward calls equal those of the real cascade."""
    from csdrafting import Cascade, CascadeConfig
    from csdrafting.levels.mag import BigramTable
    from csdrafting.tune.measure import Profile
    from csdrafting.tune.replay import Replayer

    _, report, _, _ = tuned
    profile = Profile.from_dict(report["profile"])
    trace = profile.traces[0]
    bigram = BigramTable.load(MODELS_DIR / "pycode-22m" / "csd_bigram.npy")
    replayer = Replayer(profile.traces, ["pycode-22m", "pycode-5m", "pycode-1m"], 8192, bigram)
    drafters = [MODELS_DIR / "pycode-5m", MODELS_DIR / "pycode-1m"]
    for k_matrix in ([[2, 1, 4], [0, 1, 3], [0, 0, 3]], [[3, 0, 0], [0, 0, 4], [0, 0, 0]]):
        config = CascadeConfig(
            str(MODELS_DIR / "pycode-22m"), tuple(map(str, drafters)), k_matrix=k_matrix, adaptive=False, kernel=KERNEL
        )
        real = Cascade.from_config(config)
        result = real.generate(trace.prompt_ids, len(trace.output_ids), ignore_eos=True)
        assert result.token_ids == trace.output_ids
        replayed = replayer.run(k_matrix)
        assert replayed.matches
        assert replayed.num_steps == result.stats.num_target_steps
        assert len(replayed.forward_tokens[0]) == result.stats.levels[0].num_forwards


# -- MaG first in the model (gate.py) -------------------------------------------------------------


def test_gate_walk_follows_the_schedules_mag_first_lengths():
    """One trajectory of 12 positions: MaG's match is long at 0 and 7. Static (8-token drafts):
    the gated step at 0 accepts 5 (MaG's run) and moves on 6; positions 6.. are ordinary steps of
    stride 1 until 7 gates again (run 3 of a possible 4 before the end: 3 accepted). Adaptive:
    the second gated draft is 2 * (5 + 1) = 12 long, capped by the room left."""
    match_lengths = np.array([5, 5, 5, 5, 5, 5, 0, 4, 4, 4, 0, 0])
    runs = np.array([5, 4, 3, 2, 1, 0, 0, 3, 2, 1, 0, 0])
    gate_runs = MagRuns((match_lengths,), (runs,))
    static = GateModel(gate_runs, threshold=3, adaptive=False, first_length=8).stats(1)
    assert static.gated_steps == pytest.approx(2 / 12) and static.gated_tokens == pytest.approx((6 + 4) / 12)
    assert static.draft_lengths == {4: pytest.approx(1 / 12), 8: pytest.approx(1 / 12)}  # the second: room 4
    never = GateModel(gate_runs, threshold=6).stats(1)
    assert never.gated_steps == 0 and never.gated_tokens == 0
    # a stride of 2 from position 6 lands on 8 (match 4): the walk depends on the ordinary steps
    assert GateModel(gate_runs, threshold=3, adaptive=False, first_length=8).stats(2).gated_tokens == pytest.approx(
        (6 + 3) / 12
    )


def test_gate_starts_at_row_0s_total_when_it_exceeds_the_schedules_start():
    """The schedule's first MaG-first draft is max(start, row 0's total) (8 adaptive, 24
    static): the model walks the same lengths. One long MaG run (match 5, run 30) then nothing:
    an adaptive gate with K row 0 totalling 12 accepts 12 in its first draft, not 8."""
    match_lengths = np.array([5] * 40)
    runs = np.array([max(30 - i, 0) for i in range(40)])
    gate = GateModel(MagRuns((match_lengths,), (runs,)), threshold=3)
    long_rows = ((8, 4), (0, 0))
    assert gate.for_rows(((2, 1), (0, 0))) is gate  # row 0 below the start: the start
    longer = gate.for_rows(long_rows)
    assert longer.first_length == 12 and gate.for_rows(long_rows) is longer
    assert longer.stats(1).draft_lengths != gate.stats(1).draft_lengths  # the walk differs...
    assert longer.stats(1) == GateModel(gate.runs, 3, first_length=12).stats(1)  # ...as the schedule's
    static = GateModel(gate.runs, 3, adaptive=False)
    assert static.for_rows(long_rows) is static  # 24 > 12
    assert static.for_rows(((20, 10), (0, 0))).first_length == 30
    # predict() applies it: the same as handing it the gate with that first length
    costs = CostModel((linear("target", 12e-3, 1.5e-3), linear("d1", 4e-3, 0.4e-3)), mag_seconds=50e-6)
    acceptance = Acceptance.constant(("target", "d1", "mag"), True, {(0, 1): 0.6, (0, 2): 0.4, (1, 2): 0.4})
    via_rows = predict(long_rows, acceptance, costs, gate=gate)
    explicit = predict(long_rows, acceptance, costs, gate=GateModel(gate.runs, 3, first_length=12))
    assert via_rows.tokens_per_second == pytest.approx(explicit.tokens_per_second)
    assert via_rows.tokens_per_second != pytest.approx(
        predict(long_rows, acceptance, costs, gate=GateModel(gate.runs, 3, first_length=8)).tokens_per_second
    )


def test_context_fit_separates_per_forward_and_per_token_costs():
    """t(n, ctx) = a(n) + (f + s n) ctx: two contexts recover f and s; at_context prices a
    forward by both (a per-token-only slope would charge a 16-token forward 16 times the
    one-token shift)."""
    forward, slope = 2e-6, 0.1e-6
    near = {n: 1e-3 + 1e-4 * n for n in (1, 4, 16)}
    far = {n: near[n] + (forward + slope * n) * 300 for n in near}
    assert fit_context(near, far, 300) == (pytest.approx(forward), pytest.approx(slope))
    # noise can make one coefficient negative: it is clamped and the other refitted
    assert fit_context({1: 1.0, 16: 1.0}, {1: 1.3, 16: 1.0}, 100) == (pytest.approx(0.0015), 0.0)
    assert fit_context({1: 1.0, 16: 1.0}, {1: 1.0, 16: 1.6}, 100) == (0.0, pytest.approx(0.006 * 16 / 257))
    assert fit_context(near, far, 0) == (0.0, 0.0)
    level = LevelCost("target", (1, 16), (near[1], near[16]), slope, forward)
    costs = CostModel((level,), reference_context=100).at_context(400)
    assert costs.levels[0](1) == pytest.approx(far[1])
    assert costs.levels[0](16) == pytest.approx(far[16])
    assert costs.reference_context == 400
    assert LevelCost.from_dict(level.as_dict()) == level


def test_gate_that_never_fires_leaves_the_prediction_unchanged():
    gate = GateModel(MagRuns((np.zeros(50, dtype=np.int64),), (np.zeros(50, dtype=np.int64),)), threshold=3)
    k = [[2, 1, 4], [0, 1, 3], [0, 0, 3]]
    base, gated = predict(k, FULL, COSTS), predict(k, FULL, COSTS, gate=gate)
    assert gated.tokens_per_step == pytest.approx(base.tokens_per_step)
    # only the gate's check (one MaG proposal a step) is added
    assert gated.seconds_per_step == pytest.approx(base.seconds_per_step + COSTS.mag_seconds)
    assert gated.mag_first == 3


def test_gated_model_matches_the_replay_of_real_traces(tuned):
    """On the recorded traces of ``csd tune``, the model's tokens per target step with MaG first
    (the gate walked along the output, acceptance measured under the gate) against the replay
    of the real step (static schedule, as the profile was measured)."""
    from csdrafting.levels.mag import BigramTable
    from csdrafting.tune.measure import Profile
    from csdrafting.tune.replay import Replayer

    _, report, _, _ = tuned
    profile = Profile.from_dict(report["profile"])
    gated = profile.gated
    assert gated is not None and not gated.adaptive and gated.thresholds == [2, 3, 4, 6]
    bigram = BigramTable.load(MODELS_DIR / "pycode-22m" / "csd_bigram.npy")
    replayer = Replayer(profile.traces, ["pycode-22m", "pycode-5m", "pycode-1m"], 8192, bigram)
    for rows, threshold in (
        (((0, 0, 1), (0, 0, 0), (0, 0, 0)), 2),
        (((0, 1, 1), (0, 0, 0), (0, 0, 1)), 3),
        (((0, 0, 0), (0, 0, 0), (0, 0, 0)), 2),  # MaG first over plain decoding
    ):
        acceptance, gate = gated.model(threshold)  # predict() starts it as the schedule does
        model = predict(rows, acceptance, profile.costs, gate=gate)
        replay = replayer.run(rows, 1.0, threshold)
        assert replay.matches
        assert model.tokens_per_step == pytest.approx(replay.tokens_per_step, rel=0.15), rows
