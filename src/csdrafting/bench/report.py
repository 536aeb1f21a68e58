"""``csd bench report``: a markdown table and PNG plots from the JSON lines of ``csd bench``.

Speedups are ratios inside one run (same ``run_id``): a method's tokens/s on a prompt divided by
the baseline's tokens/s on the same prompt, mode, length and trial; then the median over trials
per prompt, and the median (min-max) over prompts. tokens/s is end to end: new tokens divided by
the wall time of the whole ``generate`` call, prefill included, measured the same way for every
method. The standardized walltime improvement (SWI) is a cost model, shown beside measured speed.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from ..errors import ConfigError
from ..jsonl import read_jsonl

MIB = 1024 * 1024

# The issue's acceptance criteria (CPU, float32, 128 new tokens, batch 1).
TARGET_VS_PLAIN = 2.5  # best CS Drafting / transformers plain generate, greedy
TARGET_VS_PEERS = 1.7  # best CS Drafting / fastest transformers assisted or prompt lookup, greedy
TARGET_VS_SINGLE = 1.1  # best cascade / faster of MaG alone and the best single-drafter SD (ours)
TARGET_SAMPLING = 1.7  # best CS Drafting / transformers plain sampling
TARGET_OUR_PLAIN = 1.0  # our plain decoding / transformers plain generate
# issue #9, on llama.cpp levels against llama-cpp-python (CPU, f32 target, 128 new tokens, greedy)
LLAMA_TARGET_VS_PLAIN = 1.7  # best CS Drafting / llama.cpp plain decoding
LLAMA_TARGET_VS_PEERS = 1.5  # best CS Drafting / llama-cpp-python prompt lookup
LLAMA_TARGET_VS_MAG = 1.15  # best cascade / MaG alone, same backend


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        for number, row in read_jsonl(path, "results file"):
            if not isinstance(row, dict) or not str(row.get("schema", "")).startswith("csd-bench/"):
                raise ConfigError(f"{path}:{number}: not a csd bench row")
            rows.append(row)
    if not rows:
        raise ConfigError("no benchmark rows in " + ", ".join(str(p) for p in paths))
    return rows


# -- aggregation -------------------------------------------------------------------------------


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Group:
    """The rows of one run, mode, generation length and backend (speedups are over that backend's
    plain decoding: transformers' or llama.cpp's)."""

    def __init__(self, run_id: str, mode: str, length: int, rows: list[dict], backend: str = "torch") -> None:
        self.run_id, self.mode, self.length, self.rows = run_id, mode, length, rows
        self.backend = backend
        self.baseline = rows[0].get("baseline", "hf-plain")
        self.methods = list(dict.fromkeys(r["method"] for r in rows))
        self.by_method: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            self.by_method[r["method"]].append(r)
        self._base = {(r["prompt_id"], r["trial"]): r for r in self.by_method.get(self.baseline, [])}

    @property
    def label(self) -> str:
        suite = self.rows[0].get("suite")
        where = " on llama.cpp" if self.backend == "llama.cpp" else ""
        return f"{self.mode}, {self.length} new tokens{where}" + (f" (suite {suite})" if suite else "")

    def row(self, method: str) -> dict:
        return self.by_method[method][0]

    def per_prompt(self, method: str, key) -> dict[str, float]:
        """Per prompt: the median over trials of ``key(row)``."""
        values = defaultdict(list)
        for r in self.by_method.get(method, []):
            value = key(r)
            if value is not None:
                values[r["prompt_id"]].append(value)
        return {p: statistics.median(v) for p, v in values.items()}

    def tokens_per_second(self, method: str) -> dict[str, float]:
        return self.per_prompt(method, lambda r: r.get("tokens_per_second"))

    def ratio(self, method: str, other: str) -> dict[str, float]:
        """Per prompt: median over trials of tokens/s of ``method`` over ``other`` (same prompt, trial)."""
        others = {(r["prompt_id"], r["trial"]): r for r in self.by_method.get(other, [])}

        def key(r):
            o = others.get((r["prompt_id"], r["trial"]))
            if o is None or not o.get("tokens_per_second") or r.get("tokens_per_second") is None:
                return None
            return r["tokens_per_second"] / o["tokens_per_second"]

        return self.per_prompt(method, key)

    def decode_ratio(self, method: str, other: str) -> dict[str, float]:
        """Per prompt: decode-only tokens/s (after the first token) of ``method`` over ``other``."""
        others = {(r["prompt_id"], r["trial"]): r for r in self.by_method.get(other, [])}

        def key(r):
            o = others.get((r["prompt_id"], r["trial"]))
            if o is None or not o.get("decode_seconds") or not r.get("decode_seconds"):
                return None
            return o["decode_seconds"] / r["decode_seconds"]  # the same number of tokens after the first

        return self.per_prompt(method, key)

    def speedup(self, method: str) -> dict[str, float]:
        return self.ratio(method, self.baseline)

    def summary(self, method: str) -> dict:
        rows = self.by_method[method]
        speed = list(self.speedup(method).values())
        greedy = [r for r in rows if r.get("matches_baseline") is not None]
        memory = [r.get("memory") or {} for r in rows]
        return {
            "method": method,
            "engine": rows[0].get("engine"),
            "tokens_per_second": _median(self.tokens_per_second(method).values()),
            "speedup": _median(speed),
            "speedup_min": min(speed) if speed else None,
            "speedup_max": max(speed) if speed else None,
            "tokens_per_target_step": _median(r.get("tokens_per_target_step") for r in rows),
            "acceptance_rate": _median(r.get("acceptance_rate") for r in rows),
            "swi": _median(r.get("swi") for r in rows),
            "matches": sum(1 for r in greedy if r["matches_baseline"]),
            "greedy_rows": len(greedy),
            "weights_mib": (rows[0].get("weights_bytes") or 0) / MIB,
            "runner_mib": max((r.get("runner_bytes") or 0) for r in rows) / MIB,
            "peak_mib": max((m.get("peak_bytes") or 0) for m in memory) / MIB,
            "peak_increase_mib": max((m.get("peak_increase_bytes") or 0) for m in memory) / MIB,
            "memory_kind": memory[0].get("kind") if memory else None,
            "memory_scope": memory[0].get("scope") if memory else None,
            "num_prompts": len({r["prompt_id"] for r in rows}),
        }


def groups_of(rows: list[dict]) -> list[Group]:
    keyed: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        keyed[(r["run_id"], r["mode"], r["max_new_tokens"], r.get("backend", "torch"))].append(r)
    return [Group(run, mode, length, rs, backend) for (run, mode, length, backend), rs in keyed.items()]


def num_drafting_levels(row: dict) -> int:
    """Drafting levels of one of our methods (drafters + MaG); -1 for a transformers peer."""
    if row.get("engine") != "csd":
        return -1
    config = row.get("config") or {}
    return len(config.get("drafters") or []) + int(bool(config.get("mag")))


# -- text --------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".2f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def table(group: Group) -> list[str]:
    lines = [
        "| method | tokens/s | speedup (min–max) | mean acceptance length | acceptance rate | SWI (cost model) "
        "| greedy = baseline | weights (+ runner) MiB | peak MiB (+ during run) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in group.methods:
        s = group.summary(method)
        speed = (
            f"{s['speedup']:.2f}× ({s['speedup_min']:.2f}–{s['speedup_max']:.2f})" if s["speedup"] is not None else "—"
        )
        match = f"{s['matches']}/{s['greedy_rows']}" if s["greedy_rows"] else "n/a"
        name = f"**{method}**" if method == group.baseline else method
        lines.append(
            f"| {name} | {_fmt(s['tokens_per_second'], '.1f')} | {speed} | {_fmt(s['tokens_per_target_step'])} "
            f"| {_fmt(s['acceptance_rate'])} | {_fmt(s['swi'])} | {match} | {s['weights_mib']:.0f} "
            f"(+{s['runner_mib']:.0f}) "
            f"| {s['peak_mib']:.0f} (+{s['peak_increase_mib']:.0f}) |"
        )
    return lines


TREE_TABLE_NOTE = (
    "Per tree method: speculative steps, mean nodes per tree and of them the chain's, mean accepted",
    "path, the share of steps an alternative or the chain's MaG extension won (by source), and the",
    "share where no candidate paid for a tree (the chain went alone; `tree.py`: TreeSizer).",
)


def tree_stats(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    """Tree counters summed per (run, decoding, method) over the rows that verified trees."""
    out: dict[tuple[str, str, str], dict] = {}
    for r in rows:
        tree = ((r.get("levels") or [{}])[0] or {}).get("tree")
        if not tree or r.get("stop") != "fixed":
            continue
        total = out.setdefault((r["run_id"], r["decoding"], r["method"]), {"wins": defaultdict(int)})
        for key in ("num_trees", "num_nodes", "num_chain_nodes", "num_accepted", "num_branch_wins", "num_unbranched"):
            total[key] = total.get(key, 0) + tree.get(key, 0)
        for source, count in (tree.get("wins") or {}).items():
            total["wins"][source] += count
    return out


def tree_table(rows: list[dict]) -> list[str]:
    stats = tree_stats(rows)
    if not stats:
        return []
    lines = [
        "| method | decoding | steps | nodes per tree | of them chain | accepted path | branch wins | unbranched |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for (_, decoding, method), t in sorted(stats.items()):
        n = max(t["num_trees"], 1)
        wins = ", ".join(f"{source} {count / n:.3f}" for source, count in sorted(t["wins"].items())) or "—"
        lines.append(
            f"| {method} | {decoding} | {t['num_trees']} | {t['num_nodes'] / n:.1f} | {t['num_chain_nodes'] / n:.1f} "
            f"| {t['num_accepted'] / n:.2f} | {t['num_branch_wins'] / n:.3f} ({wins}) | {t['num_unbranched'] / n:.2f} |"
        )
    return lines


def summary_lines(rows: list[dict]) -> list[str]:
    """A short plain-text summary (printed at the end of ``csd bench``)."""
    out = []
    for group in groups_of(rows):
        out.append(f"{group.label} (speedup over {group.baseline}, median over prompts):")
        for method in group.methods:
            s = group.summary(method)
            match = f"  greedy match {s['matches']}/{s['greedy_rows']}" if s["greedy_rows"] else ""
            out.append(
                f"  {method:<24} {_fmt(s['tokens_per_second'], '7.1f')} tok/s  "
                f"{_fmt(s['speedup'], '5.2f')}x  SWI {_fmt(s['swi'], '.2f')}{match}"
            )
    return out


def _best(group: Group, methods: list[str]) -> tuple[str | None, float | None]:
    best, value = None, None
    for m in methods:
        s = group.speedup(m)
        v = _median(s.values())
        if v is not None and (value is None or v > value):
            best, value = m, v
    return best, value


def criteria(groups: list[Group]) -> list[str]:
    """The issue's acceptance checks, for every group where the methods they need are present."""
    lines = []
    for group in _main_groups(groups):
        if group.mode not in ("greedy-fixed", "sampling-fixed"):
            continue
        levels = {m: num_drafting_levels(group.row(m)) for m in group.methods}
        if not any(n == -1 and m != group.baseline for m, n in levels.items()):
            continue  # a run without peers (an ablation) is not what the criteria compare
        cascades = [m for m, n in levels.items() if n >= 2]
        singles = [m for m, n in levels.items() if n == 1]
        plains = [m for m, n in levels.items() if n == 0]
        peers = [m for m, n in levels.items() if n == -1 and m != group.baseline]
        best_cascade, best_speed = _best(group, cascades)
        checks = []
        if group.backend == "llama.cpp":
            checks = _llama_checks(group, levels, best_cascade, best_speed) if group.mode == "greedy-fixed" else []
        elif group.mode == "greedy-fixed":
            if best_cascade is not None:
                checks.append(_check(f"best cascade ({best_cascade}) vs {group.baseline}", best_speed, TARGET_VS_PLAIN))
                best_peer, _ = _best(group, peers)
                if best_peer is not None:
                    ratio = _median(group.ratio(best_cascade, best_peer).values())
                    checks.append(_check(f"{best_cascade} vs fastest peer ({best_peer})", ratio, TARGET_VS_PEERS))
                best_single, _ = _best(group, singles)
                if best_single is not None:
                    ratio = _median(group.ratio(best_cascade, best_single).values())
                    checks.append(
                        _check(
                            f"{best_cascade} vs best single drafter of ours ({best_single})", ratio, TARGET_VS_SINGLE
                        )
                    )
            for m in plains:
                checks.append(_check(f"{m} vs {group.baseline}", _median(group.speedup(m).values()), TARGET_OUR_PLAIN))
            greedy_rows = [r for r in group.rows if r.get("matches_baseline") is not None]
            mismatched = sorted({r["method"] for r in greedy_rows if not r["matches_baseline"]})
            ok = not mismatched
            checks.append(
                f"{'PASS' if ok else 'FAIL'}: every greedy row token-identical to {group.baseline} "
                f"({sum(r['matches_baseline'] for r in greedy_rows)}/{len(greedy_rows)}"
                + (f"; differ: {', '.join(mismatched)}" if mismatched else "")
                + ")"
            )
        elif best_cascade is not None:
            checks.append(_check(f"best cascade ({best_cascade}) vs {group.baseline}", best_speed, TARGET_SAMPLING))
        if checks:
            lines.append(f"*{group.label}:*")
            lines.append("")
            lines.extend(f"- {c}" for c in checks)
            lines.append("")
    return lines


