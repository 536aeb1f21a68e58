"""``csd bench`` end to end on tiny in-process models: suites resolve, every method runs, the JSON
lines carry what the report needs, the report and the profile are written. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from csdrafting.bench.report import load_rows, write_report
from csdrafting.bench.suite import build_suite, load_suite_file, parse_method_flag
from csdrafting.cli import main
from csdrafting.errors import ConfigError
from csdrafting.prompts import DEFAULT_PROMPTS_FILE, load_prompts
from tiny import tiny_llama

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "models" / "pycode-22m"
VOCAB = 8192  # the pycode tokenizer's

ROW_FIELDS = {
    "schema", "run_id", "suite", "baseline", "env", "method", "engine", "spec", "config", "models",
    "prompt_id", "trial", "mode", "decoding", "stop", "max_new_tokens", "sampling", "num_new_tokens",
    "finish_reason", "wall_seconds", "tokens_per_second", "prefill_seconds", "decode_seconds",
    "tokens_per_target_step", "acceptance_rate", "num_forwards", "levels", "cost_target_forwards", "swi",
    "matches_baseline", "first_mismatch", "memory", "weights_bytes", "runner_bytes",
}  # fmt: skip
ENV_FIELDS = {"python", "torch", "transformers", "csdrafting", "device", "device_name", "dtype", "num_threads"}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A tiny target, a drafter with the target's weights (always agrees) and a random one,
    saved as model folders with the pycode tokenizer, float64 so greedy has no near-ties."""
    root = tmp_path_factory.mktemp("family")
    folders = {}
    for name, seed in (("tiny-target", 1), ("tiny-copy", 1), ("tiny-rand", 2)):
        model = tiny_llama(seed, vocab_size=VOCAB, hidden_size=32, num_heads=4, num_kv_heads=2, eos_token_id=0,
                           max_positions=512)  # fmt: skip
        model.generation_config.pad_token_id = 0
        folder = root / name
        model.save_pretrained(folder)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TOKENIZER_DIR / file, folder / file)
        folders[name] = folder
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "a", "text": "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"})
        + "\n"
        + json.dumps({"id": "b", "text": "import os\n\nfor name in os.listdir('.'):\n    print(name)\n"})
        + "\n"
    )
    folders["prompts"] = prompts
    return folders


def _model_args(family) -> list[str]:
    return [
        "--target", str(family["tiny-target"]),
        "--drafter", str(family["tiny-copy"]),
        "--drafter", str(family["tiny-rand"]),
        "--dtype", "float64",
        "--prompts", str(family["prompts"]),
        "--no-progress",
    ]  # fmt: skip


def test_committed_prompt_set_loads():
    prompts = load_prompts(DEFAULT_PROMPTS_FILE)
    assert 8 <= len(prompts) <= 12
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert all(1200 <= len(p["text"]) <= 2000 and p.get("python") for p in prompts)


def test_suite_templates_and_derived_methods():
    data = load_suite_file(None)
    suite = build_suite(data, "default", ["pycode-5m", "pycode-1m"])
    names = [m.name for m in suite.methods]
    assert names[0] == "hf-plain"
    for name in ("hf-assisted-pycode-5m", "hf-assisted-pycode-1m", "hf-prompt-lookup", "csd-plain",
                 "csd-sd-pycode-5m", "csd-sd-pycode-1m", "csd-mag", "csd-vertical", "csd-horizontal", "csd-full"):  # fmt: skip
        assert name in names
    methods = {m.name: m for m in suite.methods}
    assert methods["csd-sd-pycode-1m"].spec["drafters"] == ["pycode-1m"]
    assert methods["csd-sd-pycode-1m"].spec["mag"] is False
    assert methods["hf-prompt-lookup"].spec["prompt_lookup_num_tokens"] == 10

    ablation = {m.name: m.spec for m in build_suite(data, "ablation", ["pycode-5m", "pycode-1m"]).methods}
    full = ablation["csd-full"]["k_matrix"]  # pycode-1m + MaG: a 2x2 matrix
    assert ablation["csd-full"]["drafters"] == ["pycode-1m"] and len(full) == 2  # "smallest"
    assert ablation["csd-no-mag"]["mag"] is False
    assert ablation["csd-no-mag"]["k_matrix"] == [[full[0][0]]]  # MaG's row and column dropped
    assert ablation["csd-no-mag-first"]["mag_first"] is None and ablation["csd-full"]["mag_first"] is not None
    assert ablation["csd-no-mag-first"]["k_matrix"] == full
    sweep = {n: s["k_matrix"][0][0] for n, s in ablation.items() if n.startswith("csd-full-k00-")}
    assert len(sweep) >= 3 and full[0][0] not in sweep.values()  # the copy of csd-full is dropped
    assert all(s["k_matrix"][1:] == full[1:] for n, s in ablation.items() if n.startswith("csd-full-k00-"))


