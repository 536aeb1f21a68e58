"""``k_matrix="auto"`` with planning (``autoplan.py``): costs measured (here: synthetic, so plans
are deterministic), acceptance observed on finished generations, the plan cached, and the per-level
switch of the adaptive schedule; the output never changes.

* A drafter that costs too much is left out before anything is observed; once enough output is
  observed the plan is remade from it, and once more from more output, then observing stops;
  every output equals plain greedy decoding of the target.
* The cache: a second cascade over the same levels reuses costs and plan, and observes on only
  while the cached plan is not the final one; a corrupt file is ignored; another thread count is
  another machine.
* The real pycode family: a real (short) calibration, a valid plan, the target's tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from csdrafting import Cascade, CascadeConfig, EngineParams, Levels, autoplan
from csdrafting.edge import ENV_AUTO_PLAN
from csdrafting.schedule import AdaptiveSchedule, ScheduleParams
from tiny import KERNEL, TableLevel, make_cascade, plan_automatically, random_table

VOCAB = 6
COSTS = {"target": (10e-3, 1e-3), "near": (1e-3, 0.05e-3), "far": (9.5e-3, 1e-3)}  # far: as costly as the target
PROMPTS = [[0, 1, 2, 3, 4, 5, 0, 1], [2, 2, 3, 1, 0, 4], [5, 4, 3, 2, 1, 0, 5, 4], [1, 3, 5, 1, 3]]


def tables():
    target = random_table(1, VOCAB, "bigram", scale=3.0)
    near = target + 0.5 * random_table(2, VOCAB, "bigram")  # mostly agrees with the target
    far = random_table(3, VOCAB, "bigram", scale=3.0)  # an unrelated model
    return target, near, far


def family(names=("target", "near", "far")) -> list[TableLevel]:
    return [TableLevel(name, table, "bigram", max_positions=512) for name, table in zip(names, tables())]


def reference(prompt: list[int], num_new: int) -> list[int]:
    target = TableLevel("reference", tables()[0], "bigram", max_positions=512)
    ids = list(prompt)
    for _ in range(num_new):
        ids.append(int(target.logits_after(ids).argmax()))
    return ids[len(prompt) :]


def auto_cascade(levels=None, params=None) -> Cascade:
    levels = levels or family()
    names = [lv.name for lv in levels]
    return make_cascade(levels[0], levels[1:], names=names, mag=True, eos_token_ids=[], params=params)


def test_prior_plan_leaves_out_a_drafter_that_costs_too_much(monkeypatch, tmp_path):
    plan_automatically(monkeypatch, tmp_path, COSTS)
    cascade = auto_cascade()
    plan = cascade.plan
    assert cascade.config.is_auto  # the configuration stays as given; the plan is what runs
    assert plan.source == "prior" and plan.num_observed_tokens == 0
    assert "far" not in plan.config.drafters and not plan.config.is_auto and plan.config.adaptive
    assert [d.name for d in cascade.drafters] == list(plan.config.drafters)
    described = cascade.describe()
    assert described["plan"]["source"] == "prior" and described["k_matrix"] == [list(r) for r in plan.config.k_matrix]
    assert plan.prediction.speedup > 1.0


def test_observed_plan_replaces_the_prior_twice_then_observing_stops(monkeypatch, tmp_path):
    """40 tokens per generation: re-planned after the 3rd (120 >= 100 tokens) and, for the last
    time, after the 8th (320 >= 300); nothing is observed after that, and the output never changes."""
    plan_automatically(monkeypatch, tmp_path, COSTS)
    monkeypatch.setattr(autoplan, "MIN_OBSERVED_TOKENS", 100)
    monkeypatch.setattr(autoplan, "FINAL_OBSERVED_TOKENS", 300)
    cascade = auto_cascade()
    replanned = []  # (generation, tokens the new plan was made from)
    plan_seconds = []
    for generation in range(12):
        prompt = PROMPTS[generation % len(PROMPTS)]
        before = cascade.plan
        result = cascade.generate(prompt, 40, ignore_eos=True)
        assert result.token_ids == reference(prompt, 40)
        plan_seconds.append(result.stats.plan_seconds)
        if cascade.plan is not before:
            replanned.append((generation + 1, cascade.plan.num_observed_tokens))
        assert cascade.planner.observing == (generation + 1 < 8)
    assert replanned == [(3, 120), (8, 320)]
    assert all(s > 0 for s in plan_seconds[:8]) and plan_seconds[8:] == [0.0] * 4  # observing stopped
    assert cascade.planner.trajectories == []  # nothing kept once the plan is final
    plan = cascade.plan
    assert plan.source == "observed" and plan.num_observed_tokens == 320
    assert "far" not in plan.config.drafters  # costly and unrelated: still out
    assert "near" in plan.config.drafters  # cheap and mostly right: pays
    assert all(0.0 < p < 1.0 for row in plan.priors for p in row)
    later = cascade.generate(PROMPTS[0], 40, ignore_eos=True)
    assert later.stats.plan_seconds == 0.0


def test_the_cache_holds_costs_and_plan_and_survives_a_corrupt_file(monkeypatch, tmp_path):
    calls: list = []
    plan_automatically(monkeypatch, tmp_path, COSTS, calls)
    monkeypatch.setattr(autoplan, "MIN_OBSERVED_TOKENS", 60)
    monkeypatch.setattr(autoplan, "FINAL_OBSERVED_TOKENS", 120)
    levels = family()
    first = auto_cascade(levels)
    for prompt in PROMPTS:
        first.generate(prompt, 40, ignore_eos=True)
    assert first.plan.source == "observed" and len(calls) == 1 and not first.planner.observing
    files = list((tmp_path / "csdrafting").glob("auto-*.json"))
    assert len(files) == 1
    cached = json.loads(files[0].read_text())
    # the final plan and the observations it was made from, nothing pending
    assert "pending" not in cached and cached["observed"]["num_tokens"] == 120
    assert cached["plan"]["num_observed_tokens"] == 120 and cached["plan"]["source"] == "observed"
    assert cached["key"]["cpu"] == autoplan.cpu_model() and cached["key"]["threads"] == torch.get_num_threads()
    assert [level["name"] for level in cached["key"]["levels"]] == ["target", "near", "far"]
    # the same levels again: costs and plan come from the cache, nothing is measured or observed
    second = auto_cascade(levels)
    assert len(calls) == 1 and second.plan.source == "observed" and not second.planner.observing
    assert second.plan.config == first.plan.config and second.plan.num_observed_tokens == 120
    # a corrupt cache is ignored (and rewritten)
    files[0].write_text("{not json")
    third = auto_cascade(levels)
    assert len(calls) == 2 and third.plan.source == "prior"
    assert json.loads(files[0].read_text())["key"] == cached["key"]
    files[0].write_text(json.dumps({"key": cached["key"], "costs": {"levels": "?"}}))  # parses, but wrong
    auto_cascade(levels)
    assert len(calls) == 3
    # another thread count is another machine
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        auto_cascade(levels)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 4 and len(list((tmp_path / "csdrafting").glob("auto-*.json"))) == 2


def test_short_lived_processes_add_up_their_observations(monkeypatch, tmp_path):
    """One generation per cascade (as one `csd generate` per process): the cache keeps every
    generation observed until the final plan, so processes started between the two re-plans
    run the first observed plan and go on observing; after the final one nothing is kept."""
    plan_automatically(monkeypatch, tmp_path, COSTS)
    monkeypatch.setattr(autoplan, "MIN_OBSERVED_TOKENS", 100)
    monkeypatch.setattr(autoplan, "FINAL_OBSERVED_TOKENS", 200)
    levels = family()
    path = None
    seen = []  # per process: (plan at start, tokens it was made from, observing), then the same after
    pending = []  # generations the cache holds after each process
    for prompt in PROMPTS + PROMPTS[:2]:
        cascade = auto_cascade(levels)
        start = (cascade.plan.source, cascade.plan.num_observed_tokens, cascade.planner.observing)
        cascade.generate(prompt, 40, ignore_eos=True)
        seen.append((start, (cascade.plan.source, cascade.plan.num_observed_tokens, cascade.planner.observing)))
        path = path or next((tmp_path / "csdrafting").glob("auto-*.json"))
        pending.append(len(json.loads(path.read_text()).get("pending", [])))
    assert seen == [
        (("prior", 0, True), ("prior", 0, True)),
        (("prior", 0, True), ("prior", 0, True)),
        (("prior", 0, True), ("observed", 120, True)),  # 120 >= 100 tokens: the first plan from them
        (("observed", 120, True), ("observed", 120, True)),
        (("observed", 120, True), ("observed", 200, False)),  # 200: the final plan, from all five
        (("observed", 200, False), ("observed", 200, False)),  # nothing observed any more
    ]
    assert pending == [1, 2, 3, 4, 0, 0]
    cached = json.loads(path.read_text())
    assert cached["observed"]["num_tokens"] == 200 and cached["plan"]["num_observed_tokens"] == 200
    # a plan that is not final without the generations it was made from does not fit together:
    # observations and plan are dropped, the prior plan runs and observing starts again
    cached["observed"]["num_tokens"] = 120
    cached["plan"]["num_observed_tokens"] = 120
    path.write_text(json.dumps(cached))
    restarted = auto_cascade(levels)
    assert restarted.plan.source == "prior" and restarted.planner.observing and restarted.planner.num_observed == 0


def test_mag_alone_and_no_drafter_at_all(monkeypatch, tmp_path):
    """Edge families: MaG alone is planned (and cached apart from the same target without MaG,
    which can only decode plainly)."""
    plan_automatically(monkeypatch, tmp_path, COSTS)
    target = family()[0]
    plain = make_cascade(target, [], names=["target"], mag=False, eos_token_ids=[])
    assert plain.plan.config.k_matrix == () and not plain.plan.config.mag
    mag = make_cascade(target, [], names=["target"], mag=True, eos_token_ids=[])
    assert mag.plan.config.mag and mag.plan.config.k_matrix != ()
    assert len(list((tmp_path / "csdrafting").glob("auto-*.json"))) == 2
    for prompt in PROMPTS:
        assert mag.generate(prompt, 40, ignore_eos=True).token_ids == reference(prompt, 40)
        assert plain.generate(prompt, 40, ignore_eos=True).token_ids == reference(prompt, 40)


def test_planning_can_be_switched_off(monkeypatch, tmp_path):
    plan_automatically(monkeypatch, tmp_path, COSTS)
    monkeypatch.setenv(ENV_AUTO_PLAN, "off")
    cascade = auto_cascade()
    assert cascade.plan is None and cascade.planner is None
    assert cascade.describe()["plan"] is None
    assert [d.name for d in cascade.drafters] == ["near", "far"]  # resolve()'s start: every drafter


def test_per_level_switch_flips_drafters_without_changing_the_output(monkeypatch, tmp_path):
    """A judge that always predicts the cascade faster without a drafter (a negative margin)
    switches each drafter off at every judgement and back on after a short back-off, in the
    middle of generations: the output stays the target's."""
    plan_automatically(monkeypatch, tmp_path, COSTS)  # the plan: "near" (which mostly agrees) and MaG
    monkeypatch.setattr(autoplan, "AUTO_MAG_FIRST", 100)  # no MaG-first steps: every step is judged
    monkeypatch.setattr(autoplan, "MIN_OBSERVED_TOKENS", 10**6)  # the prior plan throughout
    schedule = ScheduleParams(
        slower=1e9,  # whatever the clock says, keep speculating
        level_margin=-1.0,
        judge_levels_first=2,
        first_level_backoff=3,
    )
    switched = []
    level_off = AdaptiveSchedule._level_off
    monkeypatch.setattr(
        AdaptiveSchedule, "_level_off", lambda self, column: (switched.append(column), level_off(self, column))
    )
    cascade = auto_cascade(params=EngineParams(schedule=schedule))
    assert [d.name for d in cascade.drafters] == ["near"]
    for prompt in PROMPTS:
        result = cascade.generate(prompt, 48, ignore_eos=True)
        assert result.token_ids == reference(prompt, 48)
    assert len(switched) >= 4
    forwards = [cascade.generate(p, 48, ignore_eos=True).stats.levels[1].num_forwards for p in PROMPTS]
    assert sum(forwards) > 0  # retried drafters draft again between switches