def _llama_checks(group: Group, levels: dict, best_cascade: str | None, best_speed: float | None) -> list[str]:
    """Issue #9's bars on llama.cpp levels: vs llama.cpp plain, vs prompt lookup, vs MaG alone;
    each also decode-only (after the first token), since the prompt's prefill is the same work
    for every method and bounds the end-to-end ratios."""
    checks = []
    if best_cascade is not None:
        best_peer, _ = _best(group, [m for m, n in levels.items() if n == -1 and m != group.baseline])
        mags = [m for m, n in levels.items() if n == 1 and not (group.row(m).get("config") or {}).get("drafters")]
        best_mag, _ = _best(group, mags)
        bars = [
            (f"best cascade ({best_cascade}) vs {group.baseline}", group.baseline, LLAMA_TARGET_VS_PLAIN),
            (f"{best_cascade} vs fastest peer ({best_peer})", best_peer, LLAMA_TARGET_VS_PEERS),
            (f"{best_cascade} vs MaG alone ({best_mag})", best_mag, LLAMA_TARGET_VS_MAG),
        ]
        for what, other, target in bars:
            if other is None:
                continue
            ratio = _median(group.ratio(best_cascade, other).values())
            decode = _median(group.decode_ratio(best_cascade, other).values())
            checks.append(_check(what, ratio, target) + f"; decode only {_fmt(decode)}×")
    greedy_rows = [r for r in group.rows if r.get("matches_baseline") is not None]
    matched = sum(r["matches_baseline"] for r in greedy_rows)
    checks.append(f"greedy rows token-identical to {group.baseline}: {matched}/{len(greedy_rows)}")
    return checks


