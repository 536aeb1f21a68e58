"""The lean runner's matmul kernels (``levels/kernels.py``): every kernel is exact, the choice
rule, the cache file, and weights held once.

Every kernel, not only the one this machine would pick, must decode token for token like
transformers, keep the KV-cache invariants and sample the target's distribution. ``linear`` and
``transposed`` run in float64 like the other identity tests; oneDNN has no float64, so
``onednn`` and ``packed`` run in float32 on the same tiny models (peaky logits: no near-ties)
and are compared with transformers in float32 and with the float64 logits.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
import torch

from csdrafting import CascadeConfig, ConfigError
from csdrafting.config import KERNELS
from csdrafting.edge import config_defaults
from csdrafting.levels import kernels
from csdrafting.levels.lean_llama import LlamaRunner
from csdrafting.levels.memo import PrefixMemoLevel
from csdrafting.sampling import SamplingParams, warp
from test_cache_and_stopping import drive_level
from tiny import chisquare_pvalue, copy_model, hf_greedy, make_cascade, noisy_copy, tiny_llama

PROMPT = [5, 17, 33, 2, 81, 40, 7]
NUM_NEW = 30
CPU = torch.device("cpu")
ONEDNN = kernels.onednn_available(CPU, torch.float32)
ALL_KERNELS = [
    pytest.param(name, marks=pytest.mark.skipif(needs_onednn and not ONEDNN, reason="no oneDNN"))
    for name, needs_onednn in (("linear", False), ("transposed", False), ("onednn", True), ("packed", True))
]


def dtype_of(kernel: str) -> torch.dtype:
    return torch.float64 if kernel in ("linear", "transposed") else torch.float32


def lean_level(name: str, model, kernel: str) -> PrefixMemoLevel:
    """A level on the lean runner with ``kernel`` everywhere, over its own copy of ``model`` (so
    ``packed`` can take the weights over without breaking the reference model)."""
    clone = copy_model(model, model.dtype)
    return PrefixMemoLevel(name, LlamaRunner(clone, kernel=kernel, own_weights=True))


@pytest.fixture(scope="module")
def family():
    """Per dtype: target, a copy, two noisy copies, and transformers' greedy reference."""
    out = {}
    for dtype in (torch.float64, torch.float32):
        target = tiny_llama(0, dtype=dtype)
        out[dtype] = {
            "target": target,
            "copy": copy_model(target, dtype),
            "noisy": noisy_copy(target, 1, 0.02).to(dtype),
            "noisier": noisy_copy(target, 2, 0.1).to(dtype),
            "reference": hf_greedy(target, PROMPT, NUM_NEW),
        }
    # float32 decodes like float64 on these models, so both kernels' outputs are checked against one truth
    assert out[torch.float32]["reference"] == out[torch.float64]["reference"]
    return out


# -- every kernel is exact -----------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_every_kernel_decodes_like_transformers(family, kernel):
    models = family[dtype_of(kernel)]
    target = lean_level("target", models["target"], kernel)
    assert {c.layout for c in target.runner.choices.values()} == {kernels.KERNELS[kernel].layout}
    plain = make_cascade(target, [], mag=False, eos_token_ids=[]).generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert plain.token_ids == models["reference"]
    assert plain.stats.levels[0].num_forwards == NUM_NEW
    # a full cascade: the target verifies 2..6 tokens at once, drafters review each other
    drafters = [lean_level("drafter1", models["noisy"], kernel), lean_level("drafter2", models["noisier"], kernel)]
    target.reset()
    cascade = make_cascade(target, drafters, mag=True, k_matrix=[[2, 1, 3], [0, 1, 2], [0, 0, 3]], eos_token_ids=[])
    result = cascade.generate(PROMPT, NUM_NEW, ignore_eos=True)
    assert result.token_ids == models["reference"]
    review = result.stats.levels[0].review
    assert 0 < review.num_accepted < review.num_drafted
    assert result.stats.levels[1].review.num_drafted > 0  # the vertical cascade ran


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_every_kernel_computes_transformers_logits(family, kernel):
    """Against the float64 logits: float rounding of the kernel's dtype, nothing more; at every
    bucket of token counts (1, 2-4, 5-16, 17+)."""
    models = family[dtype_of(kernel)]
    level = lean_level("t", models["target"], kernel)
    ids = list(range(3, 43))
    with torch.no_grad():
        exact = family[torch.float64]["target"](torch.tensor([ids])).logits[0]  # (T, V)
    tolerance = 1e-9 if dtype_of(kernel) == torch.float64 else 1e-4
    start = 0
    for num_new in (20, 1, 3, 9, 7):  # a prompt, then buckets 1, 2-4, 5-16, 5-16
        logits = level.runner.forward(ids[start : start + num_new], start, num_new)
        torch.testing.assert_close(logits.double(), exact[start : start + num_new], rtol=0, atol=tolerance)
        start += num_new


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_every_kernel_keeps_the_cache_invariants(family, kernel):
    models = family[dtype_of(kernel)]
    atol = 1e-9 if dtype_of(kernel) == torch.float64 else 1e-4
    level = lean_level("t", models["target"], kernel)
    moves = drive_level(level, models["target"], seed=1, atol=atol, kernel=kernel)  # fresh forwards: same kernel
    assert min(moves[m] for m in ("extend", "rollback", "diverge", "prefill")) > 0, moves