def test_method_flag_overrides_and_errors():
    data = load_suite_file(None)
    extra = [parse_method_flag('csd-full={"k_matrix": "3,1,4;1,3;3"}'), parse_method_flag('x={"lenience": 2}')]
    suite = build_suite(
        data, "default", ["pycode-5m", "pycode-1m"], extra_methods=extra, only=["csd-full", "x"], backends=["torch"]
    )
    methods = {m.name: m.spec for m in suite.methods}
    assert set(methods) == {"hf-plain", "csd-full", "x"}  # the baseline is always kept
    assert methods["csd-full"]["k_matrix"] == "3,1,4;1,3;3"
    assert methods["x"]["drafters"] == ["pycode-5m", "pycode-1m"] and methods["x"]["lenience"] == 2
    with pytest.raises(ConfigError, match="NAME=JSON"):
        parse_method_flag("no-equals-sign")
    with pytest.raises(ConfigError, match="not defined"):
        build_suite({"methods": {}, "suites": {"s": {"methods": ["nope"]}}}, "s", [])
    with pytest.raises(ConfigError, match="unknown keys"):
        build_suite(data, "default", [], extra_methods=[("y", {"k_matrx": [[1]]})])
    with pytest.raises(ConfigError, match="no suite"):
        build_suite(data, "missing", [])