def _check(what: str, value: float | None, target: float) -> str:
    if value is None:
        return f"n/a: {what}"
    verdict = "PASS" if value >= target else "FAIL"
    return f"{verdict}: {what}: {value:.2f}× (target ≥ {target}×)"


def _header(rows: list[dict], title: str) -> list[str]:
    lines = [f"# {title}", ""]
    runs = list(dict.fromkeys(r["run_id"] for r in rows))
    for run in runs:
        first = next(r for r in rows if r["run_id"] == run)
        env = first.get("env", {})
        prompts = len({r["prompt_id"] for r in rows if r["run_id"] == run})
        trials = len({r["trial"] for r in rows if r["run_id"] == run})
        commit = env.get("git_commit")
        commit_text = f", commit {commit[:10]}{' (dirty)' if env.get('git_dirty') else ''}" if commit else ""
        lines.append(
            f"- run `{run}` (suite `{first.get('suite')}`), started {first.get('started_at')}: "
            f"{env.get('device_name')} ({env.get('device')}, {env.get('num_threads')} threads, "
            f"{env.get('cpu_count')} CPUs), {env.get('dtype')}, batch 1, {prompts} prompts × {trials} trials; "
            f"Python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
            f"csdrafting {env.get('csdrafting')}{commit_text}"
        )
    lines += [
        "",
        "tokens/s: new tokens / wall time of the whole generate call (prefill included), the same "
        "measure for every method; speedup: per prompt over the baseline in the same run, median "
        "(min–max) over prompts. SWI: the paper's standardized walltime improvement, a **cost model** "
        "(forward calls × parameters relative to the target), not a measurement. Memory: " + _memory_note(rows),
        "",
    ]
    return lines


