"""``csd tune``: measure the family on this device, plan the fastest cascade, write its config,
and check the prediction against a measured run. Registered by ``csdrafting.cli``."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:  # for annotations only: this module imports the tuning code where it runs
    from ..cascade import Cascade
    from ..config import CascadeConfig
    from .planner import Acceptance, Candidate, CostModel, Prediction, SearchResult

EXAMPLES = """\
examples:
  csd tune                                   tune the embedded family; writes csd-tuned.json
  csd tune --grid --plot tune.png            also measure a grid of >= 20 K-matrices and plot
  csd tune --num-prompts 2 --max-new-tokens 32 --no-verify     a quick look
  csd tune --drafter models/pycode-5m --no-mag --output sd.json   tune plain speculative decoding
  csd generate --config csd-tuned.json --prompt "def f("          use the result
"""


def add_parser(subparsers) -> None:
    from ..cli import add_cascade_command, add_prompt_arguments

    tune = add_cascade_command(
        subparsers,
        "tune",
        help="measure this device, plan the fastest K-matrix and lenience, write a config file",
        description="Measure every level's forward cost and every drafter's acceptance on sample "
        "prompts, search K-matrices (and lenience) for the best predicted speed, leave out drafters "
        "that do not pay, write the configuration, then measure it against plain decoding and "
        "plain speculative decoding. The cascade flags choose the family (--k-matrix is ignored).",
        examples=EXAMPLES,
    )
    group = tune.add_argument_group("tuning")
    add_prompt_arguments(group)
    group.add_argument("--max-new-tokens", type=int, default=128, help="tokens per generation (default: 128)")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = tune for greedy (default); > 0 for sampling")
    group.add_argument(
        "--output", "-o", default="csd-tuned.json", help="configuration file to write (default: csd-tuned.json)"
    )
    group.add_argument("--plot", metavar="PNG", help="plot predicted speed over the explored configurations")
    group.add_argument("--report", metavar="JSON", help="write measurements, explored configurations and results")
    group.add_argument(
        "--profile", metavar="JSON", help="reuse the measurements of an earlier --report (skip measuring)"
    )
    group.add_argument("--grid", action="store_true", help="also measure a grid of >= 20 K-matrices and the default")
    group.add_argument("--trials", type=int, default=3, help="timed repetitions in the check (default: 3)")
    group.add_argument(
        "--cost-rounds", type=int, default=11, help="timed rounds per forward-cost cell (median; default: 11)"
    )
    group.add_argument("--no-verify", action="store_true", help="plan only: do not measure the result")
    tune.set_defaults(func=cmd_tune)


def _log(message: str) -> None:
    print(f"[tune] {message}", file=sys.stderr, flush=True)


def _relative(path: str, folder: Path) -> str:
    """``path`` relative to the config file's folder when it lies inside it (``CascadeConfig``
    resolves relative paths from there), else absolute."""
    resolved, base = Path(path).resolve(), folder.resolve()
    return os.path.relpath(resolved, base) if resolved.is_relative_to(base) else str(resolved)


@dataclass(frozen=True)
class _Family:
    """The levels being tuned: the family's configuration, a cascade holding its levels, and their
    names (the target, the drafters largest first, then "mag"); level ``v`` is ``names[v]``."""

    config: CascadeConfig
    cascade: Cascade
    names: list[str]

    @property
    def num_neural(self) -> int:
        return len(self.cascade.drafters)

    @property
    def has_mag(self) -> bool:
        return self.cascade.mag is not None

    @property
    def mag_level(self) -> int | None:
        return self.num_neural + 1 if self.has_mag else None


@dataclass(frozen=True)
class _Plan:
    """What the search found: the best configuration (``result.best``), the best plain speculative
    decoding (``sd``), and the hand-written default K-matrix over all levels with its prediction."""

    result: SearchResult
    sd: Candidate | None
    default_rows: list
    default_prediction: Prediction
    replay: Callable | None  # (rows, lenience, mag_first) -> Prediction, when there are traces (greedy)
    acceptance: Acceptance
    costs: CostModel

    def predict(self, rows, lenience: float = 1.0, mag_first: int | None = None) -> Prediction:
        """The replay of the measured traces where there are any, else the expected-walltime
        model (which does not model ``mag_first``)."""
        from .planner import predict

        if self.replay is not None:
            return self.replay(rows, lenience, mag_first)
        return predict(rows, self.acceptance, self.costs, lenience)


def cmd_tune(args) -> int:
    from ..prompts import DEFAULT_PROMPTS_FILE, load_prompts
    from ..sampling import SamplingParams

    _check_arguments(args)
    params = SamplingParams(temperature=args.temperature, seed=0)
    family = _load_family(args)
    prompts = load_prompts(args.prompts or DEFAULT_PROMPTS_FILE, args.num_prompts)
    prompts_ids = [family.cascade.encode(p["text"]) for p in prompts]
    for ids in prompts_ids:
        family.cascade.validate_request(ids, args.max_new_tokens)

    # 1. measure (or reuse) costs and acceptance
    profile = _measure_or_load(args, family, prompts_ids, params)
    # 2. plan
    plan = _plan(family, profile, max_draft=args.max_new_tokens - 1)
    # 3. write the configuration
    best = plan.result.best
    tuned = _method("tuned", best.k_matrix, best.lenience, best.prediction.speedup, best.keep, best.mag_first)
    tuned_config = _write_tuned_config(args, family, tuned, best)
    methods, default_method = _compared_methods(family, tuned, plan)
    _print_predictions(plan, methods, default_method)

    # 4. check: measure the tuned configuration against plain and plain SD (and the grid)
    measured = None
    grid_methods = []
    if not args.no_verify:
        if args.grid:
            grid_methods = _grid_methods(family, plan, default_method)
        measured = _check(args, family, methods, grid_methods, prompts_ids, params)
    if args.plot:
        _plot(args.plot, plan.result, family.names, plan.default_prediction, plan.sd, measured)
        print(f"plot: {args.plot}")
    if args.report:
        _report(args.report, profile, plan.result, family.names, tuned_config, methods + grid_methods, measured)
        print(f"report: {args.report}")
    return 0


def _check_arguments(args) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {args.trials}")
    if args.cost_rounds < 1:
        raise ConfigError(f"--cost-rounds must be >= 1, got {args.cost_rounds}")


def _load_family(args) -> _Family:
    """The family the cascade flags name (the whole embedded family when they name none)."""
    from ..cascade import Cascade
    from ..cli import DEFAULT_DRAFTERS, config_from_args

    config = config_from_args(args)
    if args.config is None and args.target is None and args.drafter is None:
        # no family named: tune the whole embedded family, not just the levels its default uses
        config = replace(config, drafters=tuple(str(p) for p in DEFAULT_DRAFTERS), k_matrix="auto", mag_first=None)
    if args.k_matrix is not None:
        _log("--k-matrix is ignored: tuning chooses the K-matrix")
    # the family's cascade only holds the levels (every measured configuration is built from
    # it): an explicit K-matrix, so that "auto" does not measure and plan it on its own
    cascade = Cascade.from_config(replace(config, k_matrix=_default_rows_reduced(config), adaptive=False))
    names = [cascade.target.name] + [d.name for d in cascade.drafters] + (["mag"] if cascade.mag else [])
    return _Family(config, cascade, names)


def _measure_or_load(args, family: _Family, prompts_ids: list[list[int]], params):
    """The ``Profile`` of an earlier --report (--profile), else measured now."""
    import torch

    from .measure import measure

    if args.profile:
        profile = _load_profile(args.profile, family.names)
        _log(f"measurements from {args.profile}")
        return profile
    _log(f"measuring {', '.join(family.names)} on {len(prompts_ids)} prompts ({torch.get_num_threads()} threads)")
    return measure(family.cascade, prompts_ids, args.max_new_tokens, params, cost_rounds=args.cost_rounds, log=_log)


def _plan(family: _Family, profile, max_draft: int) -> _Plan:
    """Search the configurations: by replaying the measured traces where there are any (greedy),
    else by the expected-walltime model."""
    from .measure import replayer_for
    from .planner import best_plain_speculative, predict, search, search_gated

    costs, acceptance = profile.costs, profile.acceptance
    replay = None
    if profile.traces:
        replayer = replayer_for(family.cascade, profile.traces)

        def replay(rows, lenience, mag_first=None):
            return replayer.predict(rows, lenience, costs, mag_first)

    started = time.perf_counter()
    if replay is None and profile.gated is not None:
        # no traces to replay (sampling): the model judges MaG first too (gate.py)
        gates = {n: profile.gated.model(n) for n in profile.gated.thresholds}
        result = search_gated(acceptance, gates, costs, max_draft=max_draft)
    else:
        result = search(acceptance, costs, replay=replay, max_draft=max_draft)
    sd = best_plain_speculative(acceptance, costs, replay=replay)
    default_rows = _default_rows(family.num_neural, family.has_mag)
    default_prediction = replay(default_rows, 1.0) if replay else predict(default_rows, acceptance, costs)
    _log(
        f"planned in {time.perf_counter() - started:.1f} s: {len(result.explored)} configurations explored, "
        f"{sum(c.replay is not None for c in result.explored)} replayed"
    )
    return _Plan(result, sd, default_rows, default_prediction, replay, acceptance, costs)


def _write_tuned_config(args, family: _Family, tuned, best):
    """Write the tuned configuration to --output (model paths relative to its folder), say what it holds."""
    names, config, mag_level = family.names, family.config, family.mag_level
    output = Path(args.output)
    folder = output.parent if str(output.parent) else Path(".")
    drafters = [_relative(config.drafters[v - 1], folder) for v in tuned.levels if v != mag_level]
    with_mag = mag_level in tuned.levels
    tuned_config = replace(
        config,
        target=_relative(config.target, folder),
        drafters=drafters,
        mag=with_mag,
        k_matrix=[list(row) for row in tuned.k_matrix],
        lenience=best.lenience,
        mag_first=best.mag_first if with_mag else None,
        adaptive=False if args.adaptive is None else args.adaptive == "on",
        bigram=_relative(config.bigram, folder) if (with_mag and config.bigram) else None,
    )
    folder.mkdir(parents=True, exist_ok=True)
    tuned_config.save(output)
    left_out = [names[v] for v in range(1, len(names)) if v not in tuned.levels]
    print(f"wrote {output}")
    print(f"  levels:   {' -> '.join([names[0]] + [names[v] for v in tuned.levels]) or names[0]}")
    if left_out:
        print(f"  left out: {', '.join(left_out)} (predicted not to pay for themselves)")
    gating = f"   mag_first: {tuned_config.mag_first}" if tuned_config.mag_first is not None else ""
    print(f"  k_matrix: {json.dumps(tuned_config.k_matrix)}   lenience: {best.lenience:g}{gating}")
    return tuned_config


def _compared_methods(family: _Family, tuned, plan: _Plan):
    """(plain, tuned and the best plain speculative decoding; the default K-matrix as a ``Method``)."""
    from .compare import Method

    methods = [Method("plain", (), ()), tuned]
    sd = plan.sd
    if sd is not None:
        methods.append(_method(f"sd-{family.names[sd.levels[0]]}", sd.k_matrix, 1.0, sd.prediction.speedup))
    default_method = _method("default", plan.default_rows, 1.0, plan.default_prediction.speedup)
    return methods, default_method


def _print_predictions(plan: _Plan, methods: list, default_method) -> None:
    plain, tuned = methods[0], methods[1]
    print()
    print("predicted speed (" + ("replay of the measured traces" if plan.replay else "expected-walltime model") + "):")
    print(f"  {'configuration':<22} {'tokens/step':>11} {'tokens/s':>9} {'speedup':>8}   K-matrix")
    rows_out = [(tuned, plan.result.best.prediction), (default_method, plan.default_prediction)]
    if plan.sd is not None:
        rows_out.insert(1, (methods[2], plan.sd.prediction))
    rows_out.append((plain, plan.result.plain.prediction))
    for method, pred in rows_out:
        print(
            f"  {method.name:<22} {pred.tokens_per_step:>11.2f} {pred.tokens_per_second:>9.1f} {pred.speedup:>7.2f}x"
            f"   {json.dumps([list(r) for r in method.k_matrix])}"
        )


def _grid_methods(family: _Family, plan: _Plan, default_method) -> list:
    """The default, the fixed grid (``_grid``) and the shipped default, each with its prediction."""
    methods = [default_method]
    extra = _grid(family.num_neural, family.has_mag, family.mag_level)
    embedded = _embedded_default(family.config, family.cascade, family.mag_level)
    if embedded is not None:
        extra.append(embedded)
    for m in extra:
        pred = plan.predict(_full_rows(m, len(family.names) - 1), m.lenience, m.mag_first)
        methods.append(replace(m, predicted_speedup=pred.speedup))
    return methods


def _check(args, family: _Family, methods: list, grid_methods: list, prompts_ids, params) -> dict:
    """Measure ``methods`` and the grid (interleaved, against plain decoding), print the results."""
    from .compare import compare, speedups

    def same(m):
        return (m.levels, m.k_matrix, m.lenience, m.mag_first)

    taken = {same(m) for m in methods}
    all_methods = methods + [m for m in grid_methods if same(m) not in taken]
    num_prompts = len(prompts_ids)
    _log(
        f"measuring {len(all_methods)} configurations x {num_prompts} prompts x {args.trials} trials "
        f"({args.max_new_tokens} new tokens, interleaved)"
    )
    measured = compare(family.cascade, all_methods, prompts_ids, args.max_new_tokens, args.trials, params, log=_log)
    ratio = speedups(measured, "plain")
    print()
    print(f"measured ({num_prompts} prompts x {args.max_new_tokens} tokens, median of {args.trials} trials):")
    print(f"  {'configuration':<22} {'predicted':>9} {'measured':>9} {'pred/meas':>9} {'tokens/s':>9}  identical")
    for m in methods:
        _print_row(m, measured[m.name], ratio[m.name], params.greedy)
    if grid_methods:
        _print_grid_ranking(all_methods, len(grid_methods) - 1, ratio)
    return measured


def _print_grid_ranking(all_methods: list, num_grid: int, ratio: dict[str, float]) -> None:
    print()
    ranked = sorted(all_methods, key=lambda m: -ratio[m.name])
    fastest = ranked[0]
    print(f"grid: {num_grid} K-matrices + the default, ranked by measured speedup:")
    for i, m in enumerate(ranked, 1):
        mark = " <- tuned" if m.name == "tuned" else (" <- default" if m.name == "default" else "")
        gating = f" mag_first {m.mag_first}" if m.mag_first is not None else ""
        print(
            f"  {i:>2}. {m.name:<22} {ratio[m.name]:>6.2f}x (predicted {m.predicted_speedup or 1.0:.2f}x)  "
            f"{json.dumps([list(r) for r in m.k_matrix])}{gating}{mark}"
        )
    gap = ratio["tuned"] / ratio[fastest.name]
    print(
        f"tuned: rank {[m.name for m in ranked].index('tuned') + 1} of {len(ranked)}, "
        f"{100 * (1 - gap):.1f}% slower than the fastest ({fastest.name})"
        + (" - within 5%" if gap >= 0.95 else " - NOT within 5%")
        + f"; {ratio['tuned'] / ratio['default']:.2f}x the default's speed"
    )


def _print_row(method, measured, ratio: float, greedy: bool) -> None:
    predicted = method.predicted_speedup if method.predicted_speedup is not None else 1.0
    identical = ("yes" if measured.mismatches == 0 else f"NO ({measured.mismatches})") if greedy else "-"
    print(
        f"  {method.name:<22} {predicted:>8.2f}x {ratio:>8.2f}x {predicted / ratio:>9.2f} "
        f"{measured.tokens_per_second:>9.1f}  {identical}"
    )


def _load_profile(path: str, names: list[str]):
    from .measure import Profile

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read profile {path}: {exc}") from None
    profile = Profile.from_dict(data.get("profile", data))
    if list(profile.acceptance.names) != names:
        raise ConfigError(f"profile {path} measured levels {list(profile.acceptance.names)}, this cascade has {names}")
    return profile


def _default_rows_reduced(config):
    from ..kmatrix import KMatrix

    return KMatrix.default(len(config.drafters), config.mag).as_lists()


def _default_rows(num_neural: int, mag: bool):
    from ..kmatrix import KMatrix
    from .planner import expand

    n = num_neural + int(mag)
    return expand(list(range(1, n + 1)), KMatrix.default(num_neural, mag).as_lists(), n)


def _method(name: str, rows, lenience: float, predicted: float | None, keep=(), mag_first: int | None = None):
    """A ``Method`` from a K-matrix over all levels (unused levels are left out, but ``keep``)."""
    from .compare import Method
    from .planner import reduce

    if not rows or not any(rows[0]):
        return Method(name, (), (), lenience, False, predicted)
    used, reduced = reduce(rows, keep)
    return Method(name, tuple(used), tuple(tuple(r) for r in reduced), lenience, False, predicted, mag_first)


def _embedded_default(config, cascade, mag_level):
    """The embedded family's shipped configuration (models/csd_default.json) as a ``Method``,
    when the family being tuned is the embedded one (its drafters all loaded)."""
    from ..cli import DEFAULT_CONFIG
    from ..config import CascadeConfig
    from .compare import Method

    if not DEFAULT_CONFIG.is_file():
        return None
    shipped = CascadeConfig.load(DEFAULT_CONFIG)
    if Path(shipped.target).resolve() != Path(config.target).resolve() or not isinstance(shipped.k_matrix, list):
        return None
    loaded = [Path(p).resolve() for p in config.drafters]
    try:
        levels = [loaded.index(Path(p).resolve()) + 1 for p in shipped.drafters]
    except ValueError:
        return None
    if shipped.mag:
        if mag_level is None:
            return None
        levels.append(mag_level)
    return Method(
        "embedded-default",
        tuple(levels),
        tuple(tuple(r) for r in shipped.k_matrix),
        shipped.lenience,
        False,
        None,
        shipped.mag_first if shipped.mag else None,
    )


def _full_rows(method, num_drafting: int):
    from .planner import expand

    if not method.levels:
        return ()
    return expand(list(method.levels), [list(r) for r in method.k_matrix], num_drafting)


def _grid(num_neural: int, mag: bool, mag_level) -> list:
    """A fixed grid of K-matrices spanning the kinds of cascade (>= 20 for two drafters + MaG):
    plain speculative decoding with each drafter, MaG alone, each drafter with MaG (vertical and
    horizontal), and full cascades."""
    from .compare import Method

    out = []
    drafters = list(range(1, num_neural + 1))[:2]
    for v in drafters:
        for k in (1, 2, 3, 4, 6):
            out.append(Method(f"sd-d{v}-k{k}", (v,), ((k,),)))
    if mag:
        for k in (2, 4, 8, 12, 16):
            out.append(Method(f"mag-k{k}", (mag_level,), ((k,),)))
        for v in drafters:
            for k, m in ((1, 8), (3, 4), (2, 12)):
                out.append(Method(f"d{v}<mag-{k}.{m}", (v, mag_level), ((k, 0), (0, m))))
            out.append(Method(f"d{v}+mag-2.8", (v, mag_level), ((2, 8), (0, 0))))
        if len(drafters) == 2:
            a, b = drafters
            for label, rows in (
                ("vertical", ((4, 0, 0), (0, 2, 0), (0, 0, 3))),
                ("horizontal", ((2, 1, 4), (0, 0, 0), (0, 0, 0))),
                ("full-3.1.8", ((3, 1, 8), (0, 1, 4), (0, 0, 4))),
                ("full-1.1.12", ((1, 1, 12), (0, 0, 4), (0, 0, 4))),
                ("full-2.2.8", ((2, 2, 8), (0, 1, 4), (0, 0, 4))),
            ):
                out.append(Method(label, (a, b, mag_level), rows))
    elif len(drafters) == 2:
        a, b = drafters
        for label, rows in (("vertical-4.2", ((4, 0), (0, 2))), ("horizontal-2.2", ((2, 2), (0, 0)))):
            out.append(Method(label, (a, b), rows))
    return out


def _plot(path: str, result, names, default_pred, sd, measured) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    explored = result.explored
    model = sorted((c.model.tokens_per_second for c in explored), reverse=True)
    replayed = sorted((c.replay.tokens_per_second for c in explored if c.replay is not None), reverse=True)
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.plot(range(1, len(model) + 1), model, ".", ms=2, color="0.6", label="expected-walltime model")
    if replayed:
        ax.plot(range(1, len(replayed) + 1), replayed, "o", ms=3, color="tab:blue", label="replay of traces")
    best = result.best.prediction.tokens_per_second
    ax.axhline(best, color="tab:red", lw=1, label=f"tuned: {best:.0f} tok/s ({result.best.prediction.speedup:.2f}x)")
    if sd is not None:
        ax.axhline(
            sd.prediction.tokens_per_second, color="tab:green", lw=1, ls="--", label="plain speculative decoding"
        )
    ax.axhline(default_pred.tokens_per_second, color="tab:orange", lw=1, ls="--", label="hand-written default K")
    ax.axhline(result.plain.prediction.tokens_per_second, color="k", lw=1, ls=":", label="plain decoding")
    ax.set_xscale("log")
    ax.set_xlabel("explored configurations, ranked by predicted speed")
    ax.set_ylabel("predicted tokens/s")
    ax.set_title("csd tune: " + " / ".join(names))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(path, profile, result, names, tuned_config, methods, measured) -> None:
    from .compare import speedups

    ratio = speedups(measured, "plain") if measured else {}
    payload = {
        "schema": "csd-tune/1",
        "config": tuned_config.as_dict(),
        "profile": profile.as_dict(),
        "explored": [c.as_dict(tuple(names)) for c in result.explored[:500]],
        "methods": [
            {
                "name": m.name,
                "levels": [names[v] for v in m.levels],
                "k_matrix": [list(r) for r in m.k_matrix],
                "lenience": m.lenience,
                "mag_first": m.mag_first,
                "predicted_speedup": m.predicted_speedup,
                "measured_speedup": ratio.get(m.name),
                "measured_tokens_per_second": measured[m.name].tokens_per_second if measured else None,
                "trial_seconds": measured[m.name].seconds if measured else None,
                "mismatches": measured[m.name].mismatches if measured else None,
            }
            for m in methods
            if not measured or m.name in measured
        ],
    }
    Path(path).write_text(json.dumps(payload) + "\n")