def test_real_family_plans_and_generates_the_targets_tokens(monkeypatch, tmp_path):
    """The embedded pycode family with real (short) cost measurement: a valid explicit plan,
    cached; greedy output equal to plain decoding."""
    plan_automatically(monkeypatch, tmp_path)
    models = Path(__file__).resolve().parents[1] / "models"
    drafters = (str(models / "pycode-5m"), str(models / "pycode-1m"))
    cascade = Cascade.from_config(CascadeConfig(str(models / "pycode-22m"), drafters, kernel=KERNEL))
    plan = cascade.plan
    assert plan.source == "prior" and plan.seconds > 0
    assert set(plan.config.drafters) <= {str(models / "pycode-5m"), str(models / "pycode-1m")}
    CascadeConfig.from_dict(plan.config.as_dict())  # valid and explicit
    costs = cascade.planner.costs
    assert [c.name for c in costs.levels] == ["pycode-22m", "pycode-5m", "pycode-1m"]
    assert all(s > 0 for c in costs.levels for s in c.seconds) and costs.step_seconds > 0
    plain = cascade.with_config(CascadeConfig(target=str(models / "pycode-22m"), mag=False, k_matrix=[]))
    prompt = "import os\n\ndef main(argv):\n    "
    assert cascade.generate(prompt, 32).token_ids == plain.generate(prompt, 32).token_ids
    assert list((tmp_path / "csdrafting").glob("auto-*.json"))