def _memory_note(rows: list[dict]) -> str:
    memory = rows[0].get("memory") or {}
    if memory.get("kind") == "cuda_max_allocated":
        return "`torch.cuda.max_memory_allocated`, reset before each generation (all loaded models included)."
    scope = "each generation" if memory.get("scope") == "row" else "the whole process (it only grows)"
    return (
        f"peak RSS of the process over {scope}; every model of the run is loaded in it, so the per-method "
        "share is the weights of the models it uses plus what the peak grew by during its generations."
    )


# -- plots -------------------------------------------------------------------------------------


def write_report(rows: list[dict], out: Path, title: str = "csd bench results") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    groups = groups_of(rows)
    lines = _header(rows, title)
    checks = criteria(groups)
    if checks:
        lines += [
            "## Acceptance criteria",
            "",
            "The issue's targets (stated for the CPU of the reference machine, float32, the committed prompt "
            "set, 128 new tokens, batch 1); checked here on whatever this run measured.",
            "",
        ] + checks
    lines += ["## Results", ""]
    for group in groups:
        lines += [f"### {group.label}", "", f"run `{group.run_id}`, baseline **{group.baseline}**", ""]
        lines += table(group) + [""]
    trees = tree_table(rows)
    if trees:
        lines += ["## Token trees", "", *TREE_TABLE_NOTE, ""] + trees + [""]
    plots = _plots(rows, groups, out)
    if plots:
        lines += ["## Plots", ""]
        for file, caption in plots:
            lines += [f"**{caption}**", "", f"![{caption}]({file})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _plots(rows: list[dict], groups: list[Group], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for maker in (
        _plot_speedup,
        _plot_swi,
        _plot_acceptance,
        _plot_length,
        _plot_kmatrix,
        _plot_ablation,
        _plot_memory,
        _plot_trees,
    ):
        result = maker(plt, rows, groups, out)
        if result is not None:
            made.append(result)
        plt.close("all")
    return made