def test_bench_end_to_end(family, tmp_path, capsys):
    results = tmp_path / "smoke.jsonl"
    rc = main(["bench", *_model_args(family), "--suite", "smoke", "--output", str(results), "--seed", "3"])
    assert rc == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assert methods[0] == "hf-plain" and "hf-assisted-tiny-rand" in methods and "csd-full" in methods
    assert len(rows) == len(methods) * 2 * 3  # methods x prompts x modes (x 1 length x 1 trial)
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert ENV_FIELDS <= set(row["env"])
        assert row["tokens_per_second"] > 0 and row["wall_seconds"] > 0
        assert row["memory"]["peak_bytes"] > 0
        assert row["levels"][0]["num_forwards"] > 0
        if row["stop"] == "fixed":
            assert row["num_new_tokens"] == 8 and row["finish_reason"] == "length"
        if row["decoding"] == "greedy":
            assert row["matches_baseline"] is True, (row["method"], row["prompt_id"], row["first_mismatch"])
        else:
            assert row["matches_baseline"] is None and row["sampling"]["temperature"] == 0.7
    by = {(r["method"], r["prompt_id"], r["mode"]): r for r in rows}
    copy = by[("csd-sd-tiny-copy", "a", "greedy-fixed")]
    assert copy["acceptance_rate"] == 1.0  # a drafter with the target's weights always agrees
    assert copy["num_forwards"]["tiny-copy"] > 0 and copy["swi"] is not None
    assert by[("hf-plain", "a", "greedy-fixed")]["swi"] == pytest.approx(1.0)
    assert by[("hf-assisted-tiny-copy", "a", "greedy-fixed")]["num_forwards"]["tiny-copy"] > 0
    full = by[("csd-full", "a", "greedy-fixed")]
    assert full["config"]["k_matrix"] == full["spec"]["k_matrix"] and full["ablation"]
    assert "greedy-fixed, 8 new tokens" in capsys.readouterr().out

    # the paper's other views: a length sweep and the ablation suite, then one report over all
    lengths = tmp_path / "length.jsonl"
    assert main(["bench", *_model_args(family), "--suite", "length", "--only", "csd-plain,csd-full",
                 "--lengths", "4,8", "--num-prompts", "1", "--output", str(lengths)]) == 0  # fmt: skip
    ablation = tmp_path / "ablation.jsonl"
    assert main(["bench", *_model_args(family), "--suite", "ablation", "--lengths", "4", "--num-prompts", "1",
                 "--warmup", "0", "--output", str(ablation)]) == 0  # fmt: skip
    out = tmp_path / "report"
    assert main(["bench", "report", str(results), str(lengths), str(ablation), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Acceptance criteria" in report and "cost model" in report
    for method in methods:
        assert f"| {method} |" in report or f"| **{method}** |" in report
    for plot in ("speedup", "swi", "acceptance_by_position", "length", "kmatrix", "ablation", "memory"):
        assert (out / f"{plot}.png").stat().st_size > 0, plot
        assert f"({plot}.png)" in report


def test_cascade_config_file_becomes_a_method(family, tmp_path):
    config = tmp_path / "tuned.json"
    # drafter_window: the bench wraps drafters through the configuration field, as the library does
    spec = {"drafters": [str(family["tiny-copy"])], "k_matrix": [[3, 2], [0, 2]], "drafter_window": 4}
    config.write_text(json.dumps(spec))
    results = tmp_path / "config.jsonl"
    rc = main(["bench", *_model_args(family), "--config", str(config), "--suite", "smoke", "--only", "csd-config",
               "--modes", "greedy-fixed", "--num-prompts", "1", "--warmup", "0", "--output", str(results),
               "--backends", "torch"])  # fmt: skip
    assert rc == 0
    rows = {r["method"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(rows) == {"hf-plain", "csd-config"}
    assert rows["csd-config"]["config"]["drafters"] == ["tiny-copy"]
    assert rows["csd-config"]["config"]["k_matrix"] == [[3, 2], [0, 2]]
    assert rows["csd-config"]["config"]["drafter_window"] == 4
    assert rows["csd-config"]["matches_baseline"] is True


def test_tree_methods_report_trees_and_plot_them(family, tmp_path):
    """The trees suite's methods run (greedy identity holds), the report gets its tree table, and
    the accepted-length-vs-tree-size plot is drawn."""
    results = tmp_path / "trees.jsonl"
    rc = main(["bench", *_model_args(family), "--suite", "trees", "--only", "csd-full,csd-full-tree",
               "--modes", "greedy-fixed,sampling-fixed", "--lengths", "12", "--num-prompts", "1", "--warmup", "0",
               "--output", str(results), "--report", str(tmp_path / "report")])  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    trees = [r for r in rows if r["method"] == "csd-full-tree"]
    assert trees and all(r["config"]["tree"] and r["levels"][0]["tree"]["num_trees"] > 0 for r in trees)
    assert all(r["matches_baseline"] for r in trees if r["decoding"] == "greedy")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Token trees" in report and "| csd-full-tree | greedy |" in report
    assert (tmp_path / "report" / "trees.png").is_file()


def test_report_rejects_foreign_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    with pytest.raises(ConfigError, match="not a csd bench row"):
        load_rows([bad])
    assert main(["bench", "report", str(bad), "--out", str(tmp_path / "r")]) == 2
    with pytest.raises(ConfigError):
        write_report(load_rows([tmp_path / "missing.jsonl"]), tmp_path)


def test_profile(family, tmp_path, capsys):
    args = [a for a in _model_args(family) if a != "--no-progress"]
    rc = main(["bench", "profile", *args, "--tokens", "1,3", "--repeats", "2", "--max-new-tokens", "6",
               "--only", "csd-full,csd-plain", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    assert {(r["level"], r["new_tokens"]) for r in result["per_forward"]} == {
        (n, k) for n in ("tiny-target", "tiny-copy", "tiny-rand") for k in (1, 3)
    }
    for r in result["per_forward"]:
        assert r["hf_forward_ms"] > 0 and r["backend_forward_ms"] > 0 and r["next_token_logits_ms"] > 0
    # the lean runner's kernel per weight, and each forward split into output layer, projections,
    # attention and the rest (small ops and Python)
    assert {(r["level"], r["weight"]) for r in result["kernels"]} == {
        (n, w) for n in ("tiny-target", "tiny-copy", "tiny-rand") for w in ("qkv", "o", "gate_up", "down", "head")
    }
    forced = os.environ["CSDRAFTING_KERNEL"] != "auto"  # linear unless the run sets another (conftest)
    assert all(r["forced"] == forced and len(r["kernels"]) == 4 for r in result["kernels"])
    assert {(r["level"], r["new_tokens"]) for r in result["forward_split"]} == {
        (n, k) for n in ("tiny-target", "tiny-copy", "tiny-rand") for k in (1, 3)
    }
    for r in result["forward_split"]:
        assert r["forward_ms"] > 0 and r["projections_ms"] > 0 and r["attention_ms"] > 0 and r["num_ops"] > 20
    generation = {g["method"]: g for g in result["in_generation"]}
    assert set(generation) == {"csd-full", "csd-plain"}
    assert generation["csd-full"]["mag_calls"] > 0
    assert all(lv["calls"] > 0 for lv in generation["csd-full"]["levels"])
    out = capsys.readouterr().out
    assert "runner overhead" in out and "kernel per weight" in out and "where a forward goes" in out


# -- llama.cpp backend -------------------------------------------------------------------------

HAS_LLAMA = all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "gguf"))
needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python / gguf not installed")


def test_suite_backends():
    data = load_suite_file(None)
    both = build_suite(data, "default", ["pycode-5m", "pycode-1m"], backends=["torch", "llama.cpp"])
    methods = {m.name: m for m in both.methods}
    assert methods["llama-plain"].backend == "llama.cpp" and methods["hf-plain"].backend == "torch"
    assert methods["llama-prompt-lookup"].spec["prompt_lookup_num_tokens"] == 10
    # every csd method runs on both backends; each is compared with its own backend's plain decoding
    assert methods["csd-full"].spec["backend"] == "torch"
    assert methods["csd-full@llama.cpp"].spec["backend"] == "llama.cpp"
    assert methods["csd-full@llama.cpp"].spec["k_matrix"] == methods["csd-full"].spec["k_matrix"]
    assert both.baseline_of(methods["csd-full@llama.cpp"]) == "llama-plain"
    assert both.baseline_of(methods["csd-full"]) == both.baseline == "hf-plain"
    torch_only = {m.name for m in build_suite(data, "default", ["pycode-1m"], backends=["torch"]).methods}
    assert not any("llama" in name for name in torch_only) and "hf-plain" in torch_only
    llama_only = build_suite(data, "llama", ["pycode-1m"])  # the suite's own backends: llama.cpp
    assert llama_only.baseline == "llama-plain" and all(m.backend == "llama.cpp" for m in llama_only.methods)
    # --only keeps both baselines and names a method on every backend; a pinned method runs only there
    full = build_suite(data, "default", ["pycode-1m"], only=["csd-full"], backends=["torch", "llama.cpp"])
    assert [m.name for m in full.methods] == ["hf-plain", "llama-plain", "csd-full", "csd-full@llama.cpp"]
    pinned = ("x", {"drafters": [], "k_matrix": [[2]], "backend": "llama.cpp"})
    only = build_suite(data, "default", [], extra_methods=[pinned], only=["x"], backends=["torch", "llama.cpp"])
    assert [m.name for m in only.methods] == ["hf-plain", "llama-plain", "x"]
    with pytest.raises(ConfigError, match="unknown backend"):
        build_suite(data, "default", [], backends=["onnx"])
    with pytest.raises(ConfigError, match="backend must be one of"):
        build_suite(data, "default", [], extra_methods=[("y", {"backend": "onnx"})])
    with pytest.raises(ConfigError, match="unknown keys"):
        build_suite(data, "default", [], extra_methods=[("z", {"engine": "llama.cpp", "assistant": "a"})])


def test_llama_backend_needs_the_extra(family, monkeypatch, capsys):
    import csdrafting.bench.llamacpp_peers as peers

    monkeypatch.setattr(peers, "llama_extra_available", lambda: False)
    assert main(["bench", *_model_args(family), "--backends", "llama.cpp", "--suite", "smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[llama]'" in err[0]


@needs_llama
def test_bench_llama_backend(family, tmp_path, capsys):
    """llama.cpp peers and our methods on llama.cpp levels: greedy rows equal llama.cpp's plain
    decoding, GGUFs convert once into the cache, the report checks issue #9's bars."""
    from csdrafting.gguf_cache import cached_gguf

    gguf_dir = tmp_path / "gguf"
    results = tmp_path / "llama.jsonl"
    rc = main(["bench", *_model_args(family), "--backends", "llama.cpp", "--suite", "smoke", "--gguf-dir",
               str(gguf_dir), "--output", str(results), "--report", str(tmp_path / "report")])  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assert methods[:2] == ["llama-plain", "llama-prompt-lookup"] and "csd-full@llama.cpp" in methods
    assert not any(r["backend"] == "torch" for r in rows)
    for row in rows:
        assert ROW_FIELDS <= set(row) and row["baseline"] == "llama-plain"
        assert row["levels"][0]["num_forwards"] > 0 and row["tokens_per_second"] > 0
        if row["stop"] == "fixed":
            assert row["num_new_tokens"] == 8
        if row["decoding"] == "greedy":
            assert row["matches_baseline"] is True, (row["method"], row["prompt_id"], row["first_mismatch"])
    by = {(r["method"], r["prompt_id"], r["mode"]): r for r in rows}
    copy = by[("csd-sd-tiny-copy@llama.cpp", "a", "greedy-fixed")]
    # the target's weights in q8_0: mostly agrees (not always: quantized); the drafter ran
    assert copy["acceptance_rate"] >= 0.5 and copy["num_forwards"]["tiny-copy"] > 0
    lookup = by[("llama-prompt-lookup", "a", "greedy-fixed")]
    assert lookup["config"]["prompt_lookup_num_tokens"] == 10
    # target f32, drafters q8_0 by default, each converted once
    assert sorted(p.name.split("-")[1] for p in gguf_dir.glob("*.gguf")) == ["copy", "rand", "target"]
    assert any(p.name.startswith("tiny-target-f32-") for p in gguf_dir.glob("*.gguf"))
    assert any(p.name.startswith("tiny-copy-q8_0-") for p in gguf_dir.glob("*.gguf"))
    report = (tmp_path / "report" / "report.md").read_text()
    assert "on llama.cpp" in report and "vs MaG alone" in report and "token-identical to llama-plain" in report

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr("csdrafting.convert.convert", no_conversion)
    try:
        path = cached_gguf(family["tiny-target"], "f32", gguf_dir)
    finally:
        monkeypatch.undo()
    assert path.is_file() and path.parent == gguf_dir


@needs_llama
def test_profile_llama_backend(family, tmp_path, capsys):
    args = [a for a in _model_args(family) if a != "--no-progress"]
    rc = main(["bench", "profile", *args, "--backends", "llama.cpp", "--tokens", "1,3", "--repeats", "2",
               "--max-new-tokens", "6", "--only", "csd-full,csd-plain", "--gguf-dir", str(tmp_path / "gguf"),
               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    assert {(r["level"], r["new_tokens"]) for r in result["per_forward"]} == {
        (n, k) for n in ("tiny-target", "tiny-copy", "tiny-rand") for k in (1, 3)
    }
    for r in result["per_forward"]:
        assert r["runner"] == "llama.cpp" and r["hf_forward_ms"] is None
        # the library's call sits inside the runner's forward, which sits inside the level's call
        assert 0 < r["llama_decode_ms"] <= r["median_ms"]["backend_forward"] and r["next_token_logits_ms"] > 0
    assert not result["kernels"] and not result["forward_split"]  # the torch lean runner's views only
    generation = {g["method"]: g for g in result["in_generation"]}
    assert set(generation) == {"csd-full@llama.cpp", "csd-plain@llama.cpp"}
    assert all(lv["calls"] > 0 for lv in generation["csd-full@llama.cpp"]["levels"])
    assert "llama_decode" in capsys.readouterr().out