def model_joint(model, prompt: list[int], num_tokens: int, params: SamplingParams) -> dict:
    """{(t1, .., tn): probability} under transformers' float64 logits, warped."""
    vocab = model.config.vocab_size
    out = {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=num_tokens):
            logits = model(torch.tensor([prompt + list(seq[:-1])])).logits[0, len(prompt) - 1 :]  # (n, V)
            probs = warp(logits, params)
            out[seq] = float(torch.prod(probs[torch.arange(num_tokens), torch.tensor(seq)]))
    return out


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_every_kernel_samples_the_target_distribution(kernel):
    """A cascade (drafter + MaG) over lean levels running ``kernel``; 3 tokens over a 4-token
    vocabulary, chi-squared against the float64 model's exact joint law."""
    vocab, prompt, params = 4, [0, 1, 2, 3, 0, 1], SamplingParams(1.0)
    reference = tiny_llama(5, vocab_size=vocab, hidden_size=16, init=0.1)
    dtype = dtype_of(kernel)
    target = lean_level("target", copy_model(reference, dtype), kernel)
    drafter = lean_level("drafter1", tiny_llama(6, vocab_size=vocab, hidden_size=16, init=0.1, dtype=dtype), kernel)
    cascade = make_cascade(target, [drafter], mag=True, k_matrix=[[1, 1], [0, 1]], eos_token_ids=[])
    counts, drafted, accepted = Counter(), 0, 0
    for seed in range(1500):
        result = cascade.generate(prompt, 3, temperature=1.0, seed=seed, ignore_eos=True)
        counts[tuple(result.token_ids)] += 1
        drafted += result.stats.levels[0].review.num_drafted
        accepted += result.stats.levels[0].review.num_accepted
    expected = model_joint(reference, prompt, 3, params)
    assert sum(p > 0.01 for p in expected.values()) >= 6  # not degenerate: a wrong law would show
    assert 0 < accepted < drafted
    assert chisquare_pvalue(counts, expected) > 1e-3


# -- the choice rule ---------------------------------------------------------------------------


def times(**per_kernel) -> dict:
    """bucket -> kernel -> ms, each kernel given as its four bucket times."""
    return {b: {k: v[i] for k, v in per_kernel.items()} for i, b in enumerate(kernels.BUCKETS)}


def test_the_layout_minimises_the_expected_time_and_buckets_pick_within_it():
    measured = times(
        linear=(1.0, 2.0, 3.0, 9.0), onednn=(2.0, 1.0, 1.0, 1.0), transposed=(0.8, 4.0, 5.0, 9.0), packed=(5, 5, 5, 5)
    )
    choice = kernels.choose(measured, ["linear", "onednn", "transposed", "packed"])
    assert choice.layout == "plain"  # linear for one token, onednn above: 0.5*1 + 0.3 + 0.18 + 0.02 = 1.0
    assert choice.kernels == ("linear", "onednn", "onednn", "onednn")
    assert choice.expected_ms() == pytest.approx(1.0)
    # the same times, and a transposed kernel much faster everywhere
    measured = times(linear=(1, 1, 1, 1), onednn=(1, 1, 1, 1), transposed=(0.5, 0.5, 0.5, 0.5), packed=(9, 9, 9, 9))
    assert kernels.choose(measured, ["linear", "onednn", "transposed", "packed"]).layout == "transposed"