def _save(fig, out: Path, name: str, caption: str) -> tuple[str, str]:
    """Lay out and write one plot; (file name, caption) for the report."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    return name, caption


def _main_groups(groups: list[Group]) -> list[Group]:
    """One group per (run, mode): the run's most common length (the sweep's 128 if present)."""
    by_key = defaultdict(list)
    for g in groups:
        by_key[(g.run_id, g.mode, g.backend)].append(g)
    chosen = []
    for gs in by_key.values():
        lengths = [g.length for g in gs]
        pick = 128 if 128 in lengths else max(lengths)
        chosen.extend(g for g in gs if g.length == pick)
    return chosen


def _plot_speedup(plt, rows, groups, out):
    main = [g for g in _main_groups(groups) if len(g.methods) > 1]
    if not main:
        return None
    height = max(len(g.methods) for g in main) * 0.35 + 1.2
    fig, axes = plt.subplots(1, len(main), figsize=(6 * len(main), height), squeeze=False)
    for ax, group in zip(axes[0], main):
        names = group.methods[::-1]
        for y, m in enumerate(names):
            per_prompt = list(group.speedup(m).values())
            if not per_prompt:
                continue
            med = statistics.median(per_prompt)
            color = "tab:orange" if group.row(m).get("engine") == "csd" else "tab:blue"
            ax.barh(y, med, color=color, alpha=0.7)
            ax.plot(per_prompt, [y] * len(per_prompt), "k.", markersize=4)
            ax.errorbar(med, y, xerr=[[med - min(per_prompt)], [max(per_prompt) - med]], color="k", capsize=3)
        ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel(f"speedup over {group.baseline} (measured; dots: prompts)")
        ax.set_title(group.label)
    return _save(
        fig,
        out,
        "speedup.png",
        "Measured speedup per method (median, min–max across prompts; blue: transformers, orange: ours)",
    )


def _plot_swi(plt, rows, groups, out):
    main = [g for g in _main_groups(groups) if g.mode.startswith("greedy")]
    main = [g for g in main if any(g.summary(m)["swi"] is not None for m in g.methods)]
    if not main:
        return None
    group = main[0]
    names = group.methods
    measured = [group.summary(m)["speedup"] or 0 for m in names]
    swi = [group.summary(m)["swi"] or 0 for m in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], measured, width=0.4, label="measured speedup (wall clock)")
    ax.bar(
        [i + 0.2 for i in x],
        swi,
        width=0.4,
        label="SWI (cost model: forward calls × parameters)",
        hatch="//",
        alpha=0.7,
    )
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(list(x), names, rotation=35, ha="right")
    ax.set_ylabel(f"× over {group.baseline}")
    ax.set_title(f"Measured speed vs the paper's cost model ({group.label})")
    ax.legend()
    return _save(fig, out, "swi.png", "Standardized walltime improvement (cost model) next to measured speedup")


def _plot_acceptance(plt, rows, groups, out):
    """The paper's Figure 2: target acceptance by draft position, one curve per single drafter."""
    curves = defaultdict(lambda: ([], []))  # (decoding, method) -> (drafted, accepted) by position
    labels = {}
    for r in rows:
        if num_drafting_levels(r) != 1 or r.get("stop") != "fixed":
            continue
        review = (r.get("levels") or [{}])[0].get("review") or {}
        drafted, accepted = curves[(r["decoding"], r["method"])]
        for i, (d, a) in enumerate(zip(review.get("drafted_by_position", []), review.get("accepted_by_position", []))):
            if i >= len(drafted):
                drafted.append(0)
                accepted.append(0)
            drafted[i] += d
            accepted[i] += a
        config = r.get("config") or {}
        labels[r["method"]] = (config.get("drafters") or ["MaG"])[0]
    if not curves:
        return None
    decodings = sorted({d for d, _ in curves})
    fig, axes = plt.subplots(1, len(decodings), figsize=(6 * len(decodings), 4), squeeze=False)
    for ax, decoding in zip(axes[0], decodings):
        for (d, method), (drafted, accepted) in sorted(curves.items()):
            if d != decoding:
                continue
            rate = [a / n if n else None for a, n in zip(accepted, drafted)]
            xs = [i + 1 for i, v in enumerate(rate) if v is not None]
            ax.plot(xs, [v for v in rate if v is not None], marker="o", label=f"{labels[method]} ({method})")
        ax.set_xlabel("draft position")
        ax.set_ylabel("fraction of drafts accepted up to this position")
        ax.set_ylim(0, 1)
        ax.set_title(f"Acceptance by draft position ({decoding})")
        ax.legend()
    return _save(
        fig,
        out,
        "acceptance_by_position.png",
        "Acceptance rate by draft position for each drafter (the paper's Figure 2)",
    )