def test_levels_from_models_are_identified_by_name_and_size(monkeypatch, tmp_path):
    plan_automatically(monkeypatch, tmp_path, COSTS)
    levels = Levels.from_models(*[family()[0]], [family()[1]], names=["target", "near"])
    planner = autoplan.AutoPlanner(levels, CascadeConfig(target="target", drafters=["near"]))
    identity = planner.key["levels"][1]
    assert identity["name"] == "near" and identity["num_params"] > 0 and "files" not in identity


def test_the_cache_key_holds_each_levels_runner_and_the_cache_version(monkeypatch, tmp_path):
    """Costs belong to a backend: the same model behind another runner (llama.cpp) is another
    cache entry, and so is a cache written by another version of the cost model."""
    plan_automatically(monkeypatch, tmp_path, COSTS)
    config = CascadeConfig(target="target", drafters=["near"])

    def planner(runner_name: str | None = None):
        levels = family()[:2]
        if runner_name is not None:
            levels[1].runner_name = runner_name
        return autoplan.AutoPlanner(Levels.from_models(levels[0], [levels[1]], names=["target", "near"]), config)

    torch_planner, llama_planner = planner(), planner("llama.cpp")
    assert torch_planner.key["version"] == autoplan.CACHE_VERSION
    assert [lv["runner"] for lv in llama_planner.key["levels"]] == [
        torch_planner.key["levels"][0]["runner"],
        "llama.cpp",
    ]
    assert torch_planner.cache_path != llama_planner.cache_path
    monkeypatch.setattr(autoplan, "CACHE_VERSION", autoplan.CACHE_VERSION + 1)
    assert planner().cache_path != torch_planner.cache_path