def test_another_layout_must_clearly_win_and_packing_must_be_allowed():
    measured = times(linear=(1, 1, 1, 1), transposed=(0.99, 0.99, 0.99, 0.99), packed=(0.1, 0.1, 0.1, 0.1))
    assert kernels.choose(measured, ["linear", "transposed"]).layout == "plain"  # 1% is noise
    assert kernels.choose(measured, ["linear", "transposed", "packed"]).layout == "packed"
    assert kernels.choose(measured, ["linear", "transposed"]).kernels == ("linear",) * 4


def test_forced_kernel_is_used_without_timing(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "calibrate", _no_calibration)
    shapes = {"qkv": (12, 8), "head": (20, 8)}
    choices = kernels.plan(shapes, CPU, torch.float64, "transposed", cache=kernels.KernelCache(tmp_path / "k.json"))
    assert {c.layout for c in choices.values()} == {"transposed"} and all(c.forced for c in choices.values())
    assert kernels.plan(shapes, CPU, torch.float64, "linear")["qkv"].kernels == ("linear",) * 4
    assert not (tmp_path / "k.json").exists()


def test_a_forced_kernel_falls_back_to_its_library_on_the_plain_layout():
    shapes, layouts = {"qkv": (12, 8), "head": (20, 8)}, {"qkv": kernels.LAYOUTS, "head": ("plain",)}
    choices = kernels.plan(shapes, CPU, torch.float64, "transposed", layouts)
    assert choices["qkv"].layout == "transposed"
    assert choices["head"].layout == "plain" and choices["head"].kernels == ("linear",) * 4
    if ONEDNN:
        choices = kernels.plan(shapes, CPU, torch.float32, "packed", layouts)
        assert choices["qkv"].layout == "packed"
        assert choices["head"].layout == "plain" and choices["head"].kernels == ("onednn",) * 4


def test_unknown_or_unavailable_kernels_are_config_errors():
    with pytest.raises(ConfigError, match="kernel must be"):
        kernels.plan({"qkv": (12, 8)}, CPU, torch.float64, "fast")
    with pytest.raises(ConfigError, match="kernel must be"):
        CascadeConfig(kernel="fastest")
    with pytest.raises(ConfigError, match="CSDRAFTING_KERNEL"):
        config_defaults({"CSDRAFTING_KERNEL": "fastest"})
    assert config_defaults({"CSDRAFTING_KERNEL": "packed"}) == {"kernel": "packed"}
    assert config_defaults({}) == {} and CascadeConfig().kernel == "auto"
    assert set(CascadeConfig.__dataclass_fields__) >= {"kernel"} and KERNELS == ("auto", *kernels.KERNELS)
    with pytest.raises(ConfigError, match="not available"):
        kernels.plan({"qkv": (12, 8)}, CPU, torch.float64, "onednn")  # oneDNN has no float64


def test_bucket_of_token_counts():
    assert [kernels.bucket_index(n) for n in (1, 2, 4, 5, 16, 17, 300)] == [0, 1, 1, 2, 2, 3, 3]


# -- timing and the cache ------------------------------------------------------------------------


def _no_calibration(*args, **kwargs):
    raise AssertionError("calibrate must not run")


def test_calibration_times_every_available_kernel_at_every_bucket():
    shapes = [(24, 16), (16, 24)]
    candidates = kernels.available_kernels(CPU, torch.float32)
    calibration = kernels.calibrate(shapes, CPU, torch.float32, candidates, max_rounds=3, min_rounds=1)
    assert calibration.reliable  # single-threaded (conftest): nothing can stall
    measured = calibration.times_ms
    assert set(measured) == {"24x16", "16x24"}
    for by_bucket in measured.values():
        assert set(by_bucket) == set(kernels.BUCKETS)
        for per_kernel in by_bucket.values():
            assert set(per_kernel) == set(candidates) and all(ms > 0 for ms in per_kernel.values())