def _plot_length(plt, rows, groups, out):
    by_run_mode = defaultdict(list)
    for g in groups:
        by_run_mode[(g.run_id, g.mode, g.backend)].append(g)
    sweeps = [sorted(gs, key=lambda g: g.length) for gs in by_run_mode.values() if len(gs) >= 2]
    if not sweeps:
        return None
    sweep = sweeps[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = list(dict.fromkeys(m for g in sweep for m in g.methods))
    for m in methods:
        xs, tps, sp = [], [], []
        for g in sweep:
            if m in g.by_method:
                xs.append(g.length)
                tps.append(_median(g.tokens_per_second(m).values()))
                sp.append(_median(g.speedup(m).values()))
        style = "-" if sweep[0].row(m).get("engine") == "csd" else "--"
        ax1.plot(xs, tps, style, marker="o", label=m)
        ax2.plot(xs, sp, style, marker="o", label=m)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks([g.length for g in sweep], [str(g.length) for g in sweep])
        ax.set_xlabel("new tokens")
    ax1.set_ylabel("tokens/s (median over prompts)")
    ax2.set_ylabel(f"speedup over {sweep[0].baseline}")
    ax1.set_title(f"Tokens/s vs generation length ({sweep[0].mode})")
    ax2.set_title("Speedup vs generation length")
    ax2.legend(fontsize=8)
    return _save(
        fig, out, "length.png", "Tokens/s against generation length (the paper's Table 4; dashed: transformers)"
    )


def _plot_kmatrix(plt, rows, groups, out):
    """Speedup against K[0][0] for methods that differ only in that entry."""
    best = None
    for g in _main_groups(groups):
        families = defaultdict(dict)
        for m in g.methods:
            config = g.row(m).get("config") or {}
            k = config.get("k_matrix")
            if g.row(m).get("engine") != "csd" or not k:
                continue
            rest = json.dumps(
                [
                    config.get("drafters"),
                    config.get("mag"),
                    config.get("lenience"),
                    config.get("adaptive"),
                    [row[1:] for row in k[:1]] + k[1:],
                ]
            )
            families[rest][k[0][0]] = m
        for members in families.values():
            if len(members) >= 3 and (best is None or len(members) > len(best[1])):
                best = (g, members)
    if best is None:
        return None
    group, members = best
    ks = sorted(members)
    fig, ax = plt.subplots(figsize=(6, 4))
    med = [_median(group.speedup(members[k]).values()) for k in ks]
    lo = [min(group.speedup(members[k]).values()) for k in ks]
    hi = [max(group.speedup(members[k]).values()) for k in ks]
    ax.plot(ks, med, marker="o", label="measured speedup (median)")
    ax.fill_between(ks, lo, hi, alpha=0.2, label="min–max across prompts")
    swi = [_median(r.get("swi") for r in group.by_method[members[k]]) for k in ks]
    ax.plot(ks, swi, linestyle=":", marker="s", label="SWI (cost model)")
    ax.set_xlabel("K[0][0] (tokens the largest drafter drafts for the target)")
    ax.set_ylabel(f"× over {group.baseline}")
    ax.set_title(f"Sensitivity to the first K-matrix entry ({group.label})")
    ax.legend()
    return _save(fig, out, "kmatrix.png", "Sensitivity to the first K-matrix entry (the paper's ablation)")


def _plot_ablation(plt, rows, groups, out):
    for g in _main_groups(groups):
        labelled = [(m, g.row(m).get("ablation")) for m in g.methods if g.row(m).get("ablation")]
        if len(labelled) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(labelled) + 1.2))
        names = [f"{label} ({m})" for m, label in labelled][::-1]
        values = [_median(g.speedup(m).values()) or 0 for m, _ in labelled][::-1]
        swi = [_median(r.get("swi") for r in g.by_method[m]) or 0 for m, _ in labelled][::-1]
        ys = range(len(names))
        ax.barh([y + 0.2 for y in ys], values, height=0.4, label="measured speedup")
        ax.barh([y - 0.2 for y in ys], swi, height=0.4, label="SWI (cost model)", hatch="//", alpha=0.6)
        ax.set_yticks(list(ys), names)
        ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel(f"× over {g.baseline}")
        ax.set_title(f"Removing each cascade ({g.label})")
        ax.legend(fontsize=8)
        return _save(fig, out, "ablation.png", "Effect of removing each cascade (the paper's ablation)")
    return None


def _plot_memory(plt, rows, groups, out):
    main = _main_groups(groups)
    if not main:
        return None
    group = main[0]
    names = group.methods
    summaries = [group.summary(m) for m in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 4))
    x = list(range(len(names)))
    weights = [s["weights_mib"] for s in summaries]
    runner = [s["runner_mib"] for s in summaries]
    grow = [s["peak_increase_mib"] for s in summaries]
    ax.bar(x, weights, label="weights of the models it uses")
    ax.bar(x, runner, bottom=weights, label="our runner's fused weights and KV buffers")
    ax.bar(x, grow, bottom=[w + r for w, r in zip(weights, runner)], label="peak growth during its generations")
    kind = summaries[0]["memory_kind"]
    ax.set_ylabel("MiB")
    ax.set_xticks(x, names, rotation=35, ha="right")
    ax.set_title(
        f"Memory per method ({'CUDA max allocated' if kind == 'cuda_max_allocated' else 'RSS'}; {group.label})"
    )
    ax.legend()
    return _save(fig, out, "memory.png", "Memory per method")


def _plot_trees(plt, rows, groups, out):
    """Accepted length against tree size: each tree method (large: all its generations pooled,
    per target step; small: each generation, per tree), and as an x the same method with chains
    (pooled per target step) at its chain's size."""
    stats = tree_stats(rows)
    if not stats:
        return None
    decodings = sorted({decoding for _, decoding, _ in stats})
    fig, axes = plt.subplots(1, len(decodings), figsize=(6 * len(decodings), 4.5), squeeze=False)
    for ax, decoding in zip(axes[0], decodings):
        for index, ((run_id, d, method), t) in enumerate(sorted(stats.items())):
            if d != decoding:
                continue
            color = f"C{index % 10}"
            own = _fixed_rows(rows, run_id, decoding, method)
            sizes, paths = [], []
            for r in own:
                tree = ((r.get("levels") or [{}])[0] or {}).get("tree")
                if tree and tree.get("num_trees"):
                    sizes.append(tree["num_nodes"] / tree["num_trees"])
                    paths.append(tree["num_accepted"] / tree["num_trees"])
            ax.scatter(sizes, paths, s=8, alpha=0.35, color=color)
            n = max(t["num_trees"], 1)
            pooled = _accepted_per_step(own)  # over every target step, as for the chain below
            if pooled is not None:
                ax.scatter([t["num_nodes"] / n], [pooled], s=70, color=color, label=method)
            base, _, backend = method.partition("@")
            if "-tree" in base:
                twin = base.split("-tree")[0] + (f"@{backend}" if backend else "")
                accepted = _accepted_per_step(_fixed_rows(rows, run_id, decoding, twin))
                if accepted is not None:
                    ax.scatter([t["num_chain_nodes"] / n], [accepted], s=70, marker="x", color=color)
        ax.set_xlabel("draft nodes verified per speculative step (mean)")
        ax.set_ylabel("accepted draft tokens per step (mean)")
        ax.set_title(f"Accepted length vs tree size, {decoding} (x: with chains)")
        ax.legend(fontsize=8)
    return _save(fig, out, "trees.png", "Accepted length against tree size (token trees vs chains)")


def _fixed_rows(rows: list[dict], run_id: str, decoding: str, method: str) -> list[dict]:
    return [
        r
        for r in rows
        if (r["run_id"], r["decoding"], r["method"]) == (run_id, decoding, method) and r.get("stop") == "fixed"
    ]


def _accepted_per_step(rows: list[dict]) -> float | None:
    """Accepted draft tokens per target step, all generations pooled (None without step counts)."""
    steps = sum((r.get("engine_stats") or {}).get("num_target_steps") or 0 for r in rows)
    return sum(r["num_new_tokens"] for r in rows) / steps - 1 if steps else None