def test_a_kernel_that_computes_something_else_is_never_timed(monkeypatch):
    wrong = kernels.Kernel("wrong", "plain", lambda x, w: x @ w.t() * 1.001, lambda x, w, r: r + x @ w.t() * 1.001)
    monkeypatch.setitem(kernels.KERNELS, "wrong", wrong)
    measured = kernels.calibrate(
        [(24, 16)], CPU, torch.float64, ["linear", "wrong"], max_rounds=2, min_rounds=1
    ).times_ms
    assert measured["24x16"]["1"]["wrong"] is None and measured["24x16"]["1"]["linear"] > 0
    assert kernels.choose(measured["24x16"], ["linear", "wrong"]).kernels == ("linear",) * 4
    # recorded as unusable: a cache holding it is complete, and the next load does not time again
    assert kernels._complete(measured["24x16"], ["linear", "wrong"])


def test_auto_times_once_then_reads_the_cache(monkeypatch, tmp_path):
    cache = kernels.KernelCache(tmp_path / "kernels.json")
    shapes = {"qkv": (24, 16), "o": (16, 16)}
    first = kernels.plan(shapes, CPU, torch.float64, "auto", cache=cache)
    data = json.loads(cache.path.read_text())
    key = kernels.machine_key(CPU, torch.float64)
    assert data["schema"] == kernels.CACHE_SCHEMA and set(data["machines"][key]) == {"24x16", "16x16"}
    assert kernels.cpu_model() in key and f"torch {torch.__version__}" in key and "float64" in key
    monkeypatch.setattr(kernels, "calibrate", _no_calibration)
    second = kernels.plan(shapes, CPU, torch.float64, "auto", cache=cache)  # the round trip
    assert second == first
    assert not any(c.forced for c in second.values())
    # another dtype (another key) is timed afresh; the file keeps both
    monkeypatch.undo()
    kernels.plan(shapes, CPU, torch.float32, "auto", cache=cache)
    assert len(json.loads(cache.path.read_text())["machines"]) == 2


@pytest.mark.parametrize(
    "content",
    ["{not json", "[1, 2]", '{"schema": 99, "machines": {}}', '{"schema": 1, "machines": []}', "MACHINE"],
    ids=["not json", "a list", "another schema", "machines not a dict", "times not numbers"],
)
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path, content):
    cache = kernels.KernelCache(tmp_path / "kernels.json")
    key = kernels.machine_key(CPU, torch.float64)
    if content == "MACHINE":  # the right structure around nonsense
        content = json.dumps({"schema": 1, "machines": {key: {"24x16": {"1": {"linear": "fast"}}}}})
    cache.path.write_text(content)
    choices = kernels.plan({"qkv": (24, 16)}, CPU, torch.float64, "auto", cache=cache)
    assert not choices["qkv"].forced
    assert isinstance(json.loads(cache.path.read_text())["machines"][key]["24x16"]["1"]["linear"], float)


def test_a_calibration_on_a_stalling_machine_is_used_but_not_cached(monkeypatch, tmp_path):
    """While the machine cannot run this process's threads together every parallel call waits
    for a scheduler tick: those times are not what the kernels cost another time."""
    monkeypatch.setattr(kernels._StallProbe, "clear", lambda self: False)
    cache = kernels.KernelCache(tmp_path / "kernels.json")
    calibration = kernels.calibrate([(24, 16)], CPU, torch.float64, ["linear", "transposed"], budget_s=0.05)
    assert not calibration.reliable and calibration.times_ms["24x16"]["1"]["linear"] > 0
    choices = kernels.plan({"qkv": (24, 16)}, CPU, torch.float64, "auto", cache=cache)
    assert not choices["qkv"].forced and not cache.path.exists()


def test_the_stall_probe_passes_on_an_idle_thread_team():
    probe = kernels._StallProbe(CPU)
    assert any(probe.clear() for _ in range(20))


@pytest.mark.parametrize("blocked", ["folder", "file"])
def test_an_unwritable_cache_is_not_an_error(monkeypatch, tmp_path, blocked):
    """The plan is made and used, the write fails quietly, and no temporary file is left."""
    monkeypatch.setattr(kernels._StallProbe, "clear", lambda self: True)  # reliable: plan stores it
    (tmp_path / "blocker").write_text("")
    if blocked == "folder":
        path = tmp_path / "blocker" / "sub" / "kernels.json"  # its folder cannot be made
    else:
        path = tmp_path / "kernels.json"
        path.mkdir()  # the rename onto it fails
    cache = kernels.KernelCache(path)
    stored, real_store = [], cache.store

    def store(key, times):
        stored.append(key)
        real_store(key, times)

    monkeypatch.setattr(cache, "store", store)
    choices = kernels.plan({"qkv": (24, 16)}, CPU, torch.float64, "auto", cache=cache)
    assert len(stored) == 1  # the write was tried...
    assert not choices["qkv"].forced and choices["qkv"].expected_ms() > 0  # ...and the measured plan used
    assert cache.lookup(stored[0]) == {}
    left = {"blocker"} if blocked == "folder" else {"blocker", "kernels.json"}
    assert {p.name for p in tmp_path.rglob("*")} == left  # no temporary file


def test_the_cache_lives_in_the_user_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernels.KernelCache().path == tmp_path / "csdrafting" / "kernels.json"


# -- weights held once ---------------------------------------------------------------------------


def storage_ptrs(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if not t.is_mkldnn}


def held_once(model, runner) -> bool:
    """Every parameter of the module shares its storage with a tensor the runner multiplies."""
    runner_tensors = [t for layer in runner.layers for t in layer] + [runner.lm_head, runner.embed, runner.final_norm]
    return storage_ptrs(model.parameters()) <= storage_ptrs(runner_tensors)


@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("tied", [False, True])
def test_a_module_handed_in_stays_a_usable_transformers_module(kernel, tied, tmp_path):
    """Without ``own_weights`` every weight keeps transformers' layout (a forced kernel of another
    layout runs its library's plain-layout kernel): the module's parameters are contiguous views
    of what the runner multiplies, it computes what it did, and it still saves."""
    model = tiny_llama(0, tied=tied, dtype=dtype_of(kernel))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        before = model(ids).logits
    runner = LlamaRunner(model, kernel=kernel)
    assert {c.layout for c in runner.choices.values()} == {"plain"}
    assert held_once(model, runner) and all(p.is_contiguous() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == runner.num_params
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    saved = type(model).from_pretrained(tmp_path, dtype=model.dtype)
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_transposed_weights_leave_the_module_views_of_them(tied):
    model = tiny_llama(0, tied=tied)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        before = model(ids).logits
    runner = LlamaRunner(model, kernel="transposed", own_weights=True)
    assert {c.layout for c in runner.choices.values()} == {"transposed"}
    assert held_once(model, runner)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-12)


@pytest.mark.skipif(not ONEDNN, reason="no oneDNN")
@pytest.mark.parametrize("tied", [False, True])
def test_packed_weights_replace_the_module_weights(tied):
    model = tiny_llama(0, tied=tied, dtype=torch.float32)
    reference = copy_model(model, torch.float32)
    runner = LlamaRunner(model, kernel="packed", own_weights=True)
    layouts = {name: choice.layout for name, choice in runner.choices.items()}
    # a tied table also serves the token lookup, which cannot read packed blocks
    assert layouts == {"qkv": "packed", "o": "packed", "gate_up": "packed", "down": "packed"} | {
        "head": "plain" if tied else "packed"
    }
    released = [p for name, p in model.named_parameters() if p.numel() == 0]
    assert len(released) == 7 * 2 + (0 if tied else 1)  # the projections, the untied head
    with pytest.raises(RuntimeError, match="packed into csdrafting"):
        model(torch.tensor([PROMPT]))
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(runner.forward(PROMPT, 0, len(PROMPT)), expected, rtol=0, atol=1e-4)


def test_kernel_report_names_every_weight():
    runner = LlamaRunner(tiny_llama(0), kernel="transposed", own_weights=True)
    report = runner.kernel_report()
    assert [row["weight"] for row in report] == ["qkv", "o", "gate_up", "down", "head"]
    assert report[0]["shape"] == [48 + 2 * 24, 48] and report[0]["layout"] == "transposed"
    assert report[0]["forced"] and report[0]["expected_ms"] is None
    assert report[0]["kernels"] == dict.fromkeys(kernels.BUCKETS, "transposed")
